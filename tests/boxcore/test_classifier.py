"""boxcore.classifier: the indexed classifier against a brute-force linear
scan (hypothesis, with interleaved adds and removes), plus counters and limits."""

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from boxcore.classifier import Classifier, ClassifierError, Decision, TableFull
from boxcore.packet import Packet
from boxcore.rules import Action, Match, PayloadPattern, Rule

ADDRS = ("10.0.0.1", "10.0.0.2", "10.0.1.1", "192.168.0.1")
PORTS = (53, 80, 7000, 7001)


def udp(dst="10.0.0.1", dport=7000, src="10.0.0.2", sport=53, payload=b"\x01abc"):
    return Packet(17, src, sport, dst, dport, payload)


def test_priority_then_insertion_order_and_copies():
    c = Classifier()
    low = Rule(Match(proto="udp"), Action.DROP, priority=10, cookie=1)
    high = Rule(Match(dst_port=7000), Action.REDIRECT, priority=200, cookie=2)
    tie = Rule(Match(dst="10.0.0.0/24"), Action.DROP, priority=200, cookie=3)
    copy_low = Rule(Match(), Action.COPY, priority=1, cookie=4)
    copy_high = Rule(Match(dst_port=(7000, 7010)), Action.COPY, priority=500, cookie=5)
    for rule in (low, high, tie, copy_low, copy_high):
        assert c.add(rule)
    decision = c.lookup(udp(), nbytes=100)
    assert decision.terminal == high                 # same priority as `tie`, added first
    assert decision.copies == (copy_high, copy_low)  # every COPY, whatever its priority
    assert list(decision) == [high, copy_high, copy_low] and len(decision) == 3
    assert decision.action is Action.REDIRECT
    assert c.lookup(udp(dport=9)).terminal == tie
    assert c.lookup(udp(dport=9, dst="10.9.9.9")).terminal == low
    default = c.lookup(Packet(6, "1.1.1.1", 1, "2.2.2.2", 2, b""))
    assert default.terminal is None and default.copies == (copy_low,) and default.action is Action.FORWARD
    counters = c.counters()
    assert counters[2] == (1, 100)
    assert counters[4] == (4, 100 + 4 + 4 + 0)
    assert counters[1] == (1, 4)
    assert c.stats["lookups"] == 4 and c.stats["default_forward"] == 1


def test_remove_and_idempotent_add_and_cookie_clash():
    c = Classifier()
    rule = Rule(Match(proto="udp", dst_port=7000), Action.REDIRECT, cookie=9, owner="a")
    assert c.add(rule) and not c.add(rule)
    with pytest.raises(ClassifierError, match="cookie 9"):
        c.add(Rule(Match(proto="tcp"), Action.DROP, cookie=9))
    assert c.lookup(udp()).terminal == rule
    assert c.remove(9) == rule and c.remove(9) is None
    assert c.lookup(udp()) == Decision(None, ())
    assert not c.lookup(udp()) and len(c) == 0
    assert 9 not in c.counters()


def test_table_is_bounded_and_refusals_counted():
    c = Classifier(max_rules=2)
    c.add(Rule(Match(dst_port=1), Action.DROP, cookie=1))
    c.add(Rule(Match(dst_port=2), Action.DROP, cookie=2))
    with pytest.raises(TableFull):
        c.add(Rule(Match(dst_port=3), Action.DROP, cookie=3))
    assert c.stats["refused"] == 1
    c.remove(1)
    c.add(Rule(Match(dst_port=3), Action.DROP, cookie=3))
    with pytest.raises(ValueError):
        Classifier(max_rules=0)


def test_exact_fast_path_and_prefix_index():
    c = Classifier()
    exact = Rule(Match(proto="udp", src="10.0.0.2", src_port=53, dst="10.0.0.1", dst_port=7000),
                 Action.REDIRECT, priority=1, cookie=1)
    wide = Rule(Match(dst="10.0.0.0/8"), Action.DROP, priority=5, cookie=2)
    c.add(exact)
    c.add(wide)
    assert c._exact and c._by_prefix
    assert c.lookup(udp()).terminal == wide           # priority beats specificity
    c.remove(2)
    assert c.lookup(udp()).terminal == exact
    assert c.lookup(udp(sport=54)).terminal is None
    c.remove(1)
    assert not c._exact and not c._by_prefix


def test_payload_rules():
    c = Classifier()
    gnutella = Rule(Match(proto="udp", payload=[PayloadPattern(0, b"GNUTELLA")]), Action.REDIRECT, cookie=1)
    c.add(gnutella)
    assert c.lookup(udp(payload=b"GNUTELLA CONNECT/0.6")).terminal == gnutella
    assert c.lookup(udp(payload=b"GNUT")).terminal is None


# ------------------------------------------------- hypothesis vs brute force

prefixes = st.sampled_from([None, "10.0.0.0/8", "10.0.0.0/24", "10.0.0.1", "10.0.0.2", "192.168.0.0/16", "::/0"])
ports = st.one_of(st.none(), st.sampled_from(PORTS),
                  st.tuples(st.sampled_from(PORTS), st.sampled_from(PORTS)).map(lambda t: tuple(sorted(t))))


def safe_pattern(offset, value, mask):
    if mask is not None and len(mask) != len(value):
        mask = None
    return PayloadPattern(offset, value, mask)


patterns = st.lists(st.builds(safe_pattern, st.integers(0, 2), st.sampled_from([b"\x01", b"a", b"ab", b"\x00"]),
                              st.sampled_from([None, b"\x01", b"\xff"])), max_size=1)


@st.composite
def rule_specs(draw):
    proto = draw(st.sampled_from([None, 17, 6]))
    pats = draw(patterns)
    if draw(st.integers(0, 3)) == 0:   # an exact 5-tuple, to exercise the fast path
        match = Match(proto=proto or 17, src=draw(st.sampled_from(ADDRS)), dst=draw(st.sampled_from(ADDRS)),
                      src_port=draw(st.sampled_from(PORTS)), dst_port=draw(st.sampled_from(PORTS)))
    else:
        match = Match(proto=proto, src=draw(prefixes), dst=draw(prefixes), src_port=draw(ports),
                      dst_port=draw(ports), payload=tuple(pats))
    action = draw(st.sampled_from(list(Action)))
    return match, action, draw(st.integers(0, 3)), (draw(st.integers(0, 9)) if action is Action.MULTICAST else None)


packets = st.builds(Packet, st.sampled_from([17, 6, 1]), st.sampled_from(ADDRS), st.sampled_from(PORTS),
                    st.sampled_from(ADDRS), st.sampled_from(PORTS),
                    st.sampled_from([b"", b"\x01", b"ab", b"\x01ab", b"xab\x01"]))


def brute_force(rules_in_order, pkt):
    ordered = sorted(enumerate(rules_in_order), key=lambda ir: (-ir[1].priority, ir[0]))
    matching = [r for _, r in ordered if r.match.matches(pkt)]
    terminal = next((r for r in matching if r.action is not Action.COPY), None)
    return Decision(terminal, tuple(r for r in matching if r.action is Action.COPY))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(rule_specs(), st.booleans()), min_size=1, max_size=25),
       st.lists(packets, min_size=1, max_size=20))
def test_lookup_equals_linear_scan(specs, pkts):
    c = Classifier()
    live: list[Rule] = []
    cookies = itertools.count(1)
    expected_counts: dict[int, list[int]] = {}
    for (match, action, priority, group), remove_one in specs:
        rule = Rule(match, action, priority=priority, cookie=next(cookies), group=group)
        c.add(rule)
        live.append(rule)
        expected_counts[rule.cookie] = [0, 0]
        if remove_one and len(live) > 1:
            victim = live.pop(len(live) // 2)
            assert c.remove(victim.cookie) == victim
            del expected_counts[victim.cookie]
    assert c.rules() == sorted(live, key=lambda r: (-r.priority, live.index(r)))
    for pkt in pkts:
        want = brute_force(live, pkt)
        got = c.lookup(pkt)
        assert got == want, (pkt, live)
        for rule in want:
            expected_counts[rule.cookie][0] += 1
            expected_counts[rule.cookie][1] += len(pkt.payload)
    assert c.counters() == {k: tuple(v) for k, v in expected_counts.items()}
