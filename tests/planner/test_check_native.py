"""The C planner under AddressSanitizer/UBSan and valgrind memcheck (scripts/check-native.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_check_native_finds_no_memory_errors_or_leaks():
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    # valgrind is optional; AddressSanitizer's leak checker runs either way.
    args = ["--asan-only"] if shutil.which("valgrind") is None else []
    result = subprocess.run(
        [str(ROOT / "scripts" / "check-native.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "native planner checks passed" in result.stdout
    assert "check-native: OK" in result.stdout
