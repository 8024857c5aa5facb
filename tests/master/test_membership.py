"""Pure membership bookkeeping: dead-node retention, the per-peer registration limit, pages."""

from oobleck.master.membership import RateLimiter, page, peer_host, purgeable


def test_dead_nodes_are_purged_after_retention_unless_still_needed():
    dead = {1: 100.0, 2: 150.0, 3: 10.0, 4: 0.0}
    assert purgeable(200.0, dead, keep=set(), retention_s=60.0) == [1, 3, 4]
    assert purgeable(200.0, dead, keep={3}, retention_s=60.0) == [1, 4]
    assert purgeable(200.0, dead, keep=set(), retention_s=0.0) == [1, 2, 3, 4]
    assert purgeable(200.0, {}, keep=set(), retention_s=0.0) == []


def test_rate_limiter_allows_a_burst_then_the_rate_per_peer():
    lim = RateLimiter(rate_per_s=2.0, burst=3)
    assert [lim.allow("a", 0.0)[0] for _ in range(4)] == [True, True, True, False]
    ok, wait_s = lim.allow("a", 0.0)
    assert not ok and abs(wait_s - 0.5) < 1e-9
    assert lim.allow("b", 0.0)[0]  # another peer has its own bucket
    assert lim.allow("a", 0.5)[0] and not lim.allow("a", 0.5)[0]  # one token per 0.5 s
    assert [lim.allow("a", 100.0)[0] for _ in range(4)] == [True, True, True, False]  # refills to the burst only


def test_rate_limiter_table_is_bounded_under_a_flood_of_peers():
    lim = RateLimiter(rate_per_s=1.0, burst=1, max_keys=100)
    for i in range(10_000):
        assert lim.allow(f"10.0.{i // 256}.{i % 256}", float(i))[0]
    assert len(lim) == 100


def test_peer_host_takes_the_address_of_grpc_peers():
    assert peer_host("ipv4:10.1.2.3:45678") == "10.1.2.3"
    assert peer_host("ipv6:[::1]:45678") == "::1"
    assert peer_host("ipv6:[fe80::1%eth0]:1") == "fe80::1%eth0"
    assert peer_host("unix:/run/x.sock") == "unix:/run/x.sock"
    assert peer_host("") == ""


def test_pages_walk_every_item_once_in_order():
    items = [1, 2, 5, 8, 9, 12, 13]
    got, after = [], 0
    while True:
        chunk, after = page(items, after, 3)
        got.extend(chunk)
        assert len(chunk) <= 3
        if not after:
            break
    assert got == items
    assert page(items, 0, 7) == (items, 0)
    assert page(items, 13, 3) == ([], 0)


def test_heartbeat_terms_stretch_with_cluster_size_within_five_seconds():
    from oobleck.master.membership import MAX_SCALED_TIMEOUT_S, heartbeat_terms

    assert heartbeat_terms(0, 0.5, 2.0, 5000.0) == (0.5, 2.0)
    assert heartbeat_terms(2500, 0.5, 2.0, 5000.0) == (0.5, 2.0)  # 2,500 nodes x 2/s fit the budget
    interval, timeout = heartbeat_terms(4000, 0.5, 2.0, 5000.0)
    assert interval == 0.8 and timeout == 3.2  # the ratio is kept
    for live in (10_000, 100_000, 1_000_000):
        interval, timeout = heartbeat_terms(live, 0.5, 2.0, 5000.0)
        assert timeout == MAX_SCALED_TIMEOUT_S and interval <= timeout / 2
    assert heartbeat_terms(10_000, 0.5, 30.0, 5000.0)[1] == 30.0  # a longer configured timeout stays
    previous = (0.0, 0.0)
    for live in range(0, 50_000, 997):  # never shorter for a larger cluster
        terms = heartbeat_terms(live, 0.5, 2.0, 5000.0)
        assert terms >= previous
        previous = terms
