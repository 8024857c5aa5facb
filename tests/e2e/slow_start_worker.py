"""A real worker whose start-up starves its own heartbeat thread, as importing torch does on a
loaded machine: right after attaching to its agent (the side-thread heartbeat has started) it
holds the GIL in one long C call for several seconds, then runs as ``python -m oobleck.worker``.
"""

import sys

from oobleck.worker import agent_link, main

_attach = agent_link.AgentLink.attach


def attach(self) -> None:
    _attach(self)
    sum(range(6 * 10**8))  # one C call: no other Python thread runs meanwhile (5-15 s)


agent_link.AgentLink.attach = attach
sys.exit(main.main([]))
