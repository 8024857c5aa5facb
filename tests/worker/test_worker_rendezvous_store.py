"""A generation's rendezvous keys under the plan's secret (SecretKeyStore), in one process.

The store is a HashStore reached through a PrefixStore, as torch reaches it (C++ calling the
Python methods); the agent's real TCPStore with other processes is in tests/agent/test_agent_store.py.
"""

from __future__ import annotations

import datetime

import pytest
import torch.distributed as dist

from oobleck.protos.v1 import plan_pb2
from oobleck.worker.layout import PlanError
from oobleck.worker.planmsg import dist_init_from_proto
from oobleck.worker.rendezvous import DistInit
from oobleck.worker.store import RendezvousTampered, SecretKeyStore, make_store

SECRET = "5e" * 16

pytestmark = pytest.mark.timeout(30)


def test_keys_are_digests_and_every_store_operation_keeps_its_meaning() -> None:
    raw = dist.HashStore()
    keyed = SecretKeyStore(raw, SECRET, 4)
    store = dist.PrefixStore("default_pg/", keyed)  # torch's own wrapping: calls come from C++
    store.set("0", "10.0.0.1:4000")
    assert store.get("0") == b"10.0.0.1:4000"
    [stored] = raw.list_keys()
    assert stored.startswith("oobleck/gen4/") and len(stored) == len("oobleck/gen4/") + 64
    assert "default_pg" not in stored and SECRET not in stored
    assert raw.get(stored).startswith(b"10.0.0.1:4000")  # values are tagged, not encrypted

    assert store.check(["0"]) and not store.check(["1"])
    store.wait(["0"], datetime.timedelta(seconds=1))
    assert store.add("arrived", 2) == 2 and store.add("arrived", 0) == 2
    assert store.compare_set("cs", "", "a") == b"a"  # absent + empty expected: set
    assert store.compare_set("cs", "a", "b") == b"b"
    assert store.compare_set("cs", "zz", "c") == b"b"  # mismatch: the current value
    store.append("log", "x")
    store.append("log", "y")
    assert store.get("log") == b"xy"
    assert store.multi_get(["cs", "log"]) == [b"b", b"xy"]
    assert store.num_keys() == raw.num_keys()
    assert store.delete_key("0") and not store.check(["0"])


def test_without_the_secret_nothing_is_found_or_accepted() -> None:
    raw = dist.HashStore()
    SecretKeyStore(raw, SECRET, 4).set("0", "10.0.0.1:4000")
    raw.set_timeout(datetime.timedelta(milliseconds=200))
    # The old scheme's key, another secret, another generation: none finds it.
    assert not dist.PrefixStore("oobleck/gen4/", raw).check(["0"])
    assert not SecretKeyStore(raw, "00" * 16, 4).check(["0"])
    assert not SecretKeyStore(raw, SECRET, 5).check(["0"])
    with pytest.raises(RuntimeError):  # a get of a key that is not there waits, then times out
        SecretKeyStore(raw, "00" * 16, 4).get("0")


def test_a_value_written_without_the_secret_fails_the_read() -> None:
    raw = dist.HashStore()
    keyed = SecretKeyStore(raw, SECRET, 4)  # held: C++ finds its methods only while it lives
    store = dist.PrefixStore("default_pg/", keyed)
    store.set("0", "10.0.0.1:4000")
    store.set("1", "10.0.0.2:4000")
    key0, key1 = sorted(raw.list_keys(), key=lambda k: raw.get(k))
    raw.set(key0, b"10.6.6.6:4000" + raw.get(key0)[len(b"10.0.0.1:4000") :])  # tag kept, value changed
    with pytest.raises(RendezvousTampered, match="integrity check") as info:
        store.get("0")
    assert SECRET not in str(info.value)
    raw.set(key0, raw.get(key1))  # a valid value moved to another key
    with pytest.raises(RendezvousTampered):
        store.get("0")
    raw.set(key0, b"short")
    with pytest.raises(RendezvousTampered):
        store.get("0")
    assert store.get("1") == b"10.0.0.2:4000"


def test_clones_share_the_keys_and_their_parent_keeps_them_usable_from_cpp() -> None:
    raw = dist.HashStore()
    keyed = SecretKeyStore(raw, SECRET, 4)
    dist.PrefixStore("p/", keyed.clone()).set("k", "v")  # only the parent holds the clone
    other = SecretKeyStore(raw, SECRET, 4)
    assert dist.PrefixStore("p/", other).get("k") == b"v"


def test_a_store_no_one_holds_is_refused_by_torch() -> None:
    """Why the engine keeps its SecretKeyStore: torch's trampoline cannot reach a collected one."""
    with pytest.raises(RuntimeError, match="Not implemented"):
        dist.PrefixStore("p/", SecretKeyStore(dist.HashStore(), SECRET, 4)).set("k", "v")


def test_make_store_uses_the_secret_and_keeps_the_old_prefix_without_one() -> None:
    raw = dist.HashStore()
    assert isinstance(make_store(DistInit(store=raw, secret=SECRET), 1, 2), SecretKeyStore)
    plain = make_store(DistInit(store=raw), 1, 2)
    plain.set("k", "v")
    assert raw.list_keys() == ["oobleck/gen2//k"]  # PrefixStore adds its own "/"


def test_the_secret_is_never_shown() -> None:
    init = DistInit(host="10.0.0.8", port=29400, secret=SECRET)
    assert SECRET not in repr(init) and SECRET not in repr(SecretKeyStore(dist.HashStore(), SECRET, 1))
    with pytest.raises(ValueError, match="secret: required"):
        SecretKeyStore(dist.HashStore(), "", 1)


def test_plan_message_secret_reaches_dist_init() -> None:
    msg = plan_pb2.Plan(generation=3, rendezvous=plan_pb2.Endpoint(host="10.0.0.8", port=29400, secret=SECRET))
    assert dist_init_from_proto(msg).secret == SECRET
    msg.rendezvous.secret = ""
    assert dist_init_from_proto(msg).secret == ""  # an older master or a test: plain keys
    msg.rendezvous.secret = "short-secret-0123"
    with pytest.raises(PlanError, match=r"rendezvous\.secret: must be at least 32 characters, got 17") as info:
        dist_init_from_proto(msg)
    assert "short-secret" not in str(info.value)
