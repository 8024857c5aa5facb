"""The agent's profiler runner (agent/profiling.py): failures become ProfileFailed, children never linger."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from oobleck.agent.profiling import MAX_PROFILE_BYTES, ProfileFailed, run_profiler
from oobleck.common.procs import wait_pid_gone

SPEC = "name: p\nmodel: {name: gpt}\nglobal_batch_size: 4\nmicrobatch_size: 2\nsteps: 1\n"


def _script(tmp_path, body: str) -> list[str]:
    path = tmp_path / "fake_profiler.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_result_file_is_returned(tmp_path) -> None:
    argv = _script(
        tmp_path,
        "import sys, json\nout = sys.argv[sys.argv.index('--out') + 1]\n"
        "open(out, 'w').write(json.dumps({'format': 'x', 'argv': sys.argv[1:]}))\n",
    )
    text = asyncio.run(run_profiler(SPEC, tmp_path, 30, argv=argv, tag="t1"))
    data = json.loads(text)
    assert "--spec" in data["argv"] and (tmp_path / "t1.yaml").read_text() == SPEC
    assert data["argv"][data["argv"].index("--device") + 1] in ("auto", "cpu", "cuda")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("import sys\nprint('profiler: bad things', file=sys.stderr)\nsys.exit(3)\n", "exited with 3: profiler: bad"),
        ("pass\n", "wrote no result"),
        (
            "import sys\nout = sys.argv[sys.argv.index('--out') + 1]\n"
            f"open(out, 'w').write('x' * {MAX_PROFILE_BYTES + 1})\n",
            "more than",
        ),
    ],
    ids=["exit-status", "no-result", "too-big"],
)
def test_failures_name_the_reason(tmp_path, body, needle) -> None:
    with pytest.raises(ProfileFailed, match=needle):
        asyncio.run(run_profiler(SPEC, tmp_path, 30, argv=_script(tmp_path, body)))


def test_a_profiler_past_its_deadline_is_killed(tmp_path) -> None:
    pid_file = tmp_path / "pid"
    argv = _script(tmp_path, f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    with pytest.raises(ProfileFailed, match=r"ran past 2s and was killed"):
        asyncio.run(run_profiler(SPEC, tmp_path, 2.0, argv=argv))
    assert wait_pid_gone(int(pid_file.read_text()), 5)
