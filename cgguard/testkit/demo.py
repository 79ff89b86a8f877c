"""``cgguard demo``: a contained bomb in a throwaway cgroup, found and removed while you watch.

Safe on a small machine: the bomb runs under a kernel task cap (see cgguard.testkit.sandbox) and stops
by itself after a deadline even if cgguard did nothing; everything is removed afterwards.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import threading
import time

from cgguard import config
from cgguard.agent import Agent
from cgguard.kernel.cgroupfs import CgroupFS
from cgguard.testkit.corpus import WORKLOADS
from cgguard.testkit.sandbox import Sandbox
from cgguard.testkit.sinks import CallbackSink


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(fs: CgroupFS, keep_state: bool = False, cap: int = 1024, deadline_s: float = 8.0) -> int:
    logging.basicConfig(level=logging.WARNING, format="[cgguard] %(message)s")
    state = tempfile.mkdtemp(prefix="cgguard-demo-")
    sb = Sandbox.create(fs, prefix="cgguard-demo", cap=cap)
    agent: Agent | None = None
    thread = None
    got: list[dict] = []
    done = threading.Event()
    try:
        bomb_cg = sb.cgroup("bomb")
        calm_cg = sb.cgroup("calm")
        _say(f"sandbox {fs.abspath(sb.name)} (task cap {cap} via {sb.mode}, bomb deadline {deadline_s:.0f} s)")
        cfg = config.build(
            {
                "watch": [f"{sb.name}/**"],
                "state_dir": state,
                "listen": "",
                "control_socket": "",
                "log_level": "warning",
            }
        )

        def on_incident(inc: dict) -> None:
            got.append(inc)
            done.set()

        agent = Agent(cfg, fs, sinks=[CallbackSink(on_incident)])
        agent.setup()
        thread = threading.Thread(target=agent.run, name="cgguard-agent", daemon=True)
        thread.start()
        _say(f"cgguard watches {sb.name}/** (tracking: {agent.tracking_note})")
        innocent = sb.spawn(["sleep", "60"], calm_cg, deadline_s=30)
        _say(f"started an innocent 'sleep 60' in {calm_cg}")
        time.sleep(0.3)
        t0 = time.monotonic()
        bomb = sb.spawn(WORKLOADS["classic"].make(int(deadline_s)), bomb_cg, deadline_s=deadline_s + 2)
        _say(f"started the classic bash bomb :(){{ :|:& }};: in {bomb_cg}")
        if not done.wait(deadline_s + 5):
            _say("FAILED: cgguard did not report an incident before the bomb's deadline")
            return 1
        elapsed = (time.monotonic() - t0) * 1000
        inc = got[0]
        _say(f"incident {inc['id']}: {inc['detector']} verdict -> {inc['action']}: {inc['result']}")
        for r in inc["reasons"]:
            _say(f"  why: {r['detail']}")
        if inc.get("origin"):
            o = inc["origin"]
            _say(f"  origin: pid {o['pid']} {o.get('cmdline') or o.get('comm')} ({'alive' if o['alive'] else 'dead'})")
        _say(
            f"  tasks at detection {inc['tasks_at_detection']}, peak {inc['peak_tasks']}, "
            f"detect {inc['detect_ms']} ms, remove {inc['remove_ms']} ms, survivors {inc['survivors']}"
        )
        time.sleep(0.2)
        left = sb.live_pids(bomb)
        alive = innocent.proc.poll() is None
        _say(f"start to end of the bomb: {elapsed:.0f} ms; bomb processes left: {len(left)}; innocent sleep alive: {alive}")
        ok = inc["result"] in ("removed", "gone") and not left and alive
        _say("OK: the bomb is gone and the innocent process lives" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        if agent is not None:
            agent.stop()
            if thread is not None:
                thread.join(5)
            agent.close()
        left = sb.close()
        if left:
            print(f"[demo] could not remove: {', '.join(left)}", file=sys.stderr)
        if keep_state:
            _say(f"incident log kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
