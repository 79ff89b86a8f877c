"""The agent's cheap paths give the answers of the slow ones they replace (no speed asserted here:
speed belongs in ``cgguard bench --cost``)."""

from __future__ import annotations

from lineage_sim import MS, Sim

from cgguard.agent.status import own_usage
from cgguard.config import LineageDetect
from cgguard.detect.lineage import qualifies
from cgguard.state.lineage_walk import within


def brute_cgstats(tree, cgroup, subtree=True):
    """What cgstats() answered before it had an index: a pass over every CgStat, in _cg's order
    (detectors break ties by that order)."""
    return [cg.path for path, cg in tree._cg.items() if within(path, cgroup, subtree)]


def test_cgstats_follows_cgroups_that_come_and_go():
    sim = Sim()
    t = sim.tree
    a = sim.start("sh", "sh", cgroup="sim/a")
    assert [cg.path for cg in t.cgstats("sim")] == ["sim/a"]
    b = sim.start("sh", "sh", cgroup="sim/a/b")
    kid = sim.fork(b)
    for q in ("sim", "sim/a", "sim/a/b", "sim/c"):
        for sub in (True, False):
            assert [cg.path for cg in t.cgstats(q, sub)] == brute_cgstats(t, q, sub)
    assert t.tasks_in("sim/a") == 3 and t.tasks_in("sim/a/b") == 2
    c = sim.start("sh", "sh", cgroup="sim/c")
    assert sorted(cg.path for cg in t.cgstats("sim")) == ["sim/a", "sim/a/b", "sim/c"]
    # the last records of sim/a/b go: its CgStat is dropped, and the answers follow
    sim.exit(kid)
    sim.exit(b)
    assert "sim/a/b" not in t._cg
    assert [cg.path for cg in t.cgstats("sim")] == brute_cgstats(t, "sim") == ["sim/a", "sim/c"]
    assert [cg.path for cg in t.cgstats("")] == brute_cgstats(t, "") and t.cgstats("/sim/a/") == t.cgstats("sim/a")
    assert t.tasks_in("sim/a") == 1 and t.births_in("sim/a/b") == 0
    sim.exit(a)
    sim.exit(c)
    assert t.cgstats("sim") == []


def test_last_abandonment_bounds_what_qualifies_can_find():
    """The agent skips qualifies() when no abandonment is younger than the window: then no
    cgroup can qualify. A bomb that abandons makes it recent, and qualifies() finds it."""
    sim = Sim()
    t = sim.tree
    p = LineageDetect()
    assert t.last_abandon_ns < sim.t - p.window_ms * MS
    sh = sim.start("bash", "bash")
    waited = sim.fork(sh)
    sim.exit(waited)  # exits childless: no abandonment
    assert t.last_abandon_ns < 0
    # the classic bomb's shape: every member forks two and exits
    frontier = [sim.fork(sh)]
    for _ in range(6):
        nxt = []
        for m in frontier:
            nxt += [sim.fork(m, dt=MS), sim.fork(m, dt=MS)]
            sim.exit(m)
        frontier = nxt
    assert t.last_abandon_ns == max(ts for cg in t._cg.values() for ts, _, _ in cg.abandons)
    assert t.last_abandon_ns >= sim.t - p.window_ms * MS
    assert qualifies(t, "sim", sim.t, p)
    # later than the window: nothing can qualify, and the skip agrees
    sim.tick(p.window_ms * MS + 1)
    assert t.last_abandon_ns < sim.t - p.window_ms * MS
    assert not qualifies(t, "sim", sim.t, p)


def test_own_usage_reads_this_process():
    cpu, rss = own_usage()
    sum(i * i for i in range(200_000))  # some CPU
    cpu2, rss2 = own_usage()
    assert cpu2 > cpu > 0
    assert rss > 1 << 20 and rss2 > 1 << 20


# -- the HTTP endpoint under many scrapers -------------------------------------------------------
def _metrics_server():
    import test_metrics as tm

    from cgguard.sinks.http import serve
    from cgguard.sinks.metrics import Metrics

    m = Metrics(tm.board_of(tm.full_status(500)))
    renders = []
    real = m.render

    def counted(accept=None):
        renders.append(accept)
        return real(accept)

    m.render = counted  # type: ignore[method-assign]
    return tm, m, renders, serve("127.0.0.1:0", lambda: True, m)


def test_concurrent_scrapers_all_get_the_exposition_rendered_once_a_second():
    import concurrent.futures
    import time

    tm, _m, renders, srv = _metrics_server()
    try:
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(40) as ex:
            answers = list(ex.map(lambda _: tm.get(srv.url + "/metrics"), range(120)))
        elapsed = time.monotonic() - t0
        assert all(status == 200 and ctype.startswith("text/plain") for status, ctype, _ in answers)
        bodies = {body for _, _, body in answers}
        for body in bodies:  # every answer is a whole, valid exposition
            assert tm.value(tm.parse(body.decode()), "cgguard_watched_cgroups") == 500
        assert 1 <= len(renders) <= 1 + int(elapsed)
        # the OpenMetrics format is its own copy
        status, ctype, body = tm.get(srv.url + "/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert status == 200 and ctype.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    finally:
        srv.close()


def test_an_incident_shows_in_the_next_scrape_despite_the_cached_copy():
    tm, m, renders, srv = _metrics_server()
    try:
        before = tm.parse(tm.get(srv.url + "/metrics")[2].decode())
        key = {"action": "kill-cgroup", "result": "removed"}
        m.incident(tm.incident("kill-cgroup", "removed", 30.0, 7.0, None))
        after = tm.parse(tm.get(srv.url + "/metrics")[2].decode())
        assert tm.value(after, "cgguard_incidents_total", **key) == tm.value(before, "cgguard_incidents_total", **key) + 1
        assert len(renders) == 2
    finally:
        srv.close()


def test_bad_requests_on_a_kept_alive_connection_do_not_block_others():
    import http.client
    import socket

    tm, _m, _renders, srv = _metrics_server()
    try:
        # a client that sends a broken request line gets 400, one that sends POST gets 501
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"GARBAGE\r\n\r\n")
            assert b" 400 " in s.recv(4096).split(b"\r\n")[0]
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        c.request("POST", "/metrics", body=b"x")
        r = c.getresponse()
        r.read()
        assert r.status == 501
        c.close()
        # a client that connects and says nothing holds its own thread, not the endpoint
        idle = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        try:
            assert tm.get(srv.url + "/healthz")[0] == 200
            assert tm.get(srv.url + "/metrics")[0] == 200
        finally:
            idle.close()
    finally:
        srv.close()


def test_abandoned_recently_is_per_cgroup_and_windowed():
    sim = Sim()
    t = sim.tree
    quiet = sim.start("sh", "sh", cgroup="sim/quiet")
    for _ in range(5):
        sim.exit(sim.fork(quiet))  # waits for its children: never abandons
    bomb = sim.start("bash", "bash", cgroup="sim/bomb")
    kid = sim.fork(bomb)
    sim.fork(kid)
    sim.exit(kid)  # exits while its child runs: an abandonment in sim/bomb
    since = sim.t - 5000 * MS
    assert t.abandoned_recently(["sim/bomb"], since)
    assert t.abandoned_recently(["sim/quiet", "sim/bomb"], since)
    assert not t.abandoned_recently(["sim/quiet"], since)
    assert not t.abandoned_recently(["sim/nowhere"], since)
    assert not t.abandoned_recently(["sim/bomb"], sim.t + 1)  # older than the window


# -- the exposition, written without prometheus_client ------------------------------------------
def test_exposition_is_byte_for_byte_what_prometheus_client_writes():
    """The agent writes its own exposition (prometheus_client costs it 3.2 MiB of RSS): the same
    families through prometheus_client's writers give the very same bytes, in both formats."""
    import test_metrics as tm
    from prometheus_client import CollectorRegistry
    from prometheus_client import generate_latest as pc_text
    from prometheus_client.core import Metric as PcMetric
    from prometheus_client.openmetrics.exposition import generate_latest as pc_om

    from cgguard.sinks import exposition as ex
    from cgguard.sinks import metrics as mm

    m = mm.Metrics(tm.board_of(tm.full_status(80)))
    m.incident(tm.incident("kill-lineage", "removed", 12, 80, None))
    m.incident(tm.incident("report", "odd\"result\\with\nnewline", None, 3e4, None))
    fams = m.families()
    # awkward values and texts on top of the real ones
    odd = ex.Metric("cgguard_odd", "gauge", 'help with \\ backslash, "quotes"\nand a newline', labels=("l",))
    for i, v in enumerate((0.1, 1e20, 123456789.0, float("inf"), -float("inf"), 0.0, 7.0)):
        odd.add_metric((f'v{i} "q" \\ \n',), v)
    fams.append(odd)

    class Collector:
        def collect(self):
            for f in fams:
                pm = PcMetric(f.name, f.documentation, f.type)
                for name, labels, value in f.samples:
                    pm.add_sample(name, dict(labels), value)
                yield pm

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector())
    assert ex.encode(fams, openmetrics=False) == pc_text(reg)
    assert ex.encode(fams, openmetrics=True) == pc_om(reg)


def test_content_negotiation_matches_prometheus_client():
    from prometheus_client.exposition import choose_encoder

    from cgguard.sinks.exposition import negotiate

    for accept in ("", "*/*", "text/plain", "text/plain; version=0.0.4", "text/plain;version=1.0.0",
                   "text/plain; version=1.0.0; escaping=allow-utf-8", "application/openmetrics-text",
                   "application/openmetrics-text; version=1.0.0", "application/openmetrics-text;version=0.0.1",
                   "application/openmetrics-text; version=1.0.0; escaping=dots",
                   "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"):
        encoder, ctype = choose_encoder(accept)
        om = "openmetrics" in getattr(encoder, "func", encoder).__module__
        assert negotiate(accept) == (om, ctype), accept


def test_status_dict_equals_to_dict():
    import dataclasses

    import test_metrics as tm

    from cgguard.agent.status import status_dict
    from cgguard.state.status import Status

    st = tm.full_status(40)
    st.watch, st.protect, st.notes = ["a/**"], ["a/keep"], ["a note"]
    st.tracking.incomplete = ["a/b"]
    d = status_dict(st)
    assert d == st.to_dict() == dataclasses.asdict(st)
    assert Status.from_dict(d) == st
    # containers are the reply's own: changing them changes nothing in the status
    d["cgroups"].clear()
    d["watch"].append("x")
    d["sinks"]["journal"]["sent"] = -1
    d["tracking"]["incomplete"].append("y")
    assert len(st.cgroups) == 40 and st.watch == ["a/**"] and st.sinks["journal"]["sent"] == 4
    assert st.tracking.incomplete == ["a/b"]


def test_http_protocol_edges():
    """The endpoint's own HTTP/1.1: keep-alive, HEAD, HTTP/1.0, and the limits on what it reads."""
    import socket

    tm, _m, _renders, srv = _metrics_server()

    def exchange(raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):  # the server closes the connection after its answer
                data += chunk
            return data

    try:
        # two requests on one kept-alive connection, the second asks to close
        got = exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nHEAD /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        first, _, rest = got.partition(b"\r\n\r\nok\n")
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 3\r\n" in first
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in rest
        assert rest.endswith(b"\r\n\r\n"), "HEAD: headers only"
        # HTTP/1.0 closes after one answer unless asked otherwise
        got = exchange(b"GET /readyz HTTP/1.0\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nready\n")
        assert exchange(b"GET /x HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
        assert exchange(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 414 ")
        flood = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n"
        assert exchange(flood).startswith(b"HTTP/1.1 431 ")
        assert exchange(b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert tm.get(srv.url + "/healthz")[0] == 200  # and it still serves
    finally:
        srv.close()


def test_cost_targets_and_tables_from_figures():
    """The cost bench's verdicts on made-up figures: each against its goal, busy-node rows against
    the quiet node, and the tables name the issue's before figures."""
    from cgguard.bench import cost

    out = {
        "figures": {"xargs_watched_cpu_pct": 2.5, "xargs_unwatched_cpu_pct": 1.5, "idle_rss_mib": 35.0,
                    "calm10k_fds": 1040, "calm10k_new_cgroup_overflow_s": None},
        "scrape": {"ratio": 1.05},
        "busy_node": [
            {"rate": 1000, "achieved_per_s": 990, "agent_cpu_pct_background": 2.0, "forks_received_per_s_background": 1000,
             "events_received": 3100, "events_generated": 3000, "enobufs": 0, "seq_gaps": 0,
             "removal_vs_quiet": 1.2, "peak_vs_quiet": 1.6,
             "classic": {"start_to_populated0_ms": 40.0, "verdict_to_populated0_ms": 4.0, "peak": 50}},
        ],
        "quiet_classic": {"start_to_populated0_ms": 33.0, "verdict_to_populated0_ms": 4.0, "peak": 31},
        "notes": [],
    }
    t = cost.targets(out)
    assert t["xargs_watched_cpu_pct"]["met"] is True and t["xargs_watched_cpu_pct"]["before"] == 26.1
    assert t["xargs_unwatched_cpu_pct"]["met"] is False
    assert t["idle_rss_mib"]["met"] is True
    assert t["calm10k_fds"]["met"] is True
    assert t["calm10k_new_cgroup_overflow_s"]["met"] is None  # not measured
    assert t["scrape_5000_removal_s"]["met"] is True
    assert t["busy_1000"]["met"] is False  # peak 1.6x the quiet node's
    out["targets"] = t
    md = cost.markdown(out, "m")
    assert "| 1000/s | 990 |" in md and "26.1" in md and "**NO**" in md
