"""deploy/prometheus (alerting rules, their promtool tests, the PrometheusRule) and
deploy/grafana (the dashboard): valid, identical where they must be, tested both ways, and
written only against metrics the agent exports.

promtool runs where installed (CI installs it); without it those tests skip with the reason.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cgguard.attribution import attribute
from cgguard.sinks.http import serve
from cgguard.sinks.metrics import (
    ACTIONS,
    METRICS,
    NOT_REMOVED_REASONS,
    RESULTS,
    SINK_RESULTS,
    Metrics,
)
from cgguard.state.status import (
    CgroupStatus,
    ConnectorStatus,
    IncidentsStatus,
    Status,
    StatusBoard,
    TrackingStatus,
)

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
RULES = PROM / "cgguard-rules.yaml"
PROMETHEUSRULE = PROM / "prometheusrule.yaml"
PROM_TESTS = PROM / "tests"
DASHBOARD = REPO / "deploy" / "grafana" / "cgguard-dashboard.json"
K8S = REPO / "deploy" / "kubernetes"

SEVERITIES = {"info", "warning", "critical"}
# Labels a scrape adds: job and instance always; the PodMonitor's relabeling adds node, the
# Prometheus Operator namespace, pod, container and endpoint.
TARGET_LABELS = {"job", "instance", "node", "namespace", "pod", "container", "endpoint"}


def skip(reason: str) -> None:
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def promtool() -> str:
    tool = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").is_file() else None)
    if tool is None:
        skip("promtool not installed (Debian/Ubuntu: apt-get install prometheus): promtool checks skipped")
    return tool


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=cwd)


def load_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def load_prometheusrule() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(PROMETHEUSRULE.read_text()) if d is not None]
    assert len(docs) == 1
    return docs[0]


def alerts(groups: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    g = groups or load_rules()
    return [r for grp in g["groups"] for r in grp["rules"] if "alert" in r]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


# -- PromQL metric names -----------------------------------------------------------------------
# Words that are neither functions (those are followed by "(") nor metrics.
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "inf", "nan"}
_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
_GRAFANA_VAR = r"\$\{?\w+(?::\w+)?\}?"
_LABEL_LIST = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers that are not functions (followed by
    "("), keywords, label names (in {...}, by/on/... lists), durations or numbers."""
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    s = re.sub(_STRING, '""', expr)
    s = re.sub(_GRAFANA_VAR, "1", s)
    s = re.sub(r"\{[^}]*\}", "{}", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "[]", s)  # ranges, subqueries
    s = re.sub(_LABEL_LIST, " ", s)  # keyword and its label list: "group by (job) (x)" -> "group  (x)"
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?!\s*\()(?![\w:])", s):
        word = m.group(1)
        if word.lower() not in _KEYWORDS:
            names.add(word)
    return names


def selectors(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value), ...]) for every metric{matchers} in the expression."""
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\s*\{((?:" + _STRING + r"|[^}\"'`])*)\}", expr):
        matchers = re.findall(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', m.group(2))
        yield m.group(1), matchers


def grouping_labels(expr: str) -> set[str]:
    s = re.sub(_STRING, '""', expr)
    out: set[str] = set()
    for lst in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s):
        out |= {x.strip() for x in lst.split(",") if x.strip()}
    return out


_SPECS = {m.name: m for m in METRICS}


def exposed() -> dict[str, tuple[str, ...]]:
    """Every series name a scrape of the agent can hold -> its labels (histograms with le)."""
    out: dict[str, tuple[str, ...]] = {"up": ()}
    for m in METRICS:
        if m.type == "histogram":
            out[m.name + "_bucket"] = (*m.labels, "le")
            out[m.name + "_sum"] = m.labels
            out[m.name + "_count"] = m.labels
        else:
            out[m.name] = m.labels  # counters are listed with their _total
    return out


# Closed vocabularies of label values, from cgguard.sinks.metrics.
VOCAB: dict[tuple[str, str], set[str]] = {
    ("cgguard_incidents_total", "action"): set(ACTIONS),
    ("cgguard_incidents_total", "result"): set(RESULTS),
    ("cgguard_incidents_not_removed_total", "reason"): set(NOT_REMOVED_REASONS),
    **{(name, "result"): set(results) for name, results in SINK_RESULTS.values()},
}


def check_expr(expr: str, where: str) -> set[str]:
    """Assert the expression reads only exported metrics, with their labels and values."""
    known = exposed()
    names = metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    unknown = names - set(known)
    assert not unknown, f"{where}: {sorted(unknown)} not in cgguard.sinks.metrics.METRICS: {expr!r}"
    for metric, matchers in selectors(expr):
        for label, op, value in matchers:
            assert label in set(known[metric]) | TARGET_LABELS, f"{where}: {metric} has no label {label!r}"
            vocab = VOCAB.get((metric, label))
            if vocab and op in ("=", "=~") and re.fullmatch(r"[\w-]+(\|[\w-]+)*", value):
                bad = set(value.split("|")) - vocab
                assert not bad, f"{where}: {metric}{{{label}}} is never {sorted(bad)} (values: {sorted(vocab)})"
    labels = set().union(*(known[n] for n in names)) | TARGET_LABELS | {"le"}
    stray = grouping_labels(expr) - labels
    assert not stray, f"{where}: grouping by {sorted(stray)}, a label none of {sorted(names)} has"
    return names


def test_metric_name_parser() -> None:
    assert metric_names('sum by (le) (rate(foo_bucket{a="b{c}", d=~"x|y"}[5m]))') == {"foo_bucket"}
    assert metric_names("up == 0 and on (job) group by (job) (cgguard_build_info)") == {"up", "cgguard_build_info"}
    assert metric_names("a / on(x) group_left(y) b offset 5m > bool 1e-3") == {"a", "b"}
    assert metric_names("sum(x) without (instance) or vector(0)") == {"x"}
    assert metric_names('topk($top, m{instance=~"$instance"}) - n[${__range}:1m]') == {"m", "n"}
    assert metric_names('{__name__="named_by_matcher"}') == {"named_by_matcher"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[$__rate_interval])))") == {"h_bucket"}
    assert metric_names("-x_total*2+Inf") == {"x_total"}
    # and the checks built on it bite
    with pytest.raises(AssertionError, match="cgguard_incidents_removed_total"):
        check_expr("increase(cgguard_incidents_removed_total[10m]) > 0", "typo")
    with pytest.raises(AssertionError, match="cgguard_detection_latency_seconds"):
        check_expr("rate(cgguard_detection_latency_seconds[5m])", "histogram without suffix")
    with pytest.raises(AssertionError, match="timedout"):
        check_expr('increase(cgguard_incidents_total{result=~"failed|timedout"}[10m])', "value typo")
    with pytest.raises(AssertionError, match="no label 'reason'"):
        check_expr('cgguard_incidents_total{reason="budget"}', "label of another metric")
    with pytest.raises(AssertionError, match="grouping by"):
        check_expr("sum by (cgroup) (cgguard_incidents_total)", "by a missing label")


# -- the rules files ---------------------------------------------------------------------------
def test_rules_are_complete_and_documented() -> None:
    doc = load_rules()
    assert [g["name"] for g in doc["groups"]] == ["cgguard"]
    rs = alerts(doc)
    names = [r["alert"] for r in rs]
    assert len(names) == len(set(names)), "an alert name twice"
    for r in rs:
        assert r["alert"].startswith("Cgguard"), r["alert"]
        assert r["labels"]["severity"] in SEVERITIES, r["alert"]
        assert {"summary", "description", "runbook"} <= set(r["annotations"]), r["alert"]
    # what operators were promised, by the metric each alert rests on
    rest_on = {r["alert"]: metric_names(r["expr"]) for r in rs}
    for metric in ("cgguard_incidents_not_removed_total", "cgguard_ready", "up", "cgguard_procconn_overflows_total",
                   "cgguard_procconn_events_lost_total", "cgguard_inotify_overflows_total", "cgguard_journal_entries_total",
                   "cgguard_hook_runs_total", "cgguard_webhook_deliveries_total"):
        assert any(metric in ms for ms in rest_on.values()), metric
    by_name = {r["alert"]: r for r in rs}
    assert by_name["CgguardBombRemoved"]["expr"] == 'increase(cgguard_incidents_total{result="removed"}[10m]) > 0'
    assert 'result=~"failed|timeout"' in by_name["CgguardRemovalFailed"]["expr"]
    assert by_name["CgguardAgentAbsent"]["expr"] == "absent(cgguard_build_info)"
    # No alert names a job or aggregates target labels away: they work with any scrape config.
    for r in rs:
        assert "job=" not in r["expr"] and "job!" not in r["expr"], r["alert"]
        assert not re.search(r"\b(sum|max|min|avg|count)\b", r["expr"]), r["alert"]


def test_rules_read_only_exported_metrics() -> None:
    seen: set[str] = set()
    for r in alerts():
        seen |= check_expr(r["expr"], r["alert"])
    assert "cgguard_incidents_total" in seen and "up" in seen


def test_prometheusrule_carries_the_same_rules() -> None:
    pr = load_prometheusrule()
    assert pr["spec"]["groups"] == load_rules()["groups"]
    # and the comparison is not vacuous
    changed = copy.deepcopy(pr["spec"]["groups"])
    changed[0]["rules"][0]["labels"]["severity"] = "critical"
    assert changed != load_rules()["groups"]


# A structural subset of the Prometheus Operator's PrometheusRule CRD (monitoring.coreos.com/v1):
# unknown keys are errors, as they would be in a strict apply.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
PROMETHEUSRULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace", "labels"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "query_offset": {"type": "string", "pattern": _DURATION},
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {"type": "string"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": {"type": "string", "pattern": _DURATION},
                                        "keep_firing_for": {"type": "string", "pattern": _DURATION},
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_prometheusrule_schema() -> None:
    try:
        import jsonschema
    except ImportError:
        skip("jsonschema not installed (it comes with kubernetes-validate)")
    pr = load_prometheusrule()
    jsonschema.validate(pr, PROMETHEUSRULE_SCHEMA)
    meta = pr["metadata"]
    assert meta["namespace"] == "cgguard"  # with the agent (deploy/kubernetes/namespace.yaml)
    ns = yaml.safe_load((K8S / "namespace.yaml").read_text())["metadata"]["name"]
    assert meta["namespace"] == ns
    # what the common Prometheus Operator setups select on (documented in the file's header)
    assert meta["labels"]["prometheus"] == "k8s" and meta["labels"]["role"] == "alert-rules"
    assert meta["labels"]["app.kubernetes.io/name"] == "cgguard"
    for bad_edit in (
        lambda d: d["spec"]["groups"][0]["rules"][0].update({"fro": "5m"}),
        lambda d: d["spec"]["groups"][0]["rules"][0].update({"record": "x"}),  # alert and record
        lambda d: d["spec"]["groups"][0]["rules"][3].update({"for": "5 minutes"}),
        lambda d: d.update({"kind": "PrometheusRules"}),
    ):
        bad = copy.deepcopy(pr)
        bad_edit(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, PROMETHEUSRULE_SCHEMA)


def test_prometheusrule_is_not_in_the_kustomization() -> None:
    # Like podmonitor.yaml: applying it without the operator's CRDs fails, and the agent must
    # deploy anywhere.
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in k.get("resources", []):
        assert "prometheus" not in res.lower(), res
        path = (K8S / res).resolve()
        if path.is_file():
            kinds = {d.get("kind") for d in yaml.safe_load_all(path.read_text()) if d}
            assert "PrometheusRule" not in kinds, res


def test_promtool_check_rules(tmp_path: Path) -> None:
    tool = promtool()
    r = run([tool, "check", "rules", str(RULES)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in r.stdout, r.stdout
    # the PrometheusRule's spec, as the operator hands it to Prometheus
    spec = tmp_path / "from-prometheusrule.yaml"
    spec.write_text(yaml.safe_dump(load_prometheusrule()["spec"]))
    r = run([tool, "check", "rules", str(spec)])
    assert r.returncode == 0, r.stdout + r.stderr
    # and promtool is not vacuous: a broken expression and a broken template are refused
    for broken in ("increase(cgguard_incidents_total[10m] > 0", None):
        doc = load_rules()
        if broken:
            doc["groups"][0]["rules"][0]["expr"] = broken
        else:
            doc["groups"][0]["rules"][0]["annotations"]["summary"] = "{{ $labels.instance "
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(doc))
        r = run([tool, "check", "rules", str(bad)])
        assert r.returncode != 0, r.stdout


def promtool_tests() -> list[Path]:
    files = sorted(PROM_TESTS.glob("*.yaml"))
    assert files
    return files


def test_promtool_unit_tests_cover_every_alert_both_ways() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for f in promtool_tests():
        doc = yaml.safe_load(f.read_text())
        assert doc["rule_files"] == ["../cgguard-rules.yaml"], f
        for t in doc["tests"]:
            for a in t.get("alert_rule_test", []):
                (firing if a.get("exp_alerts") else silent).add(a["alertname"])
    names = {r["alert"] for r in alerts()}
    assert names - firing == set(), "never tested firing"
    assert names - silent == set(), "never tested silent"
    assert (firing | silent) - names == set(), "tests of alerts that do not exist"


def test_promtool_unit_tests() -> None:
    tool = promtool()
    r = run([tool, "test", "rules", *map(str, promtool_tests())])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(promtool_tests()), r.stdout


def _mutated_run(tmp_path: Path, mutate) -> str:
    """promtool's failures with every alert of a copy of the rules changed by ``mutate``."""
    tool = promtool()
    shutil.copytree(PROM_TESTS, tmp_path / "tests")
    doc = load_rules()
    for r in alerts(doc):
        mutate(r)
    (tmp_path / "cgguard-rules.yaml").write_text(yaml.safe_dump(doc))
    r = run([tool, "test", "rules", *sorted(str(p) for p in (tmp_path / "tests").glob("*.yaml"))])
    assert r.returncode != 0, r.stdout
    return r.stdout + r.stderr


def _failed_alerts(out: str) -> set[str]:
    return set(re.findall(r"alertname: (\w+), time:", out))


def test_promtool_unit_tests_catch_an_alert_that_never_fires(tmp_path: Path) -> None:
    out = _mutated_run(tmp_path, lambda r: r.update(expr="vector(1) < 0"))
    assert _failed_alerts(out) == {r["alert"] for r in alerts()}, out


def test_promtool_unit_tests_catch_an_alert_that_always_fires(tmp_path: Path) -> None:
    def always(r: dict[str, Any]) -> None:
        r["expr"] = "vector(1)"
        r.pop("for", None)

    out = _mutated_run(tmp_path, always)
    assert _failed_alerts(out) == {r["alert"] for r in alerts()}, out


def test_promtool_unit_tests_catch_a_shorter_for(tmp_path: Path) -> None:
    # the `for:` windows are tested at their edge: one evaluation less and the tests fail
    def shorter(r: dict[str, Any]) -> None:
        if "for" in r:
            m = re.fullmatch(r"(\d+)([mh])", r["for"])
            assert m, r["for"]
            minutes = int(m.group(1)) * (60 if m.group(2) == "h" else 1)
            r["for"] = f"{minutes - 1}m"

    out = _mutated_run(tmp_path, shorter)
    assert _failed_alerts(out) == {r["alert"] for r in alerts() if "for" in r}, out


# -- a real scrape of the agent's metrics, through the rules -----------------------------------
POD = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6b5a7f8e_1c2d_4e3f_9a0b_1c2d3e4f5a6b.slice/cri-containerd-" + "3f1c9a0e" * 8 + ".scope"


def agent_status(ready: bool, not_removed: dict[str, int], sinks: dict[str, dict[str, int]], n_extra: int = 60) -> Status:
    cgroups = [CgroupStatus(path=POD, tasks=400, source="pids.current", pids_max=512, state="active",
                            workload=attribute(POD).to_dict())]
    cgroups += [CgroupStatus(path=f"system.slice/s{i:03d}.service", tasks=1 + i % 7, state="calm") for i in range(n_extra)]
    return Status(
        ready=ready, cgroup_root="/sys/fs/cgroup", cgroups=cgroups, watched=len(cgroups), by_state={"calm": n_extra, "active": 1},
        connector=ConnectorStatus(mode="event-filter", received=1000, lost_estimate=0, overflows=0, rescans=0),
        tracking=TrackingStatus(enabled=True, reset_interval_ms=30000, records=10, live=9, placeholders=1),
        incidents=IncidentsStatus(since_start=sum(not_removed.values()), recorded=0, not_removed=not_removed),
        sinks=sinks,
    )


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Series:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Series = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _series_text(name: str, labels: dict[str, str]) -> str:
    esc = ",".join(f'{k}="' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for k, v in sorted(labels.items()))
    return f"{name}{{{esc}}}"


def scrapes_to_input_series(scrapes: list[tuple[Series, int]], target: dict[str, str]) -> list[dict[str, str]]:
    """promtool input_series from real scrapes: each scrape's values held for its number of
    intervals, with the target labels a scrape adds, and up = 1. A series missing from a scrape
    is absent ('_') there."""
    keys = sorted({k for s, _ in scrapes for k in s})
    out = []
    for name, labels in keys:
        parts = []
        for s, n in scrapes:
            v = s.get((name, labels))
            parts.append(f"_x{n - 1}" if v is None else (f"{v!r}x{n - 1}" if n > 1 else repr(v)))
        out.append({"series": _series_text(name, {**dict(labels), **target}), "values": " ".join(parts)})
    out.append({"series": _series_text("up", target), "values": f"1x{sum(n for _, n in scrapes)}"})
    return out


def test_a_real_scrape_fires_the_alerts(tmp_path: Path) -> None:
    """The agent's metrics as its HTTP endpoint serves them, before and after incidents, fed to
    the rules: the alerts fire with the labels the agent really exports. (Only promtool's
    clock is simulated: 6 minutes of the first scrape, then 20 of the second.)"""
    tool = promtool()
    board = StatusBoard()
    sinks0 = {"journal": {"sent": 3}, "hooks": {"ok": 2}, "webhook": {"delivered": 2}}
    board.publish(agent_status(True, {}, sinks0), float("inf"))
    metrics = Metrics(board)
    srv = serve("127.0.0.1:0", lambda: True, metrics)
    try:
        before = scrape(srv.url)
        # a bomb removed, a lineage kill that timed out, a runaway left running (budget), and
        # each sink failing once; the agent also stops being ready
        metrics.count("kill-cgroup", "removed", 40.0, 12.0, attribute(POD).to_dict())
        metrics.count("kill-lineage", "timeout", 30.0, 5000.0, None)
        sinks1 = {"journal": {"sent": 5, "failed": 1}, "hooks": {"ok": 3, "timeout": 1}, "webhook": {"delivered": 2, "failed": 1}}
        board.publish(agent_status(False, {"budget": 1, "failed": 1}, sinks1), float("inf"))
        after = scrape(srv.url)
    finally:
        srv.close()
    instance = f"127.0.0.1:{srv.port}"
    target = {"job": "cgguard", "instance": instance}
    assert ("cgguard_incidents_total", (("action", "kill-cgroup"), ("result", "removed"))) in before  # pre-initialised

    def firing(*alerts_: dict[str, str]) -> list[dict[str, Any]]:
        out = []
        for a in alerts_:
            out.append({"labels": _series_text("ALERTS", {"alertstate": "firing", **target, **a}), "value": 1})
        return out

    sev = {r["alert"]: r["labels"]["severity"] for r in alerts()}

    def alert(name: str, **labels: str) -> dict[str, str]:
        return {"alertname": name, "severity": sev[name], **labels}

    at_once = [
        alert("CgguardBombRemoved", action="kill-cgroup", result="removed"),
        alert("CgguardRemovalFailed", action="kill-lineage", result="timeout"),
        alert("CgguardRunawayNotRemoved", reason="budget"),
        alert("CgguardRunawayNotRemoved", reason="failed"),
        alert("CgguardJournalFailing", result="failed"),
        alert("CgguardHookFailing", result="timeout"),
        alert("CgguardWebhookFailing", result="failed"),
    ]
    # the dashboard's pids.max headroom, on the same data: 512 - 400 for the one cgroup with a limit
    pod_labels = dict(next(lbl for (n, lbl) in after if n == "cgguard_cgroup_pids_max"))
    headroom = {"labels": _series_text("", {**pod_labels, **target}), "value": 112}
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": scrapes_to_input_series([(before, 6), (after, 20)], target),
            "promql_expr_test": [
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "5m", "exp_samples": []},
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "6m", "exp_samples": firing(*at_once)},
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "11m",
                 "exp_samples": firing(*at_once, alert("CgguardNotReady"))},
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "20m", "exp_samples": firing(alert("CgguardNotReady"))},
                {"expr": dashboard_expr("pids.max headroom"), "eval_time": "10m", "exp_samples": [headroom]},
            ],
        }],
    }
    f = tmp_path / "scrape-test.yaml"
    f.write_text(yaml.safe_dump(test, sort_keys=False))
    r = run([tool, "test", "rules", str(f)])
    assert r.returncode == 0, r.stdout + r.stderr


# -- the Grafana dashboard ---------------------------------------------------------------------
def dashboard_exprs(d: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(where, expr) of every PromQL query: panel targets and annotations."""
    d = d or load_dashboard()
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p.get('title')!r} {t.get('refId')}", t.get("expr", "")))
    for a in d.get("annotations", {}).get("list", []):
        if "expr" in a:
            out.append((f"annotation {a['name']!r}", a["expr"]))
    return out


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Grafana would send it, with example values for the variables."""
    values = {"__rate_interval": "2m", "__interval": "1m", "__range": "1h", "top": "10"}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), ".*"), expr)


def dashboard_expr(title_part: str) -> str:
    (expr,) = [grafana_to_promql(t["expr"]) for p in load_dashboard()["panels"] if title_part in p.get("title", "")
               for t in p["targets"]]
    return expr


def test_dashboard_reads_only_exported_metrics() -> None:
    d = load_dashboard()
    seen: set[str] = set()
    for where, expr in dashboard_exprs(d):
        seen |= check_expr(expr, where)
    for v in d["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((?:([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s*,\s*)?(\w+)\)", q)
        assert m and m.group(1), f"variable {v['name']}: {q!r}"
        check_expr(m.group(1) + (m.group(2) or ""), f"variable {v['name']}")
        assert m.group(3) in set(exposed()[m.group(1)]) | TARGET_LABELS, q
    # every family the brief asked the dashboard to show
    for metric in ("cgguard_incidents_total", "cgguard_incidents_not_removed_total", "cgguard_detection_latency_seconds_bucket",
                   "cgguard_removal_latency_seconds_bucket", "cgguard_cgroup_tasks", "cgguard_cgroup_pids_max",
                   "cgguard_agent_cpu_seconds_total", "cgguard_agent_resident_memory_bytes", "cgguard_procconn_overflows_total",
                   "cgguard_procconn_events_lost_total", "cgguard_procconn_rescans_total", "cgguard_inotify_overflows_total",
                   "cgguard_ready", "cgguard_dry_run", "cgguard_journal_entries_total", "cgguard_hook_runs_total",
                   "cgguard_webhook_deliveries_total"):
        assert metric in seen, metric


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard query, with its variables filled in, is valid PromQL for promtool."""
    tool = promtool()
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": grafana_to_promql(e)}
                                                        for i, (_, e) in enumerate(exprs)]}]}
    f = tmp_path / "dashboard-queries.yaml"
    f.write_text(yaml.safe_dump(rules))
    r = run([tool, "check", "rules", str(f)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def check_dashboard(d: dict[str, Any]) -> None:
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert {"instance", "node"} <= set(variables)
    for name in ("job", "node", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"]["uid"] == "${datasource}", name
    uses_ds = {"${datasource}", "$datasource"}
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids not unique"
    for p in panels:
        gp = p["gridPos"]
        assert all(isinstance(gp[k], int) for k in "hwxy"), p["id"]
        assert gp["w"] > 0 and gp["h"] > 0 and gp["x"] >= 0 and gp["y"] >= 0 and gp["x"] + gp["w"] <= 24, p["id"]
        if p["type"] == "row":
            assert not p.get("collapsed") and not p.get("panels"), "rows hold no hidden panels"
            continue
        assert p["datasource"]["uid"] in uses_ds, p["id"]
        assert p.get("targets"), f"panel {p['id']} has no query"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['id']}: empty query"
            assert t["datasource"]["uid"] in uses_ds, p["id"]
            # the variables filter every query
            assert 'instance=~"$instance"' in t["expr"], f"panel {p['id']}: {t['expr']}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["id"]
    for i, a in enumerate(panels):
        for b in panels[i + 1:]:
            assert not _overlap(a["gridPos"], b["gridPos"]), (a["id"], a.get("title"), b["id"], b.get("title"))


def test_dashboard_structure() -> None:
    d = load_dashboard()
    check_dashboard(d)
    assert d["id"] is None  # importable into any Grafana
    titles = " | ".join(p["title"] for p in d["panels"]).lower()
    for words in ("incidents by result", "not removed", "detection latency", "removal latency", "tasks per cgroup",
                  "pids.max headroom", "agent cpu", "resident memory", "proc connector", "inotify", "readiness", "sink"):
        assert words in titles, words
    exprs = {e for _, e in dashboard_exprs(d)}
    for q in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({q}, sum by (le) (rate(cgguard_detection_latency_seconds_bucket" in e for e in exprs), q
        assert any(f"histogram_quantile({q}, sum by (le) (rate(cgguard_removal_latency_seconds_bucket" in e for e in exprs), q
    assert any(e.startswith("topk(") and 'cgroup!="_other"' in e and "cgguard_cgroup_tasks" in e for e in exprs)
    # the checks bite: overlapping panels, a panel without a query, a hard-coded data source
    for edit in (
        lambda b: b["panels"][2]["gridPos"].update(x=b["panels"][1]["gridPos"]["x"], y=b["panels"][1]["gridPos"]["y"]),
        lambda b: b["panels"][2].update(targets=[]),
        lambda b: b["panels"][2]["targets"][0].update(expr=" "),
        lambda b: b["panels"][2].update(datasource={"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}),
        lambda b: b["panels"][3].update(id=b["panels"][2]["id"]),
    ):
        bad = copy.deepcopy(d)
        edit(bad)
        with pytest.raises(AssertionError):
            check_dashboard(bad)
