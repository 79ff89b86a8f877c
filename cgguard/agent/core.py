"""The agent: kernel sources in, verdicts, decisions, actions, incidents out.

One thread -- the loop -- owns all state (the watcher, the lineage tree, sample histories) and
runs a selector over the inotify fd, the proc connector and a wake-up pipe, with sampling
deadlines as timeouts. Other threads only talk to it through queues and the wake-up pipe: the
action worker (:mod:`.worker`), the control socket (:mod:`.control`) and readers of the status
board (:class:`cgguard.state.status.StatusBoard`). Decisions are :func:`.policy.decide`.

A whole-cgroup kill is written from the loop the moment the verdict is final (``cgroup.kill``
returns at once) and its end is the ``populated 0`` that the watcher's inotify watch on
``cgroup.events`` already delivers; only surgical kills and freezes, which wait on the kernel
in several steps, go to the worker.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import selectors
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

from cgguard.act import ActionResult
from cgguard.attribution import attribute
from cgguard.config import Action, Config
from cgguard.detect import Verdict
from cgguard.detect.cgroup import RULES, holds_most
from cgguard.kernel.cgroupfs import CgroupError, CgroupFS, CgroupGone
from cgguard.kernel.cgroupns import adopt_cgroupns_root, own_cgroup
from cgguard.kernel.clock import MS, S
from cgguard.kernel.files import FileCache
from cgguard.kernel.procfs import read_stat
from cgguard.sinks.incidents import Incident, IncidentLog, IncidentLogError
from cgguard.state.budget import Budgets
from cgguard.state.lineage_walk import within
from cgguard.state.status import StatusBoard
from cgguard.state.watch import Node, Watcher

from . import policy
from .control import ControlServer
from .host import protect_process, raise_thread_priority, sd_notify
from .status import build_status, status_dict
from .tracking import Tracking, TrackingUnavailable
from .worker import ActionWorker, Job

log = logging.getLogger("cgguard.agent")
PROCCONN_COALESCE_NS = 2 * MS
# Between drains while nothing starts in the watched cgroups and none abandons: see _drain().
PROCCONN_CALM_COALESCE_NS = 10 * MS
# How long the 2 ms coalescing holds after a watched cgroup became populated or started forking:
# long enough for a bomb's first abandonments (a few ms for a shell bomb), which then keep it.
PROCCONN_FAST_HOLD_NS = 250 * MS
LOOP_TICK_NS = 200 * MS
SAMPLES_PER_TURN = 64
LOOP_GIL_WAIT_S = 0.001
ESCALATE_NS = 30 * S  # a runaway back within this after an action gets the whole cgroup removed
ADOPT_GAP_NS = 1 * S
KILL_ATTEMPTS = 3
# Descriptors the rest of the agent may hold at once (sockets and their connections, pipes, the
# incident log, /proc reads, a kill's inotify, hooks): kept-open cgroupfs files never take these.
FD_RESERVE = 64


def _profiler() -> Any:
    """CGGUARD_PROFILE=FILE: profile the loop thread with cProfile, written to FILE at exit (for
    ``cgguard bench``'s cost runs and by hand; the profiler slows the loop, so never in production)."""
    if not os.environ.get("CGGUARD_PROFILE"):
        return None
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    return prof


class IncidentSink(Protocol):
    """Told about every incident twice: when detected, and with its result."""

    def incident(self, inc: Incident) -> None: ...


@dataclass
class PendingKill:
    job: Job
    t0_ns: int
    deadline_ns: int
    tasks_before: int
    attempts: int = 1


def tenant_key(rel: str, wl: dict[str, Any] | None, top: str) -> str:
    """Whose kill budget an action on ``rel`` spends: a pod, a user, a container or unit, else the
    delegated tree it sits in (the highest watched cgroup above it), so that a tenant who can
    create cgroups cannot multiply its budget by making many."""
    wl = wl or {}
    kind = wl.get("kind")
    if kind == "pod" and wl.get("pod_uid"):
        return f"pod:{wl['pod_uid']}"
    if kind in ("session", "user-service") and wl.get("uid") is not None:
        return f"uid:{wl['uid']}"
    if kind in ("container", "machine", "service", "scope", "unit") and wl.get("base"):
        return f"{kind}:{wl['base']}"
    return f"cgroup:{top}"


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
        self.files = FileCache(cfg.sampling.max_open_files)
        self.budgets = Budgets(fs, self.files, cfg.budget.default_tasks, cfg.budget.use_v1)
        self.watcher = Watcher(
            fs, cfg.watch, cfg.protect, cfg.sampling, self.budgets, self.files,
            exclude=self._is_own_or_ancestor, on_removed=self._forget_cgroup,
        )
        kb = cfg.kill_budget
        self.kill_budgets = policy.Budgets(kb.max_actions, kb.node_max_actions, kb.per_seconds)
        # The connector stays open with tracking disabled, so 'ctl tracking enable' can turn it on.
        self.use_connector = cfg.tracking.connector if use_connector is None else use_connector
        self.tracking: Tracking | None = None
        self.tracking_note = "off"
        self.ready = False
        self.incidents_since_start = 0
        self.incidents_recorded = 0
        self.not_removed: dict[str, int] = {}
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
        self._kills: dict[str, PendingKill] = {}
        self._cooldown: dict[str, int] = {}
        # Lineage verdicts set aside by a relaxing allow rule, per target: quiet for a while,
        # without muting the budget rules the rule leaves in charge.
        self._lineage_quiet: dict[str, int] = {}
        self._acted: dict[str, tuple[int, str, str]] = {}  # target -> (when, action, result)
        self._adopt_at: dict[str, int] = {}
        self._workloads: dict[str, dict[str, Any] | None] = {}
        self._reeval: set[str] = set()
        self._next_age_ns = 0
        self._drained_ns = 0
        self._pc_last_ns = 0
        self._pc_hot = False  # the last drain read events: drain again on the coalescing clock
        self._pc_coalesce_ns = PROCCONN_COALESCE_NS
        self._pc_fast_until_ns = 0
        self._woken = False  # the wake-up pipe fired: look at the worker's and control's queues

    # -- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        # In a private cgroup namespace (a non-privileged container) /proc paths must be
        # translated before anything compares them with cgroupfs paths, our own cgroup first.
        adopt_cgroupns_root(self.fs)
        self.own_cgroup = own_cgroup() or ""
        self.notes += protect_process()
        self._fit_files_to_fd_limit()
        self.log.open()
        self._recover()
        self.incidents_recorded = self.log.count()
        if self.cfg.control_socket:
            self.control = ControlServer(self.cfg.control_socket, self.wake)
        self.watcher.start()
        for glob in self.watcher.unmatched_globs():
            msg = f"watch glob {glob!r} matches no cgroup under {self.fs.root} (yet): check it"
            log.warning(msg)
            self.notes.append(msg)
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
        now = self.clock()
        for rel in self._reeval:
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

    def _fit_files_to_fd_limit(self) -> None:
        """Kept-open files get at most half of what RLIMIT_NOFILE leaves beyond FD_RESERVE. A cache
        that filled the fd table (the file cache only shrinks when its own open fails) would make
        every other open fail with EMFILE: the status, a budget's pids.max, the incident log."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return
        fit = max(0, (soft - FD_RESERVE) // 2)
        if fit < self.files.max_open:
            msg = (
                f"RLIMIT_NOFILE is {soft}: keeping at most {fit} cgroupfs files open "
                f"(sampling.max_open_files {self.files.max_open}); the rest are opened per read"
            )
            log.warning(msg)
            self.notes.append(msg)
            self.files.max_open = fit

    def _recover(self) -> None:
        """An incident left open by a crash is closed, and its cgroup looked at again at once."""
        for rec in self.log.open_incidents():
            note = "the agent stopped before this incident had a result; its cgroup was re-evaluated at start-up"
            cg = rec.get("cgroup")
            if rec.get("action") == Action.kill_lineage.value and isinstance(cg, str) and self._thaw_interrupted(cg):
                note += " (thawed first: the interrupted surgical kill had left it frozen)"
            try:
                self.log.close_interrupted(rec, note)
            except (IncidentLogError, OSError) as e:
                log.error("incident log: closing %s: %s", rec.get("id"), e)
                continue
            if isinstance(rec.get("cgroup"), str):
                self._reeval.add(rec["cgroup"])
            log.warning("incident %s in %s was interrupted by an agent restart", rec.get("id"), rec.get("cgroup"))

    def _thaw_interrupted(self, rel: str) -> bool:
        """A surgical kill freezes the shared cgroup while it sorts the bomb from its neighbours;
        an agent killed in between leaves it frozen. A frozen bomb neither grows nor refuses
        forks, so no rule would ever see it, and the neighbours stay frozen with it. Thawed, the
        bomb is seen at once (its cgroup is re-evaluated) and removed whole: its lineage is lost."""
        try:
            if not self.fs.exists(rel) or not self.fs.frozen(rel):
                return False
            self.fs.freeze(rel, False)
        except CgroupError as e:
            log.error("thawing %s after an interrupted surgical kill: %s", rel, e)
            return False
        log.warning("thawed %s: an interrupted surgical kill had left it frozen", rel)
        return True

    def _watched_paths(self) -> list[str]:
        return [n.rel for n in self.watcher.watched()]

    def _forget_cgroup(self, node: Node) -> None:
        """A watched cgroup vanished: finish a kill waiting on it, and drop what the agent kept for
        it, or pod churn over weeks grows these tables without bound."""
        pk = self._kills.pop(node.rel, None)
        if pk is not None:
            self._finish(pk.job, ActionResult("kill-cgroup", "gone", (self.clock() - pk.t0_ns) / MS, 0, pk.tasks_before))
        for table in (self._cooldown, self._lineage_quiet, self._workloads, self._adopt_at, self._acted):
            table.pop(node.rel, None)

    def _is_own_or_ancestor(self, rel: str) -> bool:
        own = self.own_cgroup
        return rel == own or own.startswith(rel + "/") or rel == ""

    def _in_scope(self, cgroup: str | None) -> bool:
        return cgroup is not None and self.watcher.watched_ancestor(cgroup) is not None

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        self.notes += raise_thread_priority(self.cfg.realtime)
        # The loop shares the GIL with the HTTP, control and sink threads: when it wakes while one
        # of them runs Python, it gets the GIL after at most this long (default 5 ms).
        sys.setswitchinterval(min(sys.getswitchinterval(), LOOP_GIL_WAIT_S))
        prof = _profiler()
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
        if self._pc_hot:
            drain_ns = self._pc_last_ns + self._pc_coalesce_ns - now
            for key, _ in hot.select(max(0, min(timeout_ns, drain_ns)) / 1e9):
                key.data()
            if self._pc_hot and self.clock() >= self._pc_last_ns + self._pc_coalesce_ns:
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
        for node in self.watcher.due(now, SAMPLES_PER_TURN):
            self._sample_and_check(node, now)
        for node in self.watcher.maybe_rescan_degraded(now):
            self._new_cgroup(node, now)
        self._check_kills(now)
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
                self._finish(job, res)
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
        now = self.clock()
        for node, kind in self.watcher.handle_inotify():
            if not node.watched:
                continue
            if kind == "added" or (kind == "events" and node.populated):
                # Something starts in a watched cgroup: its first forks are drained on the 2 ms clock.
                self._fast_drains(now)
            if kind == "pids.events":
                self.watcher.hint_active(node, now)
                self._sample_and_check(node, now)
            elif kind == "added":
                self._new_cgroup(node, now)
            elif kind == "events":
                pk = self._kills.get(node.rel)
                if pk is not None and not node.populated:
                    del self._kills[node.rel]
                    self._finish(pk.job, ActionResult("kill-cgroup", "removed", (now - pk.t0_ns) / MS, 0, pk.tasks_before))
                elif node.populated:
                    # Something started in a cgroup that was empty: sample it (and, for narrowing
                    # a verdict later, its watched parents) from its first tasks on, and track
                    # processes a runtime moved in after their fork.
                    self._new_cgroup(node, now)

    def _fast_drains(self, now: int) -> None:
        self._pc_fast_until_ns = now + PROCCONN_FAST_HOLD_NS
        self._pc_coalesce_ns = PROCCONN_COALESCE_NS

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
        assert self.tracking is not None
        # Coalesce: under steady fork load the socket turns readable for every event, and a
        # wake-up per event costs more than the event. Drains are at least the coalescing delay
        # apart (2 ms: a bomb doubling every ~10 ms is seen 2 ms later at most); one due later
        # is left to the loop, which waits for its deadline without blocking inotify (run()).
        if self.clock() >= self._pc_last_ns + self._pc_coalesce_ns:
            self._drain()
        else:
            self._pc_hot = True

    def _drain(self) -> None:
        tr = self.tracking
        assert tr is not None
        t = self._pc_last_ns = self.clock()
        stats = tr.conn.stats
        before = stats.received + stats.lost_enobufs
        touched, empty = tr.drain()
        if empty:
            self._drained_ns = t
        # Events came: more are likely, so the loop drains again at the next coalescing
        # deadline instead of waking for the next datagram (see run()).
        self._pc_hot = stats.received + stats.lost_enobufs != before
        now = self.clock()
        horizon = now - tr.params.window_ms * MS
        watcher = self.watcher
        nodes: dict[str, Node] = {}
        for cg in touched:
            node = watcher.watched_ancestor(cg)
            if node is not None:
                nodes[node.rel] = node
                if node.active_until_ns <= now:  # a calm watched cgroup forks: something starts
                    self._pc_fast_until_ns = now + PROCCONN_FAST_HOLD_NS
                watcher.hint_active(node, now)
        # The 2 ms coalescing is for the lineage detector, which decides on abandoning families
        # a few generations deep. It holds for 250 ms after a watched cgroup became populated
        # (inotify) or a calm one started forking, and while a cgroup that forks shows
        # abandonment within the window. Otherwise -- steady builds, xargs, fork loops, and every
        # process outside the watch -- the loop drains every 10 ms: the cost of a drain is mostly
        # the wake-up itself. What can be later than before: the first fork events of something
        # starting in an already populated, calm watched cgroup while other traffic keeps the loop
        # on the 10 ms clock (at most 10 ms).
        fast = now < self._pc_fast_until_ns or (touched and tr.tree.abandoned_recently(touched, horizon))
        self._pc_coalesce_ns = PROCCONN_COALESCE_NS if fast else PROCCONN_CALM_COALESCE_NS
        if not nodes:
            return
        # No abandonment anywhere within the window: no cgroup can qualify (what qualifies()
        # would find, without a pass over the tree's cgroups per touched cgroup).
        if tr.tree.last_abandon_ns < horizon:
            return
        for node in nodes.values():
            if not node.busy and not node.frozen and tr.qualifies(node.rel, now):
                verdict = tr.evaluate(node.rel, now)
                if verdict is not None:
                    self._on_verdict(node, verdict)

    # -- detection -------------------------------------------------------------------------
    def _sample_and_check(self, node: Node, now: int) -> None:
        if node.busy or not node.watched or node.history is None:
            return
        tr = self.tracking
        s = self.watcher.sample(node, now, births=tr.births if tr else None)
        if tr is not None and s.tasks > tr.tasks(node.rel) + max(4, s.tasks // 10):
            # More tasks than the tree knows: processes moved in after their fork, or missed.
            self._adopt(node, now)
        if node.frozen:
            return  # frozen (for lack of budget, or by an operator): it cannot grow; nothing to judge
        for rule in RULES:
            verdict = rule(node.rel, node.history, now, self._params(rule.__name__))
            if verdict is not None and (verdict.evidence != "budget" or self._holds_most(node, s.source)):
                self._on_verdict(node, verdict)
                return

    def _holds_most(self, node: Node, source: str) -> bool:
        """Among the watched cgroups charged to the same kernel limit (a pod's containers), is this
        the one holding the most of it? Nested cgroups are left to narrowing."""
        if source == "default":
            return True
        peers = []
        for other in self.watcher.watched():
            if other is node or other.budget is None or within(other.rel, node.rel) or within(node.rel, other.rel):
                continue
            if any(g.name == source for g in other.budget.groups):
                peers.append(other.last_tasks)
        return holds_most(node.last_tasks, peers)

    def _params(self, rule: str) -> Any:
        d = self.cfg.detect
        return {"pinned": d.pinned, "fill_hold": d.fill_hold, "trajectory": d.trajectory}[rule]

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
        return self.cfg.refusal(rel)

    def _target(self, node: Node, verdict: Verdict) -> Node:
        if verdict.detector == "lineage" and verdict.cgroup:
            found = self.watcher.watched_ancestor(verdict.cgroup)
            if found is None or found.rel != verdict.cgroup and verdict.cgroup not in self.watcher.nodes:
                # A cgroup the watcher does not know (its creation was lost with an inotify
                # overflow): look again before acting, rather than blame its parent.
                for n in self.watcher.rescan():
                    self._new_cgroup(n, self.clock())
                found = self.watcher.watched_ancestor(verdict.cgroup)
            return found or node
        return self.watcher.narrow(node, verdict.first_sign_ns)

    def _top_watched(self, rel: str) -> str:
        top, cur = rel, rel
        while cur:
            cur = cur.rsplit("/", 1)[0] if "/" in cur else ""
            n = self.watcher.nodes.get(cur)
            if n is not None and n.watched:
                top = cur
        return top

    def _allow(self, target: str, v: Verdict) -> tuple[str | None, str | None]:
        """(exempting rule, relaxing rule) that match the verdict's origin, if any."""
        if not self.cfg.allow or v.origin is None:
            return None, None
        exe = self.tracking.origin_exe(v.origin_ref) if self.tracking else None
        comm, cmdline, via = v.origin.comm, v.origin.cmdline, ""
        if cmdline is None or exe is None:
            # A fire-and-forget tool's first copy exits milliseconds after its exec, often before
            # its image was read: what it ran is then told by its nearest live copy.
            copy = self._copy_image(v.origin_ref)
            # A copy that runs another program (make's sh) says nothing about the origin.
            if copy is not None and comm in (None, copy[2]):
                pid, c_exe, c_comm, c_cmdline = copy
                exe, comm, cmdline = exe or c_exe, comm or c_comm, cmdline or c_cmdline
                via = f" (matched on its copy {pid}: the origin exited before its image was read)"
        for rule in self.cfg.allow:
            if rule.matches(target, exe, comm, cmdline):
                what = rule.describe() + via
                return (what, None) if rule.mode == "exempt" else (None, what)
        return None, None

    def _copy_image(
        self, origin: Any, visits: int = 4096, reads: int = 8
    ) -> tuple[int, str | None, str | None, str | None] | None:
        """(pid, exe, comm, cmdline) of the shallowest live descendant of ``origin`` whose image
        can be read. Bounded: a bomb's family is large, and a tool's early generations are all
        gone (``visits`` records looked at, ``reads`` of them read from /proc)."""
        if self.tracking is None or origin is None:
            return None
        tree = self.tracking.tree
        level: list[Any] = [origin]
        while level:
            nxt = []
            for rec in level:
                for c in rec.children():
                    visits -= 1
                    if visits < 0:
                        return None
                    nxt.append(c)
                    if not c.alive:
                        continue
                    comm, cmdline = tree.describe(c)
                    reads -= 1
                    if cmdline is not None:
                        try:
                            exe: str | None = os.readlink(f"/proc/{c.tgid}/exe")
                        except OSError:
                            exe = None
                        return c.tgid, exe, comm, cmdline
                    if reads <= 0:
                        return None
            level = nxt
        return None

    def _escalation(self, rel: str, now: int) -> str | None:
        last = self._acted.get(rel)
        if last is None or now - last[0] > ESCALATE_NS:
            return None
        when, action, result = last
        if action == Action.kill_lineage.value or result in ("not-found", "failed", "timeout"):
            return f"the runaway is back {(now - when) / MS:.0f} ms after {action}: {result}"
        return None

    def _context(self, target: Node, verdict: Verdict, tenant: str, now: int) -> policy.Context:
        configured = self.cfg.action_for(target.rel)
        tr = self.tracking
        wants_lineage = configured in (Action.auto, Action.kill_lineage) and not verdict.members
        worst = tr.whole(tr.worst_lineage(target.rel)) if wants_lineage and tr else None
        allowed, relaxed = self._allow(target.rel, verdict if verdict.origin else (worst or verdict))
        family = verdict if verdict.members else worst
        kb = self.cfg.kill_budget
        return policy.Context(
            configured=configured,
            refusal=self.refusal(target.rel),
            dry_run=self.cfg.dry_run,
            exhausted=self.kill_budgets.exhausted(tenant),
            budget_text=f"{kb.max_actions} per {kb.per_seconds:g}s for {tenant}, {kb.node_max_actions} per node",
            worst_lineage=worst,
            escalate=self._escalation(target.rel, now),
            allowed=allowed,
            relaxed=relaxed,
            family_is_whole=family is not None and self._only(target.rel, family),
        )

    def _only(self, rel: str, family: Verdict) -> bool:
        """Does the cgroup hold nothing but this family? A bomb keeps forking while we look, so
        each process is asked whether it descends from the origin (as a surgical kill would)."""
        if self.tracking is None or family.origin_ref is None:
            return False
        belongs = self.tracking.member_test(family.origin_ref)
        try:
            inside = [p for cg in self.fs.walk(rel) for p in self.fs.procs(cg)]
        except CgroupError:
            return False
        known = {pid for pid, _ in family.members or ()}
        for pid in inside:
            if pid in known:
                continue
            st = read_stat(pid)
            if st is None:
                continue  # exited meanwhile
            b = belongs(pid, st) if belongs is not None else None
            if b is True:
                continue
            # Not known to descend from the origin. A member forked a moment ago (its event still
            # queued) has a member or, orphaned, init as its parent; anything else is a neighbour.
            if b is False or not (st.ppid in known or st.ppid == 1):
                return False
        return True

    def _on_verdict(self, node: Node, verdict: Verdict) -> None:
        now = self.clock()
        if self.tracking is not None:
            verdict = self.tracking.whole(verdict)  # type: ignore[assignment]
        target = self._target(node, verdict)
        if target.busy or self._cooldown.get(target.rel, 0) > now:
            return
        if verdict.evidence == "lineage" and self._lineage_quiet.get(target.rel, 0) > now:
            return
        wl = self.workload(target.rel)
        tenant = tenant_key(target.rel, wl, self._top_watched(target.rel))
        ctx = self._context(target, verdict, tenant, now)
        d = policy.decide(verdict, ctx)
        if d.kills:
            self.kill_budgets.take(tenant)
        inc = self._incident(target, d, tenant, wl)
        # A whole-cgroup kill is written before anything else (logging fsyncs, sinks start hooks):
        # every millisecond before cgroup.kill is a millisecond more of forks.
        killed = self._write_kill(target) if d.action == Action.kill_cgroup else None
        log.warning("runaway in %s (%s, %s): %s -> %s", target.rel, verdict.detector, verdict.evidence, verdict.summary(), d.action.value)
        self._record(inc, final=False)
        if d.result == "allowed" and ctx.allowed is None:
            # Relaxed, not exempt: only the lineage evidence was set aside. A cooldown of the
            # whole target would also silence the budget rules while the tool runs away.
            self._lineage_quiet[target.rel] = now + 30_000 * MS
        else:
            self._cooldown[target.rel] = now + (1000 if d.acts else 30_000) * MS
        if not d.acts:
            inc.result = d.result or "reported"
            self._record(inc, final=True, unremoved=d.unremoved)
            return
        target.busy = True
        tr = self.tracking
        v = d.verdict
        job = Job(inc, target.rel, d, classify=tr.member_test(v.origin_ref) if tr else None, settle=self._settle if tr else None)
        if killed is not None:
            self._kill_sent(target, job, now, killed)
        else:
            self.worker.submit(job)

    def _write_kill(self, target: Node) -> ActionResult | bool:
        """True once cgroup.kill is written; the result instead if it could not be."""
        try:
            self.fs.kill(target.rel)
            return True
        except CgroupGone:
            return ActionResult("kill-cgroup", "gone", 0.0, 0, target.last_tasks)
        except CgroupError as e:
            return ActionResult("kill-cgroup", "failed", None, None, target.last_tasks, notes=[str(e)])

    def _kill_sent(self, target: Node, job: Job, now: int, written: ActionResult | bool) -> None:
        """Wait for the kill's populated 0 through the inotify watch the watcher already has."""
        if isinstance(written, ActionResult):
            self._finish(job, written)
            return
        before = target.last_tasks
        timeout = self.cfg.remove_timeout_ms * MS // KILL_ATTEMPTS
        self._kills[target.rel] = PendingKill(job, now, now + timeout, before)
        if target.events_wd is None:  # no inotify watch (degraded): poll in _check_kills
            return
        if not self.fs.populated(target.rel):  # it emptied before the watch could tell
            self._kills.pop(target.rel)
            self._finish(job, ActionResult("kill-cgroup", "removed", (self.clock() - now) / MS, 0, before))

    def _check_kills(self, now: int) -> None:
        for rel, pk in list(self._kills.items()):
            node = self.watcher.nodes.get(rel)
            if node is not None and node.events_wd is None and not self.fs.populated(rel):
                del self._kills[rel]
                self._finish(pk.job, ActionResult("kill-cgroup", "removed", (now - pk.t0_ns) / MS, 0, pk.tasks_before))
                continue
            if now < pk.deadline_ns:
                continue
            if pk.attempts < KILL_ATTEMPTS:
                pk.attempts += 1
                pk.deadline_ns = now + self.cfg.remove_timeout_ms * MS // KILL_ATTEMPTS
                pk.job.incident.notes.append(f"populated still 1 after attempt {pk.attempts - 1}: killing again")
                try:
                    self.fs.kill(rel)
                except CgroupError:
                    pass
                continue
            del self._kills[rel]
            left = node.last_tasks if node else None
            self._finish(pk.job, ActionResult("kill-cgroup", "timeout", (now - pk.t0_ns) / MS, left, pk.tasks_before))

    def _incident(self, target: Node, d: policy.Decision, tenant: str, wl: dict[str, Any] | None) -> Incident:
        v = d.verdict
        tasks = v.tasks if target.rel == v.cgroup else (target.last_tasks or v.tasks)
        return Incident(
            cgroup=target.rel,
            action=d.action.value,
            reasons=[r.to_dict() for r in v.reasons],
            tasks_at_detection=tasks,
            detector=v.detector,
            evidence=v.evidence,
            budget=v.budget,
            budget_source=v.budget_source,
            tenant=tenant,
            peak_tasks=max(tasks, target.history.peak if target.history else 0),
            detect_ms=round(max(0, v.at_ns - v.first_sign_ns) / MS, 1),
            dry_run=self.cfg.dry_run,
            origin=v.origin.to_dict() if v.origin else None,
            family=v.family,
            depth=v.depth,
            workload=wl,
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

    def _record(self, inc: Incident, final: bool, unremoved: str | None = None) -> None:
        try:
            self.log.append(inc)
        except IncidentLogError as e:
            log.error("incident log: %s", e)
        if final:
            self.incidents_since_start += 1
            self.incidents_recorded += 1
            if unremoved:
                self.not_removed[unremoved] = self.not_removed.get(unremoved, 0) + 1
            self.board.invalidate()
        for sink in self.sinks:
            try:
                sink.incident(inc)
            except Exception:  # a sink must never stop the agent
                log.exception("incident sink %r failed", sink)

    def _settle(self, max_wait_s: float = 1.0) -> None:
        """Called from the action thread after a freeze: wait until the loop has read every
        proc-connector event queued before now, so the tree knows each frozen process. The cgroup
        is frozen meanwhile, so waiting costs the bomb nothing; it normally ends within a loop
        turn, and a loaded (or emulated) host needs longer than a few hundred ms."""
        t = self.clock()
        self.wake()
        deadline = time.monotonic() + max_wait_s
        while self._drained_ns < t and time.monotonic() < deadline:
            time.sleep(0.002)

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
        unremoved = job.decision.unremoved
        if res.result in ("failed", "timeout"):
            unremoved = "failed"
        self._record(inc, final=True, unremoved=unremoved)
        now = self.clock()
        self._acted[job.target] = (now, res.action, res.result)
        node = self.watcher.nodes.get(job.target)
        if node is not None:
            node.busy = False
            if node.history is not None:
                node.history.clear()
            self.watcher.hint_active(node, now)  # watch what is left closely: a survivor regrows
        if self.tracking is not None:
            self.tracking.after_action(job.target)

    # -- control ---------------------------------------------------------------------------
    def handle_control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": status_dict(build_status(self))}
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
