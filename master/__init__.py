"""oobleck.master: the master daemon.

Modules: ``config`` (MasterConfig, YAML/env/flags), ``detect`` (pure failure detector),
``store`` (SQLite state, off the event loop), ``planning`` (the one edge between the planner's
dataclasses and ``oobleck.v1.Plan``), ``core`` (membership, sessions, commands, reconfiguration),
``service`` (gRPC servicers and the MasterServer), ``http`` (aiohttp: /metrics, /api/status,
/healthz), ``metrics`` (Prometheus registry per master), ``main`` (the ``oobleck-master`` CLI).
"""
