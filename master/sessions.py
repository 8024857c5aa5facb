"""Membership: registration, agent sessions, heartbeats and reports, the liveness facts the
detector judges, deaths, and the purge of dead nodes (a part of :class:`~oobleck.master.core.Master`).

A node is registered once (a durable id, bound to its client certificate under mTLS), then its
agent's session attaches; everything the session reads is recorded as a fact (last heartbeat,
reported failure, leave notice) and judged by :func:`oobleck.master.detect.decide`.
"""

from __future__ import annotations

import logging

from oobleck.common.version import agent_protocol_problem
from oobleck.master import membership, messages, planning
from oobleck.master.records import (
    MasterError,
    NodeRuntime,
    NodeView,
    RegisterInfo,
    RegisterResult,
    SessionHandle,
    StateUnavailable,
)
from oobleck.master.states import ACTIVE_JOB_STATES, TERMINAL_JOB_STATES, JobState, NodeState
from oobleck.master.store import NodeRow, StoreError

log = logging.getLogger(__name__)


class SessionsMixin:
    async def on_register(self, info: RegisterInfo) -> RegisterResult:
        problem = agent_protocol_problem(info.protocol_version, info.software_version)
        if problem is not None:
            raise MasterError("FAILED_PRECONDITION", f"protocol_version: {problem}")
        now = self.clock()
        known = self.nodes.get(info.node_id) if info.node_id else None
        if known is not None and known.row.identity and known.row.identity != info.identity:
            raise MasterError(
                "PERMISSION_DENIED",
                f"node_id: node {known.row.node_id} is bound to another client certificate; register without "
                "node_id to join as a new node",
            )
        if known is not None and known.row.state != NodeState.DEAD and known.row.nonce == info.nonce:
            row = known.row
            row.address, row.store_port = info.address, info.store_port
            known.last_seen_s = now
            await self._save_fact("save_node", row)
            log.info("node %d (%s) re-registered", row.node_id, row.name)
        else:
            if known is not None and known.row.state != NodeState.DEAD:
                # Same id, another nonce: a restarted agent -- or someone else. A live session
                # (attached and heartbeating) is never displaced: the id is re-claimed only once
                # the old session is gone (its stream closed, or its heartbeats stopped).
                if known.session is not None and now - known.last_seen_s <= self.config.heartbeat_timeout_s:
                    raise MasterError(
                        "ALREADY_EXISTS",
                        f"node_id: node {known.row.node_id} is alive under another registration (its session "
                        "is attached and heartbeating); a restarted agent registers once that session is gone",
                    )
                known.failed_reason = "agent restarted (new nonce)"
            live = len(self.live)
            if live >= self.config.max_nodes:
                raise MasterError("RESOURCE_EXHAUSTED", f"max_nodes: the master already has {live} live nodes")
            row = NodeRow(
                0,
                info.node_name,
                info.address,
                info.slots,
                info.gpu_memory_bytes,
                info.software_version,
                info.nonce,
                info.store_port,
                NodeState.SPARE,
                "",
                info.identity,
            )
            self._require_store()  # a new node needs a durable id
            event = self._new_event("node_registered", f"{row.name} ({row.slots} slots) registered")
            try:
                row = await self.store.call("register_node", row, event)  # one commit: the node and its event
            except StoreError as exc:
                self.ledger.failed(exc)
                raise StateUnavailable(str(exc)) from None
            self.nodes[row.node_id] = self.live[row.node_id] = NodeRuntime(
                row=row, last_seen_s=self.clock(), joined_s=self.clock()
            )  # its session attaches next: until then attach_timeout_s applies (see detect)
            self._update_node_metrics()
            self._publish(event)
            if self.job is not None and self.job.state == JobState.PAUSED:
                self._spawn(self._try_resume())
        interval_s, timeout_s = self._heartbeat_terms()
        self.nodes[row.node_id].interval_s, self.nodes[row.node_id].timeout_s = interval_s, timeout_s
        return RegisterResult(
            row.node_id,
            timeout_s,
            interval_s,
            timeout_s,
            self.job.spec_yaml if self.job and self.job.state not in TERMINAL_JOB_STATES else "",
            self.generation,
        )

    def _heartbeat_terms(self) -> tuple[float, float]:
        """The heartbeat interval and timeout for a node registering now: longer in a large
        cluster (see :func:`~oobleck.master.membership.heartbeat_terms`), never shorter than
        before while the master runs. When they grew by a quarter since last sent, every live
        node gets them (its new timeout applies before the message leaves), so that the nodes
        that joined a small cluster do not keep heartbeating at its rate."""
        c = self.config
        terms = membership.heartbeat_terms(
            len(self.live), c.heartbeat_interval_s, c.heartbeat_timeout_s, c.heartbeat_budget_per_s
        )
        self._terms = max(self._terms, terms)
        if self._terms[0] >= 1.25 * self._terms_sent[0]:
            self._terms_sent = self._terms
            interval_s, timeout_s = self._terms
            msg = messages.terms_message(interval_s, timeout_s)
            for node in self.live.values():
                node.interval_s, node.timeout_s = interval_s, timeout_s
                if node.session is not None:
                    node.session.send(msg)
            log.info("%d live nodes: heartbeat every %.2fs, timeout %.2fs", len(self.live), interval_s, timeout_s)
        return self._terms

    def session_node(self, node_id: int, nonce: str, identity: str = "") -> NodeRuntime:
        if self.stopping:
            raise MasterError("UNAVAILABLE", "master shutting down; re-attach after it restarts")
        node = self.nodes.get(node_id)
        if node is None:
            raise MasterError("FAILED_PRECONDITION", f"hello.node_id: unknown node {node_id}; register first")
        if node.row.state == NodeState.DEAD:
            raise MasterError("FAILED_PRECONDITION", f"hello.node_id: node {node_id} was declared dead; register again")
        if node.row.nonce != nonce:
            raise MasterError("FAILED_PRECONDITION", f"hello.nonce: does not match node {node_id}'s registration")
        if node.row.identity and node.row.identity != identity:
            why = f"hello.node_id: node {node_id} is bound to another client certificate"
            raise MasterError("PERMISSION_DENIED", why)
        return node

    def attach(self, node: NodeRuntime, last_command_id: int) -> SessionHandle:
        handle = SessionHandle()
        if node.session is not None:
            node.session.close("ABORTED", "replaced by a newer session of the same node")
        node.session = handle
        node.attached = True
        node.detached_since_s = None
        node.reattach_by_s = None
        node.last_seen_s = self.clock()
        if node.interval_s is not None and node.interval_s > self.config.heartbeat_interval_s:
            # What it was told, in case it missed it.
            handle.send(messages.terms_message(node.interval_s, node.timeout_s or 0.0))
        # Unacked commands are sent again, also those the agent has seen (command id <=
        # last_command_id): the ack sent before was lost with the old session or master.
        self.ledger.resend(node)
        log.info("node %d session attached (last acked command %d)", node.row.node_id, last_command_id)
        return handle

    def detach(self, node: NodeRuntime, handle: SessionHandle) -> None:
        if node.session is handle:
            node.session = None
            if node.row.state != NodeState.DEAD:
                node.detached_since_s = self.clock()
                log.info("node %d session broke; grace %.2fs", node.row.node_id, self.config.session_grace_s)

    def on_heartbeat(self, node: NodeRuntime) -> None:
        node.last_seen_s = self.clock()

    def on_failure(self, node: NodeRuntime, reason: str) -> None:
        node.last_seen_s = self.clock()
        if node.failed_reason is None and node.row.state != NodeState.DEAD:
            node.failed_reason = reason or "reported by agent"

    async def on_leaving(self, node: NodeRuntime, reason: str, deadline_s: float) -> None:
        """The node's agent received a pre-emption or maintenance notice (SIGTERM): drain it at a
        step boundary, as an operator's drain would, so that no step is lost; its agent exits
        once its workers are out of the plan. A node outside the plan just leaves."""
        node.last_seen_s = self.clock()
        node_id = node.row.node_id
        job = self.job
        in_plan = any(node_id in p for p in self.pipelines)
        if node.row.state == NodeState.DEAD or node.leaving:
            return
        node.leaving = True
        if not in_plan or job is None or job.state not in ACTIVE_JOB_STATES:
            await self._record("node_leaving", f"{node.row.name} is leaving ({reason}); not in a plan", node_id=node_id)
            return
        self._drain.add(node_id)
        if self._pending_since is None:
            self._pending_since = self.clock()
        await self._record(
            "node_leaving",
            f"{node.row.name} is leaving ({reason}): drained at the next step boundary (it waits {deadline_s:g}s)",
            node_id=node_id,
        )

    def on_worker_report(self, node: NodeRuntime, slot: int, state: str, exit_code: int, detail: str) -> None:
        node.last_seen_s = self.clock()
        log.debug("node %d slot %d: %s exit=%d %s", node.row.node_id, slot, state, exit_code, detail)

    def list_nodes(self, after_node_id: int = 0, limit: int = 1_000_000) -> tuple[list[NodeView], int]:
        """A page of nodes in id order: (at most ``limit`` nodes with id > ``after_node_id``,
        the id to continue after, 0 when this is the last page)."""
        now = self.clock()
        nodes, next_after = membership.page(self.nodes.values(), after_node_id, limit, key=lambda n: n.row.node_id)
        views = [
            NodeView(
                n.row.node_id,
                n.row.name,
                n.row.address,
                n.row.slots,
                n.row.state,
                max(0.0, now - n.last_seen_s),
                n.row.reason or n.failed_reason or "",
            )
            for n in nodes
        ]
        return views, next_after

    def _planning_nodes(self) -> list[planning.NodeInfo]:
        return [
            planning.NodeInfo(n.row.node_id, n.row.address, n.row.slots, n.row.gpu_memory_bytes, n.row.store_port)
            for n in sorted(self.live.values(), key=lambda n: n.row.node_id)
            if n.row.state in (NodeState.ALIVE, NodeState.SPARE) and n.failed_reason is None and not n.leaving
        ]

    def _node_infos(self) -> dict[int, planning.NodeInfo]:
        return {
            n.row.node_id: planning.NodeInfo(
                n.row.node_id, n.row.address, n.row.slots, n.row.gpu_memory_bytes, n.row.store_port
            )
            for n in self.nodes.values()
        }

    def _existing(self, node_id: int) -> NodeRuntime:
        node = self.nodes.get(node_id)
        if node is None:
            raise MasterError("NOT_FOUND", f"node_id: no node {node_id} (see `oobleckctl nodes`)")
        return node
