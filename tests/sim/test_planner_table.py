"""Oobleck's throughput table from our own planner (``--profile``)."""

import json

import pytest

import oobleck.planner as planner
from oobleck.sim import load_trace, simulate
from oobleck.sim.cli import main
from oobleck.sim.planner_table import planner_system_inputs, planner_table

LAYERS = 24
# 1 GB of parameters per layer, 4x for weights + gradients + optimizer state: 96 GB in all, 40 GB per
# GPU, so no layout fits on fewer than 3 nodes.
PROFILE = {
    "format": "oobleck-profile/1",
    "model": "toy",
    "microbatch_size": 2,
    "layers": [
        {
            "name": f"layer{i}",
            "forward_ms": 1.0,
            "backward_ms": 2.0,
            "param_bytes": 10**9,
            "activation_bytes": 10**6,
            "output_bytes": 10**6,
        }
        for i in range(LAYERS)
    ],
}
CLUSTER = {
    "nodes": 30,
    "gpus_per_node": 1,
    "gpu_memory_bytes": 40 * 10**9,
    "intra_node_bytes_per_s": 3e11,
    "inter_node_bytes_per_s": 2.5e10,
    "optimizer_state_factor": 4,
}


@pytest.fixture
def files(tmp_path):
    profile, cluster = tmp_path / "profile.json", tmp_path / "cluster.json"
    profile.write_text(json.dumps(PROFILE))
    cluster.write_text(json.dumps(CLUSTER))
    return profile, cluster


def test_table_has_zero_where_nothing_fits(files):
    profile = planner.load_profile(files[0])
    table = planner_table(profile, CLUSTER, microbatches=64, max_nodes=30)
    assert table.throughput_sps[1] == 0.0
    assert table.throughput_sps[2] == 0.0
    assert table.min_nodes >= 3
    assert table.throughput_sps[30] > table.throughput_sps[table.min_nodes] > 0
    assert table.batch_samples == 64 * 2


def test_simulate_own_model(files, capsys):
    inputs = planner_system_inputs(*files, microbatches=64, reconfiguration_s=5.0)
    r = simulate(inputs, load_trace("10m"))
    assert r.throughput_sps > 0
    assert r.reconfigurations == 14
    args = ["run", "--profile", str(files[0]), "--cluster", str(files[1]), "--microbatches", "64"]
    assert main([*args, "--trace", "10m", "--system", "oobleck", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "planner:toy"
    assert out["throughput_sps"] > 0
