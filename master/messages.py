"""The master's one place that builds and reads agent-bound protobuf messages (besides the gRPC
servicers in ``service.py`` and plan conversion in ``planning.py``): the rest of the master
passes commands around as the serialized payloads it persists, and plans as opaque objects.
"""

from __future__ import annotations

from typing import Any

from oobleck.protos.v1 import agent_pb2, plan_pb2


def command(
    command_id: int, generation: int, kind: str, *, plan: Any = None, spec_yaml: str = "", reason: str = ""
) -> bytes:
    """The serialized ``Command`` of ``kind`` (start, reconfigure, drain, stop, kill, profile)."""
    if kind == "start":
        body = {"start": agent_pb2.Start(plan=plan, job_spec_yaml=spec_yaml)}
    elif kind == "reconfigure":
        body = {"reconfigure": agent_pb2.Reconfigure(plan=plan)}
    elif kind == "drain":
        body = {"drain": agent_pb2.Drain(reason=reason)}
    elif kind == "stop":
        body = {"stop": agent_pb2.Stop(reason=reason)}
    elif kind == "kill":
        body = {"kill": agent_pb2.Kill(reason=reason)}
    elif kind == "profile":
        body = {"profile": agent_pb2.Profile(job_spec_yaml=spec_yaml)}
    else:
        raise ValueError(f"unknown command kind {kind!r}")
    return agent_pb2.Command(command_id=command_id, generation=generation, **body).SerializeToString()


def command_message(payload: bytes) -> agent_pb2.MasterMessage:
    """A persisted command, as the session sends it."""
    return agent_pb2.MasterMessage(command=agent_pb2.Command.FromString(payload))


def profile_spec_of(payload: bytes) -> str:
    """The job spec a ``Profile`` command asks to measure."""
    return agent_pb2.Command.FromString(payload).profile.job_spec_yaml


def terms_message(interval_s: float, timeout_s: float) -> agent_pb2.MasterMessage:
    return agent_pb2.MasterMessage(terms=agent_pb2.HeartbeatTerms(interval_s=interval_s, timeout_s=timeout_s))


def plan_pipelines(plan: bytes) -> tuple[tuple[int, ...], ...]:
    """The pipelines (node ids in stage order) of a serialized plan (none for b"")."""
    if not plan:
        return ()
    return tuple(tuple(p.node_ids) for p in plan_pb2.Plan.FromString(plan).pipelines)


def plan_for_status(plan: bytes) -> plan_pb2.Plan:
    """A serialized plan as operators see it: the rendezvous secret is for the plan's nodes only."""
    shown = plan_pb2.Plan.FromString(plan)
    shown.rendezvous.ClearField("secret")
    return shown
