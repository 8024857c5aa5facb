"""The one cache key of a measured profile, used by the master's profile cache and by the
profiler's own cache on a node: what was measured (the model with its normalised config, the
microbatch size, the sequence length, the precision) and on what (the node's device kind).

The device kind is :func:`node_device` of the facts an agent reports (slots and GPU memory per
slot); the agent hands it to the profiler (``--device-key``), so both caches key a profile the
same way. A profiler run by hand without it uses its own description of the device.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from oobleck.common.modelconfig import validate_model_config


def node_device(slots: int, gpu_memory_bytes: int) -> str:
    """A node's device kind: ``cpu`` or ``gpu-<bytes per GPU>``, times its slots."""
    kind = f"gpu-{gpu_memory_bytes}" if gpu_memory_bytes > 0 else "cpu"
    return f"{kind}x{slots}"


def profile_key(spec: Any, device: str) -> str:
    """The key of ``spec``'s profile measured on ``device`` (24 hex characters). A job's name,
    steps or data do not change it: only what the measurement depends on."""
    key = {
        "model": validate_model_config(spec).key(),
        "microbatch_size": spec.microbatch_size,
        "seq_len": spec.data.seq_len,
        "precision": spec.precision,
        "device": device,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
