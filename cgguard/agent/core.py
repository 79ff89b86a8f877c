"""The agent's loop: kernel sources in, verdicts, decisions, actions, incidents out.

One thread -- the loop -- owns all state (the watcher, the lineage tree, sample histories) and
runs a selector over the inotify fd, the proc connector and a wake-up pipe, with sampling
deadlines as timeouts. Other threads only talk to it through queues and the wake-up pipe: the
action worker (:mod:`.worker`), the control socket (:mod:`.control`) and readers of the status
board (:class:`cgguard.state.status.StatusBoard`).

What the loop's sources bring in goes to the detectors (:mod:`.detecting`); a verdict becomes a
decision (:mod:`.policy`), an action and an incident in :mod:`.acting`, which writes a
whole-cgroup kill at once and waits for its end on the loop (:mod:`.kills`). Incidents go out
through :mod:`.recording`; what a crash left behind is settled at start-up (:mod:`.recovery`).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import sys
import time
from typing import Any, Iterable

from cgguard.config import Config
from cgguard.kernel.cgroupfs import CgroupFS
from cgguard.kernel.cgroupns import adopt_cgroupns_root, own_cgroup
from cgguard.kernel.clock import MS, S
from cgguard.kernel.files import FileCache
from cgguard.sinks.incidents import IncidentLog
from cgguard.state.budget import Budgets
from cgguard.state.status import StatusBoard
from cgguard.state.watch import Node, Watcher

from . import control
from .acting import Acting
from .context import own_or_ancestor
from .control import ControlServer
from .detecting import Detection
from .draining import ConnectorDrains
from .host import files_within_fd_limit, profiler, protect_process, raise_thread_priority, sd_notify
from .recording import IncidentSink, Recorder, Workloads
from .recovery import recover
from .status import build_status, status_dict
from .tracking import Tracking, TrackingUnavailable
from .worker import ActionWorker

log = logging.getLogger("cgguard.agent")
LOOP_TICK_NS = 200 * MS
SAMPLES_PER_TURN = 64
LOOP_GIL_WAIT_S = 0.001
ADOPT_GAP_NS = 1 * S


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
        self.board = board or StatusBoard()
        self.board.bind(self.wake)
        self.recorder = Recorder(self.log, sinks, self.board)
        self.workloads = Workloads()
        self.files = FileCache(cfg.sampling.max_open_files)
        self.budgets = Budgets(fs, self.files, cfg.budget.default_tasks, cfg.budget.use_v1)
        self.watcher = Watcher(
            fs, cfg.watch, cfg.protect, cfg.sampling, self.budgets, self.files,
            exclude=self._is_own_or_ancestor, on_removed=self._forget_cgroup,
        )
        # The connector stays open with tracking disabled, so 'ctl tracking enable' can turn it on.
        self.use_connector = cfg.tracking.connector if use_connector is None else use_connector
        self.tracking: Tracking | None = None
        self.tracking_note = "off"
        # These need the tracking that setup() starts (or fails to): made there.
        self._drains: ConnectorDrains | None = None  # only with tracking
        self._acting: Acting | None = None
        self._detection: Detection | None = None
        self.ready = False
        self.loop_errors = 0
        self._errors_logged: dict[str, float] = {}
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
        self._adopt_at: dict[str, int] = {}
        self._next_age_ns = 0
        self._woken = False  # the wake-up pipe fired: look at the worker's and control's queues

    @property
    def acting(self) -> Acting:
        if self._acting is None:
            raise RuntimeError("Agent.setup() has not run")
        return self._acting

    @property
    def detection(self) -> Detection:
        if self._detection is None:
            raise RuntimeError("Agent.setup() has not run")
        return self._detection

    # -- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        # In a private cgroup namespace (a non-privileged container) /proc paths must be
        # translated before anything compares them with cgroupfs paths, our own cgroup first.
        adopt_cgroupns_root(self.fs)
        self.own_cgroup = own_cgroup() or ""
        self.notes += protect_process()
        self._fit_files_to_fd_limit()
        self.log.open()
        reeval = recover(self.log, self.fs)
        self.recorder.count_logged()
        if self.cfg.control_socket:
            self.control = ControlServer(self.cfg.control_socket, self.wake)
        self.watcher.start()
        for glob in self.watcher.unmatched_globs():
            msg = f"watch glob {glob!r} matches no cgroup under {self.fs.root} (yet): check it"
            log.warning(msg)
            self.notes.append(msg)
        if self.use_connector:
            self._start_tracking()
        self._acting = Acting(
            self.cfg, self.fs, self.watcher, self.tracking,
            own_cgroup=self.own_cgroup, worker=self.worker, recorder=self.recorder, workloads=self.workloads,
            clock=self.clock, new_cgroup=self._new_cgroup, settle=self._drains.settle if self._drains else None,
        )
        self._detection = Detection(self.cfg, self.watcher, self.tracking, adopt=self._adopt, on_verdict=self._acting.on_verdict)
        now = self.clock()
        for rel in reeval:
            node = self.watcher.watched_ancestor(rel)
            if node is not None:
                self.watcher.hint_active(node, now)
        self._next_age_ns = now + self.cfg.tracking.reset_interval_ms * MS
        self.worker.start()
        if self.control is not None:
            self.control.start()
        self.ready = True
        self._publish_status()
        sd_notify("READY=1\nSTATUS=watching %d cgroups" % len(self.watcher.watched()))
        log.info(
            "watching %d cgroups under %s (tracking: %s%s)",
            len(self.watcher.watched()), self.fs.root, self.tracking_note, ", dry run" if self.cfg.dry_run else "",
        )

    def _start_tracking(self) -> None:
        try:
            self.tracking = Tracking(self.cfg, self.fs, in_scope=self._in_scope, watched=self._watched_paths)
            self.tracking.load(self._watched_paths())
            self.tracking_note = self.tracking.mode
            self.watcher.backoff = True
            self._drains = ConnectorDrains(self.tracking, self.watcher, self.clock, self.wake)
        except TrackingUnavailable as e:
            self.tracking = None
            self.tracking_note = f"unavailable: {e}"
            log.warning("process tracking unavailable, sampling only: %s", e)

    def _fit_files_to_fd_limit(self) -> None:
        fit = files_within_fd_limit(self.files.max_open)
        if fit is not None:
            self.files.max_open, msg = fit
            log.warning(msg)
            self.notes.append(msg)

    def _watched_paths(self) -> list[str]:
        return [n.rel for n in self.watcher.watched()]

    def _forget_cgroup(self, node: Node) -> None:
        """A watched cgroup vanished: finish a kill waiting on it, and drop what the agent kept for
        it, or pod churn over weeks grows these tables without bound."""
        if self._acting is not None:
            self._acting.forget(node.rel)
        self.workloads.forget(node.rel)
        self._adopt_at.pop(node.rel, None)

    def _is_own_or_ancestor(self, rel: str) -> bool:
        return own_or_ancestor(rel, self.own_cgroup)

    def _in_scope(self, cgroup: str | None) -> bool:
        return cgroup is not None and self.watcher.watched_ancestor(cgroup) is not None

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        self.notes += raise_thread_priority(self.cfg.realtime)
        # The loop shares the GIL with the HTTP, control and sink threads: when it wakes while one
        # of them runs Python, it gets the GIL after at most this long (default 5 ms).
        sys.setswitchinterval(min(sys.getswitchinterval(), LOOP_GIL_WAIT_S))
        prof = profiler()
        sel = selectors.DefaultSelector()
        sel.register(self.watcher.fileno(), selectors.EVENT_READ, self._on_inotify)
        sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        # While proc-connector events keep coming, waking up for the first datagram and then
        # sleeping out the coalescing delay costs two wake-ups per drain. Instead the loop then
        # waits on the other sources only, with the drain's deadline as the timeout: one wake-up
        # per drain, and inotify (a kill's populated 0) is not held up by a sleep.
        hot = selectors.DefaultSelector()
        hot.register(self.watcher.fileno(), selectors.EVENT_READ, self._on_inotify)
        hot.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        if self.tracking is not None:
            sel.register(self.tracking.fileno(), selectors.EVENT_READ, self._on_procconn)
        try:
            while not self._stop:
                try:
                    self._turn(sel, hot)
                except Exception as e:  # the guard must outlive its own bugs and exhaustion
                    self._survive(e)
        finally:
            self.ready = False
            self._publish_status()
            sel.close()
            hot.close()
            if prof is not None:
                prof.disable()
                prof.dump_stats(os.environ["CGGUARD_PROFILE"])

    def _turn(self, sel: selectors.BaseSelector, hot: selectors.BaseSelector) -> None:
        now = self.clock()
        due = self.watcher.next_due_ns()
        timeout_ns = min(LOOP_TICK_NS if due is None else max(0, due - now), LOOP_TICK_NS)
        timeout_ns = min(timeout_ns, max(0, self._next_age_ns - now))
        if self.watcher.rescanning:
            timeout_ns = 0  # look at the sources, then go on with the rescan
        drains = self._drains
        if drains is not None and drains.hot:
            drain_ns = drains.deadline_ns - now
            for key, _ in hot.select(max(0, min(timeout_ns, drain_ns)) / 1e9):
                key.data()
            if drains.hot and self.clock() >= drains.deadline_ns:
                self._drain()
        else:
            for key, _ in sel.select(timeout_ns / 1e9):
                key.data()
        self._tick(self.clock())

    def _survive(self, e: Exception) -> None:
        """An error escaped a handler. Out of descriptors: keep fewer files open and go on. Anything
        else: say so (at most once a minute per kind) and go on; a dead guard protects nobody."""
        if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
            self.files.max_open = len(self.files) // 2
            self.files.shrinks += 1
            self.files.trim()
        now = time.monotonic()
        kind = type(e).__name__
        if now - self._errors_logged.get(kind, -61.0) > 60:
            self._errors_logged[kind] = now
            log.exception("the loop survived an error (%s); continuing", kind)
        self.loop_errors += 1
        time.sleep(0.001)  # never spin at 100% on a persistent error

    def _tick(self, now: int) -> None:
        # Calm cgroups fall due together on their shared grid (thousands at once on a big node):
        # a bounded batch per turn, so the proc connector is drained between batches and a
        # bomb's fork events are not held up behind a thousand calm samples.
        acting, detection = self.acting, self.detection
        for node in self.watcher.due(now, SAMPLES_PER_TURN):
            detection.sample(node, now)
        self.watcher.maybe_rescan_degraded(now)
        if self.watcher.rescanning:
            # After lost inotify events: a slice of the rescan per turn, between samples and
            # events, so a bomb elsewhere is not left waiting behind thousands of new cgroups.
            self._on_watch(self.watcher.rescan_step(), now)
        acting.kills.check(now)
        if now >= self._next_age_ns:
            if self.tracking is not None:
                self.tracking.age(now)
                self._next_age_ns = now + self.tracking.reset_interval_ns
            else:
                self._next_age_ns = now + self.cfg.tracking.reset_interval_ms * MS
        if self._woken:
            # The worker and the control server wake the loop after queueing something: their
            # queues need no look (two lock round trips) on every other turn of the loop.
            self._woken = False
            for job, res in self.worker.results():
                acting.finish(job, res)
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
        self._woken = True
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
        self.files.close()
        self.log.close()

    # -- sources ---------------------------------------------------------------------------
    def _on_inotify(self) -> None:
        self._on_watch(self.watcher.handle_inotify(), self.clock())

    def _on_watch(self, changes: list[tuple[Node, str]], now: int) -> None:
        for node, kind in changes:
            if not node.watched:
                continue
            if kind == "added" or (kind == "events" and node.populated):
                # Something starts in a watched cgroup: its first forks are drained on the 2 ms clock.
                if self._drains is not None:
                    self._drains.fast(now)
            if kind == "pids.events":
                self.watcher.hint_active(node, now)
                self.detection.sample(node, now)
            elif kind == "added":
                self._new_cgroup(node, now)
            elif kind == "events":
                if not node.populated:
                    self.acting.kills.emptied(node, now)  # a kill's end
                else:
                    # Something started in a cgroup that was empty: sample it (and, for narrowing
                    # a verdict later, its watched parents) from its first tasks on, and track
                    # processes a runtime moved in after their fork.
                    self._new_cgroup(node, now)

    def _new_cgroup(self, node: Node, now: int) -> None:
        n: Node | None = node
        while n is not None:
            if n.watched:
                self.watcher.hint_active(n, now)
            n = n.parent
        if self.tracking is not None and node.populated:
            self._adopt(node, now)

    def _adopt(self, node: Node, now: int) -> None:
        if now - self._adopt_at.get(node.rel, 0) < ADOPT_GAP_NS:
            return
        self._adopt_at[node.rel] = now
        assert self.tracking is not None
        self.tracking.adopt(node.rel)

    def _on_procconn(self) -> None:
        drains = self._drains
        assert drains is not None
        # Coalesce (see .draining): a drain due later is left to the loop, which waits for its
        # deadline without blocking inotify (run()).
        if drains.due(self.clock()):
            self._drain()
        else:
            drains.hot = True

    def _drain(self) -> None:
        assert self._drains is not None
        nodes, now, horizon = self._drains.drain()
        if nodes:
            self.detection.lineage(nodes, now, horizon)

    # -- control and status ----------------------------------------------------------------
    def handle_control(self, req: dict[str, Any]) -> dict[str, Any]:
        return control.answer(
            req,
            status=lambda: status_dict(build_status(self)),
            tracking=self.tracking,
            tracking_note=self.tracking_note,
            reset_interval_set=self._reset_interval_set,
        )

    def _reset_interval_set(self, ms: int) -> None:
        self._next_age_ns = self.clock() + ms * MS

    def _publish_status(self) -> None:
        self.board.publish(build_status(self), time.monotonic())
