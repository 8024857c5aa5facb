"""The master's profile cache (master/profiles.py)."""

from __future__ import annotations

import dataclasses

from oobleck.common.jobspec import JobSpec, ModelSpec
from oobleck.master import profiles


def _spec(**changes) -> JobSpec:
    spec = JobSpec(model=ModelSpec("gpt", {"num_layers": 2}), global_batch_size=4, microbatch_size=2, steps=1)
    return dataclasses.replace(spec, **changes)


def test_key_follows_what_the_measurement_depends_on() -> None:
    base = profiles.cache_key(_spec(), 1, 0)
    assert base == profiles.cache_key(_spec(steps=99, name="other"), 1, 0)  # not measured: same key
    assert base != profiles.cache_key(_spec(microbatch_size=1, global_batch_size=4), 1, 0)
    assert base != profiles.cache_key(_spec(model=ModelSpec("gpt", {"num_layers": 3})), 1, 0)
    assert base != profiles.cache_key(_spec(precision="bf16"), 1, 0)
    assert base != profiles.cache_key(_spec(), 1, 80 << 30)  # a GPU node
    assert base != profiles.cache_key(_spec(), 2, 0)


def test_round_trip_and_unreadable_entries(tmp_path) -> None:
    path = profiles.cache_path(str(tmp_path / "state.db"), "k")
    assert path == tmp_path / "profiles" / "profile-k.json"
    assert profiles.read_cached(path) is None
    profiles.write_cached(path, {"format": "oobleck-profile/1"})
    assert profiles.read_cached(path) == {"format": "oobleck-profile/1"}
    assert [p.name for p in path.parent.iterdir()] == ["profile-k.json"]  # no temp file left
    path.write_text("{truncated")
    assert profiles.read_cached(path) is None  # measured again rather than failing the job
