"""Tail-loss probes (heartbeats) that tell nobody anything are skipped; the ones a member may need are sent.

Deterministic: the sans-IO reflector core driven by a FakeClock.  A probe's news is the location's last
seq; a member is unaware of it only if it lost every separate datagram that carried it (the original, its
copies, later updates and probes), so the core skips the probe when the sum over the members (not the
seq's sender) of p**n is below `probe_skip_target`.
"""

import random

import pytest

from boxcore.testing import FakeClock
from mmpog import wire
from mmpog.reliability import ClientConfig, ClientEndpoint, Received, ReflectorConfig, ReflectorCore
from mmpog.testing import LinkProfile, SimNetwork
from mmpog.wire import Flag, Header, Kind

LOC = 3
ALICE, BOB, CAROL = ("127.0.0.1", 4001), ("127.0.0.1", 4002), ("127.0.0.1", 4003)
TOKENS = {1: b"a" * 16, 2: b"b" * 16, 3: b"c" * 16}
TARGET = 0.005      # a round target for the arithmetic below (the default is stricter)


def hello(player, location=LOC):
    return wire.encode(Header(Kind.HELLO, rto_ms=40, location=location, sender=player, packet_id=77), TOKENS[player])


def data(player, pid, reliable=False):
    return wire.encode(Header(Kind.DATA, int(Flag.RELIABLE) if reliable else 0, 40, LOC, player, pid), b"x")


def core_with(clock, **config):
    config.setdefault("probe_skip_target", TARGET)
    core = ReflectorCore(ReflectorConfig(heartbeat_min=0.01, heartbeat_max=1.0, heartbeat_factor=0.5, **config))
    for player, addr in ((1, ALICE), (2, BOB), (3, CAROL)):
        core.add_member(LOC, player, TOKENS[player], clock.time())
        core.receive_datagram(hello(player), addr, clock.time())
    core.datagrams_to_send(clock.time())
    while core.next_event():
        pass
    return core


def next_wakeup(core, clock):
    """Run the core's timer once (FakeClock moved to it); the kinds of what it sent."""
    clock.now = core.get_timer()
    core.handle_timer(clock.time())
    return [wire.decode(d)[0].kind for d, _ in core.datagrams_to_send(clock.time())]


def probes_within(core, clock, seconds):
    """Times (s after now) of the probes sent in the next ``seconds`` of an idle location."""
    start, times = clock.time(), []
    while core.get_timer() is not None and core.get_timer() <= start + seconds:
        if next_wakeup(core, clock) == [Kind.HEARTBEAT]:
            times.append(round(clock.time() - start, 6))
    return times


# a clean path (1% prior, no copies): the loss the reflector assumes for every member's downlink
CLEAN = dict(loss_prior=0.01)


def test_probe_after_a_lone_reliable_packet_is_sent_and_the_ones_after_it_are_not():
    clock = FakeClock(10.0)
    core = core_with(clock, **CLEAN)
    core.receive_datagram(data(1, 1, reliable=True), ALICE, clock.time())
    core.datagrams_to_send(clock.time())
    # one datagram carried seq 1 to Bob and Carol: 2 x 1% may be unaware, above the 0.5% target -> a probe;
    # after it, two carried it: 2 x 0.01% -> the doubling probes of the idle location tell nobody anything
    assert probes_within(core, clock, 1.0) == [0.02]
    stats = core.location_stats(LOC)
    assert stats["heartbeats"] == 1 and stats["heartbeats_skipped"] >= 4


def test_an_update_sent_after_the_reliable_one_makes_the_probe_unneeded():
    clock = FakeClock(10.0)
    core = core_with(clock, **CLEAN)
    core.receive_datagram(data(1, 1, reliable=True), ALICE, clock.time())
    core.datagrams_to_send(clock.time())
    clock.now += 0.005
    core.receive_datagram(data(2, 1), BOB, clock.time())      # unreliable: it carries last seq 1 too
    core.datagrams_to_send(clock.time())
    assert probes_within(core, clock, 1.0) == []
    assert core.location_stats(LOC)["heartbeats_skipped"] >= 1


def test_updates_packed_with_the_reliable_one_are_lost_with_it_and_count_once():
    clock = FakeClock(10.0)
    core = core_with(clock, **CLEAN)
    core.receive_datagram(data(1, 1, reliable=True), ALICE, clock.time())
    core.receive_datagram(data(2, 1), BOB, clock.time())      # taken in the same pull: may share a datagram
    core.datagrams_to_send(clock.time())
    assert probes_within(core, clock, 1.0) == [0.02]


def test_a_lossy_downlink_gets_probes_until_enough_datagrams_carried_the_seq():
    clock = FakeClock(10.0)
    # 30% loss assumed (no copies to count): 2 x 0.3**n < 0.5% needs n = 5: the original and 4 probes
    core = core_with(clock, loss_prior=0.3, redundancy=False)
    core.receive_datagram(data(1, 1, reliable=True), ALICE, clock.time())
    core.datagrams_to_send(clock.time())
    assert probes_within(core, clock, 2.0) == [0.02, 0.06, 0.14, 0.3]


def test_copies_count_as_carriers_but_not_for_the_seqs_sender():
    # 10% assumed: 3 copies each; Bob and Carol got three datagrams with seq 1 (2 x 0.1% < 0.5%): no probe
    clock = FakeClock(10.0)
    core = core_with(clock, loss_prior=0.1)
    core.receive_datagram(data(1, 1, reliable=True), ALICE, clock.time())
    assert core.location_stats(LOC)["redundant_copies_sent"] == 4      # (none to Alice, the sender)
    core.datagrams_to_send(clock.time())
    assert probes_within(core, clock, 1.0) == []
    # the same without copies: one datagram each, 2 x 10%: probes until three datagrams carried it (0.2%)
    clock = FakeClock(10.0)
    core = core_with(clock, loss_prior=0.1, redundancy=False)
    core.receive_datagram(data(1, 1, reliable=True), ALICE, clock.time())
    core.datagrams_to_send(clock.time())
    assert probes_within(core, clock, 1.0) == [0.02, 0.06]


def test_a_location_without_reliable_traffic_needs_no_probe_and_target_zero_always_probes():
    clock = FakeClock(10.0)
    core = core_with(clock, **CLEAN)
    core.receive_datagram(data(1, 1), ALICE, clock.time())     # unreliable only: no seq to reveal
    core.datagrams_to_send(clock.time())
    assert probes_within(core, clock, 1.0) == []
    clock = FakeClock(10.0)
    core = core_with(clock, **CLEAN, probe_skip_target=0.0)
    core.receive_datagram(data(1, 1, reliable=True), ALICE, clock.time())
    core.datagrams_to_send(clock.time())
    assert probes_within(core, clock, 0.5) == [0.02, 0.06, 0.14, 0.3]    # every probe, doubling while idle


def test_the_default_target_probes_until_a_clean_path_has_carried_the_seq_three_times():
    clock = FakeClock(10.0)
    core = core_with(clock, **CLEAN, probe_skip_target=ReflectorConfig().probe_skip_target)
    core.receive_datagram(data(1, 1, reliable=True), ALICE, clock.time())
    core.datagrams_to_send(clock.time())
    assert probes_within(core, clock, 1.0) == [0.02, 0.06]      # 2 x 1%, 2 x 0.01%, then 2 x 0.0001%


def test_probe_skip_target_is_validated():
    with pytest.raises(ValueError, match="probe_skip_target"):
        ReflectorConfig(probe_skip_target=1.0).validate()


def test_a_member_that_lost_the_last_packet_still_learns_of_it_from_the_probe():
    """End to end in simulated time: Bob loses the location's last reliable packet; the probe (needed:
    one datagram carried it) tells him one interval later, he NACKs and gets it - no later packet needed."""
    core = ReflectorCore(ReflectorConfig(**CLEAN, heartbeat_min=0.01, heartbeat_factor=0.5, probe_skip_target=TARGET))
    net = SimNetwork(core, LinkProfile(latency=0.0005))
    endpoints = {}
    for player, addr in ((1, ALICE), (2, BOB), (3, CAROL)):
        core.add_member(LOC, player, TOKENS[player], net.now)
        endpoints[player] = ep = ClientEndpoint(player, LOC, TOKENS[player], ClientConfig(**CLEAN),
                                                rng=random.Random(player))
        net.add_client(ep, addr)
        ep.connect(net.now)
    net.run_for(0.5)
    alice, bob = endpoints[1], endpoints[2]
    assert alice.joined and bob.joined
    net.drop_when(lambda direction, addr, header: direction == "down" and addr == BOB and header.kind is Kind.DATA)
    sent_at = net.now
    pid = alice.send(b"last", net.now, reliable=True)
    net.run_for(0.5)
    [got] = [e for e in net.events[BOB] if isinstance(e, Received)]
    assert got.packet_id == pid
    assert bob.stats["gaps_from_heartbeat"] == 1 and bob.stats["nacks_sent"] == 1
    assert got.now - sent_at < 0.05        # the probe about one interval later, then a NACK round trip
    assert core.location_stats(LOC)["heartbeats"] == 1     # and no more: the probe made the seq known


def test_reflector_cli_sets_the_target_and_defaults_to_the_core_default():
    from mmpog.reflector import build_parser, config_from_args

    def config(*argv):
        return config_from_args(build_parser().parse_args(["--no-api-key", *argv]))

    assert config().probe_skip_target == ReflectorConfig().probe_skip_target
    assert config("--probe-skip-target", "0").probe_skip_target == 0.0
