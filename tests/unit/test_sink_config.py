"""The journal and hooks configuration sections, and build_sinks choosing the sinks from them."""

from __future__ import annotations

import socket

import pytest
from conftest import run_cli

from cgguard.config import ConfigError, build
from cgguard.sinks import build_sinks
from cgguard.sinks.hooks import HookRunner
from cgguard.sinks.journald import JournalSink
from cgguard.sinks.webhook import Webhook


def test_defaults():
    cfg = build({})
    assert cfg.journal.enabled == "auto"
    assert cfg.journal.socket == "/run/systemd/journal/socket"
    h = cfg.hooks
    assert (h.on_incident, h.timeout_ms, h.max_concurrent, h.queue) == ([], 10000, 4, 64)
    w = h.webhook
    assert w.url is None
    assert (w.timeout_ms, w.queue, w.retries, w.backoff_ms, w.max_backoff_ms) == (5000, 256, 5, 500, 30000)


def test_full_sections():
    cfg = build(
        {
            "journal": {"enabled": False, "socket": "/run/other/socket"},
            "hooks": {
                "on_incident": ["logger -t cgguard-hook \"$CGGUARD_CGROUP\"", ["/usr/local/bin/page", "--team", "infra"]],
                "timeout_ms": 2500,
                "max_concurrent": 2,
                "queue": 10,
                "webhook": {"url": "https://alerts.example.com:8443/cgguard?src=node", "retries": 0, "backoff_ms": 100,
                            "max_backoff_ms": 100},
            },
        }
    )
    assert cfg.journal.enabled is False and cfg.journal.socket == "/run/other/socket"
    assert cfg.hooks.on_incident[1] == ["/usr/local/bin/page", "--team", "infra"]
    assert cfg.hooks.webhook.url == "https://alerts.example.com:8443/cgguard?src=node"
    assert cfg.hooks.webhook.retries == 0


@pytest.mark.parametrize("value,want", [("auto", "auto"), ("AUTO", "auto"), (True, True), (False, False),
                                        ("true", True), ("no", False)])
def test_journal_enabled_forms(value, want):
    assert build({"journal": {"enabled": value}}).journal.enabled == want


def test_webhook_null_means_none_and_a_string_is_its_url():
    assert build({"hooks": {"webhook": None}}).hooks.webhook.url is None
    w = build({"hooks": {"webhook": "http://127.0.0.1:9000/x"}}).hooks.webhook
    assert w.url == "http://127.0.0.1:9000/x" and w.retries == 5


@pytest.mark.parametrize(
    "data,key",
    [
        ({"journal": {"enabled": "maybe"}}, "journal.enabled"),
        ({"journal": {"enabled": 1}}, "journal.enabled"),
        ({"journal": {"socket": "run/socket"}}, "journal.socket"),
        ({"journal": {"socket": "/" + "x" * 200}}, "journal.socket"),
        ({"journal": {"sokcet": "/x"}}, "journal.sokcet"),
        ({"hooks": {"timeout_ms": 0}}, "hooks.timeout_ms"),
        ({"hooks": {"timeout_ms": 10**9}}, "hooks.timeout_ms"),
        ({"hooks": {"timeout_ms": float("inf")}}, "hooks.timeout_ms"),
        ({"hooks": {"timeout_ms": float("nan")}}, "hooks.timeout_ms"),
        ({"hooks": {"timeout_ms": 10.5}}, "hooks.timeout_ms"),
        ({"hooks": {"timeout_ms": "soon"}}, "hooks.timeout_ms"),
        ({"hooks": {"max_concurrent": 0}}, "hooks.max_concurrent"),
        ({"hooks": {"max_concurrent": 1000}}, "hooks.max_concurrent"),
        ({"hooks": {"queue": 0}}, "hooks.queue"),
        ({"hooks": {"queue": 10**7}}, "hooks.queue"),
        ({"hooks": {"on_incident": "echo hi"}}, "hooks.on_incident"),
        ({"hooks": {"on_incident": [""]}}, "hooks.on_incident"),
        ({"hooks": {"on_incident": [[]]}}, "hooks.on_incident"),
        ({"hooks": {"on_incident": [["ok", 3]]}}, "hooks.on_incident"),
        ({"hooks": {"on_incident": [{"cmd": "x"}]}}, "hooks.on_incident"),
        ({"hooks": {"on_incident": [["", "x"]]}}, "hooks.on_incident"),
        ({"hooks": {"webhook": {"url": "ftp://example.com/"}}}, "hooks.webhook.url"),
        ({"hooks": {"webhook": {"url": "example.com/hook"}}}, "hooks.webhook.url"),
        ({"hooks": {"webhook": {"url": "http://"}}}, "hooks.webhook.url"),
        ({"hooks": {"webhook": {"url": "http://host:99999/"}}}, "hooks.webhook.url"),
        ({"hooks": {"webhook": {"url": "http://ho st/"}}}, "hooks.webhook.url"),
        ({"hooks": {"webhook": {"timeout_ms": 1000}}}, "hooks.webhook"),
        ({"hooks": {"webhook": {"url": "http://h/", "timeout_ms": 50}}}, "hooks.webhook.timeout_ms"),
        ({"hooks": {"webhook": {"url": "http://h/", "queue": 0}}}, "hooks.webhook.queue"),
        ({"hooks": {"webhook": {"url": "http://h/", "retries": -1}}}, "hooks.webhook.retries"),
        ({"hooks": {"webhook": {"url": "http://h/", "retries": 1000}}}, "hooks.webhook.retries"),
        ({"hooks": {"webhook": {"url": "http://h/", "backoff_ms": 0}}}, "hooks.webhook.backoff_ms"),
        ({"hooks": {"webhook": {"url": "http://h/", "max_backoff_ms": 10**10}}}, "hooks.webhook.max_backoff_ms"),
        ({"hooks": {"webhook": {"url": "http://h/", "backoff_ms": 5000, "max_backoff_ms": 100}}}, "hooks.webhook"),
        ({"hooks": {"webhook": {"url": "http://h/", "headers": {}}}}, "hooks.webhook.headers"),
        ({"hooks": {"webhook": 5}}, "hooks.webhook"),
        ({"hooks": {"webhook": "ftp://h/"}}, "hooks.webhook.url"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        build(data)
    msg = str(e.value)
    assert f"config: {key}:" in msg and "\n" not in msg, msg


def test_check_config_yaml_and_toml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        "watch: ['user.slice/**']\n"
        "journal:\n  enabled: auto\n"
        "hooks:\n"
        "  on_incident:\n"
        "    - 'logger -t cgguard \"$CGGUARD_RESULT $CGGUARD_CGROUP\"'\n"
        "    - [/usr/local/bin/notify, --json]\n"
        "  webhook:\n    url: http://127.0.0.1:9000/incident\n    retries: 3\n"
    )
    r = run_cli("check-config", str(y))
    assert r.returncode == 0, r.stderr
    t = tmp_path / "c.toml"
    t.write_text(
        'watch = ["system.slice/*.service"]\n[journal]\nenabled = false\n'
        '[hooks]\non_incident = [["/bin/true"], "exit 0"]\ntimeout_ms = 3000\n'
        '[hooks.webhook]\nurl = "https://example.com/x"\n'
    )
    r = run_cli("check-config", str(t))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "text,needle",
    [
        ("hooks:\n  timeout_ms: .inf\n", "hooks.timeout_ms"),
        ("hooks:\n  webhook:\n    url: gopher://x\n", "hooks.webhook.url"),
        ("journal:\n  enabled: sometimes\n", "journal.enabled"),
    ],
)
def test_check_config_bad_sink_values_one_line_exit_2(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    r = run_cli("check-config", str(f))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def _close(sinks):
    for s in sinks:
        s.close()


def test_build_sinks_nothing_configured(tmp_path):
    sinks = build_sinks(build({"journal": {"socket": str(tmp_path / "absent.sock")}}))
    assert sinks == []


def test_build_sinks_journal_auto_follows_the_socket(tmp_path):
    path = str(tmp_path / "journal.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    try:
        sinks = build_sinks(build({"journal": {"socket": path}}))
        try:
            assert [type(x) for x in sinks] == [JournalSink] and sinks[0].socket_path == path
            assert sinks[0].name == "journal"
        finally:
            _close(sinks)
        assert build_sinks(build({"journal": {"socket": path, "enabled": False}})) == []
    finally:
        s.close()
    forced = build_sinks(build({"journal": {"socket": str(tmp_path / "absent.sock"), "enabled": True}}))
    try:
        assert [type(x) for x in forced] == [JournalSink]
    finally:
        _close(forced)


def test_build_sinks_hooks_and_webhook(tmp_path):
    cfg = build(
        {
            "journal": {"enabled": False},
            "hooks": {
                "on_incident": ["echo hi", ["/bin/echo", "x"]],
                "timeout_ms": 1500,
                "max_concurrent": 3,
                "queue": 7,
                "webhook": {"url": "http://127.0.0.1:1/x", "timeout_ms": 250, "retries": 2, "backoff_ms": 10,
                            "max_backoff_ms": 40, "queue": 9},
            },
        }
    )
    sinks = build_sinks(cfg)
    try:
        runner, hook = sinks
        assert isinstance(runner, HookRunner) and isinstance(hook, Webhook)
        assert runner.name == "hooks" and hook.name == "webhook"
        assert runner.commands == [["/bin/sh", "-c", "echo hi"], ["/bin/echo", "x"]]
        assert (runner.timeout_s, len(runner._workers), runner.max_queue) == (1.5, 3, 7)
        assert (hook.url, hook.timeout_s, hook.retries, hook.backoff_s, hook.max_backoff_s) == (
            "http://127.0.0.1:1/x", 0.25, 2, 0.01, 0.04)
        assert hook._q.maxsize == 9
        assert set(runner.stats()) == {"ok", "failed", "timeout", "dropped"}
        assert set(hook.stats()) == {"delivered", "failed", "dropped", "retries"}
    finally:
        _close(sinks)
