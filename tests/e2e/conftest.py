"""Fixtures: a profile of the tests' model, and a real local cluster that is always stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .cluster import Cluster
from .jobs import base_spec


@pytest.fixture(scope="session")
def profile_path(tmp_path_factory) -> str:
    """An ``oobleck-profile/1`` of the tests' model, measured once per session on this CPU."""
    from oobleck.worker.profiler import cached_profile

    root = tmp_path_factory.mktemp("e2e-profile")
    data = cached_profile(base_spec(), root / "cache")
    path = root / "profile.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def cluster(tmp_path, profile_path):
    """An unstarted :class:`Cluster` under ``tmp_path``; stopped (and orphans killed) at the end.
    Its master may read the session's profile."""
    c = Cluster(tmp_path / "cluster")
    c.profile_dir = str(Path(profile_path).parent)
    try:
        yield c
    finally:
        c.stop()
