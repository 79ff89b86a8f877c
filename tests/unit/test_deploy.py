"""deploy/: the systemd unit, the container image recipe, the Kubernetes manifests, the configs.

Tools that may be missing (systemd-analyze, kubernetes-validate, kubectl) make their test skip
with the reason; the structural checks with plain YAML always run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from cgguard.attribution import attribute
from cgguard.config import Config, ConfigError, build, parse_listen

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "cgguard.service"
SYSTEMD_CONFIG = DEPLOY / "systemd" / "config.yaml"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
K8S = DEPLOY / "kubernetes"

# What the agent needs, everywhere (README.md ("Deploying") explains each). Under systemd,
# OOMScoreAdjust= is applied by systemd, so SYS_RESOURCE is not granted there.
CAPS = {"DAC_OVERRIDE", "NET_ADMIN", "KILL", "SYS_NICE", "SYS_RESOURCE"}
UNIT_CAPS = {"DAC_OVERRIDE", "NET_ADMIN", "KILL", "SYS_NICE"}

CID = "3f1c9a0e" * 8
UID_ = "6b5a7f8e_1c2d_4e3f_9a0b_1c2d3e4f5a6b"


def skip(reason: str) -> None:
    print(f"SKIP: {reason}")
    pytest.skip(reason)


# -- systemd ---------------------------------------------------------------------------------
def parse_unit(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (all sections; repeated keys accumulate)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, val = line.partition("=")
        out.setdefault(key.strip(), []).append(val.strip())
    return out


def unit_for_verify(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart binary exists here (verify checks it is executable)."""
    candidates = [shutil.which("cgguard"), os.path.join(sys.prefix, "bin", "cgguard"), "/usr/local/bin/cgguard"]
    exe = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if exe is None:
        # Not installed (an editable checkout): a stand-in that runs the package the same way.
        stub = tmp_path / "bin" / "cgguard"
        stub.parent.mkdir()
        stub.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m cgguard \"$@\"\n")
        stub.chmod(0o755)
        exe = str(stub)
    text = UNIT.read_text()
    assert re.search(r"^ExecStart=/usr/local/bin/cgguard run --config /etc/cgguard/config.yaml$", text, re.M)
    text = text.replace("ExecStart=/usr/local/bin/cgguard ", f"ExecStart={exe} ")
    out = tmp_path / "cgguard.service"
    out.write_text(text)
    return out


def test_unit_settings() -> None:
    u = parse_unit(UNIT.read_text())
    one = {k: v[-1] for k, v in u.items()}
    assert one["Type"] == "notify"
    assert one["OOMScoreAdjust"] == "-1000"
    assert one["Restart"] == "always" and one["RestartSec"] == "1"
    assert one["Delegate"] == "no"
    assert int(one["Nice"]) < 0
    assert one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict"
    assert "/sys/fs/cgroup" in one["ReadWritePaths"].split()
    assert one["StateDirectory"] == "cgguard" and one["RuntimeDirectory"] == "cgguard"
    assert one["ProtectHome"] == "yes" and one["PrivateTmp"] == "yes"
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert {c.removeprefix("CAP_") for c in one["CapabilityBoundingSet"].split()} == UNIT_CAPS
    # options that would break the agent (README.md ("Deploying") says why for each)
    for key in ("PrivateNetwork", "PrivatePIDs", "PrivateUsers", "ProtectControlGroups", "ProtectKernelTunables",
                "ProcSubset", "IPAddressDeny", "WatchdogSec", "User", "DynamicUser", "RestrictRealtime",
                "CPUSchedulingPolicy"):
        assert key not in u, key
    assert one.get("ProtectProc", "default") == "default"
    # paths the unit gives the agent agree with the config defaults
    cfg = Config()
    assert cfg.state_dir == "/var/lib/cgguard" and os.path.dirname(cfg.control_socket) == "/run/cgguard"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        skip("systemd-analyze not installed")
    unit = unit_for_verify(tmp_path)
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    out = (r.stdout + r.stderr).strip()
    # verify exits 0 on unknown keys and bad values, only warning: any output is a finding.
    assert r.returncode == 0 and not out, out


def test_systemd_analyze_verify_catches_mistakes(tmp_path: Path) -> None:
    """The verify test above could pass vacuously; show that it sees a typo and a bad value."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        skip("systemd-analyze not installed")
    unit = unit_for_verify(tmp_path)
    unit.write_text(unit.read_text().replace("OOMScoreAdjust=-1000", "OOMScoreAdjust=-5000\nPrivateNetwrk=yes"))
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert "PrivateNetwrk" in out and "OOM" in out, out


def test_systemd_analyze_security(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        skip("systemd-analyze not installed")
    unit = unit_for_verify(tmp_path)
    r = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True, timeout=120)
    if "--offline" in r.stderr and "unrecognized" in r.stderr:
        skip("this systemd-analyze has no --offline (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    # 10 is "UNSAFE"; the unit is at 3.1. Removing hardening must be a conscious change here.
    assert float(m.group(1)) <= 3.5, r.stdout


# -- configs ---------------------------------------------------------------------------------
def k8s_docs() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        out[f.name] = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
    return out


def one(kind: str) -> dict[str, Any]:
    found = [d for docs in k8s_docs().values() for d in docs if d.get("kind") == kind]
    assert len(found) == 1, (kind, len(found))
    return found[0]


def configmap_config() -> Config:
    cm = one("ConfigMap")
    return build(yaml.safe_load(cm["data"]["config.yaml"]), source="configmap.yaml")


def test_configs_validate() -> None:
    sd = build(yaml.safe_load(SYSTEMD_CONFIG.read_text()), source=str(SYSTEMD_CONFIG))
    k8s = configmap_config()
    assert sd.watch and k8s.watch
    # the validation is not vacuous: the same files with a typo are refused
    for text in (SYSTEMD_CONFIG.read_text(), one("ConfigMap")["data"]["config.yaml"]):
        data = yaml.safe_load(text)
        data["aggergates"] = data.pop("aggregates")
        with pytest.raises(ConfigError, match="aggergates"):
            build(data)


def _acts_on(cfg: Config, path: str) -> bool:
    return cfg.refusal(path) is None


def test_systemd_config_scope() -> None:
    cfg = build(yaml.safe_load(SYSTEMD_CONFIG.read_text()))
    acted = [
        "user.slice/user-1000.slice/session-3.scope",
        "user.slice/user-1000.slice/user@1000.service/app.slice/foo.service",
        f"user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope",
        "system.slice/nginx.service",
    ]
    spared = [
        "user.slice",
        "user.slice/user-1000.slice",
        "user.slice/user-1000.slice/user@1000.service",
        "system.slice/cgguard.service",
        "system.slice/systemd-journald.service",
        "system.slice/systemd-logind.service",
        "system.slice/ssh.service",
        "system.slice/dbus.service",
        "system.slice",
        "init.scope",
    ]
    for p in acted:
        assert _acts_on(cfg, p), p
    for p in spared:
        assert not _acts_on(cfg, p), p
    assert cfg.listen.startswith("127.0.0.1:")  # a plain host: loopback only


def test_kubernetes_config_scope() -> None:
    cfg = configmap_config()
    pod_sd = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
    pod_fs = "kubepods/besteffort/pod6b5a7f8e-1c2d-4e3f-9a0b-1c2d3e4f5a6b"
    containers = [f"{pod_sd}/cri-containerd-{CID}.scope", f"kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope",
                  f"{pod_fs}/{CID}", f"kubepods/pod6b5a7f8e-1c2d-4e3f-9a0b-1c2d3e4f5a6b/{CID}"]
    levels = ["kubepods.slice", "kubepods.slice/kubepods-burstable.slice", pod_sd, f"kubepods.slice/kubepods-pod{UID_}.slice",
              "kubepods", "kubepods/besteffort", pod_fs]
    for p in containers:
        assert attribute(p).container_id == CID
        assert _acts_on(cfg, p), p
    for p in levels:
        assert attribute(p).container_id is None
        assert not _acts_on(cfg, p), p
    assert not _acts_on(cfg, "system.slice/kubelet.service")


# -- container -------------------------------------------------------------------------------
def containerfile_stages(text: str) -> list[dict[str, Any]]:
    """Instructions per stage: [{'from': ..., 'name': ..., 'ins': [(INSTR, args), ...]}]."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line:
            continue
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), " ".join(rest.split())
        if instr == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k] = v
            continue
        if instr == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"from": image, "name": name, "ins": []})
            continue
        assert stages, f"{instr} before FROM"
        stages[-1]["ins"].append((instr, rest))
    return stages


def test_containerfile() -> None:
    stages = containerfile_stages(CONTAINERFILE.read_text())
    assert len(stages) == 2
    builder, runtime = stages
    assert builder["name"] == "builder"
    assert builder["from"] == runtime["from"] == "python:3.11-slim"

    b_runs = [a for i, a in builder["ins"] if i == "RUN"]
    assert any(re.search(r"\bpip wheel\b.*--wheel-dir /wheels\b.* \.$", r) for r in b_runs), b_runs
    b_copies = [a.split() for i, a in builder["ins"] if i == "COPY"]
    for args in b_copies:
        for src in args[:-1]:
            if src.startswith("--"):
                continue
            if src == "README.md" and not (REPO / src).exists():
                # pyproject declares readme = "README.md": the image build needs the file.
                warnings.warn("README.md is missing: pyproject.toml and the Containerfile need it", stacklevel=2)
                continue
            assert (REPO / src).exists(), src
    assert any("cgguard" in a[:-1] for a in b_copies) and any("pyproject.toml" in a for a in b_copies)

    r_ins = runtime["ins"]
    r_text = "\n".join(f"{i} {a}" for i, a in r_ins)
    # the wheels come from the builder stage, by bind mount or copy
    assert re.search(r"(RUN --mount=type=bind,from=builder,source=/wheels|COPY --from=builder /wheels)", r_text), r_text
    installs = [a for i, a in r_ins if i == "RUN" and "pip install" in a]
    assert len(installs) == 1
    install = installs[0]
    assert "--no-index" in install and "--find-links=/wheels" in install and install.endswith(" cgguard")
    assert not re.search(r"(\s-e\s|--editable)", install)
    # nothing to build with in the runtime image, and no source tree
    assert not re.search(r"\b(apt-get|apk|gcc|build-essential|git)\b", r_text)
    assert not re.search(r"^COPY \. ", r_text, re.M) and "COPY cgguard" not in r_text
    for i, a in r_ins:
        if i == "COPY" and not a.startswith("--from"):
            assert (REPO / a.split()[0]).exists(), a

    entry = [json.loads(a) for i, a in r_ins if i == "ENTRYPOINT"]
    cmd = [json.loads(a) for i, a in r_ins if i == "CMD"]
    assert entry == [["cgguard"]]
    assert cmd == [["run", "--config", "/etc/cgguard/config.yaml"]]
    # the health check probes the port the baked-in config listens on
    baked = build(yaml.safe_load(SYSTEMD_CONFIG.read_text()))
    health = next(a for i, a in r_ins if i == "HEALTHCHECK")
    assert f"127.0.0.1:{parse_listen(baked.listen)[1]}/healthz" in health


def test_container_readme_flags() -> None:
    text = (DEPLOY / "container" / "README.md").read_text()
    block = text.split("```sh", 2)[2].split("```", 1)[0]  # the docker run example
    for flag in ("--pid=host", "--network=host", "--cgroupns=host", "-v /sys/fs/cgroup:/sys/fs/cgroup:rw",
                 "-v /var/lib/cgguard:/var/lib/cgguard", "--cap-drop=ALL"):
        assert flag in block, flag
    assert set(re.findall(r"--cap-add=(\w+)", block)) == CAPS
    assert "--privileged" not in block
    for flag in ("--pid=host", "--network=host", "--cgroupns=host", "--cap-add=NET_ADMIN", "--cap-add=DAC_OVERRIDE"):
        assert f"`{flag}`" in text, f"{flag} is not explained"


def test_wheel_builds_with_console_script(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    if (REPO / "README.md").exists():
        shutil.copy(REPO / "README.md", src)
    else:
        warnings.warn("README.md is missing: pyproject.toml declares it; building with a placeholder", stacklevel=2)
        (src / "README.md").write_text("cgguard\n")
    shutil.copytree(REPO / "cgguard", src / "cgguard", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--wheel-dir", str(out), str(src)]
    # Offline when the build backend is at hand (setuptools + wheel); else pip fetches it.
    offline = importlib.util.find_spec("wheel") is not None and importlib.util.find_spec("setuptools") is not None
    if offline:
        cmd.insert(4, "--no-build-isolation")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if r.returncode != 0 and not offline and re.search(r"(No matching distribution|Could not find a version|connection)", r.stdout + r.stderr, re.I):
        skip(f"cannot fetch the build backend: {(r.stdout + r.stderr).strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("cgguard-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        for mod in ("__init__", "__main__", "config", "kernel/cgroupfs", "attribution", "sinks/metrics", "sinks/http", "agent/__init__"):
            assert f"cgguard/{mod}.py" in names, mod
        assert "cgguard/py.typed" in names
        assert not any(n.startswith(("tests/", "deploy/")) for n in names)
        ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry = z.read(ep).decode()
        assert re.search(r"^\[console_scripts\]\s*\ncgguard\s*=\s*cgguard\.cli:main\s*$", entry, re.M), entry
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        for dep in ("pyroute2", "pydantic", "psutil", "PyYAML", "inotify_simple"):
            assert re.search(rf"^Requires-Dist: {dep}\b(?!.*extra)", meta, re.M | re.I), dep
        # Only the tests need the reference exposition library; the agent writes its own.
        assert re.search(r"^Requires-Dist: prometheus-client.*extra == .test.", meta, re.M | re.I)


# -- Kubernetes ------------------------------------------------------------------------------
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def test_kustomization_lists_every_file() -> None:
    k = kustomization()
    listed = k["resources"]
    files = sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")
    assert sorted(listed) == sorted(set(listed)), "listed twice"
    for name in listed:
        assert (K8S / name).is_file(), name
    # The one exception, on purpose: a PodMonitor fails to apply without the operator's CRDs.
    assert set(files) - set(listed) == {"podmonitor.yaml"}
    assert [d["kind"] for d in k8s_docs()["podmonitor.yaml"]] == ["PodMonitor"]
    assert not list(K8S.glob("*.yml")), "use .yaml"


def test_manifests_structure() -> None:
    docs = k8s_docs()
    ns = one("Namespace")["metadata"]["name"]
    assert kustomization()["namespace"] == ns
    assert ns != "default"
    assert one("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for name, items in docs.items():
        if name == "kustomization.yaml":
            continue
        for d in items:
            assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), name
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == ns, name
    kinds = [d["kind"] for n, items in docs.items() if n != "kustomization.yaml" for d in items]
    # Least privilege: no API access at all, so no RBAC objects.
    assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & set(kinds)

    sa = one("ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    ds = one("DaemonSet")
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0  # hostNetwork: one per node

    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc.get("privileged", False) is False
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == CAPS
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"

    res = c["resources"]
    assert _millicores(res["requests"]["cpu"]) >= 100
    assert "cpu" not in res.get("limits", {})  # throttling would slow the agent under a bomb
    assert _bytes(res["limits"]["memory"]) <= 512 * 2**20
    assert _bytes(res["requests"]["memory"]) <= _bytes(res["limits"]["memory"])

    # probes, port and the ConfigMap's listen address agree
    cfg = configmap_config()
    host, port = parse_listen(cfg.listen)
    assert host == "0.0.0.0"  # probes come to the node IP
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert ports[c[probe]["httpGet"]["port"]] == port

    # mounts agree with the config
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    cg = next(n for n, v in vols.items() if v.get("hostPath", {}).get("path") == "/sys/fs/cgroup")
    assert mounts[cg]["mountPath"] == cfg.cgroup_root
    assert not mounts[cg].get("readOnly", False)
    conf = next(n for n, v in vols.items() if "configMap" in v)
    assert vols[conf]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    config_arg = c["args"][c["args"].index("--config") + 1]
    assert os.path.dirname(config_arg) == mounts[conf]["mountPath"]
    assert env["CGGUARD_CONFIG"]["value"] == config_arg
    paths = {m["mountPath"] for m in c["volumeMounts"]}
    assert cfg.state_dir in paths and os.path.dirname(cfg.control_socket) in paths
    assert c["image"].split(":")[0] in {i["name"] for i in kustomization()["images"]}

    svc = one("Service")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= labels.items()
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])


def _millicores(v: str | int) -> float:
    s = str(v)
    return float(s[:-1]) if s.endswith("m") else float(s) * 1000


def _bytes(v: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for u, f in units.items():
        if v.endswith(u):
            return int(v[: -len(u)]) * f
    return int(v)


# A structural subset of the Prometheus Operator's PodMonitor CRD (monitoring.coreos.com/v1):
# unknown keys at the levels used here are errors, as they would be in a strict apply.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector"],
            "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "podMetricsEndpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "portNumber": {"type": "integer"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                        "targetLabel": {"type": "string"},
                                        "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop",
                                                            "labelmap", "LabelMap", "labeldrop", "LabelDrop",
                                                            "labelkeep", "LabelKeep", "hashmod", "HashMod"]},
                                        "regex": {"type": "string"},
                                        "replacement": {"type": "string"},
                                        "separator": {"type": "string"},
                                        "modulus": {"type": "integer"},
                                    },
                                },
                            },
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def test_podmonitor_schema() -> None:
    try:
        import jsonschema
    except ImportError:
        skip("jsonschema not installed (it comes with kubernetes-validate)")
    pm = one("PodMonitor")
    jsonschema.validate(pm, PODMONITOR_SCHEMA)
    bad = json.loads(json.dumps(pm))
    bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, PODMONITOR_SCHEMA)


def test_podmonitor_matches_the_daemonset() -> None:
    pm = one("PodMonitor")
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert re.fullmatch(_DURATION, pm["spec"]["podMetricsEndpoints"][0]["interval"])
    pod = one("DaemonSet")["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    port_names = {p["name"] for p in c["ports"]}
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert ep["port"] in port_names and ep["path"] == "/metrics"
    assert pm["metadata"]["namespace"] == one("Namespace")["metadata"]["name"]


def _validator():
    try:
        import kubernetes_validate
        from kubernetes_validate import utils
    except ImportError:
        skip("kubernetes-validate not installed (pip install kubernetes-validate): schema checks skipped")
    versions = sorted(utils.all_versions(), key=lambda v: tuple(int(x) for x in v.split(".")))
    return kubernetes_validate, versions


def test_manifests_against_kubernetes_schemas() -> None:
    kv, versions = _validator()
    # The oldest and the newest schema the package ships: maxSurge on a DaemonSet, for one,
    # exists only from 1.25 on.
    targets = [versions[0], versions[-1]]
    checked = 0
    for name, items in k8s_docs().items():
        if name in ("kustomization.yaml", "podmonitor.yaml"):
            continue  # no core schema: checked structurally above
        for d in items:
            for v in targets:
                kv.validate(d, v, strict=True)
                checked += 1
    assert checked >= 2 * 5
    # and the validation bites: a misspelt field of the DaemonSet is rejected
    ds = json.loads(json.dumps(one("DaemonSet")))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = False
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, versions[-1], strict=True)


def test_kustomize_build() -> None:
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kustomize:
        cmd = [kustomize, "build", str(K8S)]
    elif kubectl:
        cmd = [kubectl, "kustomize", str(K8S)]
    else:
        skip("neither kustomize nor kubectl installed")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        skip(f"{cmd[0]} did not run: {e}")
    assert r.returncode == 0, r.stderr
    built = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = sorted(d["kind"] for d in built)
    assert kinds == sorted(["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service"])
    for d in built:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cgguard"
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "cgguard"
    ds = next(d for d in built if d["kind"] == "DaemonSet")
    img = kustomization()["images"][0]
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == f"{img['newName']}:{img['newTag']}"
    try:
        kv, versions = _validator()
    except pytest.skip.Exception:
        return
    for d in built:
        kv.validate(d, versions[-1], strict=True)
