"""Datasets of token sequences and the global sample order.

Sample ``i`` of a dataset is a fixed token sequence of ``seq_len`` tokens. Each epoch visits the
samples in a seeded permutation; each step takes the next ``global_batch_size`` samples of that
order (an epoch ends when fewer remain: the remainder is skipped, so every step is full). The
global batch is cut into microbatches of ``microbatch_size`` samples, numbered across pipelines:
pipeline ``p`` takes the microbatches after those of pipelines ``0..p-1``. The position
``(epoch, step, samples consumed in the epoch)`` is training state: it survives reconfiguration
and checkpoints, so no sample is lost or seen twice whatever the plan.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oobleck.common.files import NotRegularFile, file_kind, open_regular
from oobleck.common.validate import ConfigError


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    step: int = 0  # steps completed since the start of training
    samples: int = 0  # samples of the current epoch's order already consumed

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> DataPosition:
        return cls(int(data["epoch"]), int(data["step"]), int(data["samples"]))


class TokenDataset:
    """Base class: ``tokens(indices)`` returns ``[len(indices), seq_len]`` int64."""

    num_samples: int
    seq_len: int

    def tokens(self, indices: list[int]) -> torch.Tensor:
        raise NotImplementedError


class SyntheticDataset(TokenDataset):
    """Seeded sequences with a learnable pattern: ``x_t = (a + b t) mod V`` with 10 % noise."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.seed = seed

    def tokens(self, indices: list[int]) -> torch.Tensor:
        out = torch.empty(len(indices), self.seq_len, dtype=torch.long)
        t = torch.arange(self.seq_len)
        for row, i in enumerate(indices):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(i)) % (1 << 63))
            a, b = torch.randint(0, self.vocab_size, (2,), generator=g).tolist()
            seq = (a + (b + 1) * t) % self.vocab_size
            noise = torch.rand(self.seq_len, generator=g) < 0.1
            seq[noise] = torch.randint(0, self.vocab_size, (int(noise.sum()),), generator=g)
            out[row] = seq
        return out


@dataclass(frozen=True)
class _Part:
    """One file of a text dataset: where it is, its identity and size when listed, its first byte."""

    path: str
    dev: int
    ino: int
    size: int
    start: int  # offset of its first byte in the concatenation


def _open_regular(path: str, shown: str) -> tuple[int, os.stat_result]:
    """:func:`~oobleck.common.files.open_regular`, its errors as ``data.path`` ConfigErrors."""
    try:
        return open_regular(path)
    except NotRegularFile as exc:
        raise ConfigError("data.path", f"{shown} is {exc}") from None
    except OSError as exc:
        raise ConfigError("data.path", f"cannot open {shown}: {exc.strerror or exc}") from exc


class TextDataset(TokenDataset):
    """Local bytes read as tokens (vocabulary 256); sample ``i`` is bytes ``[i*T, (i+1)*T)``.

    ``path`` is a regular file, or a directory whose regular files are concatenated in sorted name
    order (names starting with ``.`` are skipped; a subdirectory or any other entry is refused, so
    nothing is left out silently). A symbolic link is followed, but its target must be a regular
    file: FIFOs, sockets and devices (``/dev/zero``) are refused with a :class:`ConfigError`
    naming ``data.path`` and what the file is, never quoting its content. Files are opened
    non-blocking and checked with ``fstat`` after the open; they are never read whole:
    :meth:`tokens` reads only the requested samples with positioned reads (``os.pread``, which
    moves no shared file offset, so a forked copy may read concurrently). A file that changes
    identity or shrinks after construction is an error, not a crash (a memory map would SIGBUS).
    Pickling keeps the listing and reopens the files, checking that they are the same ones.
    """

    MAX_OPEN_FILES = 32  # file descriptors kept open for a directory of many files

    def __init__(self, path: str | Path, seq_len: int, max_samples: int) -> None:
        self.path = str(path)
        self.seq_len = seq_len
        self._shown = repr(self.path)
        self._parts = self._list()
        self.total_bytes = sum(p.size for p in self._parts)
        self.num_samples = min(max_samples, self.total_bytes // seq_len)
        if self.num_samples < 1:
            raise ConfigError(
                "data.path", f"{self._shown} has {self.total_bytes} bytes, fewer than data.seq_len ({seq_len})"
            )
        self._starts = [p.start for p in self._parts]
        self._fds: OrderedDict[int, int] = OrderedDict()  # part -> open fd, least recently used first
        self._lock = threading.Lock()

    def _list(self) -> list[_Part]:
        shown = self._shown
        try:
            info = os.stat(self.path)  # refuse devices and FIFOs before opening them at all
        except OSError as exc:
            raise ConfigError("data.path", f"cannot read {shown}: {exc.strerror or exc}") from exc
        if stat.S_ISREG(info.st_mode):
            fd, info = _open_regular(self.path, shown)
            os.close(fd)
            return [_Part(self.path, info.st_dev, info.st_ino, info.st_size, 0)]
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError("data.path", f"{shown} is {file_kind(info.st_mode)}, not a regular file or a directory")
        try:
            names = sorted(n for n in os.listdir(self.path) if not n.startswith("."))
        except OSError as exc:
            raise ConfigError("data.path", f"cannot list {shown}: {exc.strerror or exc}") from exc
        if not names:
            raise ConfigError("data.path", f"{shown} is a directory without files")
        parts, start = [], 0
        for name in names:
            full = os.path.join(self.path, name)
            entry = repr(full)
            try:
                entry_info = os.stat(full)
            except OSError as exc:
                raise ConfigError("data.path", f"cannot read {entry}: {exc.strerror or exc}") from exc
            if not stat.S_ISREG(entry_info.st_mode):
                raise ConfigError("data.path", f"{entry} is {file_kind(entry_info.st_mode)}, not a regular file")
            fd, entry_info = _open_regular(full, entry)
            os.close(fd)
            parts.append(_Part(full, entry_info.st_dev, entry_info.st_ino, entry_info.st_size, start))
            start += entry_info.st_size
        return parts

    def _fd(self, k: int) -> int:
        """An open fd of part ``k`` (kept in a small LRU), checked to be the file listed."""
        fd = self._fds.get(k)
        if fd is not None:
            self._fds.move_to_end(k)
            return fd
        part = self._parts[k]
        fd, info = _open_regular(part.path, repr(part.path))
        if (info.st_dev, info.st_ino) != (part.dev, part.ino) or info.st_size < part.size:
            os.close(fd)
            raise ConfigError("data.path", f"{part.path!r} was replaced or shrank since the dataset was opened")
        self._fds[k] = fd
        while len(self._fds) > self.MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _read(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the concatenation's bytes from ``offset`` (may span files)."""
        k = bisect.bisect_right(self._starts, offset) - 1
        done = 0
        while done < len(out):
            part = self._parts[k]
            within = offset + done - part.start
            if within >= part.size:
                k += 1
                continue
            want = min(len(out) - done, part.size - within)
            try:
                n = os.preadv(self._fd(k), [out[done : done + want]], within)
            except OSError as exc:
                raise ConfigError("data.path", f"cannot read {part.path!r}: {exc.strerror or exc}") from exc
            if n <= 0:
                raise ConfigError("data.path", f"{part.path!r} shrank since the dataset was opened")
            done += n

    def tokens(self, indices: list[int]) -> torch.Tensor:
        t = self.seq_len
        rows = [int(i) for i in indices]
        for i in rows:
            if not 0 <= i < self.num_samples:
                raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        if not rows:
            return torch.empty(0, t, dtype=torch.long)
        buf = bytearray(len(rows) * t)
        view = memoryview(buf)
        with self._lock:
            for r, i in enumerate(rows):
                self._read(i * t, view[r * t : (r + 1) * t])
        return torch.frombuffer(buf, dtype=torch.uint8).view(len(rows), t).long()

    def close(self) -> None:
        """Close the open files (safe to call twice; later reads reopen them)."""
        with self._lock:
            while self._fds:
                os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        fds = getattr(self, "_fds", None)
        while fds:
            with contextlib.suppress(OSError):
                os.close(fds.popitem()[1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_fds"], state["_lock"]  # descriptors and locks are per process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fds = OrderedDict()
        self._lock = threading.Lock()


def make_dataset(data_spec, vocab_size: int, objective: str) -> TokenDataset:
    """Build the dataset of a JobSpec's ``data`` section. For masked LM, token ``vocab_size - 1``
    is reserved as the mask token, so synthetic tokens are drawn below it."""
    if data_spec.kind == "text":
        return TextDataset(data_spec.path, data_spec.seq_len, data_spec.num_samples)
    vocab = vocab_size - 1 if objective == "mlm" else vocab_size
    return SyntheticDataset(data_spec.num_samples, data_spec.seq_len, vocab, data_spec.seed)


def make_example(
    tokens: torch.Tensor, indices: list[int], objective: str, mask_token: int, seed: int, epoch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` for a batch of samples; labels are -100 where there is no target.

    ``clm``: predict token ``t+1`` at position ``t``. ``mlm``: 15 % of positions (at least one),
    chosen by a generator keyed by (seed, epoch, sample), are replaced by the mask token and
    predicted. The example depends only on the sample, never on the plan.
    """
    if objective == "clm":
        labels = torch.full_like(tokens, -100)
        labels[:, :-1] = tokens[:, 1:]
        return tokens, labels
    inputs = tokens.clone()
    labels = torch.full_like(tokens, -100)
    t = tokens.shape[1]
    for row, i in enumerate(indices):
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + int(i) + 1) % (1 << 63))
        mask = torch.rand(t, generator=g) < 0.15
        if not bool(mask.any()):
            mask[int(torch.randint(0, t, (1,), generator=g))] = True
        labels[row, mask] = tokens[row, mask]
        inputs[row, mask] = mask_token
    return inputs, labels


class GlobalOrder:
    """The fixed global sample order: which samples each step and microbatch consume."""

    def __init__(self, num_samples: int, global_batch_size: int, microbatch_size: int, seed: int) -> None:
        if num_samples < global_batch_size:
            raise ConfigError(
                "data.num_samples", f"must be >= global_batch_size ({global_batch_size}), got {num_samples}"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.microbatch_size = microbatch_size
        self.seed = seed
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
            self._perm = torch.randperm(self.num_samples, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def step_start(self, pos: DataPosition) -> DataPosition:
        """Where the next step starts (moves to the next epoch if this one has too few samples left)."""
        if pos.samples + self.global_batch_size > self.num_samples:
            return DataPosition(pos.epoch + 1, pos.step, 0)
        return pos

    def batch(self, pos: DataPosition) -> tuple[list[int], DataPosition]:
        """Sample indices of the step starting at ``pos`` and the position after it."""
        start = self.step_start(pos)
        order = self._order(start.epoch)
        idx = order[start.samples : start.samples + self.global_batch_size].tolist()
        return idx, DataPosition(start.epoch, start.step + 1, start.samples + self.global_batch_size)

    def microbatch(self, batch: list[int], global_microbatch: int) -> list[int]:
        m = self.microbatch_size
        return batch[global_microbatch * m : (global_microbatch + 1) * m]
