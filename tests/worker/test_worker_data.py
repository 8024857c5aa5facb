"""Global sample order, positions, datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oobleck.common.jobspec import DataSpec
from oobleck.common.validate import ConfigError
from oobleck.worker.data import DataPosition, GlobalOrder, SyntheticDataset, TextDataset, make_dataset, make_example
from oobleck.worker.layout import assign_ranks, simple_plan


def test_every_sample_of_an_epoch_used_once_across_pipelines() -> None:
    # 2 pipelines with 5 and 3 microbatches of 2 samples: 16 samples per step, 100 samples,
    # so 6 steps per epoch (4 samples skipped at the end of each epoch).
    plan = simple_plan([[2, 2], [1, 2, 1]], [5, 3])
    assignments = assign_ranks(plan, 4)
    order = GlobalOrder(num_samples=100, global_batch_size=16, microbatch_size=2, seed=1)
    pos = DataPosition()
    per_epoch: dict[int, list[int]] = {}
    for _ in range(13):
        epoch = order.step_start(pos).epoch
        batch, pos = order.batch(pos)
        firsts = [a for a in assignments if a.is_first]
        for a in firsts:
            for m in range(a.microbatches):
                per_epoch.setdefault(epoch, []).extend(order.microbatch(batch, a.microbatch_offset + m))
    assert pos == DataPosition(epoch=2, step=13, samples=16)
    for epoch in (0, 1):
        used = per_epoch[epoch]
        assert len(used) == len(set(used)) == 96
        assert set(used) <= set(range(100))
    assert per_epoch[0] != per_epoch[1]  # a new permutation each epoch


def test_position_resumes_identically() -> None:
    order = GlobalOrder(num_samples=50, global_batch_size=8, microbatch_size=4, seed=0)
    pos = DataPosition()
    batches = []
    for _ in range(9):
        b, pos = order.batch(pos)
        batches.append(b)
    resumed = GlobalOrder(num_samples=50, global_batch_size=8, microbatch_size=4, seed=0)
    restored = DataPosition.from_dict(DataPosition(1, 6, 0).to_dict())
    assert resumed.batch(restored)[0] == batches[6]
    with pytest.raises(ConfigError, match=r"data\.num_samples"):
        GlobalOrder(num_samples=4, global_batch_size=8, microbatch_size=4, seed=0)


def test_synthetic_is_deterministic_per_sample() -> None:
    ds = SyntheticDataset(num_samples=10, seq_len=12, vocab_size=50, seed=4)
    a = ds.tokens([3, 7])
    b = ds.tokens([7])
    assert a.shape == (2, 12) and a.dtype == torch.long
    assert torch.equal(a[1], b[0])
    assert int(a.max()) < 50
    assert not torch.equal(a[0], a[1])


def test_text_dataset_reads_bytes(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"hello world, this is a test!")
    ds = make_dataset(DataSpec(kind="text", path=str(path), seq_len=4, num_samples=100), 256, "clm")
    assert isinstance(ds, TextDataset) and ds.num_samples == 7
    assert ds.tokens([1]).tolist() == [list(b"o wo")]
    with pytest.raises(ConfigError, match=r"data\.path"):
        TextDataset(tmp_path / "missing.txt", 4, 10)


def test_examples() -> None:
    tokens = torch.arange(20).view(2, 10)
    inputs, labels = make_example(tokens, [0, 1], "clm", 99, 0, 0)
    assert torch.equal(inputs, tokens) and labels[0, :-1].tolist() == list(range(1, 10)) and labels[0, -1] == -100
    inputs, labels = make_example(tokens, [0, 1], "mlm", 99, 0, 0)
    masked = inputs == 99
    assert masked.any(dim=1).all()
    assert torch.equal(labels[masked], tokens[masked]) and (labels[~masked] == -100).all()
    again, _ = make_example(tokens[1:], [1], "mlm", 99, 0, 0)
    assert torch.equal(again[0], inputs[1])  # depends on the sample, not on its batch
