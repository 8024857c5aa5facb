"""The agent's commands as the worker loop sees them: dataclasses, converted at the edge.

:class:`~oobleck.worker.agent_link.AgentLink` delivers ``WorkerCommand``\\ s that carry the
master's ``Plan`` message; :class:`Inbox` converts each one as the loop takes it (a malformed
plan raises :class:`~oobleck.worker.layout.PlanError` there, in the loop), so nothing past this
module reads a protobuf field. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from oobleck.common.worker_link import RECONFIGURE, START, STOP
from oobleck.worker.agent_link import AgentLink, WorkerCommand
from oobleck.worker.planmsg import GenerationPlan, generation_plan_from_proto

__all__ = ["RECONFIGURE", "START", "STOP", "Command", "Inbox", "command_from_link"]


@dataclass(frozen=True)
class Command:
    """One command from the agent. ``plan`` is set for start and reconfigure."""

    kind: str  # START, RECONFIGURE or STOP
    generation: int
    plan: GenerationPlan | None = field(default=None, repr=False)
    job_spec_yaml: str = ""  # start only
    node_id: int = 0  # start only
    reason: str = ""  # stop only


def command_from_link(cmd: WorkerCommand) -> Command:
    plan = None if cmd.plan is None else generation_plan_from_proto(cmd.plan)
    return Command(cmd.kind, cmd.generation, plan, cmd.job_spec_yaml, cmd.node_id, cmd.reason)


class Inbox:
    """The commands of one worker's link, converted as they are taken."""

    def __init__(self, link: AgentLink) -> None:
        self._link = link

    def next(self, timeout_s: float | None = None) -> Command | None:
        """The next command, waiting up to ``timeout_s`` (forever if None); None on timeout or
        once the stream has ended after a stop."""
        cmd = self._link.next_command(timeout_s)
        return None if cmd is None else command_from_link(cmd)

    def poll(self) -> Command | None:
        """The next command if one is waiting, else None (never blocks)."""
        cmd = self._link.poll_command()
        return None if cmd is None else command_from_link(cmd)

    def waiting(self) -> bool:
        """Whether a command is waiting (never blocks, takes nothing)."""
        return self._link.has_command()
