"""The agent: kernel sources in, verdicts, decisions, actions, incidents out.

One thread -- the loop -- owns all state (the watcher, the lineage tree, sample histories) and
runs a selector over the inotify fd, the proc connector and a wake-up pipe, with sampling
deadlines as timeouts. Other threads only talk to it through queues and the wake-up pipe: the
action worker (:mod:`.worker`), the control socket (:mod:`.control`) and readers of the status
board (:class:`cgguard.state.status.StatusBoard`). Decisions are :func:`.policy.decide`.
"""

from __future__ import annotations

import logging
import os
import selectors
import time
from typing import Any, Iterable, Protocol

from cgguard.act import ActionResult
from cgguard.attribution import attribute
from cgguard.config import Action, Config
from cgguard.detect import Verdict
from cgguard.detect import cgroup as cgdetect
from cgguard.kernel.cgroupfs import CgroupFS
from cgguard.kernel.cgroupns import adopt_cgroupns_root, own_cgroup
from cgguard.kernel.clock import MS
from cgguard.sinks.incidents import Incident, IncidentLog, IncidentLogError
from cgguard.state.status import StatusBoard
from cgguard.state.watch import Node, Watcher

from . import policy
from .control import ControlServer
from .host import protect_process, raise_thread_priority, sd_notify
from .status import build_status
from .tracking import Tracking, TrackingUnavailable
from .worker import ActionWorker, Job

log = logging.getLogger("cgguard.agent")
PROCCONN_COALESCE_NS = 2 * MS
LOOP_TICK_NS = 200 * MS
LINEAGE_EVAL_GAP_NS = 5 * MS


class IncidentSink(Protocol):
    """Told about every incident twice: when detected, and with its result."""

    def incident(self, inc: Incident) -> None: ...


class Agent:
    def __init__(
        self,
        cfg: Config,
        fs: CgroupFS,
        *,
        use_connector: bool | None = None,
        sinks: Iterable[IncidentSink] = (),
        board: StatusBoard | None = None,
    ):
        self.cfg = cfg
        self.fs = fs
        self.clock = time.monotonic_ns
        self.pid = os.getpid()
        self.own_cgroup = ""  # read in setup(), once cgroup-namespace paths are translated
        self.log = IncidentLog(cfg.state_dir)
        self.sinks = list(sinks)
        self.board = board or StatusBoard()
        self.board.bind(self.wake)
        self.watcher = Watcher(
            fs, cfg.watch, cfg.protect, cfg.sampling, exclude=self._is_own_or_ancestor, on_removed=self._forget_cgroup
        )
        self.budget = policy.KillBudget(cfg.kill_budget.max_actions, cfg.kill_budget.per_seconds)
        # The connector stays open with tracking disabled, so 'ctl tracking enable' can turn it on.
        self.use_connector = cfg.tracking.connector if use_connector is None else use_connector
        self.tracking: Tracking | None = None
        self.tracking_note = "off"
        self.ready = False
        self.incidents_since_start = 0
        self.incidents_recorded = 0
        self.notes: list[str] = []
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.worker = ActionWorker(
            fs,
            remove_timeout_s=cfg.remove_timeout_ms / 1000,
            surgical_fallback=cfg.surgical_fallback,
            realtime=cfg.realtime,
            wake=self.wake,
        )
        self.control: ControlServer | None = None
        self._cooldown: dict[str, int] = {}
        self._lineage_eval_at: dict[str, int] = {}
        self._workloads: dict[str, dict[str, Any] | None] = {}
        self._next_age_ns = 0
        self._drained_ns = 0
        self._pc_last_ns = 0

    # -- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        # In a private cgroup namespace (a non-privileged container) /proc paths must be
        # translated before anything compares them with cgroupfs paths, our own cgroup first.
        adopt_cgroupns_root(self.fs)
        self.own_cgroup = own_cgroup() or ""
        self.notes += protect_process()
        self.log.open()
        self.incidents_recorded = self.log.count()
        if self.cfg.control_socket:
            self.control = ControlServer(self.cfg.control_socket, self.wake)
        self.watcher.start()
        if self.use_connector:
            try:
                self.tracking = Tracking(self.cfg, self.fs, in_scope=self._in_scope, watched=self._watched_paths)
                self.tracking.load(self._watched_paths())
                self.tracking_note = self.tracking.mode
                self.watcher.backoff = True
            except TrackingUnavailable as e:
                self.tracking = None
                self.tracking_note = f"unavailable: {e}"
                log.warning("process tracking unavailable, sampling only: %s", e)
        self._next_age_ns = self.clock() + self.cfg.tracking.reset_interval_ms * MS
        self.worker.start()
        if self.control is not None:
            self.control.start()
        self.ready = True
        self._publish_status()
        sd_notify("READY=1\nSTATUS=watching %d cgroups" % len(self.watcher.watched()))
        log.info(
            "watching %d cgroups under %s (tracking: %s%s)",
            len(self.watcher.watched()),
            self.fs.root,
            self.tracking_note,
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

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        self.notes += raise_thread_priority(self.cfg.realtime)
        sel = selectors.DefaultSelector()
        sel.register(self.watcher.fileno(), selectors.EVENT_READ, self._on_inotify)
        sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        if self.tracking is not None:
            sel.register(self.tracking.fileno(), selectors.EVENT_READ, self._on_procconn)
        try:
            while not self._stop:
                now = self.clock()
                due = self.watcher.next_due_ns()
                timeout_ns = min(LOOP_TICK_NS if due is None else max(0, due - now), LOOP_TICK_NS)
                timeout_ns = min(timeout_ns, max(0, self._next_age_ns - now))
                for key, _ in sel.select(timeout_ns / 1e9):
                    key.data()
                self._tick(self.clock())
        finally:
            self.ready = False
            self._publish_status()
            sel.close()

    def _tick(self, now: int) -> None:
        for node in self.watcher.due(now):
            self._sample_and_check(node, now)
        if now >= self._next_age_ns:
            if self.tracking is not None:
                self.tracking.age(now)
                self._next_age_ns = now + self.tracking.reset_interval_ns
            else:
                self._next_age_ns = now + self.cfg.tracking.reset_interval_ms * MS
        self._collect_results()
        if self.control is not None:
            self.control.serve_pending(self.handle_control)
        if self.board.wanted:
            self._publish_status()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def _on_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        if self.tracking is not None:
            self._on_procconn()

    def stop(self) -> None:
        self._stop = True
        self.wake()

    def close(self) -> None:
        self.worker.close()
        if self.control is not None:
            self.control.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        # A late write from another thread must fail (EBADF), not land in a reused fd number.
        self._wake_r = self._wake_w = -1
        if self.tracking is not None:
            self.tracking.close()
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
        assert self.tracking is not None
        # Coalesce: under steady fork load the socket turns readable for every event, and a
        # wake-up per event costs more than the event. Waiting until 2 ms after the last drain
        # batches them (a bomb doubling every ~10 ms is seen 2 ms later at most).
        wait_ns = self._pc_last_ns + PROCCONN_COALESCE_NS - self.clock()
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        t = self._pc_last_ns = self.clock()
        touched, empty = self.tracking.drain()
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
        if self.tracking is not None and now < node.active_until_ns:
            self._check_lineage(node, now)

    def _check_lineage(self, node: Node, now: int) -> None:
        if self.tracking is None or node.busy or not self.cfg.detect.lineage.enabled:
            return
        # Evaluating costs a walk of the cgroup's records; 5 ms apart is plenty for a bomb
        # that doubles every ~12 ms and keeps a C fork loop from hogging the loop.
        if now - self._lineage_eval_at.get(node.rel, 0) < LINEAGE_EVAL_GAP_NS:
            return
        self._lineage_eval_at[node.rel] = now
        verdict = self.tracking.evaluate(node.rel, now)
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
            return self.watcher.watched_ancestor(verdict.cgroup) or node
        return self.watcher.narrow(node, verdict.first_sign_ns)

    def _context(self, target: Node, verdict: Verdict) -> policy.Context:
        configured = self.cfg.action_for(target.rel)
        wants_lineage = configured in (Action.auto, Action.kill_lineage) and not verdict.members
        kb = self.cfg.kill_budget
        return policy.Context(
            configured=configured,
            refusal=self.refusal(target.rel),
            dry_run=self.cfg.dry_run,
            budget_left=self.budget.available(),
            budget_text=f"{kb.max_actions} per {kb.per_seconds:g}s",
            worst_lineage=self.tracking.worst_lineage(target.rel) if wants_lineage and self.tracking else None,
        )

    def _on_verdict(self, node: Node, verdict: Verdict) -> None:
        now = self.clock()
        target = self._target(node, verdict)
        if target.busy or self._cooldown.get(target.rel, 0) > now:
            return
        d = policy.decide(verdict, self._context(target, verdict))
        if d.acts and not self.budget.take():  # lost a race for the last slot: report instead
            d = policy.decide(verdict, policy.Context(configured=Action.report))
        inc = self._incident(target, d)
        log.warning("bomb in %s (%s): %s -> %s", target.rel, verdict.detector, verdict.summary(), d.action.value)
        self._record(inc, final=False)
        cooldown_ms = 1000 if d.acts else 30_000
        self._cooldown[target.rel] = now + cooldown_ms * MS
        if not d.acts:
            inc.result = "refused" if d.refused else "reported"
            self._record(inc, final=True)
            return
        target.busy = True
        v = d.verdict
        tr = self.tracking
        self.worker.submit(
            Job(
                inc,
                target.rel,
                d,
                classify=tr.member_test(v.origin_ref) if tr else None,
                settle=self._settle if tr else None,
            )
        )

    def _incident(self, target: Node, d: policy.Decision) -> Incident:
        v = d.verdict
        tasks = v.tasks if target.rel == v.cgroup else (target.last_tasks or v.tasks)
        return Incident(
            cgroup=target.rel,
            action=d.action.value,
            reasons=[r.to_dict() for r in v.reasons],
            tasks_at_detection=tasks,
            detector=v.detector,
            peak_tasks=max(tasks, target.history.peak if target.history else 0),
            detect_ms=round(max(0, v.at_ns - v.first_sign_ns) / MS, 1),
            dry_run=self.cfg.dry_run,
            origin=v.origin.to_dict() if v.origin else None,
            family=v.family,
            depth=v.depth,
            workload=self.workload(target.rel),
            notes=list(d.notes),
        )

    def workload(self, rel: str) -> dict[str, Any] | None:
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

    def _record(self, inc: Incident, final: bool) -> None:
        try:
            self.log.append(inc)
        except IncidentLogError as e:
            log.error("incident log: %s", e)
        if final:
            self.incidents_since_start += 1
            self.incidents_recorded += 1
            self.board.invalidate()
        for sink in self.sinks:
            try:
                sink.incident(inc)
            except Exception:  # a sink must never stop the agent
                log.exception("incident sink %r failed", sink)

    def _settle(self, max_wait_s: float = 0.2) -> None:
        """Called from the action thread after a freeze: wait until the loop has read every
        proc-connector event queued before now, so the tree knows each frozen process."""
        t = self.clock()
        self.wake()
        deadline = time.monotonic() + max_wait_s
        while self._drained_ns < t and time.monotonic() < deadline:
            time.sleep(0.002)

    def _collect_results(self) -> None:
        for job, res in self.worker.results():
            self._finish(job, res)

    def _finish(self, job: Job, res: ActionResult) -> None:
        inc = job.incident
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
        log.warning("%s %s: %s in %s ms, survivors %s", inc.action, inc.cgroup, inc.result, inc.remove_ms, inc.survivors)
        self._record(inc, final=True)
        node = self.watcher.nodes.get(job.target)
        if node is not None:
            node.busy = False
            if node.history is not None:
                node.history.samples.clear()
                node.history.peak = 0
        if self.tracking is not None:
            self.tracking.after_action(job.target)

    # -- control ---------------------------------------------------------------------------
    def handle_control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": build_status(self).to_dict()}
        if cmd == "tree":
            if self.tracking is None:
                return {"ok": False, "error": f"process tracking is {self.tracking_note}"}
            return {"ok": True, "tree": self.tracking.tree_json(str(req.get("cgroup") or ""))}
        if cmd == "tracking":
            value = req.get("value")
            if value not in ("enable", "disable"):
                return {"ok": False, "error": "tracking takes 'enable' or 'disable'"}
            if self.tracking is None:
                return {"ok": False, "error": f"process tracking is {self.tracking_note}"}
            self.tracking.set_enabled(value == "enable")
            return {"ok": True, "tracking": value + "d"}
        if cmd == "reset-interval":
            try:
                ms = int(req.get("value"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return {"ok": False, "error": "reset-interval takes milliseconds (an integer)"}
            if not 100 <= ms <= 2**32 - 1:
                return {"ok": False, "error": "reset-interval must be between 100 and 4294967295 ms"}
            if self.tracking is None:
                return {"ok": False, "error": f"process tracking is {self.tracking_note}"}
            self.tracking.set_reset_interval(ms)
            self._next_age_ns = self.clock() + ms * MS
            return {"ok": True, "reset_interval_ms": ms}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # -- status ----------------------------------------------------------------------------
    def _publish_status(self) -> None:
        self.board.publish(build_status(self), time.monotonic())
