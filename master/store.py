"""Durable master state in SQLite (WAL). Blocking methods: call them through :class:`AsyncStore`.

Tables: ``meta`` (counters), ``job`` (one row: spec, state, generation, current plan),
``nodes`` (membership in registration order), ``commands`` (every command sent, and whether it
was acked) and ``events`` (the event log). Each public method is one transaction, so a crash
leaves either all of a change or none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from oobleck.master.rows import CommandRow, EventRow, JobRow, NodeRow, Snapshot, StoreError

__all__ = [
    "AsyncStore",
    "CommandRow",
    "EventRow",
    "JobRow",
    "NodeRow",
    "Snapshot",
    "Store",
    "StoreError",
]

SCHEMA_VERSION = 2  # 2: nodes.identity (the client certificate a node is bound to under mTLS)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    job_id TEXT NOT NULL,
    spec_yaml TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    generation INTEGER NOT NULL,
    plan BLOB,
    plan_json TEXT NOT NULL,
    step INTEGER NOT NULL,
    total_steps INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    address TEXT NOT NULL,
    slots INTEGER NOT NULL,
    gpu_memory_bytes INTEGER NOT NULL,
    software_version TEXT NOT NULL,
    nonce TEXT NOT NULL,
    store_port INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    identity TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS commands (
    command_id INTEGER PRIMARY KEY,
    node_id INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0,
    ok INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands (node_id, acked);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    unix_time_s REAL NOT NULL,
    kind TEXT NOT NULL,
    node_id INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    step INTEGER NOT NULL,
    message TEXT NOT NULL,
    durations_json TEXT NOT NULL
);
"""


class Store:
    """One SQLite connection, used from one thread only (see :class:`AsyncStore`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock_fd: int | None = None
        try:
            self._open()
        except (sqlite3.Error, OSError) as exc:
            self._unlock()
            raise StoreError(self.path, "opening", exc) from exc

    def _open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._lock()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # created private (node nonces)
            os.close(fd)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(_SCHEMA)
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            c.execute("INSERT OR IGNORE INTO meta VALUES ('next_node_id', '1')")
            c.execute("INSERT OR IGNORE INTO meta VALUES ('next_command_id', '1')")
        version = int(self._meta("schema_version"))
        if version == 1:  # written by an older master: nodes had no identity (none is bound)
            with self._tx() as c:
                c.execute("ALTER TABLE nodes ADD COLUMN identity TEXT NOT NULL DEFAULT ''")
                c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            version = SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"written by a newer master (schema version {version}); this master reads versions "
                    f"1..{SCHEMA_VERSION}: run the newer master, or give this one another state file"
                )
            raise sqlite3.DatabaseError(f"schema version {version}, this master reads versions 1..{SCHEMA_VERSION}")

    def close(self) -> None:
        self._conn.close()
        self._unlock()

    def _lock(self) -> None:
        """One master per state file: an exclusive lock on ``<state file>.lock`` held for the
        process's life (the kernel releases it when the process dies, even by SIGKILL)."""
        lock_path = f"{self.path}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise sqlite3.OperationalError(
                f"in use by another master (pid {holder}, lock {lock_path}); stop it or use another state file"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None

    # -- helpers -----------------------------------------------------------------------------
    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                try:
                    self.conn.execute("COMMIT")
                    return
                except BaseException:
                    self._rollback()  # a COMMIT that failed (disk full) leaves the transaction open
                    raise
            self._rollback()

        def _rollback(self) -> None:
            # SQLite may already have rolled back on its own (SQLITE_FULL, I/O errors): a second
            # ROLLBACK would fail and hide the original error.
            if self.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")

    def _tx(self) -> Store._Tx:
        return Store._Tx(self._conn)

    def _meta(self, key: str) -> str:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0]

    def _take_counter(self, c: sqlite3.Connection, key: str, count: int = 1) -> int:
        first = int(c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])
        c.execute("UPDATE meta SET value = ? WHERE key = ?", (str(first + count), key))
        return first

    # -- load ----------------------------------------------------------------------------------
    def load(self) -> Snapshot:
        c = self._conn
        job = None
        row = c.execute(
            "SELECT job_id, spec_yaml, state, reason, generation, plan, plan_json, step, total_steps FROM job"
        ).fetchone()
        if row is not None:
            job = JobRow(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]), row[7], row[8])
        nodes = [NodeRow(*r) for r in c.execute("SELECT * FROM nodes ORDER BY node_id")]
        pending = [
            CommandRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6]), r[7])
            for r in c.execute("SELECT * FROM commands WHERE acked = 0 ORDER BY command_id")
        ]
        last_event = c.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
        return Snapshot(
            job, nodes, pending, int(self._meta("next_node_id")), int(self._meta("next_command_id")), last_event
        )

    # -- nodes ---------------------------------------------------------------------------------
    def new_node_id(self) -> int:
        with self._tx() as c:
            return self._take_counter(c, "next_node_id")

    def save_node(self, node: NodeRow) -> None:
        with self._tx() as c:
            self._save_node(c, node)

    def _save_node(self, c: sqlite3.Connection, node: NodeRow) -> None:
        c.execute(
            "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                node.node_id,
                node.name,
                node.address,
                node.slots,
                node.gpu_memory_bytes,
                node.software_version,
                node.nonce,
                node.store_port,
                node.state,
                node.reason,
                node.identity,
            ),
        )

    def register_node(self, node: NodeRow, event: EventRow | None = None) -> NodeRow:
        """Give ``node`` a fresh id (when its id is 0) and save it, with its ``event`` (whose
        node_id becomes that id), in one transaction."""
        with self._tx() as c:
            if node.node_id == 0:
                node.node_id = self._take_counter(c, "next_node_id")
            self._save_node(c, node)
            if event is not None:
                event.node_id = node.node_id
                self._insert_event(c, event)
        return node

    def save_nodes(self, nodes: list[NodeRow]) -> None:
        with self._tx() as c:
            for node in nodes:
                self._save_node(c, node)

    # -- job, plan and commands ------------------------------------------------------------------
    def save_job(self, job: JobRow) -> None:
        with self._tx() as c:
            self._save_job(c, job)

    def _save_job(self, c: sqlite3.Connection, job: JobRow) -> None:
        c.execute(
            "INSERT OR REPLACE INTO job VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.job_id,
                job.spec_yaml,
                job.state,
                job.reason,
                job.generation,
                job.plan,
                json.dumps(job.plan_json),
                job.step,
                job.total_steps,
            ),
        )

    def reserve_command_ids(self, count: int) -> int:
        with self._tx() as c:
            return self._take_counter(c, "next_command_id", count)

    def commit_plan(
        self,
        job: JobRow | None,
        nodes: list[NodeRow],
        commands: list[CommandRow],
        events: list[EventRow],
    ) -> list[EventRow]:
        """Job (plan, generation), node states, new commands and events in ONE transaction.

        Commands whose ``command_id`` is 0 get fresh ids; events get their ids. Returns the events.
        """
        with self._tx() as c:
            if job is not None:
                self._save_job(c, job)
            for node in nodes:
                self._save_node(c, node)
            for cmd in commands:
                if cmd.command_id == 0:
                    cmd.command_id = self._take_counter(c, "next_command_id")
                c.execute(
                    "INSERT INTO commands VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (cmd.command_id, cmd.node_id, cmd.generation, cmd.kind, cmd.payload, 0, 0, ""),
                )
            if commands:
                top = max(cmd.command_id for cmd in commands) + 1
                if top > int(c.execute("SELECT value FROM meta WHERE key = 'next_command_id'").fetchone()[0]):
                    c.execute("UPDATE meta SET value = ? WHERE key = 'next_command_id'", (str(top),))
            for ev in events:
                self._insert_event(c, ev)
        return events

    def ack_command(self, command_id: int, ok: bool, error: str) -> bool:
        """Mark a command acked; False when unknown or already acked (nothing applied twice)."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE commands SET acked = 1, ok = ?, error = ? WHERE command_id = ? AND acked = 0",
                (int(ok), error, command_id),
            )
            return cur.rowcount == 1

    @staticmethod
    def _drop_commands_of(c: sqlite3.Connection, node_id: int) -> None:
        """A dead node's unacked commands will never be delivered: mark them acked (not ok)."""
        c.execute(
            "UPDATE commands SET acked = 1, ok = 0, error = 'node dead' WHERE node_id = ? AND acked = 0", (node_id,)
        )

    def declare_dead(self, nodes: list[NodeRow], events: list[EventRow]) -> None:
        """Dead nodes, their undeliverable commands dropped, their events: one transaction."""
        with self._tx() as c:
            for node in nodes:
                self._save_node(c, node)
                self._drop_commands_of(c, node.node_id)
            for ev in events:
                self._insert_event(c, ev)

    def delete_nodes(self, node_ids: list[int]) -> None:
        """Purge dead nodes and their (acked) commands, in one transaction; events keep history."""
        with self._tx() as c:
            for node_id in node_ids:
                c.execute("DELETE FROM commands WHERE node_id = ? AND acked = 1", (node_id,))
                c.execute("DELETE FROM nodes WHERE node_id = ? AND state = 'dead'", (node_id,))

    def commands_for(self, node_id: int) -> list[CommandRow]:
        return [
            CommandRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6]), r[7])
            for r in self._conn.execute("SELECT * FROM commands WHERE node_id = ? ORDER BY command_id", (node_id,))
        ]

    def update_progress(self, step: int, state: str, reason: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE job SET step = ?, state = ?, reason = ? WHERE id = 1", (step, state, reason))

    # -- events ------------------------------------------------------------------------------------
    def _insert_event(self, c: sqlite3.Connection, ev: EventRow) -> None:
        """Insert ``ev``; an event with an id (the master numbers them) keeps it."""
        cur = c.execute(
            "INSERT OR IGNORE INTO events (id, unix_time_s, kind, node_id, generation, step, message, durations_json) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ev.id or None,
                ev.unix_time_s,
                ev.kind,
                ev.node_id,
                ev.generation,
                ev.step,
                ev.message,
                json.dumps(ev.durations_s),
            ),
        )
        if not ev.id:
            ev.id = int(cur.lastrowid)

    def add_event(self, ev: EventRow) -> EventRow:
        with self._tx() as c:
            self._insert_event(c, ev)
        return ev

    def resync(
        self,
        job: JobRow | None,
        nodes: list[NodeRow],
        acks: list[tuple[int, bool, str]],
        dead: list[int],
        events: list[EventRow],
    ) -> None:
        """After failed writes: everything the master holds that may not be durable, in ONE
        transaction (job and progress, every node, buffered acks, dead nodes' commands, events)."""
        with self._tx() as c:
            if job is not None:
                self._save_job(c, job)
            for node in nodes:
                self._save_node(c, node)
            for command_id, ok, error in acks:
                c.execute(
                    "UPDATE commands SET acked = 1, ok = ?, error = ? WHERE command_id = ? AND acked = 0",
                    (int(ok), error, command_id),
                )
            for node_id in dead:
                self._drop_commands_of(c, node_id)
            for ev in events:
                self._insert_event(c, ev)

    def events_since(self, since_id: int, limit: int = 10_000) -> list[EventRow]:
        return [
            EventRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]))
            for r in self._conn.execute(
                "SELECT id, unix_time_s, kind, node_id, generation, step, message, durations_json "
                "FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (since_id, limit),
            )
        ]


class AsyncStore:
    """Runs every :class:`Store` call on one dedicated thread, never on the event loop."""

    def __init__(self, path: str | Path) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="master-sqlite")
        self._path = path
        self._store: Store | None = None

    async def open(self) -> Snapshot:
        def _open() -> Snapshot:
            self._store = Store(self._path)
            try:
                return self._store.load()
            except (sqlite3.Error, OSError, ValueError) as exc:
                raise StoreError(str(self._path), "loading", exc) from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, _open)

    async def call(self, method: str, *args: Any) -> Any:
        """Run ``Store.<method>(*args)`` on the store's thread; SQLite and OS errors become
        :class:`StoreError` (the caller decides what a failed write means)."""
        store = self._store
        if store is None:
            raise RuntimeError("store is not open")

        def run() -> Any:
            try:
                return getattr(store, method)(*args)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(store.path, method, exc) from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            await asyncio.get_running_loop().run_in_executor(self._executor, store.close)
        self._executor.shutdown(wait=False)
