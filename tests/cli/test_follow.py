"""The launcher's progress printer and fault trigger, fed synthetic statuses and events."""

from __future__ import annotations

import io
import json

import pytest

from oobleck.cli.follow import FaultPlan, Follower, FollowError, last_plan_node
from oobleck.protos.v1 import admin_pb2, plan_pb2


def status(step: int, *, generation: int = 1, state=admin_pb2.JOB_STATE_RUNNING, pipelines=((1, 2), (3, 4))):
    plan = plan_pb2.Plan(pipelines=[plan_pb2.Pipeline(node_ids=list(p)) for p in pipelines])
    return admin_pb2.GetStatusResponse(
        job_id="j1", state=state, step=step, total_steps=100, loss=2.5, samples_per_s=10.0,
        generation=generation, plan=plan,
    )  # fmt: skip


def event(i: int, kind: str, generation: int, step: int, node_id: int = 0, **durations: float):
    return admin_pb2.Event(
        id=i, kind=kind, generation=generation, step=step, node_id=node_id, message=kind, durations_s=durations
    )


def test_the_fault_fires_once_at_the_step_on_the_last_plan_node_and_the_timeline_is_collected():
    killed = []
    fault = FaultPlan(at_step=10, node_id=None, kill=lambda n: killed.append(n) or [111, 222])
    out = io.StringIO()
    f = Follower(stub=None, job_id="j1", out=out, fault=fault)
    f.on_status(status(9))
    assert killed == []
    f.on_status(status(12))
    f.on_status(status(13))
    assert killed == [4]  # last node of the last pipeline, once
    f.on_event(event(1, "node_dead", 1, 13, node_id=4, detect=1.0))
    f.on_event(event(2, "reconfiguring", 2, 13, detect=1.0, plan=0.01))
    f.on_event(event(3, "reconfigured", 2, 13, detect=1.0, plan=0.01, notify=0.002, regroup=0.2, copy=0.05))
    f.on_event(event(4, "resumed", 2, 14, resume=0.1))
    f.on_status(status(100, generation=2, state=admin_pb2.JOB_STATE_SUCCEEDED, pipelines=((1, 2),)))
    s = f.summary(wall_s=3.0)
    assert s["state"] == "SUCCEEDED" and s["generations"] == 2 and s["steps"] == 100
    assert s["fault"] == {"node_id": 4, "step": 12, "generation": 1, "pids": [111, 222]}
    [r] = s["reconfigurations"]
    assert r["lost_nodes"] == [4] and r["outcome"] == "resumed"
    assert list(r["phases_s"]) == ["detect", "plan", "notify", "regroup", "copy", "resume"]
    assert r["total_s"] == pytest.approx(1.362)
    text = out.getvalue()
    assert "step 12/100 loss 2.5000 samples/s 10.0 gen 1" in text
    assert "detect 1.000s | plan 0.010s | notify 0.002s | regroup 0.200s | copy 0.050s | resume 0.100s" in text
    assert text.count("step 13/") == 1 and "step 9/" in text


def test_an_explicit_kill_node_and_json_lines():
    out = io.StringIO()
    fault = FaultPlan(at_step=1, node_id=2, kill=lambda n: [])
    f = Follower(stub=None, job_id="j1", out=out, fault=fault, json_lines=True)
    f.on_status(status(1))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["type"] for r in records] == ["step", "fault"]
    assert records[1]["node_id"] == 2


def test_a_status_of_another_job_is_an_error():
    f = Follower(stub=None, job_id="other", out=io.StringIO())
    with pytest.raises(FollowError, match="now runs job j1"):
        f.on_status(status(1))


def test_last_plan_node_of_an_empty_plan_is_none():
    assert last_plan_node(status(1, pipelines=())) is None
    assert last_plan_node(status(1, pipelines=((5,), (6, 7)))) == 7
