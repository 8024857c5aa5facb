"""A stand-in worker for agent tests: speaks the real channel (oobleck.worker.agent_link), no torch.

It waits for Start, reports ready, then "trains": one step report every FAKE_WORKER_STEP_S
seconds (default 0.05). Reconfigure is acknowledged with ready (regroup 0.01 s, copy 0.02 s) and
training goes on in the new generation; Stop exits 0. Every command received is appended to
``$OOBLECK_WORK_DIR/slot-<slot>.log`` as "<kind> <generation>".

Faults, each at step K of generation 1 on slot FAKE_WORKER_FAULT_SLOT (default 0):
- FAKE_WORKER_CRASH_AT_STEP=K: exit with status 3.
- FAKE_WORKER_HANG_AT_STEP=K: silence the heartbeat and block forever.
- FAKE_WORKER_ERROR_AT_STEP=K: report a fatal error ("boom") and go on until stopped.
- FAKE_WORKER_BLOCK_AT_STEP=K: block the main thread FAKE_WORKER_BLOCK_S seconds (heartbeat on),
  like a rank waiting in a collective, then go on.

FAKE_WORKER_SLOW_STOP_S=S (every slot): ignore SIGTERM, and take S seconds to exit on Stop, like a
worker closing its engine.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from oobleck.worker.agent_link import RECONFIGURE, START, STOP, AgentLink


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def main() -> int:
    link = AgentLink.from_env()
    link.attach()
    log_path = Path(link.work_dir) / f"slot-{link.slot}.log"
    step_s = float(os.environ.get("FAKE_WORKER_STEP_S", "0.05"))
    fault_slot = _int_env("FAKE_WORKER_FAULT_SLOT") or 0
    mine = link.slot == fault_slot
    crash_at = _int_env("FAKE_WORKER_CRASH_AT_STEP") if mine else None
    hang_at = _int_env("FAKE_WORKER_HANG_AT_STEP") if mine else None
    block_at = _int_env("FAKE_WORKER_BLOCK_AT_STEP") if mine else None
    error_at = _int_env("FAKE_WORKER_ERROR_AT_STEP") if mine else None
    block_s = float(os.environ.get("FAKE_WORKER_BLOCK_S", "0"))
    slow_stop_s = float(os.environ.get("FAKE_WORKER_SLOW_STOP_S", "0"))
    if slow_stop_s:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    generation = 0
    step = 0
    running = False
    while True:
        cmd = link.next_command(timeout_s=step_s if running else None)
        if cmd is not None:
            with log_path.open("a") as f:
                f.write(f"{cmd.kind} {cmd.generation}\n")
            if cmd.kind == STOP:
                time.sleep(slow_stop_s)
                link.close()
                return 0
            if cmd.kind in (START, RECONFIGURE):
                assert cmd.plan is not None
                generation = cmd.generation
                link.report_ready(generation, regroup_s=0.01 * (1 + link.slot), copy_s=0.02)
                running = True
            continue
        if not running:  # the stream ended after a stop
            return 0
        step += 1
        link.report_step(generation, step, loss=1.0 / step, samples_per_s=100.0, samples=8 * step)
        if generation == 1 and step == crash_at:
            os._exit(3)
        if generation == 1 and step == hang_at:
            link.stop_heartbeat()
            threading.Event().wait()
        if generation == 1 and step == error_at:
            link.report_error(generation, "boom", fatal=True)
        if generation == 1 and step == block_at:
            time.sleep(block_s)


if __name__ == "__main__":
    sys.exit(main())
