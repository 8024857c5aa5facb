"""``oobleckctl plan templates|instantiate|reconfigure``: output shapes and the error contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from oobleck.cli.ctl import main

BIN = Path(sys.executable).parent


@pytest.fixture
def inputs(tmp_path):
    layers = [
        {
            "name": f"l{i}",
            "forward_ms": 1.0 + i % 3,
            "backward_ms": 2.0,
            "param_bytes": 10**8,
            "activation_bytes": 10**6,
            "output_bytes": 10**5,
        }
        for i in range(12)
    ]
    profile = tmp_path / "p.json"
    profile.write_text(
        json.dumps({"format": "oobleck-profile/1", "model": "m", "microbatch_size": 1, "layers": layers})
    )
    cluster = tmp_path / "c.json"
    cluster.write_text(
        json.dumps(
            {
                "nodes": 13,
                "gpus_per_node": 2,
                "gpu_memory_bytes": 8 * 10**9,
                "intra_node_bytes_per_s": 3e11,
                "inter_node_bytes_per_s": 2.5e10,
                "optimizer_state_factor": 4,
            }
        )
    )
    return str(profile), str(cluster)


def run(capsys, *argv):
    try:
        code = main(["plan", *argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_templates_json(capsys, inputs):
    profile, cluster = inputs
    code, out, err = run(
        capsys, "templates", "--profile", profile, "--cluster", cluster, "--ft", "1", "--microbatches", "32", "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"node_spec", "templates"}
    assert {"min_nodes", "max_nodes", "ft", "guaranteed_range"} <= set(data["node_spec"])
    t = data["templates"][0]
    assert {"num_nodes", "num_stages", "iteration_ms", "bottleneck_ms", "gap", "stages"} <= set(t)
    assert set(t["stages"][0]) == {"layers", "node", "gpus", "latency_ms", "memory_bytes"}
    assert t["stages"][0]["layers"][0] == 0 and t["stages"][-1]["layers"][1] == 12


def test_templates_table(capsys, inputs):
    profile, cluster = inputs
    code, out, _ = run(
        capsys, "templates", "--profile", profile, "--cluster", cluster, "--ft", "1", "--microbatches", "32"
    )
    assert code == 0
    assert "node specification" in out
    assert "iteration_ms" in out.splitlines()[2]


def test_instantiate_json_and_table(capsys, inputs):
    profile, cluster = inputs
    args = ["instantiate", "--profile", profile, "--cluster", cluster, "--ft", "1", "--microbatches", "32"]
    code, out, err = run(capsys, *args, "--nodes", "11", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert {"pipelines", "iteration_ms", "sync_ms", "degraded", "spares"} == set(data)
    assert len(data["pipelines"]) >= 2
    assert set(data["pipelines"][0]) == {"template_nodes", "nodes", "microbatches", "estimated_ms"}
    assert sorted(n for p in data["pipelines"] for n in p["nodes"]) + data["spares"] == list(range(11))
    assert sum(p["microbatches"] for p in data["pipelines"]) == 32
    code, out, _ = run(capsys, *args)
    assert code == 0
    assert "estimated_ms" in out and "iteration" in out


def test_reconfigure_without_profile_is_the_policy(capsys):
    code, out, err = run(
        capsys,
        "reconfigure",
        "--pipelines",
        "[[0,1],[2,3,4],[5,6,7,8],[9,10,11,12,13]]",
        "--lost",
        "6,8",
        "--template-sizes",
        "2-5",
        "--json",
    )
    assert code == 0, err
    data = json.loads(out)
    assert [p["nodes"] for p in data["pipelines"]] == [[0, 1], [5, 7], [2, 3, 4], [9, 10, 11, 12, 13]]
    assert [p["template_nodes"] for p in data["pipelines"]] == [2, 2, 3, 5]
    assert data["ranks"]["9"] == [7]
    assert "reason" in data


def test_reconfigure_with_profile_has_copies(capsys, inputs):
    profile, cluster = inputs
    code, out, err = run(
        capsys,
        "reconfigure",
        "--pipelines",
        "[[0,1],[2,3,4],[5,6,7,8],[9,10,11,12]]",
        "--lost",
        "6,8",
        "--template-sizes",
        "2-5",
        "--profile",
        profile,
        "--cluster",
        cluster,
        "--microbatches",
        "32",
        "--json",
    )
    assert code == 0, err
    data = json.loads(out)
    assert {"pipelines", "ranks", "copies", "copy_ms", "restore_layers", "reason"} <= set(data)
    assert sum(p["microbatches"] for p in data["pipelines"]) == 32
    assert data["copies"] and {"layer", "src", "dst", "bytes"} == set(data["copies"][0])
    assert data["ranks"]["0"] == [0, 1]  # 2 GPUs per node
    assert data["copy_ms"] > 0
    code, out, _ = run(
        capsys,
        "reconfigure",
        "--pipelines",
        "[[0,1],[2,3,4]]",
        "--lost",
        "",
        "--template-sizes",
        "2-3",
        "--profile",
        profile,
        "--cluster",
        cluster,
        "--microbatches",
        "8",
    )
    assert code == 0
    assert "copies: 0" in out


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ["reconfigure", "--pipelines", "[[0,1],[2,3]", "--lost", "1", "--template-sizes", "2-5"],
            "--pipelines: malformed JSON",
        ),
        (
            ["reconfigure", "--pipelines", '[[0,"a"]]', "--lost", "1", "--template-sizes", "2-5"],
            "pipelines[0][1]: expected an integer node id",
        ),
        (
            ["reconfigure", "--pipelines", "[[0,1]]", "--lost", "x", "--template-sizes", "2-5"],
            "--lost: expected comma-separated node ids",
        ),
        (
            ["reconfigure", "--pipelines", "[[0,1]]", "--lost", "1", "--template-sizes", "5-2"],
            "--template-sizes: need 1 <= A <= B",
        ),
        (
            ["reconfigure", "--pipelines", "[[0,1],[2,3]]", "--lost", "0,1,2", "--template-sizes", "2-5"],
            "insufficient nodes: 1 surviving",
        ),
        (
            ["reconfigure", "--pipelines", "[[0,1],[2,3]]", "--lost", "1", "--template-sizes", "2-2"],
            "re-instantiating needs --profile, --cluster and --microbatches",
        ),
        (
            ["reconfigure", "--pipelines", "[[0,1]]", "--lost", "1", "--template-sizes", "1-2", "--microbatches", "4"],
            "--profile, --cluster: required together",
        ),
        (
            ["reconfigure", "--pipelines", "[[0,1]]", "--template-sizes", "1-2"],
            "the following arguments are required: --lost",
        ),
        (["templates", "--profile", "p", "--cluster", "c", "--ft", "x", "--microbatches", "3"], "invalid int value"),
    ],
)
def test_errors_exit_2_with_one_line(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert fragment in one_error_line(err)


def test_malformed_input_files(capsys, inputs, tmp_path):
    profile, cluster = inputs
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"nodes": 3,')
    code, _, err = run(
        capsys, "templates", "--profile", profile, "--cluster", str(bad_json), "--ft", "1", "--microbatches", "8"
    )
    assert code == 2
    assert "bad.json: malformed JSON at line 1" in one_error_line(err)
    bad_field = tmp_path / "field.json"
    data = json.loads(Path(cluster).read_text())
    data["gpus_per_node"] = 0
    bad_field.write_text(json.dumps(data))
    code, _, err = run(
        capsys, "instantiate", "--profile", profile, "--cluster", str(bad_field), "--ft", "1", "--microbatches", "8"
    )
    assert code == 2
    assert "gpus_per_node: must be >= 1, got 0" in one_error_line(err)
    code, _, err = run(
        capsys, "templates", "--profile", cluster, "--cluster", cluster, "--ft", "1", "--microbatches", "8"
    )
    assert code == 2
    assert "format: expected 'oobleck-profile/1'" in one_error_line(err)
    code, _, err = run(
        capsys,
        "templates",
        "--profile",
        str(tmp_path / "missing.json"),
        "--cluster",
        cluster,
        "--ft",
        "1",
        "--microbatches",
        "8",
    )
    assert code == 2
    assert "cannot read profile" in one_error_line(err)


def test_planner_constraints_are_errors(capsys, inputs):
    profile, cluster = inputs
    base = ["instantiate", "--profile", profile, "--cluster", cluster, "--ft", "1"]
    code, _, err = run(capsys, *base, "--microbatches", "1")
    assert code == 2
    assert "microbatches" in one_error_line(err)
    code, _, err = run(capsys, *base, "--microbatches", "8", "--min-nodes", "2", "--nodes", "1")
    assert code == 2
    assert "too few nodes: 1 available, the smallest pipeline template needs 2" in one_error_line(err)


def test_plan_without_subcommand(capsys):
    code, _, err = run(capsys)
    assert code == 2
    assert "a subcommand is required" in one_error_line(err)


def test_console_script_exit_code():
    result = subprocess.run(
        [
            str(BIN / "oobleckctl"),
            "plan",
            "reconfigure",
            "--pipelines",
            "[[0,1],[2,3,4]]",
            "--lost",
            "0,1,2,3",
            "--template-sizes",
            "2-3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "oobleckctl plan reconfigure: error: insufficient nodes: 1 surviving, a pipeline needs at least 2"
    )
    ok = subprocess.run(
        [
            str(BIN / "oobleckctl"),
            "plan",
            "reconfigure",
            "--pipelines",
            "[[0,1],[2,3,4]]",
            "--lost",
            "2",
            "--template-sizes",
            "2-3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["pipelines"][1]["nodes"] == [3, 4]
