"""Facts about this node the agent reports at registration, probed without touching its GPUs."""

from __future__ import annotations

import logging
import shutil
import subprocess

log = logging.getLogger(__name__)


def parse_gpu_memory_mib(text: str) -> int:
    """Smallest GPU memory in bytes from ``nvidia-smi --query-gpu=memory.total
    --format=csv,noheader,nounits`` output (MiB per line); 0 when there is none."""
    sizes = [int(line.strip()) for line in text.splitlines() if line.strip().isdigit()]
    return min(sizes) * 2**20 if sizes else 0


def gpu_memory_bytes() -> int:
    """Per-GPU memory, asked of nvidia-smi: the agent must not create a CUDA context itself
    (it would hold memory on the workers' GPU)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s): reporting 0 GPU memory", exc)
        return 0
    return parse_gpu_memory_mib(out)
