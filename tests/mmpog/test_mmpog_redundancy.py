"""Loss-adaptive redundant copies of reliable updates (issue 17): the estimator, when copies go out,
and that a copy never reaches a game twice nor gets a seq of its own."""

import random

import pytest

from boxcore.testing import FakeClock
from mmpog import wire
from mmpog.reflector import ReflectorService, build_parser, config_from_args
from mmpog.reliability import (
    ClientConfig, ClientEndpoint, Delivered, Expired, LossEstimator, ReflectorConfig, ReflectorCore, Received,
    copies_for, copy_rounds,
)
from mmpog.testing import UP, LinkProfile, SimNetwork
from mmpog.wire import Header, Kind

LOC = 5
LOSSY = 0.2       # a prior above the threshold: copies from the first update on


# ---------------------------------------------------------------- the estimator

def test_estimator_starts_at_its_prior_and_counts_units_sent_once():
    clock = FakeClock(100.0)
    est = LossEstimator(prior=0.01, prior_weight=20, half_life=5.0)
    assert est.estimate() == pytest.approx(0.01) and est.samples == 0
    est.observe(clock.time(), sent=100, lost=5)
    assert est.estimate() == pytest.approx((0.2 + 5) / 120)


async def test_estimator_forgets_with_its_half_life():
    clock = FakeClock()
    est = LossEstimator(prior=0.01, prior_weight=10, half_life=2.0)
    est.observe(clock.time(), sent=100, lost=50)
    await clock.advance(2.0)
    est.observe(clock.time(), sent=100, lost=0)       # the first 100 now weigh 50, their losses 25
    assert est.samples == pytest.approx(150)
    assert est.estimate() == pytest.approx((0.1 + 25) / (10 + 150))
    est.set_prior(0.5)                                  # the reflector's pooled prior
    assert est.estimate() == pytest.approx((5 + 25) / (10 + 150))
    with pytest.raises(ValueError):
        LossEstimator(prior=0.0)


def test_copies_for_the_fewest_with_a_residual_under_the_target():
    assert copies_for(0.01, 0.025, 0.005) == 1               # 1% loss: nothing changes
    assert copies_for(0.05, 0.025, 0.005) == 2               # 0.25%
    assert copies_for(0.10, 0.025, 0.005) == 3               # 1% > 0.5%: three, 0.1%
    assert copies_for(0.10, 0.025, 0.01) == 2                # exactly on the target is enough
    assert copies_for(0.5, 0.025, 0.005, cap=3) == 3          # capped
    assert copies_for(0.5, 0.025, 0.005, cap=1) == 1


def test_copy_rounds_keep_copies_of_one_update_in_datagrams_of_their_own():
    a, b, c = b"a" * 40, b"b" * 40, b"c" * 40
    assert copy_rounds([a, b, c]) == [[a, b, c]]
    assert copy_rounds([a, a, b, a]) == [[a, b], [a], [a]]
    for group in copy_rounds([a, a, b, a]):
        assert len(wire.pack(group)) == 1                    # each round fits one datagram ...
    assert copy_rounds([a]) == [[a]] and copy_rounds([]) == [[]]


# ---------------------------------------------------------------- in simulated time

def _play(loss: float, seed: int = 1, players: int = 8, seconds: float = 4.0, client=None, reflector=None,
          duplicate: float = 0.0, jitter: float = 0.0002) -> tuple[SimNetwork, dict, dict]:
    core = ReflectorCore(ReflectorConfig(**(reflector or {})))
    net = SimNetwork(core, LinkProfile(loss_up=loss, loss_down=loss, latency=0.00025, jitter=jitter,
                                       duplicate=duplicate), seed=seed)
    eps = {}
    for player in range(1, players + 1):
        token = bytes([player]) * 12
        core.add_member(LOC, player, token, now=net.now)
        ep = ClientEndpoint(player, LOC, token, ClientConfig(join_timeout=30, **(client or {})),
                            rng=random.Random(seed * 31 + player))
        addr = ("10.9.0.%d" % player, 7000 + player)
        net.add_client(ep, addr)
        ep.connect(net.now)
        eps[addr] = ep
    while not all(ep.joined for ep in eps.values()):
        net.run_for(0.1)
    rng = random.Random(seed)
    sent = {addr: [] for addr in eps}
    for _ in range(int(seconds * 10 * players)):
        addr = rng.choice(list(eps))
        reliable = rng.random() < 0.5
        pid = eps[addr].send(b"update", net.now, reliable=reliable)
        if reliable:
            sent[addr].append(pid)
        net.run_for(0.1 / players)
    net.run_for(3.0)
    return net, eps, sent


def _copies(eps: dict, net: SimNetwork) -> tuple[int, int, int]:
    client = sum(ep.stats["redundant_copies_sent"] for ep in eps.values())
    reliable = sum(ep.stats["sent_reliable"] for ep in eps.values())
    return client, net.reflector.totals()["redundant_copies_sent"], reliable


def test_copies_go_out_at_high_loss_and_only_at_the_start_of_a_clean_path():
    net, eps, _ = _play(0.10)
    client, reflector, reliable = _copies(eps, net)
    assert client > reliable / 2                      # most reliable updates went up twice or more
    assert reflector > reliable * 7 / 2               # ... and down to most of the 7 other members
    totals = net.reflector.totals()
    assert totals["redundant_copies_received"] > 0 and totals["reliable"] == reliable
    assert all(ep._copies > 1 for ep in eps.values())
    # a conservative start: both ends copy until the evidence shows the path clean, then stop
    net, eps, _ = _play(0.0, seconds=8.0)
    client, reflector, reliable = _copies(eps, net)
    assert 0 < client < reliable * 0.6 and 0 < reflector < reliable * 7 * 0.1   # the first 2-3 s and 1 s
    assert all(ep._copies == 1 for ep in eps.values())
    assert all(member.copies == 1 for member in net.reflector._locations[LOC].by_addr.values())
    assert net.reflector.totals()["loss_reports"] == 0            # nothing arrived first as a COPY
    net, eps, _ = _play(0.01, seconds=8.0)
    client, reflector, reliable = _copies(eps, net)
    assert client < reliable * 0.6 and reflector < reliable * 7 * 0.15
    # (a member whose 1% downlink lost a few in a row is copied to for a while: most are not)
    assert sum(member.copies > 1 for member in net.reflector._locations[LOC].by_addr.values()) <= 2


def test_a_clean_prior_starts_without_copies():
    clean = dict(loss_prior=0.01)
    net, eps, _ = _play(0.0, client=clean, reflector=clean)
    assert _copies(eps, net)[:2] == (0, 0)


@pytest.mark.parametrize("loss", [0.0, 0.05, 0.10])
def test_the_reflector_measures_a_members_downlink_while_copying(loss):
    """With copies on from the start, the members' LOSS reports (first arrival a COPY) keep the
    reflector's estimate of each downlink at the path's loss: a clean path is seen clean, a lossy one
    lossy (without them only losing every copy shows, and a lossy path reads as a clean one)."""
    net, eps, _ = _play(loss, seconds=6.0, client=dict(loss_prior=0.05), reflector=dict(loss_prior=0.05))
    loc = net.reflector._locations[LOC]
    estimate = loc.loss.estimate()
    assert abs(estimate - loss) < 0.02, estimate
    reports = net.reflector.totals()["loss_reports"]
    assert (reports == 0) if loss == 0 else (reports > 0)
    assert net.reflector.totals()["loss_report_clipped"] == 0


def test_switched_off_nothing_is_copied_and_the_run_is_the_one_without_the_feature():
    off = dict(redundancy=False, loss_prior=LOSSY)
    net, eps, _ = _play(0.10, client=off, reflector=off)
    assert _copies(eps, net)[:2] == (0, 0)
    assert all(not ep._echo_watch for ep in eps.values())     # not even watched


@pytest.mark.parametrize("seed", range(6))
def test_every_copy_lost_duplicated_or_reordered_reaches_each_game_once_under_one_seq(seed):
    """Copies from the first update on (prior above the threshold) over a path that loses 15% each way,
    duplicates 20% and reorders (jitter 4x the latency): every member receives each reliable update exactly
    once, every sender gets exactly one Delivered or Expired, and the reflector gives each update one seq."""
    lossy = dict(loss_prior=LOSSY)
    net, eps, sent = _play(0.15, seed=seed, players=5, seconds=2.0, client=lossy, reflector=lossy,
                           duplicate=0.2, jitter=0.001)
    client, reflector, _ = _copies(eps, net)
    assert client > 0 and reflector > 0
    seqs_of: dict = {}
    for (_, seq), key in net.sequenced.items():
        seqs_of.setdefault(key, set()).add(seq)
    assert all(len(seqs) == 1 for seqs in seqs_of.values()), "a copy was sequenced anew"
    players = {addr: ep.player for addr, ep in eps.items()}
    for addr, ep in eps.items():
        received = [(e.sender, e.packet_id) for e in net.events[addr] if isinstance(e, Received) and e.reliable]
        assert len(received) == len(set(received)), "a copy reached the game twice"
        expected = {(players[other], pid) for other, pids in sent.items() if other != addr for pid in pids}
        assert set(received) == expected
        outcomes = [e.packet_id for e in net.events[addr] if isinstance(e, (Delivered, Expired))]
        assert sorted(outcomes) == sorted(sent[addr])
    assert sum(ep.stats["duplicates"] for ep in eps.values()) > 0      # copies did arrive, and were dropped


def test_a_copy_carries_the_update_when_the_original_is_lost_on_the_way_up():
    """The original of one reliable update dropped on its way up: its copy is sequenced and fanned out
    as the update, in the same instant - no timeout, no NACK."""
    lossy = dict(loss_prior=LOSSY)
    core = ReflectorCore(ReflectorConfig(**lossy))
    net = SimNetwork(core, LinkProfile(latency=0.00025), seed=1)
    eps = {}
    for player in (1, 2, 3):
        token = bytes([player]) * 12
        core.add_member(LOC, player, token, now=net.now)
        ep = ClientEndpoint(player, LOC, token, ClientConfig(**lossy), rng=random.Random(player))
        net.add_client(ep, ("10.9.1.%d" % player, 7100 + player))
        ep.connect(net.now)
        eps[player] = ep
    net.run_for(0.1)
    dropped_once = []

    def original_up(direction, addr, header):
        if direction == UP and header.kind is Kind.DATA and header.reliable and not dropped_once:
            dropped_once.append(header.packet_id)
            return True
        return False

    net.drop_when(original_up)
    start = net.now
    pid = eps[1].send(b"sword", net.now, reliable=True)
    net.run_for(0.002)
    assert dropped_once == [pid]
    for player in (2, 3):
        [got] = [e for e in net.events[("10.9.1.%d" % player, 7100 + player)] if isinstance(e, Received)]
        assert got.packet_id == pid and got.now - start < 0.0015
    assert eps[1].stats["timeouts"] == 0 and eps[2].stats["nacks_sent"] == eps[3].stats["nacks_sent"] == 0
    # a 20% leg takes three copies (0.2**3 <= 0.5%): the original lost, one copy sequenced, the other recognised
    assert eps[1].stats["redundant_copies_sent"] == 2 and core.totals()["redundant_copies_received"] == 1
    assert core.totals()["reliable"] == 1


# ---------------------------------------------------------------- the reflector's adapter and CLI

def _hello(player: int, token: bytes) -> bytes:
    return wire.encode(Header(Kind.HELLO, location=LOC, sender=player, packet_id=1), token)


def test_service_sends_copies_only_to_bound_members_apart_and_not_as_updates_relayed():
    core = ReflectorCore(ReflectorConfig(loss_prior=LOSSY))
    addrs = {1: ("127.0.0.1", 1001), 2: ("127.0.0.1", 1002), 3: ("127.0.0.1", 1003)}
    for player in (1, 2, 3, 4):                        # player 4 holds a token but never said HELLO
        core.add_member(LOC, player, bytes([player]) * 12)
    for player, addr in addrs.items():
        core.receive_datagram(_hello(player, bytes([player]) * 12), addr, 0.0)
    core.datagrams_to_send(0.0)
    service = ReflectorService(core)
    fanned, unicast = [], []
    service.fanout = lambda location, data: fanned.append(data)
    service.send_to = lambda data, addr: unicast.append((addr, data))
    update = wire.encode(Header(Kind.DATA, wire.RELIABLE, 3, LOC, 1, 77), b"x" * 20)
    service.receive(update, addrs[1])
    service.flush()
    assert len(fanned) == 1                                      # the original, to every bound member
    copies = core.location_stats(LOC)["redundant_copies_sent"]
    assert copies >= 2                                           # 20% prior: 3 copies to each of 2 and 3
    assert sorted({addr for addr, _ in unicast}) == [addrs[2], addrs[3]]   # not the sender, not player 4
    for addr, data in unicast:
        header, _ = wire.decode(data)
        assert header.kind is Kind.DATA and header.seq == 1      # whole datagrams, never a BUNDLE of copies
    assert len(unicast) == copies
    assert service.counters["redundant_copies_out"] == copies
    assert service.counters["updates_out"] == 3                  # one update relayed to 3 bound members


def test_cli_switches_redundancy_off_and_sets_the_spacing():
    args = build_parser().parse_args(["--mode", "standalone", "--no-api-key", "--no-redundancy",
                                      "--redundancy-spacing", "0.001"])
    config = config_from_args(args)
    assert config.redundancy is False and config.redundancy_spacing == 0.001
    assert config_from_args(build_parser().parse_args(["--no-api-key"])).redundancy is True
    assert config_from_args(build_parser().parse_args(["--no-api-key", "--loss-prior", "0.01"])).loss_prior == 0.01
    with pytest.raises(ValueError):
        ReflectorConfig(redundancy_max_copies=4).validate()
    with pytest.raises(ValueError):
        ClientConfig(redundancy_target=0.0).validate()


# ---------------------------------------------------------------- the member's LOSS report

def _bound_core(players=(1, 2)) -> tuple[ReflectorCore, dict]:
    core = ReflectorCore(ReflectorConfig(loss_prior=LOSSY))
    addrs = {}
    for player in players:
        core.add_member(LOC, player, bytes([player]) * 12)
        addrs[player] = ("127.0.0.1", 2000 + player)
        core.receive_datagram(_hello(player, bytes([player]) * 12), addrs[player], 0.0)
    core.datagrams_to_send(0.0)
    return core, addrs


def _report(player: int, count: int) -> bytes:
    return wire.encode(Header(Kind.LOSS, location=LOC, sender=player), wire.LOSS_REPORT.pack(count))


def test_reflector_copies_carry_the_copy_flag_and_the_original_does_not():
    core, addrs = _bound_core()
    core.receive_datagram(wire.encode(Header(Kind.DATA, wire.RELIABLE, 3, LOC, 1, 77), b"x"), addrs[1], 0.0)
    out = core.datagrams_to_send(0.0)
    original = [d for d, dest in out if dest == LOC]
    copies = [d for d, dest in out if dest == addrs[2]]
    assert len(original) == 1 and len(copies) == 2
    assert not wire.decode(original[0])[0].flags & wire.COPY
    for data in copies:
        header, payload = wire.decode(data)
        assert header.flags == wire.RELIABLE | wire.COPY and header.seq == 1 and payload == b"x"


def test_a_loss_report_is_credited_only_up_to_the_seqs_copied_and_never_answered():
    core, addrs = _bound_core()
    for pid in range(1, 5):
        core.receive_datagram(wire.encode(Header(Kind.DATA, wire.RELIABLE, 3, LOC, 1, pid), b"x"), addrs[1], 0.0)
    core.datagrams_to_send(0.0)
    member = core._locations[LOC].members[2]
    assert member.copied == 4
    core.receive_datagram(_report(2, 3), addrs[2], 0.0)
    assert member.lost_pending == 3 and core.datagrams_to_send(0.0) == []      # no answer: no amplification
    core.receive_datagram(_report(2, 3), addrs[2], 0.0)                       # the same count again: nothing new
    assert member.lost_pending == 3
    core.receive_datagram(_report(2, 1000), addrs[2], 0.0)                    # more than it was sent: clipped
    assert member.lost_pending == 4
    assert core.location_stats(LOC)["loss_report_clipped"] == 996
    core.receive_datagram(_report(1, 5), ("127.0.0.1", 9999), 0.0)             # a stranger: not a member
    assert core.location_stats(LOC)["loss_reports"] == 3


def _client(config=None) -> ClientEndpoint:
    ep = ClientEndpoint(2, LOC, bytes([2]) * 12, config or ClientConfig(), rng=random.Random(2))
    ep.connect(0.0)
    [hello] = ep.datagrams_to_send(0.0)
    pid = wire.decode(hello)[0].packet_id
    ep.receive_datagram(wire.encode(Header(Kind.WELCOME, location=LOC, sender=2, packet_id=pid)), 0.0005)
    return ep


def _update(seq: int, flags: int) -> bytes:
    return wire.encode(Header(Kind.DATA, flags, 0, LOC, 1, 100 + seq, seq, 1), b"u")


def test_a_member_reports_seqs_that_came_first_as_a_copy_once_the_original_fails_to_follow():
    ep = _client()
    ep.receive_datagram(_update(1, wire.RELIABLE), 0.001)
    ep.receive_datagram(_update(1, wire.RELIABLE | wire.COPY), 0.001)        # original first: no loss
    ep.receive_datagram(_update(2, wire.RELIABLE | wire.COPY), 0.002)        # copy first ...
    ep.receive_datagram(_update(2, wire.RELIABLE), 0.0021)                   # ... original right after: reordered
    ep.receive_datagram(_update(3, wire.RELIABLE | wire.COPY), 0.003)        # copy first, original lost
    assert [e.seq for e in ep.events if isinstance(e, Received)] == [1, 2, 3]  # each once
    ep.datagrams_to_send(0.003)
    timer = ep.get_timer()
    assert timer is not None and 0.003 < timer <= 0.01
    ep.handle_timer(timer)                   # the reordered seq 2's settle time: nothing to count
    assert not ep.has_datagrams
    timer = ep.get_timer()                   # seq 3's: its original never came
    assert timer is not None and timer <= 0.01
    ep.handle_timer(timer)
    [report] = ep.datagrams_to_send(timer)
    header, payload = wire.decode(report)
    assert header.kind is Kind.LOSS and wire.LOSS_REPORT.unpack(payload) == (1,)
    assert ep.stats["copies_first"] == 1
    # the next loss waits for the report interval: at most one report per interval
    ep.receive_datagram(_update(4, wire.RELIABLE | wire.COPY), timer + 0.01)
    ep.handle_timer(timer + 0.02)
    assert ep.datagrams_to_send(timer + 0.02) == []
    ep.handle_timer(timer + ep.config.loss_report_interval)
    [report] = ep.datagrams_to_send(timer + ep.config.loss_report_interval)
    assert wire.LOSS_REPORT.unpack(wire.decode(report)[1]) == (2,)           # a running count


@pytest.mark.parametrize("lost_every, expected_copies", [(None, 1), (10, 3), (20, 2)])
def test_the_reflector_estimate_with_copies_on_follows_the_members_reports(lost_every, expected_copies):
    """Deterministic (FakeClock): member 2's downlink starts copied (10% prior); it reports every
    `lost_every`-th seq as first arriving as a COPY (its original lost).  A clean member is seen clean
    and loses its copies; 10% is measured 10% (three copies), 5% two - with copies on, NACKs alone
    would show none of it."""
    clock = FakeClock(0.0)
    core = ReflectorCore(ReflectorConfig(loss_prior=0.10, loss_prior_weight=25))
    addrs = {1: ("127.0.0.1", 3001), 2: ("127.0.0.1", 3002)}
    for player, addr in addrs.items():
        core.add_member(LOC, player, bytes([player]) * 12)
        core.receive_datagram(_hello(player, bytes([player]) * 12), addr, clock.time())
    member = core._locations[LOC].members[2]
    reported = 0
    for pid in range(1, 801):
        clock.now += 0.01
        core.receive_datagram(wire.encode(Header(Kind.DATA, wire.RELIABLE, 3, LOC, 1, pid), b"x"), addrs[1], clock.time())
        if pid == 1:
            assert member.copies == 3                       # the conservative start
        if lost_every and pid % lost_every == 0 and member.copies > 1:
            reported += 1
            core.receive_datagram(_report(2, reported), addrs[2], clock.time())
        core.datagrams_to_send(clock.time())
    estimate = member.loss.estimate()           # its own (the pool also holds the sender's clean downlink)
    if lost_every is None:
        assert estimate < 0.01 and member.copies == 1
    else:
        assert estimate == pytest.approx(1 / lost_every, rel=0.35) and member.copies == expected_copies
    assert core.location_stats(LOC)["loss_report_clipped"] == 0
