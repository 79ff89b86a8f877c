"""The Prometheus text exposition and OpenMetrics, written without prometheus_client.

The agent's families are few and fixed, and prometheus_client with what it imports (http.server's
parsers and more) costs the agent 3.2 MiB of RSS. What :func:`encode` writes for a list of
:class:`Metric` families is what prometheus_client writes for the same families, byte for byte
(a test compares the two in both formats), and :func:`negotiate` picks the format for an Accept
header as prometheus_client's ``choose_encoder`` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

# Content types, as prometheus_client names them.
CONTENT_TYPE_LATEST = "text/plain; version=1.0.0; charset=utf-8"
CONTENT_TYPE_PLAIN_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_ESCAPINGS = ("allow-utf-8", "underscores", "dots", "values")


@dataclass(slots=True)
class Metric:
    """One family: ``name`` without the _total of counters (OpenMetrics' family name), and its
    samples as (full sample name, labels, value)."""

    name: str
    type: str  # counter, gauge, histogram
    documentation: str
    samples: list[tuple[str, tuple[tuple[str, str], ...], float]] = field(default_factory=list)
    labels: tuple[str, ...] = ()

    def add_metric(self, values: Iterable[str], value: float) -> None:
        suffix = "_total" if self.type == "counter" else ""
        self.samples.append((self.name + suffix, tuple(zip(self.labels, values)), float(value)))


def go_float(d: float) -> str:
    """A value as Go (and prometheus_client) writes it."""
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(float(d))
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


def _escape(v: str, quote: bool = True) -> str:
    v = v.replace("\\", r"\\").replace("\n", r"\n")
    return v.replace('"', r'\"') if quote else v


def encode(fams: Iterable[Metric], openmetrics: bool) -> bytes:
    """The families in the text format (0.0.4 and 1.0.0 read the same) or OpenMetrics."""
    out: list[str] = []
    for m in fams:
        name = m.name if openmetrics or m.type != "counter" else m.name + "_total"
        out.append(f"# HELP {name} {_escape(m.documentation, quote=openmetrics)}\n")
        out.append(f"# TYPE {name} {m.type}\n")
        for sname, labels, value in m.samples:
            if labels:
                inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels))
                out.append(f"{sname}{{{inner}}} {go_float(value)}\n")
            else:
                out.append(f"{sname} {go_float(value)}\n")
    if openmetrics:
        out.append("# EOF\n")
    return "".join(out).encode("utf-8")


def _accept_tokens(toks: list[str]) -> tuple[str, str]:
    version, escaping = "", "underscores"
    for tok in toks:
        k, eq, v = tok.strip().partition("=")
        if not eq:
            continue
        if k == "version":
            version = v
        elif k == "escaping" and v in _ESCAPINGS:
            escaping = v
    return version, escaping


def _version(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (0,)


def negotiate(accept: str | None) -> tuple[bool, str]:
    """(OpenMetrics?, content type) for an Accept header, as prometheus_client's choose_encoder.
    The agent's names are valid in every escaping scheme, so the body never depends on it."""
    for accepted in (accept or "").split(","):
        toks = accepted.split(";")
        kind = toks[0].strip()
        if kind == "application/openmetrics-text":
            version, escaping = _accept_tokens(toks[1:])
            if not version:
                return True, CONTENT_TYPE_OPENMETRICS
            if _version(version) >= (1, 0, 0):
                return True, f"application/openmetrics-text; version={version}; charset=utf-8; escaping={escaping}"
        elif kind == "text/plain":
            version, escaping = _accept_tokens(toks[1:])
            if version and _version(version) >= (1, 0, 0):
                return False, f"{CONTENT_TYPE_LATEST}; escaping={escaping}"
    return False, CONTENT_TYPE_PLAIN_0_0_4
