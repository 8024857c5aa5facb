"""The agent's rendezvous store, created as the agent creates it, with real sockets and processes.

torch's TCPStore has no authentication and lets any client list, read, overwrite and delete
keys. The agent binds it to the node's address where it can (so the node's other addresses
refuse connections), and workers keep a generation's keys under the plan's secret: a client
without it finds only digests, cannot guess a key, and a value it writes fails the read.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import multiprocessing
import socket

import pytest
import torch.distributed as dist

from oobleck.agent.store import create_store, store_listen_host
from oobleck.worker.rendezvous import DistInit
from oobleck.worker.store import RendezvousTampered, SecretKeyStore
from oobleck.worker.store import make_store as _make_store

SECRET = "a1" * 16
GENERATION = 5

pytestmark = pytest.mark.timeout(60)


def ips(*texts: str):
    return [ipaddress.ip_address(t) for t in texts]


def resolver(table):
    def resolve(host):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


def test_listen_host_is_the_address_other_nodes_are_given_when_it_is_one() -> None:
    resolve = resolver({
        "node1.cluster": ips("10.1.0.7"),
        "debian-host": ips("127.0.1.1"),
        "localhost": ips("127.0.0.1"),
        "dual": ips("10.1.0.7", "fd00::7"),
    })  # fmt: skip
    remote = {"master_on_loopback": False, "resolve": resolve}
    assert store_listen_host("10.1.0.7", **remote)[0] == "10.1.0.7"
    assert store_listen_host("fd00::7", **remote)[0] == "fd00::7"
    assert store_listen_host("node1.cluster", **remote) == ("10.1.0.7", "address 'node1.cluster' resolves to 10.1.0.7")
    assert store_listen_host("localhost", master_on_loopback=True, resolve=resolve)[0] == "127.0.0.1"
    host, why = store_listen_host("debian-host", **remote)  # other nodes resolve it to the real address
    assert host is None and "loopback" in why
    host, why = store_listen_host("dual", **remote)
    assert host is None and "2 addresses (10.1.0.7, fd00::7)" in why
    host, why = store_listen_host("gone.cluster", **remote)
    assert host is None and "does not resolve" in why


def test_store_listens_only_on_the_bound_address() -> None:
    store, port, where = create_store("127.0.0.1", 0, master_on_loopback=True)
    assert where == "127.0.0.1"
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=5))
    client.set("k", "v")
    assert store.get("k") == b"v"
    with pytest.raises(ConnectionRefusedError):  # another address of this host (all of 127/8 is local)
        socket.create_connection(("127.0.0.2", port), timeout=5).close()
    del client, store  # the store closes the socket it was handed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_fixed_port_and_an_address_of_another_host(caplog) -> None:
    with socket.socket() as probe:  # a free port, for the fixed-port case
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    store, port, where = create_store("127.0.0.1", free, master_on_loopback=True)
    assert (port, where) == (free, "127.0.0.1")
    del store
    # Not an address of this host (a NAT'd address, say): every interface, and a warning saying why.
    with caplog.at_level(logging.WARNING, logger="oobleck.agent.store"):
        store, port, where = create_store("203.0.113.7", 0, master_on_loopback=False)
    assert where == "all interfaces"
    assert "is not an address of this host" in caplog.text and "set address" in caplog.text
    socket.create_connection(("127.0.0.2", port), timeout=5).close()
    del store


def _rank(rank: int, port: int, secret: str, done) -> None:
    """One worker's rendezvous, as the engine makes it: gloo over the SecretKeyStore."""
    import torch

    init = DistInit(host="127.0.0.1", port=port, timeout_s=30, secret=secret)
    store = _make_store(init, 2, GENERATION)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    if rank == 0:
        store.set("probe", "10.0.0.1:4000")
    t = torch.ones(1) * (rank + 1)
    dist.all_reduce(t)
    done.put((rank, float(t.item())))
    dist.destroy_process_group()


def test_a_client_without_the_secret_cannot_find_read_or_forge_a_generations_keys() -> None:
    store, port, _ = create_store("127.0.0.1", 0, master_on_loopback=True)
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Queue()
    ranks = [ctx.Process(target=_rank, args=(r, port, SECRET, done)) for r in range(2)]
    for p in ranks:
        p.start()
    results = sorted(done.get(timeout=45) for _ in ranks)
    for p in ranks:
        p.join(timeout=30)
    assert results == [(0, 3.0), (1, 3.0)] and [p.exitcode for p in ranks] == [0, 0]

    outsider = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=5))
    listed = outsider.list_keys()  # the store lets any client list everything
    assert listed and all(k.startswith(f"oobleck/gen{GENERATION}/") for k in listed)
    assert all(len(k.rsplit("/", 1)[1]) == 64 for k in listed)  # digests only: no key name, no secret
    assert not any(SECRET in k or "probe" in k or "default_pg" in k for k in listed)
    # Keys as they were before the secret, and the same keys under another secret: absent.
    guesses = ["probe", "default_pg/0", "oobleck/arrived"]
    assert not dist.PrefixStore(f"oobleck/gen{GENERATION}/", outsider).check(guesses)
    wrong = SecretKeyStore(outsider, "00" * 16, GENERATION)
    assert not wrong.check(guesses)
    outsider.set_timeout(datetime.timedelta(milliseconds=300))
    with pytest.raises(RuntimeError):  # torch's DistStoreError: waited, nothing there
        wrong.get("probe")

    # Overwriting what it can list does not plant anything: a worker's read fails instead.
    insider = SecretKeyStore(
        dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=5)), SECRET, GENERATION
    )
    assert insider.get("probe") == b"10.0.0.1:4000"
    for key in listed:
        value = outsider.get(key)
        if value.startswith(b"10.0.0.1:4000"):
            outsider.set(key, b"10.6.6.6:4000" + value[len(b"10.0.0.1:4000") :])
    with pytest.raises(RendezvousTampered):
        insider.get("probe")
    del store
