"""Plan-independent checkpoints: one file per layer plus a manifest.

Layout::

    <dir>/step-00000012/layer-00003.pt   # {"param.<name>": tensor, "opt.<name>.<key>": tensor}
    <dir>/step-00000012/rank-00001.json  # what rank 1 wrote (files + sha256), written after them
    <dir>/step-00000012/manifest.json    # step, data position, model, RNG state, files + sha256
    <dir>/latest                         # "step-00000012"

Every file is written to a temporary name and renamed into place; rank 0 writes the manifest
last (once every writing rank's sidecar exists), so a checkpoint is complete iff its manifest
exists, and ``latest`` only ever names a complete one. The directory must be shared by all
ranks (a shared file system when they run on several nodes). Writing needs no collective, so it
can run in a background thread while training goes on: only copying the state to host memory
stalls training. Loading checks each file's SHA-256. Because files are
per layer, a checkpoint saved under one plan loads under any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
FORMAT = "oobleck-checkpoint/1"


class CheckpointError(RuntimeError):
    pass


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.pt"


def write_layers(root: Path, layers: dict[int, dict[str, torch.Tensor]], rank: int) -> None:
    """Write this rank's layer files, then its sidecar ``rank-NNNNN.json`` (files + checksums)."""
    root.mkdir(parents=True, exist_ok=True)
    mine = {}
    for index, state in layers.items():
        path = root / layer_file(index)
        _atomic_write(path, lambda f, s=state: torch.save(s, f))
        mine[str(index)] = {"file": path.name, "sha256": _sha256(path)}
    data = json.dumps(mine, sort_keys=True).encode()
    _atomic_write(root / f"rank-{rank:05d}.json", lambda f: f.write(data))


def finish(
    directory: Path, root: Path, *, step: int, writers: set[int], manifest_extra: dict[str, Any], timeout_s: float
) -> None:
    """Rank 0: wait until every writer's sidecar exists, then write the manifest and ``latest``."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    files: dict[str, Any] = {}
    pending = set(writers)
    while pending:
        for rank in sorted(pending):
            sidecar = root / f"rank-{rank:05d}.json"
            if sidecar.exists():
                files.update(json.loads(sidecar.read_text()))
                pending.discard(rank)
        if pending:
            if time.monotonic() > deadline:
                raise CheckpointError(f"checkpoint {root}: ranks {sorted(pending)} did not write in {timeout_s}s")
            pause.wait(0.02)  # other ranks write to (possibly shared) storage: poll with a deadline
    missing = [i for i in range(manifest_extra["num_layers"]) if str(i) not in files]
    if missing:
        raise CheckpointError(f"checkpoint {root}: no rank wrote layers {missing}")
    manifest = {"format": FORMAT, "step": step, "layers": files, **manifest_extra}
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _atomic_write(root / MANIFEST, lambda f: f.write(data))
    _atomic_write(directory / "latest", lambda f: f.write(root.name.encode()))


def step_dir(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}"


def read_manifest(path: Path) -> tuple[dict[str, Any], Path]:
    """The manifest of checkpoint ``path`` (a ``step-*`` directory, or a parent with ``latest``)."""
    root = path
    if not (root / MANIFEST).exists() and (path / "latest").exists():
        root = path / (path / "latest").read_text().strip()
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no complete checkpoint (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{root / MANIFEST}: unreadable: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{root / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest, root


def load_layers(root: Path, manifest: dict[str, Any], indices) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for index in indices:
        info = manifest["layers"].get(str(index))
        if info is None:
            raise CheckpointError(f"{root}: layer {index} missing from the manifest")
        path = root / info["file"]
        digest = _sha256(path)
        if digest != info["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (expected {info['sha256']}, got {digest})")
        out[index] = torch.load(path, map_location="cpu", weights_only=True)
    return out
