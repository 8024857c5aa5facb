"""Global sample order, positions, datasets."""

from __future__ import annotations

import os
import pickle
import socket
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch

from oobleck.common.jobspec import DataSpec
from oobleck.common.validate import ConfigError
from oobleck.worker import data
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


# --- data.path: regular files (or a directory of them), opened non-blocking, never read whole ---


def _old_tokens(raw: bytes, seq_len: int, max_samples: int, indices: list[int]) -> torch.Tensor:
    """The former ``read_bytes``-based implementation, kept as the reference for equivalence."""
    n = min(max_samples, len(raw) // seq_len)
    flat = torch.frombuffer(bytearray(raw[: n * seq_len]), dtype=torch.uint8)
    idx = torch.tensor(indices, dtype=torch.long)
    return flat[idx[:, None] * seq_len + torch.arange(seq_len)[None, :]].long()


def test_text_samples_equal_the_read_bytes_slicing(tmp_path: Path) -> None:
    corpus = bytes(torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(3)).tolist())
    (tmp_path / "one.bin").write_bytes(corpus)
    # The same bytes split into uneven files (one empty); a hidden file is ignored.
    shards = tmp_path / "shards"
    shards.mkdir()
    for name, (a, b) in {"a": (0, 7), "b": (7, 7), "c": (7, 500), "d": (500, 1000)}.items():
        (shards / f"{name}.txt").write_bytes(corpus[a:b])
    (shards / ".hidden").write_bytes(b"x" * 100)
    indices = [0, 82, 5, 40, 41, 1, 0, 82]
    for max_samples in (83, 50, 10_000):
        want = _old_tokens(corpus, 12, max_samples, [i for i in indices if i < min(max_samples, 83)])
        for path in (tmp_path / "one.bin", shards):
            ds = TextDataset(path, 12, max_samples)
            assert ds.num_samples == min(max_samples, 1000 // 12)
            got = ds.tokens([i for i in indices if i < ds.num_samples])
            assert got.dtype == torch.long and torch.equal(got, want)
            assert ds.tokens([]).shape == (0, 12)
            with pytest.raises(IndexError):
                ds.tokens([ds.num_samples])
            ds.close()


def test_text_dataset_pickles_and_detects_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(bytes(range(256)) * 4)
    ds = TextDataset(path, 16, 100)
    first = ds.tokens([3, 60])
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy.tokens([3, 60]), first)
    copy.close()
    replacement = tmp_path / "new.txt"
    replacement.write_bytes(b"\0" * 1024)
    replacement.replace(path)
    copy = pickle.loads(pickle.dumps(ds))
    with pytest.raises(ConfigError, match=r"data\.path: .*replaced or shrank"):
        copy.tokens([0])
    ds.close()


def _within_deadline(fn, fifo: Path, deadline_s: float = 10.0) -> BaseException | None:
    """Run ``fn()`` in a thread and return what it raised; past the deadline, open the FIFO's
    writing end (which unblocks a reader's open) and fail the test."""
    raised: list[BaseException | None] = [None]

    def target() -> None:
        try:
            fn()
        except Exception as exc:
            raised[0] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(deadline_s)
        pytest.fail(f"opening {fifo} blocked")
    return raised[0]


def test_text_dataset_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    exc = _within_deadline(lambda: TextDataset(fifo, 4, 10), fifo)
    assert isinstance(exc, ConfigError) and exc.field == "data.path" and "is a FIFO" in str(exc)
    # The check after the open (a FIFO swapped in after the stat): the open does not block either.
    exc = _within_deadline(lambda: data._open_regular(str(fifo), repr(str(fifo))), fifo)
    assert isinstance(exc, ConfigError) and "is a FIFO" in str(exc)
    # A FIFO inside a directory is refused, naming the entry.
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.txt").write_bytes(b"0123456789")
    os.mkfifo(shards / "b.txt")
    exc = _within_deadline(lambda: TextDataset(shards, 4, 10), shards / "b.txt")
    assert isinstance(exc, ConfigError) and "b.txt' is a FIFO" in str(exc)


def test_text_dataset_refuses_devices_sockets_and_odd_directories(tmp_path: Path) -> None:
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")
    for path in (Path("/dev/zero"), zero):
        with pytest.raises(ConfigError, match=r"^data\.path: .* is a character device, not a regular file"):
            TextDataset(path, 4, 10)
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(ConfigError, match=r"is a socket"):
            TextDataset(sock_path, 4, 10)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"a directory without files"):
        TextDataset(empty, 4, 10)
    nested = tmp_path / "nested"
    (nested / "sub").mkdir(parents=True)
    (nested / "a.txt").write_text("SECRET-CONTENT " * 10)
    with pytest.raises(ConfigError, match=r"sub' is a directory, not a regular file") as info:
        TextDataset(nested, 4, 10)
    assert "SECRET" not in str(info.value)
    short = tmp_path / "short.txt"
    short.write_text("SECRET")
    with pytest.raises(ConfigError, match=r"has 6 bytes, fewer than data\.seq_len \(8\)") as info:
        TextDataset(short, 8, 10)
    assert "SECRET" not in str(info.value).replace(str(tmp_path), "")  # the path, not the content


def test_text_dataset_never_reads_a_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.bin"
    size = 8 << 30
    try:
        with open(big, "wb") as f:
            f.truncate(size)  # sparse: no blocks allocated
            f.seek(size - 4)
            f.write(b"tail")
    except OSError as exc:
        pytest.skip(f"no sparse 8 GiB file here: {exc}")
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read_bytes called"))
    monkeypatch.setattr(os, "read", lambda *a: pytest.fail("os.read called"))
    tracemalloc.start()
    try:
        ds = TextDataset(big, 8, size)
        last = ds.tokens([0, ds.num_samples - 1])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ds.close()
    assert ds.num_samples == size // 8
    assert last[0].tolist() == [0] * 8 and last[1].tolist() == [0, 0, 0, 0, *b"tail"]
    assert peak < 1 << 20  # a few samples, not 8 GiB
