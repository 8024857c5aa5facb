"""Plan-independent checkpoints: the tensors and the collective save. The format (layout,
publication, verification) is :mod:`oobleck.common.checkpoint`; this module adds what needs torch.

Each writing rank saves its layer files (``torch.save`` of ``{"param.<name>": tensor,
"opt.<name>.<key>": tensor}``) into the attempt's staging directory, then its sidecar; rank 0
collects the sidecars and publishes the checkpoint with one rename (:func:`save`). Writing needs
no collective, so it can run in a background thread (:class:`BackgroundWriter`) while training
goes on: only copying the state to host memory stalls training. Loading checks each file's
SHA-256. Because files are per layer, a checkpoint saved under one plan loads under any other.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

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
from oobleck.worker.failures import communicating

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "BackgroundWriter",
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
    "restore_rng",
    "rng_text",
    "save",
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


def rng_text() -> str:
    """This process's torch RNG state, as a manifest stores it."""
    return base64.b64encode(bytes(torch.get_rng_state().tolist())).decode()


def restore_rng(text: str) -> None:
    torch.set_rng_state(torch.tensor(list(base64.b64decode(text)), dtype=torch.uint8))


class BackgroundWriter:
    """This rank's background checkpoint write: at most one at a time, its error kept for
    :meth:`wait`. A reconfiguration may :meth:`leave_behind` one still running (rank 0's may be
    waiting for a writer that died: it ends at its own deadline); its error is then only logged."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._orphans: set[threading.Thread] = set()

    def start(self, write: Callable[[], None]) -> None:
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(write,), name="checkpoint", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as exc:
            log.exception("background checkpoint failed")
            if threading.current_thread() not in self._orphans:
                self._error = exc

    def wait(self) -> None:
        """Join the running write (rank 0: until its manifest is written); re-raise its error as
        :class:`CheckpointError`."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
            if self._error is not None:
                error, self._error = self._error, None
                raise CheckpointError(f"background checkpoint failed: {error}") from error

    def leave_behind(self) -> bool:
        """Stop tracking a write that is still running (True if there was one)."""
        if self._thread is None or not self._thread.is_alive():
            return False
        self._orphans.add(self._thread)
        self._thread = None
        return True


def save(
    directory: Path,
    *,
    step: int,
    attempt: str,
    layers: Mapping[int, Mapping[str, torch.Tensor]],
    rank: int,
    writers: Iterable[int],
    manifest_extra: Mapping[str, Any],
    timeout_s: float,
    background: BackgroundWriter | None = None,
) -> Path:
    """Collective entry (every rank calls it at the same step): write ``layers`` (this rank's
    share, already copied to host memory) into the staging directory of ``attempt``; rank 0
    publishes the checkpoint once every rank of ``writers`` is done. Without ``background``
    every rank returns after the checkpoint is published (a barrier); with it the files are
    written by its thread. Returns the checkpoint's directory."""
    directory = Path(directory)
    root = step_dir(directory, step)
    staging = staging_dir(directory, step, attempt)
    writers = set(writers)

    def write() -> None:
        write_layers(staging, dict(layers), rank)
        if rank == 0:
            files = collect_sidecars(staging, writers, timeout_s)
            publish(directory, staging, step=step, files=files, manifest_extra=dict(manifest_extra))

    if background is None:
        write()
        with communicating("checkpoint barrier failed"):
            dist.barrier()
    else:
        background.start(write)
    return root
