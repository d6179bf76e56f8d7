"""The reliability protocol in memory: the four cases of the paper's Fig. 12, properties under a
seeded lossy/reordering/duplicating network, and the RTO estimator against RFC 6298."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmpog import wire
from mmpog.reliability import (
    BufferFull, ClientConfig, ClientEndpoint, Delivered, Expired, Joined, NotJoined, Received,
    ReflectorConfig, ReflectorCore, RttEstimator, Unrecoverable,
)
from mmpog.testing import DOWN, UP, LinkProfile, SimNetwork

# these tests are about resends and fan-out: a path taken as clean from the start (no redundant copies;
# the default is a conservative start that copies until the path shows itself clean, test_mmpog_redundancy)
CLEAN_PATH = dict(loss_prior=0.01)

LOC = 9
A, B, C = ("10.0.0.1", 5001), ("10.0.0.2", 5002), ("10.0.0.3", 5003)


def make_world(players=2, profile=None, seed=1, client_config=None, reflector_config=None, join_time=0.2):
    reflector = ReflectorCore(reflector_config or ReflectorConfig(**CLEAN_PATH))
    net = SimNetwork(reflector, profile or LinkProfile(latency=0.005), seed=seed)
    endpoints = []
    for index in range(players):
        player = index + 1
        token = bytes([player]) * 16
        reflector.add_member(LOC, player, token, now=net.now)
        ep = ClientEndpoint(player, LOC, token, client_config or ClientConfig(**CLEAN_PATH), rng=random.Random(seed + player))
        addr = (f"10.0.0.{player}", 5000 + player)
        net.add_client(ep, addr)
        ep.connect(net.now)
        endpoints.append((ep, addr))
    net.run_for(join_time)
    for ep, _ in endpoints:
        assert ep.joined
    return net, endpoints


def received(net, addr):
    return [e for e in net.events[addr] if isinstance(e, Received)]


def of_type(net, addr, kind):
    return [e for e in net.events[addr] if isinstance(e, kind)]


# ---------------------------------------------------------------- Fig. 12


def test_fig12_normal_echo_is_ack_and_seq_assigned():
    net, [(a, addr_a), (b, addr_b)] = make_world()
    pid = a.send(b"S1", net.now, reliable=True)
    net.run_for(0.1)
    [got] = received(net, addr_b)
    assert (got.sender, got.packet_id, got.payload, got.seq, got.reliable) == (1, pid, b"S1", 1, True)
    [delivered] = of_type(net, addr_a, Delivered)
    assert delivered.packet_id == pid and not delivered.retransmitted and delivered.seq == 1
    assert got.location == LOC
    assert delivered.rtt == pytest.approx(0.010)      # two 5 ms hops
    assert received(net, addr_a) == []                 # the echo is an ACK, not data
    assert a.rtt.srtt == pytest.approx(0.010, abs=1e-9)


def test_fig12_loss_from_sender_is_retransmitted_after_rto():
    net, [(a, addr_a), (b, addr_b)] = make_world()
    net.drop_when(lambda d, addr, h: d == UP and h.kind is wire.Kind.DATA)
    sent_at = net.now
    rto = a.rtt.rto
    pid = a.send(b"S2", net.now, reliable=True)
    net.run_for(0.5)
    [got] = received(net, addr_b)
    assert got.packet_id == pid and got.seq == 1
    [delivered] = of_type(net, addr_a, Delivered)
    assert delivered.retransmitted
    assert delivered.rtt == pytest.approx(rto + 0.010)
    assert a.stats["retransmitted"] == 1
    assert got.now == pytest.approx(sent_at + rto + 0.010)


def test_fig12_loss_to_sender_resend_recognised_by_the_reflector_as_the_same_update():
    net, [(a, addr_a), (b, addr_b)] = make_world()
    pid_b = a.send(b"b", net.now, reliable=True)
    net.run_for(0.1)
    # the echo of packet c (seq 2) is lost on its way back to the sender
    net.drop_when(lambda d, addr, h: d == DOWN and addr == addr_a and h.kind is wire.Kind.DATA)
    pid_c = a.send(b"c", net.now, reliable=True)
    net.run_for(1.0)
    got = received(net, addr_b)
    assert [(e.packet_id, e.seq) for e in got] == [(pid_b, 1), (pid_c, 2)]
    # the sender's resend is the same update: no new seq, no second fan-out, only the echo again
    assert b.stats["duplicates"] == 0
    assert (LOC, 3) not in net.sequenced and net.reflector.location_stats(LOC)["last_seq"] == 2
    assert net.reflector.location_stats(LOC)["resends_recognised"] == 1
    assert a.stats["retransmitted"] == 1 and a.stats["retransmissions_received"] == 1
    assert received(net, addr_a) == []
    delivered = of_type(net, addr_a, Delivered)
    assert [d.packet_id for d in delivered] == [pid_b, pid_c]
    assert delivered[1].retransmitted and delivered[1].seq == 2   # acknowledged under its original seq
    assert a.snapshot()["missing"] == 0


def test_fig12_loss_to_receiver_revealed_by_heartbeat():
    net, [(a, addr_a), (b, addr_b)] = make_world()
    net.drop_when(lambda d, addr, h: d == DOWN and addr == addr_b and h.kind is wire.Kind.DATA)
    pid = a.send(b"S5", net.now, reliable=True)
    net.run_for(0.02)
    assert received(net, addr_b) == [] and b.highest_seq == 0
    net.run_for(1.0)                                    # idle: only heartbeats flow
    assert b.stats["heartbeats"] >= 1
    [got] = received(net, addr_b)
    assert got.packet_id == pid and got.seq == 1
    assert b.stats["nacks_sent"] == 1
    assert net.reflector.location_stats(LOC)["retransmitted"] == 1


# ---------------------------------------------------------------- other behaviour


def test_unrecoverable_reported_when_buffer_moves_past_gap():
    config = ReflectorConfig(**CLEAN_PATH, buffer_packets=2)
    net, [(a, addr_a), (b, addr_b)] = make_world(reflector_config=config)
    # B misses seq 1 and its NACKs are lost: by the time it could ask again, seq 1 is gone
    net.drop_when(lambda d, addr, h: d == DOWN and addr == addr_b and h.seq == 1)
    net.drop_when(lambda d, addr, h: d == UP and addr == addr_b and h.kind is wire.Kind.NACK, times=50)
    for n in range(4):
        a.send(b"x%d" % n, net.now, reliable=True)
        net.run_for(0.01)
    net.run_for(0.5)
    unrec = of_type(net, addr_b, Unrecoverable)
    assert [(u.first, u.count) for u in unrec] == [(1, 1)]
    assert [e.seq for e in received(net, addr_b)] == [2, 3, 4]


def test_expired_when_reflector_unreachable():
    net, [(a, addr_a), _] = make_world()
    net.drop_when(lambda d, addr, h: d == UP and addr == addr_a, times=1000)
    pid = a.send(b"doomed", net.now, reliable=True, deadline=0.3)
    net.run_for(0.5)
    assert of_type(net, addr_a, Expired) == [Expired(pid)]
    assert of_type(net, addr_a, Delivered) == []
    assert a.pending_count == 0


def test_close_expires_pending_reliable_packets():
    net, [(a, addr_a), _] = make_world()
    net.drop_when(lambda d, addr, h: d == UP and addr == addr_a and h.kind is wire.Kind.DATA, times=10)
    pid = a.send(b"in flight", net.now, reliable=True)
    net.run_for(0.01)
    a.close(net.now)
    net.flush()
    assert of_type(net, addr_a, Expired) == [Expired(pid)] and a.pending_count == 0
    assert [h.kind for d, addr, h in net.dropped][-1] is wire.Kind.DATA   # the BYE itself went out


def test_unreliable_is_not_retransmitted_and_not_sequenced():
    net, [(a, addr_a), (b, addr_b)] = make_world()
    net.drop_when(lambda d, addr, h: d == UP and h.kind is wire.Kind.DATA)
    a.send(b"lost", net.now)
    a.send(b"kept", net.now)
    net.run_for(0.5)
    assert [(e.payload, e.seq, e.reliable) for e in received(net, addr_b)] == [(b"kept", 0, False)]
    assert a.stats["retransmitted"] == 0 and b.stats["nacks_sent"] == 0


def nack_seqs(header_payload):
    return [seq for first, count in wire.decode_nack_ranges(header_payload) for seq in range(first, first + count)]


def test_nack_asks_for_all_ripe_gaps_at_once_and_each_seq_backs_off_on_its_own():
    net, [(a, addr_a), (b, addr_b)] = make_world()
    # seqs 1..3 never reach B, and the reflector never hears B's NACKs
    net.drop_when(lambda d, addr, h: d == DOWN and addr == addr_b and h.seq in (1, 2, 3), times=3)
    nacks = []
    net.drop_when(lambda d, addr, h: d == UP and addr == addr_b and h.kind is wire.Kind.NACK
                  and not nacks.append(net.now), times=100)
    for n in range(4):
        a.send(b"%d" % n, net.now, reliable=True)
    net.run_for(0.02)
    assert len(nacks) == 1 and b.stats["nack_seqs"] == 3       # one request for all three
    net.run_for(1.0)
    gaps = [round(t2 - t1, 4) for t1, t2 in zip(nacks, nacks[1:])]
    assert len(gaps) >= 3
    assert all(later == pytest.approx(2 * earlier, rel=0.05) for earlier, later in zip(gaps, gaps[1:]))
    assert gaps[0] == pytest.approx(b.rtt.rto, rel=0.05)       # the first timeout is the RTO
    assert b.stats["nack_retries"] == 3 * len(gaps)


def test_several_nacks_in_flight_each_with_its_own_timer():
    """A gap found while an earlier NACK is unanswered is asked for at once, not after that NACK's timeout."""
    net, [(a, addr_a), (b, addr_b)] = make_world()
    net.drop_when(lambda d, addr, h: d == DOWN and addr == addr_b and h.seq == 1 and not h.retransmit)
    net.drop_when(lambda d, addr, h: d == UP and addr == addr_b and h.kind is wire.Kind.NACK)  # the first NACK
    net.drop_when(lambda d, addr, h: d == DOWN and addr == addr_b and h.seq == 3 and not h.retransmit)
    asked = []
    net.drop_when(lambda d, addr, h: d == UP and addr == addr_b and h.kind is wire.Kind.NACK
                  and asked.append(net.now), times=100)                           # records, never drops
    a.send(b"1", net.now, reliable=True)
    a.send(b"2", net.now, reliable=True)
    net.run_for(0.012)            # seq 2 revealed the gap; the NACK for 1 went out and was lost
    t_gap = net.now
    a.send(b"3", net.now, reliable=True)
    a.send(b"4", net.now, reliable=True)
    net.run_for(0.2)
    rto = b.rtt.rto
    # seq 3's NACK went out within a reorder window of seeing seq 4, not after seq 1's timeout
    assert asked[0] - t_gap < rto / 2
    assert sorted(e.seq for e in received(net, addr_b)) == [1, 2, 3, 4]
    assert b.snapshot()["missing"] == 0


def test_gap_revealed_by_an_unreliable_packet_without_waiting_for_a_heartbeat():
    # heartbeats far away: only the unreliable packet can tell B that seq 1 exists
    net, [(a, addr_a), (b, addr_b)] = make_world(reflector_config=ReflectorConfig(**CLEAN_PATH, heartbeat_min=5.0, heartbeat_max=5.0))
    net.drop_when(lambda d, addr, h: d == DOWN and addr == addr_b and h.kind is wire.Kind.DATA and h.reliable)
    pid = a.send(b"event", net.now, reliable=True)
    net.run_for(0.02)
    assert b.highest_seq == 0
    a.send(b"position", net.now)              # unreliable: carries the location's last seq (1)
    net.run_for(0.05)
    assert b.stats["gaps_from_unreliable"] == 1 and b.stats["heartbeats"] == 0
    assert [(e.packet_id, e.seq) for e in received(net, addr_b) if e.reliable] == [(pid, 1)]


def test_per_packet_backoff_leaves_later_packets_at_the_measured_rto():
    net, [(a, addr_a), (b, addr_b)] = make_world()
    rto = a.rtt.rto
    net.drop_when(lambda d, addr, h: d == UP and h.kind is wire.Kind.DATA, times=3)   # the first packet, 3 times
    first = a.send(b"unlucky", net.now, reliable=True)

    net.run_for(rto * 3.5)               # two retransmissions of `first` so far, each after twice the last wait
    assert a.stats["retransmitted"] == 2
    assert a.rtt.rto == rto and a.rtt.backoffs == 0     # the endpoint's RTO did not back off
    later = a.send(b"fine", net.now, reliable=True)
    net.run_for(0.5)
    delivered = {d.packet_id: d for d in of_type(net, addr_a, Delivered)}
    assert not delivered[later].retransmitted and delivered[later].rtt == pytest.approx(0.010, abs=1e-6)
    # first: sent at t0, resent at t0+rto, t0+3 rto, t0+7 rto (the 3rd resend got through)
    assert delivered[first].rtt == pytest.approx(7 * rto + 0.010, rel=1e-3)



def test_nack_rate_limited_per_member():
    config = ReflectorConfig(**CLEAN_PATH, nack_rate=0.0, nack_burst=2)
    net, [(a, addr_a), (b, addr_b)] = make_world(reflector_config=config)
    net.drop_when(lambda d, addr, h: d == DOWN and addr == addr_b and h.kind is wire.Kind.DATA, times=5)
    for n in range(6):
        a.send(b"%d" % n, net.now, reliable=True)
    net.run_for(0.3)
    stats = net.reflector.location_stats(LOC)
    assert stats["retransmitted"] == 2
    assert stats["nack_rate_limited"] >= 3
    assert len(received(net, addr_b)) == 3


def test_new_endpoint_can_start_from_a_previous_rtt_estimate():
    old = RttEstimator(initial_rto=0.2, min_rto=0.04, max_rto=1.0)
    old.update(0.05)
    ep = ClientEndpoint(1, 2, b"k" * 16, rtt=old)
    assert (ep.rtt.srtt, ep.rtt.rttvar, ep.rtt.rto) == (old.srtt, old.rttvar, old.rto)
    assert ep.rtt is not old
    assert ClientEndpoint(1, 2, b"k" * 16).rtt.rto == 0.2


def test_send_before_join_and_pending_bound():
    token = b"t" * 16
    ep = ClientEndpoint(1, LOC, token, ClientConfig(**CLEAN_PATH, max_pending=2))
    with pytest.raises(NotJoined):
        ep.send(b"x", 0.0)
    reflector = ReflectorCore(ReflectorConfig(**CLEAN_PATH))
    reflector.add_member(LOC, 1, token)
    ep.connect(0.0)
    for data in ep.datagrams_to_send(0.0):
        reflector.receive_datagram(data, A, 0.0)
    [(welcome, dest)] = reflector.datagrams_to_send(0.0)
    assert dest == A
    ep.receive_datagram(welcome, 0.001)
    assert ep.next_event() == Joined(LOC, 0)
    ep.send(b"1", 0.01, reliable=True)
    ep.send(b"2", 0.01, reliable=True)
    with pytest.raises(BufferFull):
        ep.send(b"3", 0.01, reliable=True)
    assert ep.stats["refused_pending"] == 1
    ep.send(b"unreliable is not bounded by max_pending", 0.01)


def test_packet_ids_random_start_increment_skip_zero():
    token = b"k" * 16
    ids = set()
    for seed in range(5):
        ep = ClientEndpoint(1, 1, token, rng=random.Random(seed))
        ep._next_id = wire.MAX_U32 if seed == 0 else ep._next_id
        first = ep._new_id()
        second = ep._new_id()
        ids.add(first)
        assert second == (first + 1) & wire.MAX_U32 or second == 1
        assert second != 0
    assert len(ids) == 5


def test_client_drops_malformed_and_foreign_datagrams():
    net, [(a, addr_a), (b, addr_b)] = make_world()
    b.receive_datagram(b"\x01junk", net.now)
    b.receive_datagram(wire.encode(wire.Header(wire.Kind.DATA, location=LOC + 1, sender=1, packet_id=5)), net.now)
    b.receive_datagram(wire.encode(wire.Header(wire.Kind.NACK, location=LOC, sender=1),
                                   wire.encode_nack_ranges([(1, 1)])), net.now)
    assert (b.stats["malformed"], b.stats["wrong_location"], b.stats["unexpected_kind"]) == (1, 1, 1)
    assert b.next_event() is None


# ---------------------------------------------------------------- RFC 6298


def test_rto_first_sample_rfc6298_2_2():
    est = RttEstimator(initial_rto=1.0, min_rto=0.001, max_rto=60, granularity=0.001)
    assert est.rto == 1.0                               # (2.1) before any sample
    est.update(0.100)
    assert est.srtt == pytest.approx(0.100)
    assert est.rttvar == pytest.approx(0.050)
    assert est.rto == pytest.approx(0.100 + 4 * 0.050)


def test_rto_subsequent_samples_rfc6298_2_3():
    est = RttEstimator(initial_rto=1.0, min_rto=0.001, max_rto=60, granularity=0.001)
    est.update(0.100)
    est.update(0.200)
    rttvar = 0.75 * 0.050 + 0.25 * abs(0.100 - 0.200)   # with the OLD srtt
    srtt = 0.875 * 0.100 + 0.125 * 0.200
    assert est.rttvar == pytest.approx(rttvar)
    assert est.srtt == pytest.approx(srtt)
    assert est.rto == pytest.approx(srtt + 4 * rttvar)


def test_rto_clock_granularity_floor():
    est = RttEstimator(initial_rto=1.0, min_rto=0.0001, max_rto=60, granularity=0.05)
    for _ in range(50):
        est.update(0.010)                               # rttvar decays towards 0
    assert est.rto == pytest.approx(est.srtt + 0.05)    # max(G, K*RTTVAR) = G


def test_rto_min_max_and_backoff_rfc6298_5_5():
    est = RttEstimator(initial_rto=0.2, min_rto=0.04, max_rto=1.0)
    est.update(0.001)
    assert est.rto == 0.04                              # (2.4) clamped to the configured minimum
    est.backoff()
    assert est.rto == 0.08                              # (5.5) doubled
    for _ in range(10):
        est.backoff()
    assert est.rto == 1.0                               # (2.5) capped at the configured maximum
    est.update(0.001)
    assert est.rto == pytest.approx(0.04)               # a new sample recomputes it


@given(st.lists(st.floats(min_value=0.0001, max_value=5.0), min_size=1, max_size=40))
@settings(max_examples=100, deadline=None)
def test_rto_always_within_bounds_and_above_srtt(samples):
    est = RttEstimator(initial_rto=0.5, min_rto=0.03, max_rto=2.0)
    for sample in samples:
        est.update(sample)
        assert 0.03 <= est.rto <= 2.0
        assert est.rto >= min(2.0, est.srtt)


def test_karn_no_sample_from_retransmitted_packet():
    net, [(a, addr_a), _] = make_world()
    samples_before = a.rtt.samples
    net.drop_when(lambda d, addr, h: d == UP and h.kind is wire.Kind.DATA)
    a.send(b"x", net.now, reliable=True)
    net.run_for(0.5)
    [delivered] = of_type(net, addr_a, Delivered)
    assert delivered.retransmitted
    assert a.rtt.samples == samples_before
    assert a.rtt.backoffs == 0          # the timeout backed off that packet's timer, not the estimator


# ---------------------------------------------------------------- properties


@given(
    seed=st.integers(0, 2**32 - 1),
    loss_up=st.floats(0, 0.2), loss_down=st.floats(0, 0.2),
    jitter=st.floats(0, 0.02), duplicate=st.floats(0, 0.2),
    players=st.integers(2, 4), packets=st.integers(1, 25), buffer_packets=st.integers(1, 40),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_no_duplicates_and_every_reliable_packet_accounted(
        seed, loss_up, loss_down, jitter, duplicate, players, packets, buffer_packets):
    profile = LinkProfile(loss_up=loss_up, loss_down=loss_down, latency=0.004, jitter=jitter, duplicate=duplicate)
    reflector = ReflectorCore(ReflectorConfig(**CLEAN_PATH, buffer_age=1.0, buffer_packets=buffer_packets))
    net = SimNetwork(reflector, profile, seed=seed)
    rng = random.Random(seed)
    eps = {}
    for player in range(1, players + 1):
        token = bytes([player]) * 12
        reflector.add_member(LOC, player, token, now=net.now)
        ep = ClientEndpoint(player, LOC, token, ClientConfig(**CLEAN_PATH, join_timeout=30), rng=random.Random(seed ^ player))
        addr = ("10.1.0.%d" % player, 6000 + player)
        net.add_client(ep, addr)
        ep.connect(net.now)
        eps[addr] = ep
    net.run_for(0.5)
    while not all(ep.joined for ep in eps.values()):
        net.run_for(0.5)
    joined_last = {addr: next(e.last_seq for e in net.events[addr] if isinstance(e, Joined)) for addr in eps}
    sent_reliable = {addr: [] for addr in eps}
    for _ in range(packets):
        addr = rng.choice(list(eps))
        reliable = rng.random() < 0.6
        pid = eps[addr].send(b"p", net.now, reliable=reliable, deadline=0.8)
        if reliable:
            sent_reliable[addr].append(pid)
        net.run_for(rng.random() * 0.01)
    net.run_for(6.0)      # long enough for every buffer entry to age out and heartbeats to tell

    players_of = {addr: ep.player for addr, ep in eps.items()}
    for addr, ep in eps.items():
        got = [e for e in net.events[addr] if isinstance(e, Received)]
        keys = [(e.sender, e.packet_id) for e in got]
        assert len(keys) == len(set(keys)), "a duplicate reached the application"
        # sender side: each reliable packet is delivered or expired, exactly once
        outcomes = [e.packet_id for e in net.events[addr] if isinstance(e, (Delivered, Expired))]
        assert sorted(outcomes) == sorted(sent_reliable[addr])
        # receiver side: every sequenced packet after joining is received or reported
        lost = set()
        for e in net.events[addr]:
            if isinstance(e, Unrecoverable):
                lost.update(range(e.first, e.first + e.count))
        for (location, seq), (sender, pid) in net.sequenced.items():
            if seq <= joined_last[addr]:
                continue
            if sender == players_of[addr]:
                continue
            assert (sender, pid) in set(keys) or seq in lost, f"seq {seq} neither received nor reported"
        assert ep.snapshot()["missing"] == 0


def test_join_after_a_lost_hello_still_measures_the_rtt():
    """Each HELLO attempt has its own id, echoed by WELCOME: no backed-off RTO at the start of a session."""
    reflector = ReflectorCore(ReflectorConfig(**CLEAN_PATH))
    net = SimNetwork(reflector, LinkProfile(latency=0.005), seed=3)
    token = b"h" * 16
    reflector.add_member(LOC, 1, token, now=net.now)
    ep = ClientEndpoint(1, LOC, token, ClientConfig(**CLEAN_PATH), rng=random.Random(1))
    net.add_client(ep, A)
    net.drop_when(lambda d, addr, h: d == UP and h.kind is wire.Kind.HELLO)
    ep.connect(net.now)
    net.run_for(1.0)
    assert ep.joined and ep.rtt.backoffs == 1
    assert ep.rtt.samples == 1 and ep.rtt.srtt == pytest.approx(0.010)
    assert ep.rtt.rto == pytest.approx(0.010 + 4 * 0.005)      # RFC 6298 (2.2), not the backed-off 400 ms


def test_join_sample_is_provisional_the_first_game_sample_starts_afresh():
    est = RttEstimator(initial_rto=0.2, min_rto=0.001, granularity=0.002)
    est.update(0.030, provisional=True)                # the join, in a wave of 64 players joining
    assert est.rto == pytest.approx(0.030 + 4 * 0.015)
    est.update(0.002)                                   # the first game packet's echo: (2.2) again
    assert (est.srtt, est.rttvar) == (pytest.approx(0.002), pytest.approx(0.001))
    est.update(0.004)                                   # and from then on (2.3)
    assert est.srtt == pytest.approx(7 / 8 * 0.002 + 1 / 8 * 0.004)


def test_nack_retry_not_backed_off_while_repairs_arrive():
    """A lost answer among answered ones is independent loss: that seq is asked again after one RTO, not two."""
    net, [(a, addr_a), (b, addr_b)] = make_world()
    net.drop_when(lambda d, addr, h: d == DOWN and addr == addr_b and h.seq in (1, 2) and not h.retransmit, times=2)
    net.drop_when(lambda d, addr, h: d == DOWN and addr == addr_b and h.seq == 2 and h.retransmit, times=2)
    asked = []
    net.drop_when(lambda d, addr, h: d == UP and addr == addr_b and h.kind is wire.Kind.NACK
                  and asked.append(net.now), times=100)                           # records, never drops
    for n in range(3):
        a.send(b"%d" % n, net.now, reliable=True)
    net.run_for(0.5)
    rto = b.rtt.rto
    gaps = [t2 - t1 for t1, t2 in zip(asked, asked[1:])]
    assert len(gaps) >= 2
    # NACK 1 asks for 1 and 2; 1's answer arrives (a repair), 2's is lost.  NACK 2 (one RTO later) asks for 2
    # again and, since a repair arrived after 2 was last asked for, waits one RTO (not two) before NACK 3.
    assert gaps == [pytest.approx(rto, rel=0.1), pytest.approx(rto, rel=0.1)]
    assert b.stats["nack_retries_unbacked"] == 1
    assert sorted(e.seq for e in received(net, addr_b)) == [1, 2, 3]


def test_a_packet_whose_rto_outlasts_its_deadline_is_resent_at_the_last_useful_moment():
    # a long path (one way 200 ms): SRTT 0.4 s, RTO clamped to 1 s = the deadline; with one RTO per
    # try a lost packet would expire untried, so it is resent at deadline - SRTT (0.6 s) instead
    net, [(a, addr_a), (b, addr_b)] = make_world(profile=LinkProfile(latency=0.2), join_time=1.0)
    a.send(b"a sample", net.now)          # the first game packet's echo: the RTT sample that counts
    net.run_for(0.5)
    assert a.rtt.srtt == pytest.approx(0.4, rel=1e-3) and a.rtt.rto == 1.0
    net.drop_when(lambda d, addr, h: d == UP and h.kind is wire.Kind.DATA, times=1)
    t0 = net.now
    lost = a.send(b"lost once", net.now, reliable=True, deadline=1.0)
    assert a.get_timer() == pytest.approx(t0 + 0.6)
    net.run_for(1.5)
    [delivered] = [d for d in of_type(net, addr_a, Delivered) if d.packet_id == lost]
    assert delivered.retransmitted and delivered.rtt == pytest.approx(0.6 + 0.4, rel=1e-3)
    [got] = [r for r in received(net, addr_b) if r.packet_id == lost]
    assert got.now - t0 == pytest.approx(0.6 + 0.4, rel=1e-3)       # up 0.2 s, down 0.2 s: just in time
    assert not of_type(net, addr_a, Expired)


def test_on_a_short_path_the_retransmission_timer_is_one_rto():
    net, [(a, _), _] = make_world()
    t0 = net.now
    a.send(b"x", net.now, reliable=True, deadline=1.0)
    assert a.get_timer() == pytest.approx(t0 + a.rtt.rto)
