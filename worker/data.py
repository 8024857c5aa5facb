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

from dataclasses import dataclass
from pathlib import Path

import torch

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


class TextDataset(TokenDataset):
    """A local file read as bytes (vocabulary 256); sample ``i`` is bytes ``[i*T, (i+1)*T)``."""

    def __init__(self, path: str | Path, seq_len: int, max_samples: int) -> None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError("data.path", f"cannot read {path}: {exc.strerror or exc}") from exc
        self.seq_len = seq_len
        self.num_samples = min(max_samples, len(data) // seq_len)
        if self.num_samples < 1:
            raise ConfigError("data.path", f"{path} has {len(data)} bytes, fewer than data.seq_len ({seq_len})")
        self._data = torch.frombuffer(bytearray(data[: self.num_samples * seq_len]), dtype=torch.uint8)

    def tokens(self, indices: list[int]) -> torch.Tensor:
        idx = torch.tensor(indices, dtype=torch.long)
        rows = idx[:, None] * self.seq_len + torch.arange(self.seq_len)[None, :]
        return self._data[rows].long()


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
