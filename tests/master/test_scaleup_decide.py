"""The scale-up decision, tested with timestamps."""

from __future__ import annotations

import pytest

from oobleck.master.scaleup import ScaleUpConfig, ScaleUpState, decide_scale_up

CFG = ScaleUpConfig(enabled=True, delay_s=2.0)


def state(**kw) -> ScaleUpState:
    base = {"job_running": True, "busy": False, "spares": ((7, 10.0),), "tried": None}
    return ScaleUpState(**{**base, **kw})


def test_waits_for_the_delay_after_the_newest_spare_then_adds_all() -> None:
    s = state(spares=((9, 11.0), (7, 10.0)))
    assert decide_scale_up(12.9, s, CFG)[0] == ()
    assert "waiting 0.100s more" in decide_scale_up(12.9, s, CFG)[1]
    assert decide_scale_up(13.0, s, CFG) == ((7, 9), "scale up onto spares [7, 9]")


@pytest.mark.parametrize(
    ("changes", "config", "why"),
    [
        ({}, ScaleUpConfig(enabled=False), "scale up disabled"),
        ({"spares": ()}, CFG, "no spares"),
        ({"job_running": False}, CFG, "not running"),
        ({"busy": True}, CFG, "in flight or pending"),
        ({"tried": frozenset({7})}, CFG, "bring no gain"),
    ],
)
def test_nothing_to_do(changes, config, why) -> None:
    add, reason = decide_scale_up(100.0, state(**changes), config)
    assert add == () and why in reason


def test_a_new_spare_is_tried_even_after_a_useless_set() -> None:
    s = state(spares=((7, 10.0), (8, 20.0)), tried=frozenset({7}))
    assert decide_scale_up(21.0, s, CFG)[0] == ()  # delay after node 8
    assert decide_scale_up(22.0, s, CFG)[0] == (7, 8)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="delay_s"):
        ScaleUpConfig(delay_s=-1.0)
