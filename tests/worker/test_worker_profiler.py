"""The profiler writes valid oobleck-profile/1 JSON and caches it by config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from worker_testutil import tiny_spec

from oobleck.planner import parse_profile
from oobleck.worker.profiler import cache_key, cached_profile


def test_profile_is_valid_and_cached(tmp_path: Path) -> None:
    spec = tiny_spec("gpt")
    data = cached_profile(spec, tmp_path, warmup=1, runs=2)
    profile = parse_profile(data)
    assert profile.microbatch_size == 2 and profile.num_layers == 4
    assert [layer.name for layer in profile.layers] == ["embed", "block0", "block1", "head"]
    hidden_bytes = 2 * 16 * 32 * 4  # microbatch x seq x hidden x fp32
    assert all(layer.output_bytes == hidden_bytes for layer in profile.layers[:-1])
    assert profile.layers[-1].output_bytes == 2 * 16 * 64 * 4  # logits
    block = profile.layers[1]
    assert block.param_bytes == 4 * (12 * 32 * 32 + 13 * 32)  # qkv, proj, fc1, fc2, 2 norms
    assert block.activation_bytes > hidden_bytes and block.forward_ms > 0 and block.backward_ms > 0
    files = list(tmp_path.glob("profile-*.json"))
    assert len(files) == 1
    # Cached: a second call reads the file (even if edited) instead of measuring again.
    files[0].write_text(files[0].read_text().replace('"embed"', '"embed-cached"'))
    assert cached_profile(spec, tmp_path)["layers"][0]["name"] == "embed-cached"
    # Another microbatch size is another key.
    other = replace(spec, microbatch_size=4)
    assert cache_key(other, "cpu") != cache_key(spec, "cpu")
    assert cached_profile(other, tmp_path, warmup=0, runs=1)["microbatch_size"] == 4
    assert len(list(tmp_path.glob("profile-*.json"))) == 2
