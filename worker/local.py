"""Run a plan's ranks as local processes (tests, benchmarks, single-machine runs).

:func:`run_ranks` starts ``world_size`` processes (``forkserver``, torch preloaded), each calling
``target(rank, DistInit(file=...), *args)``; results come back through a queue. Every process is
stopped (terminate, then kill after a deadline) whatever happens, and the first failure is
raised with the child's traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from oobleck.worker.drills import FailAt, FaultPoint
from oobleck.worker.engine import TrainingEngine
from oobleck.worker.rendezvous import DistInit
from oobleck.worker.step import CommFailed, StepFailed

_CTX: Any = None


def _context():
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        preload = ["torch", "oobleck.worker.engine"]
        if importlib.util.find_spec("transformers") is not None:
            # Importing transformers costs seconds; once in the fork server, not in every rank.
            preload += [
                "transformers.models.gpt2.modeling_gpt2",
                "transformers.models.bert.modeling_bert",
                "transformers.models.llama.modeling_llama",
            ]
        ctx.set_forkserver_preload(preload)
        _CTX = ctx
    return _CTX


def _child(rank: int, store_file: str, target: Callable, args: Sequence[Any], results, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        out = target(rank, DistInit(file=store_file, timeout_s=120.0), *args)
        # Serialised to bytes: tensors sent as-is would be shared by file descriptor, which
        # breaks once this process exits.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


class RankFailed(RuntimeError):
    pass


def run_ranks(
    world_size: int, target: Callable, args: Sequence[Any] = (), timeout_s: float = 120.0, threads: int = 1
) -> list[Any]:
    """Run ``target`` on ``world_size`` ranks; returns the results by rank."""
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="oobleck-local-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_child, args=(r, store, target, tuple(args), results, threads), daemon=True)
            for r in range(world_size)
        ]
        try:
            for p in procs:
                p.start()
            out: dict[int, Any] = {}
            deadline = time.monotonic() + timeout_s
            while len(out) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"ranks {sorted(set(range(world_size)) - set(out))} did not finish in {timeout_s}s"
                    )
                try:
                    rank, ok, value = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in out]
                    if dead:
                        raise RankFailed(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}") from None
                    continue
                if not ok:
                    raise RankFailed(f"rank {rank} failed:\n{value}")
                out[rank] = torch.load(io.BytesIO(value), weights_only=False)
            return [out[r] for r in range(world_size)]
        finally:
            started = [p for p in procs if p.pid is not None]
            for p in started:
                if p.is_alive():
                    p.terminate()
            stop = time.monotonic() + 5.0
            for p in started:
                p.join(max(0.0, stop - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join()
            results.close()


def train_ranks(rank: int, init: DistInit, spec, plan, steps: int, options: dict[str, Any] | None = None) -> dict:
    """A ``run_ranks`` target: train ``steps`` steps; returns losses and the held layers' params.

    ``options``: ``load`` (checkpoint to start from), ``save`` (directory to checkpoint into at
    the end), ``export`` (return parameters, default True), ``warmup`` (steps run before the
    ``steps`` that are timed and reported), ``fail_at`` (``(rank, step)``: that rank raises once
    after the backward of that step; the failed step is retried and ``failed_steps`` reported),
    ``save_async`` (``(directory, step)``: start a background checkpoint once ``step`` steps are
    done and keep training).
    """
    options = options or {}
    engine = TrainingEngine(spec, plan, rank, init)
    failed: list[int] = []
    if options.get("fail_at") and options["fail_at"][0] == rank:
        fail_step = options["fail_at"][1]
        message = f"injected fault at rank {rank}, step {fail_step}, {FaultPoint.BACKWARD_DONE}"
        engine.faults = FailAt(fail_step, FaultPoint.BACKWARD_DONE, message)
    try:
        if options.get("load"):
            engine.load_checkpoint(options["load"])
        for _ in range(options.get("warmup", 0)):
            engine.train_step()
        losses = []
        t0 = time.perf_counter()
        c0 = time.process_time()
        while len(losses) < steps:
            try:
                losses.append(engine.train_step().loss)
            except StepFailed:
                failed.append(engine.position.step)
                continue
            if options.get("save_async") and options["save_async"][1] == engine.position.step:
                engine.save_checkpoint(options["save_async"][0], wait=False)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        engine.wait_checkpoint()
        if options.get("save"):
            engine.save_checkpoint(options["save"])
        params = {}
        if options.get("export", True):
            params = {
                i: {k[len("param.") :]: v for k, v in state.items() if k.startswith("param.")}
                for i, state in engine.export_layers().items()
            }
        return {
            "losses": losses,
            "params": params,
            "elapsed_s": elapsed,
            "cpu_s": cpu,
            "position": engine.position.to_dict(),
            "failed_steps": failed,
        }
    finally:
        engine.close()


def _fail_vote_at(step: int) -> FailAt:
    return FailAt(step, FaultPoint.VOTED, "simulated: the commit vote did not complete on this rank", once=False)


def reconfigure_ranks(process: int, init: DistInit, spec, generations: list[tuple]) -> dict:
    """A ``run_ranks`` target that lives through several generations (reconfiguration tests).

    ``generations``: ``(plan, steps, {process: rank})``, optionally with a fourth item naming the
    processes that do not commit the generation's last step, as when a peer dies while the commit
    vote completes on some ranks only: a set (they restore the state they had before the step:
    nothing of it survives), or a dict ``{process: "lost" | "voted"}`` where ``"voted"`` makes the
    vote fail on that rank after every gradient all-reduce (the engine keeps the gradients). A
    process missing from a generation's map
    leaves (as if its node failed: it closes its engine and does nothing more); a process that
    appears for the first time starts a fresh engine and receives its layers from the others.
    Returns the losses by step and, for processes in the last generation, their parameters.
    """
    engine: TrainingEngine | None = None
    losses: dict[int, float] = {}
    phases: list[dict[str, float]] = []
    left = False
    try:
        for g, (plan, steps, ranks, *rest) in enumerate(generations):
            uncommitted = rest[0] if rest else set()
            if not isinstance(uncommitted, dict):
                uncommitted = dict.fromkeys(uncommitted, "lost")
            if process not in ranks:
                if engine is not None:
                    engine.close()
                    engine = None
                    left = True
                continue
            if left:
                raise ValueError(f"process {process} cannot come back after leaving")
            gen_init = DistInit(file=f"{init.file}.gen{g}", timeout_s=init.timeout_s)
            if engine is None:
                engine = TrainingEngine(spec, plan, ranks[process], gen_init)
            else:
                phases.append(engine.reconfigure(plan, ranks[process], gen_init))
            for k in range(steps):
                step = engine.position.step
                mode = uncommitted.get(process) if k == steps - 1 else None
                if mode == "voted":
                    engine.faults = _fail_vote_at(step)
                    with contextlib.suppress(CommFailed):
                        engine.train_step()
                    engine.faults = None
                    continue
                undo = (engine.export_layers(), engine.position) if mode == "lost" else None
                losses[step] = engine.train_step().loss
                if undo is not None:
                    engine.import_layers(undo[0])
                    engine.position = undo[1]
                    del losses[step]
        params = {}
        if engine is not None:
            params = {
                i: {k[len("param.") :]: v for k, v in state.items() if k.startswith("param.")}
                for i, state in engine.export_layers().items()
            }
        return {"losses": losses, "params": params, "phases": phases}
    finally:
        if engine is not None:
            engine.close()
