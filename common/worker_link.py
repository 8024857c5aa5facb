"""The contract between an agent and the workers it spawns (no torch, no gRPC).

The agent (:mod:`oobleck.agent.daemon`) sets these variables for every worker process; the
worker's side of the channel (:mod:`oobleck.worker.agent_link`) reads them. Commands travel as
``oobleck.v1.WorkerCommand`` messages over the agent's Unix socket; their kinds are named here.
"""

from __future__ import annotations

#: Environment the agent sets for every worker it spawns.
ENV_AGENT_SOCKET = "OOBLECK_AGENT_SOCKET"  # the agent's WorkerService socket
ENV_NODE_ID = "OOBLECK_NODE_ID"
ENV_SLOT = "OOBLECK_SLOT"
ENV_WORK_DIR = "OOBLECK_WORK_DIR"
ENV_HEARTBEAT_INTERVAL_S = "OOBLECK_WORKER_HEARTBEAT_INTERVAL_S"
ENV_AGENT_PID = "OOBLECK_AGENT_PID"  # the worker dies with this process (PR_SET_PDEATHSIG)

#: Exit status of a worker whose agent went away.
AGENT_LOST_EXIT_CODE = 75

#: The largest message either side accepts (plans for large clusters travel on this channel).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: Command kinds, as a worker sees them.
START = "start"
RECONFIGURE = "reconfigure"
STOP = "stop"
