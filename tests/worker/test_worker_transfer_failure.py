"""A failed transfer between stages is a communication failure, not a local error: the engine
raises CommFailed at once, without the gradient sync or the vote. (A neighbour in a pipeline of
three or more stages may be blocked on this rank; syncing with healthy peers instead would keep
it, and them, blocked until their timeout: see the five-node e2e tests.)"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from worker_testutil import tiny_spec

from oobleck.worker.engine import TrainingEngine
from oobleck.worker.executor import TransferFailed, _comm
from oobleck.worker.layout import simple_plan
from oobleck.worker.rendezvous import DistInit
from oobleck.worker.step import CommFailed


def test_comm_errors_become_transfer_failed() -> None:
    failed = r"transfer with a neighbouring stage failed: .*Connection reset"
    with pytest.raises(TransferFailed, match=failed), _comm("transfer"):
        raise RuntimeError("Read error: Connection reset by peer")
    with pytest.raises(ValueError), _comm("transfer"):  # not a communication error: left alone
        raise ValueError("bad shape")


def test_failed_transfer_skips_the_gradient_sync_and_the_vote(monkeypatch) -> None:
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    engine = TrainingEngine(tiny_spec("gpt"), simple_plan([[4]], [8]), 0, DistInit(host="127.0.0.1", port=store.port))
    try:
        synced, reduced = [], []

        def broken_run(ops, io):
            raise TransferFailed("recv with a neighbouring stage failed: Connection reset by peer")

        monkeypatch.setattr(engine.executor, "run", broken_run)
        monkeypatch.setattr(engine.sync, "all_reduce", lambda params: synced.append(params))
        monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: reduced.append(a))
        with pytest.raises(CommFailed, match=r"step 1: recv with a neighbouring stage failed"):
            engine.train_step()
        assert synced == [] and reduced == []
        assert engine.position.step == 0
        assert all(p.grad is None for p in engine._params().values())
        monkeypatch.undo()
        assert engine.train_step().step == 1  # nothing was left half-done
    finally:
        engine.close()
    assert not dist.is_initialized()
