"""Plan-independent checkpoints: the tensors. The format (layout, publication, verification)
is :mod:`oobleck.common.checkpoint`; this module adds what needs torch.

Each writing rank saves its layer files (``torch.save`` of ``{"param.<name>": tensor,
"opt.<name>.<key>": tensor}``) into the attempt's staging directory, then its sidecar; rank 0
collects the sidecars and publishes the checkpoint with one rename. Writing needs no
collective, so it runs in a background thread while training goes on: only copying the state to
host memory stalls training. Loading checks each file's SHA-256. Because files are per layer, a
checkpoint saved under one plan loads under any other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from oobleck.common.checkpoint import (
    FORMAT,
    LATEST,
    MANIFEST,
    CheckpointCorrupt,
    CheckpointError,
    collect_sidecars,
    complete_steps,
    layer_file,
    newest_intact,
    publish,
    quarantine,
    read_manifest,
    sha256_file,
    staging_dir,
    step_dir,
    verify,
    write_sidecar,
)
from oobleck.common.files import atomic_write

__all__ = [
    "FORMAT",
    "LATEST",
    "MANIFEST",
    "CheckpointCorrupt",
    "CheckpointError",
    "collect_sidecars",
    "complete_steps",
    "layer_file",
    "load_layers",
    "newest_intact",
    "publish",
    "quarantine",
    "read_manifest",
    "staging_dir",
    "step_dir",
    "verify",
    "write_layers",
]


def write_layers(staging: Path, layers: dict[int, dict[str, torch.Tensor]], rank: int) -> None:
    """Write this rank's layer files into ``staging``, then its sidecar (files, sizes, checksums)."""
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    mine = {}
    for index, state in layers.items():
        path = staging / layer_file(index)
        atomic_write(path, lambda f, s=state: torch.save(s, f))
        mine[str(index)] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    write_sidecar(staging, rank, mine)


def load_layers(root: Path, manifest: dict, indices) -> dict[int, dict[str, torch.Tensor]]:
    """The layer states ``indices`` of checkpoint ``root``, each file checked against the
    manifest first (:class:`CheckpointCorrupt` names the one that does not match)."""
    indices = list(indices)
    verify(root, manifest, indices)
    out = {}
    for index in indices:
        path = Path(root) / manifest["layers"][str(index)]["file"]
        try:
            out[index] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a file that matches its checksum but torch cannot read
            raise CheckpointCorrupt(f"{path}: unreadable by torch: {exc}") from exc
    return out
