"""The checkpoint format on disk: how a checkpoint is written, published, found and verified.

This module imports no torch (the worker's :mod:`oobleck.worker.checkpoint` writes and reads the
tensors); tools that inspect checkpoints use it directly. Layout of a checkpoint directory::

    <dir>/step-00000012/layer-00003.pt      one file per layer: parameters + optimizer state
    <dir>/step-00000012/rank-00001.json     what rank 1 wrote: {layer: {file, sha256, bytes}}
    <dir>/step-00000012/manifest.json       format, job, step, data position, model, RNG, layers
    <dir>/latest                            "step-00000012"
    <dir>/.partial-step-00000014-<attempt>/ an attempt being written (loaders never look here)
    <dir>/.corrupt-step-00000010-<ns>/      a checkpoint a loader found corrupt, set aside

Rules that keep every checkpoint intact:

- **Every attempt writes to its own staging directory**, named by the step and the attempt (the
  job and the generation that writes it), so files of an earlier attempt at the same step (a
  step redone after a restore, a generation superseded while saving) are never mixed with
  this one's, and a rank's sidecar always describes the files next to it.
- **Publication is one rename.** Rank 0 collects every writer's sidecar, checks the files'
  sizes, writes the manifest into the staging directory and renames it to ``step-S``. A
  published checkpoint is never modified: when ``step-S`` already exists complete, the new
  attempt is discarded (both hold the same training state).
- **``latest`` only moves forward**, and only to a published checkpoint: it always names a
  complete checkpoint, the newest one published.
- **Loaders verify.** :func:`verify` checks each layer file against the manifest's SHA-256;
  :func:`newest_intact` walks back from the newest complete checkpoint to the first one that
  verifies, saying which ones it skipped and why; :func:`quarantine` sets a corrupt one aside
  (renamed, never deleted) and repairs ``latest``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from oobleck.common.files import atomic_write, fsync_dir

log = logging.getLogger(__name__)

FORMAT = "oobleck-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
STAGING_PREFIX = ".partial-"
CORRUPT_PREFIX = ".corrupt-"
STALE_PREFIX = ".stale-"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_STAGING_RE = re.compile(r"^\.partial-step-(\d{8,})-")
SIDECAR_POLL_S = 0.02


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or cannot be written."""


class CheckpointCorrupt(CheckpointError):
    """A published checkpoint whose files do not match its manifest."""


# -- names -------------------------------------------------------------------------------------


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / step_name(step)


def staging_dir(directory: str | Path, step: int, attempt: str) -> Path:
    """Where one attempt at checkpointing ``step`` writes (``attempt``: e.g. job id and generation,
    the same on every rank of the attempt and different for every other attempt)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", attempt) or "attempt"
    return Path(directory) / f"{STAGING_PREFIX}{step_name(step)}-{safe}"


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.pt"


def sidecar_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- writing -----------------------------------------------------------------------------------


def write_sidecar(staging: Path, rank: int, files: dict[str, dict[str, Any]]) -> None:
    """Record what ``rank`` wrote into ``staging`` (after the files themselves)."""
    atomic_write(Path(staging) / sidecar_file(rank), json.dumps(files, sort_keys=True).encode())


def collect_sidecars(staging: Path, writers: set[int], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Rank 0: wait (polling, with a deadline) until every writer's sidecar is in ``staging``;
    returns the union of their layer entries, each file's size checked against its sidecar."""
    staging = Path(staging)
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    files: dict[str, dict[str, Any]] = {}
    pending = set(writers)
    while pending:
        for rank in sorted(pending):
            sidecar = staging / sidecar_file(rank)
            if sidecar.exists():
                try:
                    files.update(json.loads(sidecar.read_text()))
                except (OSError, ValueError) as exc:
                    raise CheckpointError(f"{sidecar}: unreadable: {exc}") from exc
                pending.discard(rank)
        if pending:
            if time.monotonic() > deadline:
                raise CheckpointError(f"checkpoint {staging}: ranks {sorted(pending)} did not write in {timeout_s:g}s")
            pause.wait(SIDECAR_POLL_S)  # other ranks write to (possibly shared) storage
    for index, info in files.items():
        path = staging / info["file"]
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise CheckpointError(f"checkpoint {staging}: layer {index}: {exc}") from exc
        if "bytes" in info and size != info["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes on disk, its writer wrote {info['bytes']}")
    return files


def publish(
    directory: str | Path, staging: Path, *, step: int, files: dict[str, dict[str, Any]], manifest_extra: dict[str, Any]
) -> Path:
    """Rank 0: write the manifest into ``staging`` and rename it to ``step-<step>`` (atomic: a
    loader sees the whole checkpoint or none of it), then move ``latest`` forward. When that
    step is already published, the existing checkpoint is kept and this attempt discarded.
    Returns the published directory."""
    directory, staging = Path(directory), Path(staging)
    missing = [i for i in range(manifest_extra.get("num_layers", 0)) if str(i) not in files]
    if missing:
        raise CheckpointError(f"checkpoint {staging}: no rank wrote layers {missing}")
    manifest = {"format": FORMAT, "step": step, "layers": files, **manifest_extra}
    atomic_write(staging / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    fsync_dir(staging)
    final = step_dir(directory, step)
    job = manifest_extra.get("job_id") or ""
    try:
        os.rename(staging, final)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise CheckpointError(f"checkpoint {final}: cannot publish: {exc}") from exc
        owner = _owner(final)
        if owner is not None and not (owner and job and owner != job):
            log.info("checkpoint %s already published: kept, this attempt (%s) discarded", final, staging.name)
            shutil.rmtree(staging, ignore_errors=True)
            update_latest(directory, step, job)
            return final
        # Not this job's: an incomplete step directory (written in place by an older version),
        # or another job's checkpoint in a reused directory. Set aside (renamed, not deleted).
        aside = directory / f"{STALE_PREFIX}{final.name}-{time.time_ns()}"
        os.rename(final, aside)
        what = "incomplete checkpoint" if owner is None else f"checkpoint of job {owner}"
        log.warning("%s %s moved aside to %s", what, final, aside.name)
        os.rename(staging, final)
    fsync_dir(directory)
    update_latest(directory, step, job)
    remove_staging(directory, up_to_step=step)
    return final


def _owner(root: Path) -> str | None:
    """The job id of the complete checkpoint ``root`` ("" when it records none); None when it is
    not a complete, readable checkpoint."""
    try:
        return load_manifest(root).get("job_id") or ""
    except CheckpointError:
        return None


def update_latest(directory: str | Path, step: int, job_id: str = "") -> None:
    """Point ``latest`` at ``step-<step>`` unless it already names a newer complete checkpoint
    of the same job (one of another job, in a reused directory, is replaced)."""
    directory = Path(directory)
    current = latest_step(directory)
    if current is not None and current >= step:
        owner = _owner(step_dir(directory, current)) or ""
        if not (owner and job_id and owner != job_id):
            return
    atomic_write(directory / LATEST, step_name(step).encode())


def remove_staging(directory: str | Path, *, up_to_step: int) -> None:
    """Remove staging directories of steps up to ``up_to_step``: attempts that cannot be published
    any more (superseded generations, crashed writers)."""
    for entry in _entries(Path(directory)):
        found = _STAGING_RE.match(entry.name)
        if found and int(found.group(1)) <= up_to_step:
            shutil.rmtree(entry, ignore_errors=True)


# -- reading -----------------------------------------------------------------------------------


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def complete_steps(directory: str | Path) -> list[int]:
    """Steps of the published (complete) checkpoints in ``directory``, newest first."""
    steps = []
    for entry in _entries(Path(directory)):
        found = _STEP_RE.match(entry.name)
        if found and (entry / MANIFEST).is_file():
            steps.append(int(found.group(1)))
    return sorted(steps, reverse=True)


def latest_step(directory: str | Path) -> int | None:
    """The step ``latest`` names, when that checkpoint is complete; None otherwise."""
    directory = Path(directory)
    try:
        name = (directory / LATEST).read_text().strip()
    except OSError:
        return None
    found = _STEP_RE.match(name)
    if found is None or not (directory / name / MANIFEST).is_file():
        return None
    return int(found.group(1))


def load_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of the checkpoint directory ``root`` (format checked)."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{root}: no complete checkpoint (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointCorrupt(f"{root / MANIFEST}: unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{root / MANIFEST}: format {got!r}, expected {FORMAT!r}")
    if not isinstance(manifest.get("layers"), dict):
        raise CheckpointCorrupt(f"{root / MANIFEST}: no layer table")
    return manifest


def read_manifest(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The manifest of checkpoint ``path``: a ``step-*`` directory, or a checkpoint directory
    (then the one ``latest`` names, or the newest complete one when ``latest`` is missing or
    names an incomplete one). Files are not verified here (see :func:`verify`)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return load_manifest(path), path
    step = latest_step(path)
    if step is None:
        steps = complete_steps(path)
        if not steps:
            raise CheckpointError(f"{path}: no complete checkpoint (no {MANIFEST})")
        step = steps[0]
        if (path / LATEST).exists():
            log.warning("%s: `latest` names no complete checkpoint; using the newest, %s", path, step_name(step))
    root = step_dir(path, step)
    return load_manifest(root), root


def verify(root: str | Path, manifest: dict[str, Any], indices=None) -> None:
    """Check layer files of checkpoint ``root`` (``indices``, default all) against the manifest's
    SHA-256; raises :class:`CheckpointCorrupt` naming the first file that does not match."""
    root = Path(root)
    layers = manifest["layers"]
    if indices is None:
        indices = range(int(manifest.get("num_layers", len(layers))))
    for index in indices:
        info = layers.get(str(index))
        if info is None:
            raise CheckpointCorrupt(f"{root}: layer {index} missing from the manifest")
        path = root / info["file"]
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise CheckpointCorrupt(f"{path}: unreadable: {exc}") from exc
        if digest != info["sha256"]:
            raise CheckpointCorrupt(f"{path}: checksum mismatch (expected {info['sha256']}, got {digest})")


def newest_intact(directory: str | Path, *, job_id: str | None = None) -> tuple[dict[str, Any], Path]:
    """The newest complete checkpoint whose every file matches its manifest (of job ``job_id``
    when given). Corrupt ones are logged and skipped, not modified. Raises CheckpointError when
    there is none."""
    directory = Path(directory)
    skipped = []
    for step in complete_steps(directory):
        root = step_dir(directory, step)
        try:
            manifest = load_manifest(root)
            if job_id is not None and manifest.get("job_id", job_id) != job_id:
                continue
            verify(root, manifest)
        except CheckpointError as exc:
            log.warning("checkpoint %s is not intact (%s): trying an older one", root, exc)
            skipped.append(f"{root.name}: {exc}")
            continue
        return manifest, root
    why = f" ({'; '.join(skipped)})" if skipped else ""
    raise CheckpointError(f"{directory}: no intact checkpoint{why}")


def quarantine(directory: str | Path, root: str | Path) -> Path | None:
    """Set the corrupt checkpoint ``root`` aside (renamed ``.corrupt-...``, never deleted) and
    point ``latest`` at the newest remaining complete checkpoint. Returns the new path (None
    when it was already gone: another process set it aside)."""
    directory, root = Path(directory), Path(root)
    aside = directory / f"{CORRUPT_PREFIX}{root.name}-{time.time_ns()}"
    try:
        os.rename(root, aside)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot set corrupt checkpoint %s aside: %s", root, exc)
        return None
    log.warning("corrupt checkpoint %s set aside as %s", root, aside.name)
    if latest_step(directory) is None:
        steps = complete_steps(directory)
        if steps:
            atomic_write(directory / LATEST, step_name(steps[0]).encode())
        else:
            with contextlib.suppress(FileNotFoundError):
                (directory / LATEST).unlink()
    fsync_dir(directory)
    return aside


def audit(directory: str | Path) -> list[str]:
    """What is wrong with the checkpoints in ``directory``: each complete checkpoint whose files
    do not match its manifest, and a ``latest`` that is missing or names no intact checkpoint.
    Empty when every checkpoint is intact (drills and tests assert that)."""
    directory = Path(directory)
    problems = []
    intact = set()
    for step in complete_steps(directory):
        root = step_dir(directory, step)
        try:
            manifest = load_manifest(root)
            if manifest.get("step") != step:
                raise CheckpointCorrupt(f"{root}: manifest says step {manifest.get('step')}")
            verify(root, manifest)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        intact.add(step)
    if intact:
        latest = latest_step(directory)
        if latest not in intact:
            problems.append(f"{directory / LATEST}: names {latest and step_name(latest)}, not an intact checkpoint")
        elif latest != max(intact):
            problems.append(f"{directory / LATEST}: names {step_name(latest)}, the newest is {step_name(max(intact))}")
    return problems
