"""``oobleckctl`` admin subcommands: status, nodes, events, submit, drain-node, undrain-node, kill-node, cancel.

Each talks to the master's AdminService with the admin token. Errors print one line
(``oobleckctl: CODE: message``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from oobleck.common.text import escape_control

ENV_MASTER = "OOBLECK_MASTER"
ENV_ADMIN_TOKEN_FILE = "OOBLECK_ADMIN_TOKEN_FILE"
EXIT_ERROR = 2


class CliError(Exception):
    pass


def add_master_flags(g) -> None:
    """The flags that reach a running master's AdminService (``oobleckctl``, ``oobleck-launch``)."""
    g.add_argument("--master", metavar="HOST:PORT", help=f"master gRPC address (default: ${ENV_MASTER})")
    g.add_argument("--token-file", metavar="PATH", help=f"admin token file (default: ${ENV_ADMIN_TOKEN_FILE})")
    g.add_argument("--tls-ca-file", metavar="PATH", help="CA that signed the master's certificate (enables TLS)")
    g.add_argument("--tls-cert-file", metavar="PATH", help="client certificate (mTLS)")
    g.add_argument("--tls-key-file", metavar="PATH", help="client key (mTLS)")
    g.add_argument("--tls-server-name", metavar="NAME", help="expected name in the master's certificate")
    g.add_argument("--allow-insecure", action="store_true", help="allow plaintext to a non-loopback master")


def admin_channel(target: str, token_file: str, args: argparse.Namespace | None = None):
    """``(channel, AdminServiceStub)`` for ``target`` with the admin token in ``token_file``; TLS
    and ``--allow-insecure`` from the flags of :func:`add_master_flags` when ``args`` is given."""
    from oobleck.common.auth import read_token_file
    from oobleck.common.tls import ClientTls, sync_channel
    from oobleck.protos.v1 import admin_pb2_grpc

    tls = None
    if args is not None and (args.tls_ca_file or args.tls_cert_file):
        tls = ClientTls(args.tls_ca_file, args.tls_cert_file, args.tls_key_file, args.tls_server_name)
    allow_insecure = bool(args is not None and args.allow_insecure)
    channel = sync_channel(target, token=read_token_file(token_file), tls=tls, allow_insecure=allow_insecure)
    return channel, admin_pb2_grpc.AdminServiceStub(channel)


def _connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    add_master_flags(g)
    g.add_argument("--timeout-s", type=float, default=10.0, metavar="S", help="per-call deadline (default 10)")
    g.add_argument("--json", action="store_true", help="print JSON instead of text")


def add_admin_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the admin subcommands on ``oobleckctl``'s subparsers."""

    def add(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        _connection_flags(p)
        p.set_defaults(func=lambda args: _run(func, args))
        return p

    add("status", "show the job's state, generation, step and plan", _status)
    add("nodes", "list registered nodes (alive, spare, draining, drained, dead)", _nodes)
    p = add("events", "print the event log (reconfigurations with phase durations)", _events)
    p.add_argument("--since", type=int, default=0, metavar="ID", help="only events with id > ID")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p = add("submit", "submit a job spec (YAML) to the master", _submit)
    p.add_argument("job_spec", metavar="JOB.yaml")
    p = add("drain-node", "move a node's work elsewhere and keep it out of every plan until undrain-node", _drain)
    p.add_argument("node_id", type=int)
    p = add("undrain-node", "make a drained node a spare again (a running job may grow onto it)", _undrain)
    p.add_argument("node_id", type=int)
    p = add("kill-node", "fault drill: the node's agent kills its workers and drops out", _kill)
    p.add_argument("node_id", type=int)
    p = add("cancel", "cancel the running job", _cancel)
    p.add_argument("--reason", default="", help="recorded in the event log")


def _stub(args):
    target = args.master or os.environ.get(ENV_MASTER)
    if not target:
        raise CliError(f"--master: required (or set ${ENV_MASTER})")
    token_file = args.token_file or os.environ.get(ENV_ADMIN_TOKEN_FILE)
    if not token_file:
        raise CliError(f"--token-file: required (or set ${ENV_ADMIN_TOKEN_FILE})")
    return admin_channel(target, token_file, args)


def _to_dict(msg) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _print_json(data: Any) -> None:
    print(json.dumps(data, sort_keys=True))


def _status(args, stub, admin_pb2) -> None:
    s = stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=args.timeout_s)
    if args.json:
        _print_json(_to_dict(s))
        return
    state = admin_pb2.JobState.Name(s.state).removeprefix("JOB_STATE_")
    print(f"job:         {s.job_id or '-'}  {state}" + (f"  ({escape_control(s.reason)})" if s.reason else ""))
    print(f"generation:  {s.generation}")
    print(f"step:        {s.step}/{s.total_steps}  loss {s.loss:.4f}  {s.samples_per_s:.1f} samples/s")
    print(f"nodes:       {s.nodes_alive} alive ({s.spares} spare), {s.nodes_dead} dead")
    for i, p in enumerate(s.plan.pipelines):
        print(f"pipeline {i}:  nodes {list(p.node_ids)}  microbatches {p.microbatches}")


def iter_nodes(stub, admin_pb2, timeout_s: float, page_size: int = 5000):
    """Every node the master knows, page by page (ListNodes answers at most a page at a time)."""
    after = 0
    while True:
        res = stub.ListNodes(admin_pb2.ListNodesRequest(page_size=page_size, after_node_id=after), timeout=timeout_s)
        yield from res.nodes
        if not res.next_after_node_id:
            return
        after = res.next_after_node_id


def _nodes(args, stub, admin_pb2) -> None:
    nodes = iter_nodes(stub, admin_pb2, args.timeout_s)
    if args.json:
        _print_json([_to_dict(n) for n in nodes])
        return
    print(f"{'ID':>5}  {'NAME':<20} {'ADDRESS':<16} {'SLOTS':>5}  {'STATE':<9} {'SEEN':>7}  REASON")
    for n in nodes:
        state = admin_pb2.NodeState.Name(n.state).removeprefix("NODE_STATE_").lower()
        print(
            f"{n.node_id:>5}  {escape_control(n.name):<20} {escape_control(n.address):<16} {n.slots:>5}  {state:<9} "
            f"{n.last_seen_s_ago:>6.1f}s  {escape_control(n.reason)}"
        )


def _events(args, stub, admin_pb2) -> None:
    req = admin_pb2.WatchEventsRequest(since_id=args.since, follow=args.follow)
    for ev in stub.WatchEvents(req, timeout=None if args.follow else args.timeout_s):
        if args.json:
            _print_json(_to_dict(ev))
        else:
            when = time.strftime("%H:%M:%S", time.localtime(ev.unix_time_s))
            phases = " ".join(f"{k}={v:.3f}s" for k, v in sorted(ev.durations_s.items()))
            node = f" node={ev.node_id}" if ev.node_id else ""
            message = escape_control(ev.message)
            print(f"{ev.id:>6} {when} {ev.kind:<18} gen={ev.generation} step={ev.step}{node} {message} {phases}")
        sys.stdout.flush()


def _submit(args, stub, admin_pb2) -> None:
    try:
        text = Path(args.job_spec).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"job spec {args.job_spec!r}: cannot read: {exc}") from None
    res = stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=text), timeout=args.timeout_s)
    if args.json:
        _print_json(_to_dict(res))
    else:
        print(f"submitted job {res.job_id} (generation {res.generation})")


def _undrain(args, stub, admin_pb2) -> None:
    stub.UndrainNode(admin_pb2.UndrainNodeRequest(node_id=args.node_id), timeout=args.timeout_s)
    _print_json({"undrained": args.node_id}) if args.json else print(f"node {args.node_id} is a spare again")


def _drain(args, stub, admin_pb2) -> None:
    stub.DrainNode(admin_pb2.DrainNodeRequest(node_id=args.node_id), timeout=args.timeout_s)
    _print_json({"drained": args.node_id}) if args.json else print(f"draining node {args.node_id}")


def _kill(args, stub, admin_pb2) -> None:
    stub.KillNode(admin_pb2.KillNodeRequest(node_id=args.node_id), timeout=args.timeout_s)
    _print_json({"killed": args.node_id}) if args.json else print(f"kill sent to node {args.node_id}")


def _cancel(args, stub, admin_pb2) -> None:
    stub.CancelJob(admin_pb2.CancelJobRequest(reason=args.reason), timeout=args.timeout_s)
    _print_json({"cancelled": True}) if args.json else print("job cancelled")


def _run(func, args) -> int:
    import grpc

    from oobleck.common.auth import TokenFileError
    from oobleck.common.tls import InsecureTransportError, TlsConfigError
    from oobleck.protos.v1 import admin_pb2

    channel = None
    try:
        channel, stub = _stub(args)
        func(args, stub, admin_pb2)
        return 0
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() else "UNKNOWN"
        details = " ".join((exc.details() or "").split())
        print(f"oobleckctl: {code}: {details}", file=sys.stderr)
    except (CliError, TokenFileError, TlsConfigError, InsecureTransportError, ValueError) as exc:
        print(f"oobleckctl: {' '.join(str(exc).split())}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    finally:
        if channel is not None:
            channel.close()
    return EXIT_ERROR
