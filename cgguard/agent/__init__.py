"""The agent: wires kernel sources -> state -> detectors -> actions -> sinks.

One thread owns all state (the watcher, the lineage tree, sample histories) and runs a selector
loop over the inotify fd, the proc connector fd and the control socket, with sampling deadlines
as timeouts. Actions run on a separate worker thread so that ingestion never stops while a kill
waits for ``populated 0`` (a stalled reader would overflow the proc connector mid-bomb). The HTTP
server runs on its own thread and reads a snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import resource
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from cgguard import act
from cgguard.sinks import incidents
from cgguard.attribution import attribute
from cgguard.kernel.cgroupfs import CgroupFS, adopt_cgroupns_root, own_cgroup
from cgguard.config import Action, Config
from cgguard.detect import Verdict
from cgguard.detect import cgroup as cgdetect
from cgguard.sinks.incidents import Incident, IncidentLog
from cgguard.agent.lineage_source import LineageSource, LineageUnavailable
from cgguard.state.watch import Node, Watcher

log = logging.getLogger("cgguard.agent")
MS = 1_000_000
PROCCONN_COALESCE_NS = 2 * MS


class AgentError(Exception):
    pass


def raise_thread_priority(realtime: bool = True) -> list[str]:
    """A bomb on a small node starves everyone; the agent must keep running to remove it.

    Linux keeps nice values and scheduling policies per thread, so each agent thread calls this
    for itself (and an agent embedded in another program changes only its own threads).
    """
    notes = []
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -15)
    except OSError as e:
        notes.append(f"nice: {e.strerror}")
    if realtime:
        # Nice alone loses: CFS shares CPU per task, and 500 bomb tasks at nice 0 outweigh one
        # agent at nice -15 twenty to one. SCHED_RR at the lowest RT priority runs the agent as
        # soon as an event arrives; its hot path is event-driven and short, and the kernel's RT
        # throttling (sched_rt_runtime_us) still bounds it should it ever spin.
        try:
            # RESET_ON_FORK: nothing the agent's threads might ever spawn inherits RT priority.
            os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(1))
        except (OSError, AttributeError) as e:
            notes.append(f"SCHED_RR: {getattr(e, 'strerror', e)}")
    return notes


def protect_process() -> list[str]:
    """Per-process protections: never the OOM killer's victim, enough fds for pread sampling."""
    notes = []
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        notes.append(f"oom_score_adj: {e.strerror}")
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as e:
        notes.append(f"RLIMIT_NOFILE: {e}")
    return notes


def sd_notify(msg: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed: %s", e)
        return False


class KillBudget:
    """At most ``max_actions`` per sliding window: a detector gone wrong cannot empty a node."""

    def __init__(self, max_actions: int, per_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.max_actions = max_actions
        self.per_seconds = per_seconds
        self.clock = clock
        self.times: deque[float] = deque()

    def take(self) -> bool:
        now = self.clock()
        while self.times and self.times[0] <= now - self.per_seconds:
            self.times.popleft()
        if len(self.times) >= self.max_actions:
            return False
        self.times.append(now)
        return True


@dataclass
class Pending:
    incident: Incident
    node: Node
    verdict: Verdict


class Agent:
    def __init__(
        self,
        cfg: Config,
        fs: CgroupFS,
        *,
        lineage: bool | None = None,
        on_incident: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.cfg = cfg
        self.fs = fs
        self.clock = time.monotonic_ns
        self.own_cgroup = ""  # read in setup(), once cgroup-namespace paths are translated
        self.log = IncidentLog(cfg.state_dir)
        self.watcher = Watcher(fs, cfg.watch, cfg.protect, cfg.sampling)
        self.budget = KillBudget(cfg.kill_budget.max_actions, cfg.kill_budget.per_seconds)
        # The connector stays open with tracking disabled, so 'ctl tracking enable' can turn it on.
        self.want_lineage = cfg.lineage.connector if lineage is None else lineage
        self.lineage: LineageSource | None = None
        self.lineage_note = "off"
        self.on_incident = on_incident
        self.metrics = None  # set by the CLI when /metrics is served
        self.stop_event = threading.Event()
        self.ready = False
        self.started_at = time.time()
        self.incident_count = 0
        self.notes: list[str] = []
        self._actions: queue.Queue[Pending | None] = queue.Queue()
        self._done: queue.Queue[tuple[Pending, act.ActionResult]] = queue.Queue()
        self._cooldown: dict[str, int] = {}
        self._lineage_eval_at: dict[str, int] = {}
        self._next_age_ns = 0
        self._drained_ns = 0
        self._pc_last_ns = 0
        self._control: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._snapshot: dict[str, Any] = {}
        self._snap_cond = threading.Condition()
        self._snap_gen = 0
        self._snap_wanted = False
        self._running = False
        self._workloads: dict[str, dict[str, Any] | None] = {}
        self._proc = psutil.Process()

    # -- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        # In a private cgroup namespace (a non-privileged container) /proc paths must be
        # translated before anything compares them with cgroupfs paths, our own cgroup first.
        adopt_cgroupns_root(self.fs)
        self.own_cgroup = own_cgroup() or ""
        self.notes += protect_process()
        self.log.open()
        self.watcher.exclude = self._is_own_or_ancestor
        self.watcher.on_removed = self._forget_cgroup
        self.watcher.start()
        if self.want_lineage:
            try:
                self.lineage = LineageSource(self.cfg, self.fs, in_scope=self._in_scope, watched=self._watched_paths)
                self.lineage.load(self._watched_paths())
                self.lineage_note = self.lineage.mode
                self.watcher.backoff = True
            except LineageUnavailable as e:
                self.lineage = None
                self.lineage_note = f"unavailable: {e}"
                log.warning("lineage tracking unavailable, sampling only: %s", e)
        self._next_age_ns = self.clock() + self.cfg.lineage.reset_interval_ms * MS
        if self.cfg.control_socket:
            self._control = self._open_control(self.cfg.control_socket)
        self._worker = threading.Thread(target=self._action_worker, name="cgguard-act", daemon=True)
        self._worker.start()
        self.ready = True
        self._refresh_snapshot()
        sd_notify("READY=1\nSTATUS=watching %d cgroups" % len(self.watcher.watched()))
        log.info(
            "watching %d cgroups under %s (lineage: %s%s)",
            len(self.watcher.watched()),
            self.fs.root,
            self.lineage_note,
            ", dry run" if self.cfg.dry_run else "",
        )

    def _watched_paths(self) -> list[str]:
        return [n.rel for n in self.watcher.watched()]

    def _forget_cgroup(self, node: Node) -> None:
        """A watched cgroup vanished: drop what the agent kept for it, or pod churn over weeks
        grows these tables without bound."""
        for table in (self._cooldown, self._lineage_eval_at, self._workloads):
            table.pop(node.rel, None)

    def _is_own_or_ancestor(self, rel: str) -> bool:
        own = self.own_cgroup
        return rel == own or own.startswith(rel + "/") or rel == ""

    def _in_scope(self, cgroup: str | None) -> bool:
        return cgroup is not None and self.watcher.watched_ancestor(cgroup) is not None

    def _open_control(self, path: str) -> socket.socket | None:
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o077)
            try:
                s.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            s.listen(8)
            s.setblocking(False)
            return s
        except OSError as e:
            self.notes.append(f"control socket {path}: {e.strerror}")
            log.warning("control socket %s unavailable: %s", path, e.strerror)
            return None

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> None:
        self.notes += raise_thread_priority(self.cfg.realtime)
        sel = selectors.DefaultSelector()
        sel.register(self.watcher.fileno(), selectors.EVENT_READ, "inotify")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        if self.lineage is not None:
            sel.register(self.lineage.fileno(), selectors.EVENT_READ, "procconn")
        if self._control is not None:
            sel.register(self._control, selectors.EVENT_READ, "control")
        self._running = True
        try:
            while not self.stop_event.is_set():
                now = self.clock()
                due = self.watcher.next_due_ns()
                timeout_ns = 200 * MS if due is None else max(0, due - now)
                timeout_ns = min(timeout_ns, 200 * MS, max(0, self._next_age_ns - now))
                for key, _ in sel.select(timeout_ns / 1e9):
                    what = key.data
                    if what == "procconn":
                        self._on_procconn()
                    elif what == "inotify":
                        self._on_inotify()
                    elif what == "control":
                        self._on_control()
                    elif what == "wake":
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                        if self.lineage is not None:
                            self._on_procconn()
                now = self.clock()
                for node in self.watcher.due(now):
                    self._sample_and_check(node, now)
                if self.lineage is not None and now >= self._next_age_ns:
                    self.lineage.age(now)
                    self._next_age_ns = now + self.lineage.reset_interval_ns
                elif now >= self._next_age_ns:
                    self._next_age_ns = now + self.cfg.lineage.reset_interval_ms * MS
                self._collect_results()
                if self._snap_wanted:
                    self._refresh_snapshot()
        finally:
            self._running = False
            self._refresh_snapshot()
            sel.close()

    def stop(self) -> None:
        self.stop_event.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        self._actions.put(None)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        # A late write from another thread must fail (EBADF), not land in a reused fd number.
        self._wake_r = self._wake_w = -1
        if self._control is not None:
            try:
                os.unlink(self.cfg.control_socket)
            except OSError:
                pass
            self._control.close()
        if self.lineage is not None:
            self.lineage.close()
        self.watcher.close()

    # -- sources ---------------------------------------------------------------------------
    def _on_inotify(self) -> None:
        now = self.clock()
        for node, kind in self.watcher.handle_inotify():
            if not node.watched:
                continue
            if kind == "pids.events":
                self.watcher.hint_active(node, now)
                self._sample_and_check(node, now)
            elif kind == "events" and node.populated:
                # Something started in a cgroup that was empty: sample it (and, for narrowing
                # a verdict later, its watched parents) from its first tasks on.
                n: Node | None = node
                while n is not None:
                    if n.watched:
                        self.watcher.hint_active(n, now)
                    n = n.parent

    def _on_procconn(self) -> None:
        assert self.lineage is not None
        # Coalesce: under steady fork load the socket turns readable for every event, and a
        # wake-up per event costs more than the event. Waiting until 2 ms after the last drain
        # batches them (a bomb doubling every ~10 ms is seen 2 ms later at most).
        wait_ns = self._pc_last_ns + PROCCONN_COALESCE_NS - self.clock()
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        t = self._pc_last_ns = self.clock()
        touched, empty = self.lineage.drain()
        if empty:
            self._drained_ns = t
        if not touched:
            return
        now = self.clock()
        nodes: dict[str, Node] = {}
        for cg in touched:
            node = self.watcher.watched_ancestor(cg)
            if node is not None:
                nodes[node.rel] = node
                self.watcher.hint_active(node, now)
        for node in nodes.values():
            self._check_lineage(node, now)

    # -- detection -------------------------------------------------------------------------
    def _sample_and_check(self, node: Node, now: int) -> None:
        if node.busy or not node.watched or node.history is None:
            return
        prev = node.history.last
        s = self.watcher.sample(node, now)
        d = self.cfg.detect
        moved = prev is None or (s.tasks, s.forks_refused) != (prev.tasks, prev.forks_refused)
        # On an unchanged sample growth and the refusal rate cannot newly fire; saturation can
        # (an older, not-yet-full sample leaving its hold window), so it always runs.
        verdict = cgdetect.fork_failures(node.rel, node.history, now, d.fork_failures) if moved else None
        verdict = verdict or cgdetect.saturation(node.rel, node.history, now, d.saturation)
        if moved:
            verdict = verdict or cgdetect.growth(node.rel, node.history, now, d.growth)
        if verdict is not None:
            self._on_verdict(node, verdict)
            return
        if self.lineage is not None and now < node.active_until_ns:
            self._check_lineage(node, now)

    def _check_lineage(self, node: Node, now: int) -> None:
        if self.lineage is None or node.busy or not self.cfg.detect.lineage.enabled:
            return
        last = self._lineage_eval_at.get(node.rel, 0)
        # Evaluating costs a walk of the cgroup's records; 5 ms apart is plenty for a bomb
        # that doubles every ~12 ms and keeps a C fork loop from hogging the loop.
        if now - last < 5 * MS:
            return
        self._lineage_eval_at[node.rel] = now
        verdict = self.lineage.evaluate(node.rel, now)
        if verdict is not None:
            self._on_verdict(node, verdict)

    # -- decisions -------------------------------------------------------------------------
    def refusal(self, rel: str) -> str | None:
        """Why cgguard must not act on this cgroup, or None."""
        if not rel:
            return "the cgroup2 root"
        if self._is_own_or_ancestor(rel):
            return "cgguard's own cgroup or an ancestor of it"
        node = self.watcher.nodes.get(rel)
        if node is None or not node.watched:
            return "outside the watch globs"
        if node.protected or self.watcher.is_protected(rel):
            return "protected by --protect"
        return None

    def _target(self, node: Node, verdict: Verdict) -> Node:
        if verdict.detector == "lineage" and verdict.cgroup:
            n = self.watcher.watched_ancestor(verdict.cgroup)
            return n or node
        return self.watcher.narrow(node, verdict.first_sign_ns)

    def _on_verdict(self, node: Node, verdict: Verdict) -> None:
        now = self.clock()
        target = self._target(node, verdict)
        if target.busy or self._cooldown.get(target.rel, 0) > now:
            return
        action = self.cfg.action_for(target.rel)
        why_not = self.refusal(target.rel)
        notes: list[str] = []
        if why_not:
            notes.append(f"not acting: {why_not}")
            action = Action.report
        elif self.cfg.dry_run:
            notes.append("dry run: reporting only")
            action = Action.report
        elif action not in (Action.report,) and not self.budget.take():
            notes.append(
                f"kill budget exhausted ({self.cfg.kill_budget.max_actions} per "
                f"{self.cfg.kill_budget.per_seconds:g}s): reporting only"
            )
            action = Action.report
        if action == Action.auto and not verdict.lineage and self.lineage is not None:
            # A cgroup-level verdict (growth, pids.max) in a cgroup that may be shared: if one
            # lineage holds most of the tasks, remove it surgically and spare the rest.
            lin = self.lineage.worst_lineage(target.rel)
            if lin is not None and lin.family is not None and lin.family * 2 >= max(verdict.tasks, 1):
                verdict = lin_verdict(verdict, lin)
                notes.append(f"one lineage holds {lin.family} of {verdict.tasks} tasks: removing it surgically")
        if action == Action.auto:
            action = Action.kill_lineage if verdict.lineage else Action.kill_cgroup
        if action == Action.kill_lineage and not verdict.lineage:
            lin = self.lineage.worst_lineage(target.rel) if self.lineage is not None else None
            if lin is None:
                notes.append("no lineage known for this cgroup: killing the cgroup")
                action = Action.kill_cgroup
            else:
                verdict = lin_verdict(verdict, lin)
        tasks = verdict.tasks if target.rel == verdict.cgroup else (target.last_tasks or verdict.tasks)
        inc = Incident(
            cgroup=target.rel,
            action=action.value,
            reasons=[r.to_dict() for r in verdict.reasons],
            tasks_at_detection=tasks,
            detector=verdict.detector,
            peak_tasks=max(tasks, target.history.peak if target.history else 0),
            detect_ms=round(max(0, verdict.at_ns - verdict.first_sign_ns) / MS, 1),
            dry_run=self.cfg.dry_run,
            origin=verdict.origin.to_dict() if verdict.origin else None,
            family=verdict.family,
            depth=verdict.depth,
            workload=self._workload(target.rel),
            notes=notes,
        )
        log.warning("bomb in %s (%s): %s -> %s", target.rel, verdict.detector, verdict.summary(), action.value)
        self._write(inc)
        cooldown_ms = 30_000 if action == Action.report else 1000
        self._cooldown[target.rel] = now + cooldown_ms * MS
        if action == Action.report:
            inc.result = "reported" if not why_not else "refused"
            self._write(inc)
            self._count(inc)
            return
        target.busy = True
        self._actions.put(Pending(inc, target, verdict))

    def _workload(self, rel: str) -> dict[str, Any] | None:
        if rel in self._workloads:
            return self._workloads[rel]
        try:
            wl: dict[str, Any] | None = attribute(rel).to_dict()
        except Exception:  # attribution must never stop an action
            log.exception("attribution of %s failed", rel)
            wl = None
        if len(self._workloads) > 100_000:
            self._workloads.clear()  # cgroups come and go; keep the cache bounded
        self._workloads[rel] = wl
        return wl

    def _write(self, inc: Incident) -> None:
        try:
            self.log.append(inc)
        except incidents.IncidentLogError as e:
            log.error("incident log: %s", e)

    def _count(self, inc: Incident) -> None:
        self.incident_count += 1
        if self.metrics is not None:
            self.metrics.incident(inc.action, inc.result, inc.detect_ms, inc.remove_ms, inc.workload)
        if self.on_incident is not None:
            self.on_incident(inc.to_dict())

    # -- actions (worker thread) -----------------------------------------------------------
    def _action_worker(self) -> None:
        raise_thread_priority(self.cfg.realtime)
        while True:
            p = self._actions.get()
            if p is None:
                return
            try:
                res = self._execute(p)
            except Exception as e:  # an action bug must not kill the agent
                log.exception("action on %s failed", p.node.rel)
                res = act.ActionResult(p.incident.action, "failed", notes=[f"internal error: {e!r}"])
            self._done.put((p, res))
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def _execute(self, p: Pending) -> act.ActionResult:
        timeout = self.cfg.remove_timeout_ms / 1000
        rel = p.node.rel
        kind = Action(p.incident.action)
        if kind == Action.kill_cgroup:
            return act.kill_cgroup(self.fs, rel, timeout)
        if kind == Action.freeze:
            return act.freeze(self.fs, rel, min(timeout, 2.0))
        if kind == Action.kill_lineage:
            fallback = (lambda r: act.kill_cgroup(self.fs, r, timeout)) if self.cfg.surgical_fallback == Action.kill_cgroup else None
            v = p.verdict
            classify = self.lineage.member_test(v.origin_ref) if self.lineage is not None else None
            return act.kill_lineage(
                self.fs,
                rel,
                v.lineage or frozenset(),
                timeout,
                fallback=fallback,
                classify=classify,
                origin_start_ns=v.origin.start_ns if v.origin else None,
                settle=self._settle if self.lineage is not None else None,
                # A lineage verdict names the bomb; if none of it is found, the cgroup's other
                # processes are not the bomb. A cgroup-level verdict stands on its own.
                unmatched_fallback=v.detector != "lineage",
            )
        return act.ActionResult(kind.value, "reported")

    def _settle(self, max_wait_s: float = 0.2) -> None:
        """Called from the action thread after a freeze: wait until the main thread has read every
        proc-connector event queued before now, so the tree knows each frozen process."""
        t = self.clock()
        try:
            os.write(self._wake_w, b"s")
        except OSError:
            pass
        deadline = time.monotonic() + max_wait_s
        while self._drained_ns < t and time.monotonic() < deadline:
            time.sleep(0.002)

    def _collect_results(self) -> None:
        while True:
            try:
                p, res = self._done.get_nowait()
            except queue.Empty:
                return
            inc = p.incident
            inc.action = res.action
            inc.result = res.result
            inc.remove_ms = round(res.remove_ms, 1) if res.remove_ms is not None else None
            inc.survivors = res.survivors
            if res.tasks_before is not None:
                inc.peak_tasks = max(inc.peak_tasks or 0, res.tasks_before)
            inc.notes = inc.notes + res.notes
            if res.innocents is not None:
                inc.notes.append(f"{res.innocents} innocent processes left running")
            if res.moved is not None:
                inc.notes.append(f"{res.moved} processes moved to quarantine")
            log.warning(
                "%s %s: %s in %s ms, survivors %s", inc.action, inc.cgroup, inc.result, inc.remove_ms, inc.survivors
            )
            self._write(inc)
            self._count(inc)
            p.node.busy = False
            if p.node.history is not None:
                p.node.history.samples.clear()
                p.node.history.peak = 0
            if self.lineage is not None:
                self.lineage.after_action(p.node.rel)

    # -- control socket --------------------------------------------------------------------
    def _on_control(self) -> None:
        assert self._control is not None
        try:
            conn, _ = self._control.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(0.5)
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                uid = int.from_bytes(creds[4:8], "little")
                data = b""
                while not data.endswith(b"\n") and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                # The file is 0600 already; this also holds if someone loosens its mode.
                if uid != 0:
                    conn.sendall(b'{"ok": false, "error": "only root may use the control socket"}\n')
                    return
                try:
                    req = json.loads(data or b"{}")
                    reply = self.control(req)
                except (ValueError, TypeError) as e:
                    reply = {"ok": False, "error": f"bad request: {e}"}
                conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
            except OSError:
                pass

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.snapshot(full=True)}
        if cmd == "tree":
            if self.lineage is None:
                return {"ok": False, "error": f"lineage tracking is {self.lineage_note}"}
            return {"ok": True, "tree": self.lineage.tree_json(str(req.get("cgroup") or ""))}
        if cmd == "tracking":
            value = req.get("value")
            if value not in ("enable", "disable"):
                return {"ok": False, "error": "tracking takes 'enable' or 'disable'"}
            if self.lineage is None:
                return {"ok": False, "error": f"lineage tracking is {self.lineage_note}"}
            self.lineage.set_tracking(value == "enable")
            return {"ok": True, "tracking": value + "d"}
        if cmd == "reset-interval":
            try:
                ms = int(req.get("value"))
            except (TypeError, ValueError):
                return {"ok": False, "error": "reset-interval takes milliseconds (an integer)"}
            if not 100 <= ms <= 2**32 - 1:
                return {"ok": False, "error": "reset-interval must be between 100 and 4294967295 ms"}
            if self.lineage is None:
                return {"ok": False, "error": f"lineage tracking is {self.lineage_note}"}
            self.lineage.set_reset_interval(ms)
            self._next_age_ns = self.clock() + ms * MS
            return {"ok": True, "reset_interval_ms": ms}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # -- status ----------------------------------------------------------------------------
    def _refresh_snapshot(self) -> None:
        snap = self.snapshot(full=True)
        with self._snap_cond:
            self._snapshot = snap
            self._snap_gen += 1
            self._snap_wanted = False
            self._snap_cond.notify_all()

    def latest_snapshot(self, timeout_s: float = 1.0) -> dict[str, Any]:
        """For other threads (the HTTP server): a fresh snapshot built by the main thread.

        Built on request rather than periodically: a scrape every 15 s costs one walk of the
        watched cgroups, where a timer would walk 1,000 calm cgroups several times a second for
        nobody. If the loop does not answer in time, the last snapshot is returned.
        """
        with self._snap_cond:
            if not self._running:
                return dict(self._snapshot)
            gen = self._snap_gen
            self._snap_wanted = True
            try:
                os.write(self._wake_w, b"m")
            except OSError:
                pass
            self._snap_cond.wait_for(lambda: self._snap_gen != gen, timeout=timeout_s)
            return dict(self._snapshot)

    def snapshot(self, full: bool = False) -> dict[str, Any]:
        cgroups = []
        for n in sorted(self.watcher.watched(), key=lambda n: n.rel):
            last = n.history.last if n.history else None
            state = "acting" if n.busy else "protected" if n.protected else (
                "growing" if n.active_until_ns > self.clock() else "calm"
            )
            cgroups.append(
                {
                    "path": n.rel,
                    "tasks": last.tasks if last else n.last_tasks,
                    "source": n.source,
                    "pids_max": last.pids_max if last else None,
                    "forks_refused": last.forks_refused if last else None,
                    "state": state,
                    "interval_ms": n.interval_ns // MS,
                    "populated": n.populated,
                    "workload": self._workload(n.rel) if full else None,
                }
            )
        try:
            cpu = self._proc.cpu_times()
            rss = self._proc.memory_info().rss
        except psutil.Error:
            cpu, rss = None, None
        return {
            "ready": self.ready,
            "dry_run": self.cfg.dry_run,
            "cgroup_root": self.fs.root,
            "own_cgroup": self.own_cgroup,
            "watch": self.cfg.watch,
            "protect": self.cfg.protect,
            "cgroups": cgroups,
            "procconn": self.lineage.procconn_stats() if self.lineage else {"mode": self.lineage_note},
            "lineage": self.lineage.stats() if self.lineage else {"tracking": False, "mode": self.lineage_note},
            "incidents": {"total": self.incident_count, "log": self.log.path},
            "self": {"cpu_seconds": (cpu.user + cpu.system) if cpu else None, "rss_bytes": rss, "pid": os.getpid()},
            "samples_taken": self.watcher.samples_taken,
            "notes": self.notes,
        }


def lin_verdict(v: Verdict, lin: Verdict) -> Verdict:
    """A cgroup-level verdict enriched with the lineage that holds the tasks (for a surgical kill)."""
    return Verdict(
        cgroup=v.cgroup,
        detector=v.detector,
        reasons=v.reasons + lin.reasons,
        tasks=v.tasks,
        first_sign_ns=v.first_sign_ns,
        at_ns=v.at_ns,
        origin=lin.origin,
        lineage=lin.lineage,
        family=lin.family,
        depth=lin.depth,
        origin_ref=lin.origin_ref,
    )
