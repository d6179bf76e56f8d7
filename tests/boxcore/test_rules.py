"""boxcore.rules: validation, normalization, msgpack form, and exact
overlaps()/covers() checked against brute-force enumeration."""

import itertools

import msgpack
import pytest
from hypothesis import example, given, settings, strategies as st

from boxcore.packet import Packet
from boxcore.rules import Action, Match, PayloadPattern, Rule, RuleError

# ------------------------------------------------------------ validation

def test_proto_names_and_numbers():
    assert Match(proto="udp").proto == 17
    assert Match(proto="TCP").proto == 6
    assert Match(proto="icmp").proto == 1
    assert Match(proto=47).proto == 47
    assert Match(proto="47").proto == 47
    for bad in ("sctp-ish", 256, -1, True, 1.5):
        with pytest.raises(RuleError, match="protocol"):
            Match(proto=bad)


def test_prefixes_are_normalized_and_strict():
    assert Match(dst="10.0.0.1").dst == "10.0.0.1/32"
    assert Match(dst="10.0.0.1") == Match(dst="10.0.0.1/32")
    assert Match(src="10.0.0.0/8").src == "10.0.0.0/8"
    assert Match(src="::1").src == "::1/128"
    with pytest.raises(RuleError, match="host bits"):
        Match(dst="10.0.0.1/8")
    with pytest.raises(RuleError, match="not a valid prefix"):
        Match(dst="10.0.0.300")
    with pytest.raises(RuleError, match="string"):
        Match(src=167772161)


def test_ports_and_ranges():
    assert Match(dst_port=(5, 5)).dst_port == 5
    assert Match(dst_port=[5, 9]).dst_port == (5, 9)
    assert Match(src_port=0).src_port == 0
    with pytest.raises(RuleError, match="empty"):
        Match(dst_port=(9, 5))
    with pytest.raises(RuleError, match="0..65535"):
        Match(dst_port=65536)
    with pytest.raises(RuleError, match="within 0..65535"):
        Match(src_port=(1, 70000))
    with pytest.raises(RuleError, match="port"):
        Match(dst_port="80")
    with pytest.raises(RuleError, match="port"):
        Match(dst_port=(1, 2, 3))


def test_payload_pattern_validation_and_normalization():
    with pytest.raises(RuleError, match="mask is 1 bytes but the value is 2"):
        PayloadPattern(0, b"ab", b"\xff")
    with pytest.raises(RuleError, match="offset"):
        PayloadPattern(-1, b"a")
    with pytest.raises(RuleError, match="1..256 bytes"):
        PayloadPattern(0, b"")
    with pytest.raises(RuleError, match="bytes"):
        PayloadPattern(0, "text")
    # an all-ones mask is no mask; values are stored masked
    assert PayloadPattern(1, b"\x12", b"\xff") == PayloadPattern(1, b"\x12")
    assert PayloadPattern(0, b"\xff", b"\x0f").value == b"\x0f"
    assert PayloadPattern(0, b"\xf3", b"\x0f") == PayloadPattern(0, b"\x03", b"\x0f")


def test_contradicting_patterns_are_refused_consistent_ones_sorted():
    with pytest.raises(RuleError, match="contradict"):
        Match(payload=(PayloadPattern(0, b"ab"), PayloadPattern(1, b"c")))
    a = Match(payload=(PayloadPattern(2, b"x"), PayloadPattern(0, b"ab")))
    b = Match(payload=[PayloadPattern(0, b"ab"), PayloadPattern(2, b"x")])
    assert a == b and hash(a) == hash(b)
    # bits under disjoint masks at one offset do not conflict
    Match(payload=(PayloadPattern(0, b"\x01", b"\x0f"), PayloadPattern(0, b"\x20", b"\xf0")))


def test_rule_validation():
    m = Match(proto="udp", dst_port=7000)
    assert Rule(m, "redirect").action is Action.REDIRECT
    with pytest.raises(RuleError, match="needs a group"):
        Rule(m, Action.MULTICAST)
    with pytest.raises(RuleError, match="only MULTICAST"):
        Rule(m, Action.COPY, group=3)
    with pytest.raises(RuleError, match="action must be one of"):
        Rule(m, "teleport")
    with pytest.raises(RuleError, match="priority"):
        Rule(m, Action.DROP, priority=2 ** 40)
    with pytest.raises(RuleError, match="cookie"):
        Rule(m, Action.DROP, cookie=-1)
    with pytest.raises(RuleError, match="Match"):
        Rule({"proto": 17}, Action.DROP)
    assert Rule(m, Action.MULTICAST, group=7).group == 7
    assert not Action.COPY.terminal and Action.DROP.terminal


def test_from_dict_is_strict():
    with pytest.raises(RuleError, match="unknown key"):
        Match.from_dict({"proto": 17, "dport": 7000})
    with pytest.raises(RuleError, match="must be a map"):
        Match.from_dict([17])
    with pytest.raises(RuleError, match="missing key"):
        Rule.from_dict({"match": {}})
    with pytest.raises(RuleError, match="unknown key"):
        Rule.from_dict({"match": {}, "action": "drop", "colour": 1})
    with pytest.raises(RuleError, match="action must be a string"):
        Rule.from_dict({"match": {}, "action": 3})
    with pytest.raises(RuleError, match="payload value must be bytes"):
        Match.from_dict({"payload": [{"offset": 0, "value": "ab"}]})
    with pytest.raises(RuleError, match="unknown key"):
        Match.from_dict({"payload": [{"offset": 0, "value": b"ab", "len": 2}]})
    with pytest.raises(RuleError, match="owner"):
        Rule.from_dict({"match": {}, "action": "drop", "owner": 5})


def test_matches_fields():
    pkt = Packet(17, "10.1.2.3", 4000, "192.168.0.9", 7000, b"\x01\x02hello")
    assert Match().matches(pkt)
    assert Match(proto="udp", src="10.0.0.0/8", dst="192.168.0.9", src_port=(3000, 5000),
                 dst_port=7000).matches(pkt)
    assert not Match(proto="tcp").matches(pkt)
    assert not Match(src="11.0.0.0/8").matches(pkt)
    assert not Match(src="::/0").matches(pkt)       # other address family
    assert not Match(dst_port=(7001, 8000)).matches(pkt)
    assert not Match(src_port=4001).matches(pkt)
    assert Match(payload=[PayloadPattern(2, b"hel")]).matches(pkt)
    assert Match(payload=[PayloadPattern(0, b"\x00\x02", b"\x00\xff")]).matches(pkt)
    assert not Match(payload=[PayloadPattern(0, b"\x02")]).matches(pkt)
    # a pattern needs the payload to be long enough, even under a zero mask
    assert not Match(payload=[PayloadPattern(6, b"\x00\x00", b"\x00\x00")]).matches(pkt)
    assert Match(payload=[PayloadPattern(5, b"\x00\x00", b"\x00\x00")]).matches(pkt)


def test_exact_key():
    m = Match(proto="udp", src="10.0.0.1", dst="10.0.0.2", src_port=1, dst_port=2)
    assert m.exact_key() == (17, "10.0.0.1", 1, "10.0.0.2", 2)
    assert m.is_exact
    assert Match(proto="udp", src="10.0.0.0/31", dst="10.0.0.2", src_port=1, dst_port=2).exact_key() is None
    assert Match(proto="udp", src="10.0.0.1", dst="10.0.0.2", src_port=1).exact_key() is None


def test_overlap_and_cover_examples():
    udp7000 = Match(proto="udp", dst_port=7000)
    assert udp7000.overlaps(Match(dst_port=(6000, 8000)))
    assert not udp7000.overlaps(Match(proto="tcp", dst_port=7000))
    assert not Match(dst="10.0.0.0/8").overlaps(Match(dst="11.0.0.0/8"))
    assert Match(dst="10.0.0.0/8").overlaps(Match(dst="10.9.0.0/16"))
    assert not Match(dst="10.0.0.0/8").overlaps(Match(dst="::/0"))
    assert Match(dst="10.0.0.0/8").covers(Match(dst="10.9.0.0/16"))
    assert not Match(dst="10.9.0.0/16").covers(Match(dst="10.0.0.0/8"))
    assert not Match(dst="0.0.0.0/0").covers(Match())    # IPv6 packets too
    # payload: conflict only where masked bits disagree at the same absolute offset
    a = Match(payload=[PayloadPattern(0, b"GNUT")])
    assert not a.overlaps(Match(payload=[PayloadPattern(1, b"X")]))
    assert a.overlaps(Match(payload=[PayloadPattern(1, b"N")]))
    assert a.overlaps(Match(payload=[PayloadPattern(1, b"\x00", b"\x00")]))
    assert a.overlaps(Match(payload=[PayloadPattern(4, b"zz")]))
    assert Match(payload=[PayloadPattern(1, b"N")]).covers(a)
    assert not a.covers(Match(payload=[PayloadPattern(1, b"N")]))
    assert Match().covers(a) and not a.covers(Match())


# ---------------------------------------------- msgpack round trip (hypothesis)

ports = st.one_of(st.none(), st.integers(0, 65535),
                  st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(lambda t: tuple(sorted(t))))


@st.composite
def any_prefix(draw):
    import ipaddress
    if draw(st.booleans()):
        return None
    length = draw(st.integers(0, 32))
    addr = draw(st.integers(0, 2 ** 32 - 1)) >> (32 - length) << (32 - length) if length else 0
    return f"{ipaddress.IPv4Address(addr)}/{length}"


@st.composite
def any_pattern(draw):
    value = draw(st.binary(min_size=1, max_size=8))
    mask = draw(st.one_of(st.none(), st.binary(min_size=len(value), max_size=len(value))))
    return PayloadPattern(draw(st.integers(0, 1500)), value, mask)


@st.composite
def any_match(draw):
    patterns = draw(st.lists(any_pattern(), max_size=3))
    try:
        return Match(draw(st.one_of(st.none(), st.integers(0, 255))), draw(any_prefix()),
                     draw(any_prefix()), draw(ports), draw(ports), tuple(patterns))
    except RuleError:
        return Match(payload=patterns[:1])


@st.composite
def any_rule(draw):
    action = draw(st.sampled_from(list(Action)))
    group = draw(st.integers(0, 2 ** 32 - 1)) if action is Action.MULTICAST else None
    return Rule(draw(any_match()), action, draw(st.integers(-(2 ** 31), 2 ** 31 - 1)),
                draw(st.text(max_size=10)), draw(st.integers(0, 2 ** 64 - 1)), group)


@settings(max_examples=150, deadline=None)
@given(any_rule())
def test_rule_msgpack_round_trip(rule):
    wire = msgpack.packb(rule.to_dict(), use_bin_type=True)
    back = Rule.from_dict(msgpack.unpackb(wire, raw=False))
    assert back == rule and hash(back) == hash(rule)
    back_tuples = Rule.from_dict(msgpack.unpackb(wire, raw=False, use_list=False))
    assert back_tuples == rule


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["proto", "src", "dst", "src_port", "dst_port", "payload", "x"]),
                       st.one_of(st.none(), st.integers(-5, 70000), st.text(max_size=12),
                                 st.binary(max_size=4), st.lists(st.integers(-1, 70000), max_size=3))))
def test_match_from_dict_fuzz_only_rule_errors(data):
    try:
        Match.from_dict(data)
    except RuleError:
        pass


# --------------------------------------- exact overlap/cover vs brute force
# A small universe that is exhaustive for the generators below: every field a
# generated match can test takes all its distinguishable values in it.

U_PROTOS = (6, 17, 1)
U_ADDRS = ("10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.4")   # .4 lies outside every generated prefix
U_PORTS = (0, 1, 2, 3)          # 3 stands for every port above the generated ranges
# Patterns test bits 0-1 under a mask, or every bit without one: bytes 0..7
# give every low-bit value with and without other bits set.  Patterns end by
# byte 2, so payloads longer than 2 bytes behave like 2-byte ones.
U_PAYLOADS = tuple(bytes(p) for n in range(3) for p in itertools.product(range(8), repeat=n))
UNIVERSE = [Packet(proto, src, sport, dst, dport, payload)
            for proto, src, dst, sport, dport in itertools.product(U_PROTOS, U_ADDRS, U_ADDRS, U_PORTS, U_PORTS)
            for payload in U_PAYLOADS]

small_prefix = st.sampled_from([None, "10.0.0.0/31", "10.0.0.0/30", "10.0.0.1", "10.0.0.2"])
small_port = st.one_of(st.none(), st.integers(0, 2),
                       st.tuples(st.integers(0, 2), st.integers(0, 2)).map(lambda t: tuple(sorted(t))))


@st.composite
def small_pattern(draw):
    offset = draw(st.integers(0, 1))
    size = draw(st.integers(1, 2 - offset))
    value = bytes(draw(st.lists(st.integers(0, 3), min_size=size, max_size=size)))
    mask = draw(st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=size, max_size=size).map(bytes)))
    return PayloadPattern(offset, value, mask)


@st.composite
def small_match(draw):
    patterns = draw(st.lists(small_pattern(), max_size=2))
    fields = dict(proto=draw(st.sampled_from([None, 6, 17])), src=draw(small_prefix), dst=draw(small_prefix),
                  src_port=draw(small_port), dst_port=draw(small_port))
    try:
        return Match(payload=tuple(patterns), **fields)
    except RuleError:       # patterns that contradict each other
        return Match(payload=tuple(patterns[:1]), **fields)


@settings(max_examples=150, deadline=None)
@given(small_match(), small_match())
@example(Match(dst="10.0.0.0/30"), Match())
@example(Match(payload=[PayloadPattern(1, b"\x00", b"\x00")]), Match(payload=[PayloadPattern(0, b"\x01")]))
@example(Match(payload=[PayloadPattern(0, b"\x01")]), Match(payload=[PayloadPattern(0, b"\x01", b"\x03")]))
def test_overlaps_and_covers_are_exact(a, b):
    in_a = [a.matches(p) for p in UNIVERSE]
    in_b = [b.matches(p) for p in UNIVERSE]
    both = any(x and y for x, y in zip(in_a, in_b))
    assert a.overlaps(b) == both
    assert b.overlaps(a) == both
    assert a.covers(b) == all(x for x, y in zip(in_a, in_b) if y)
    assert b.covers(a) == all(y for x, y in zip(in_a, in_b) if x)
    assert a.covers(a) and a.overlaps(a)


json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 70000), st.floats(allow_nan=False),
              st.text(max_size=8), st.binary(max_size=4)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["match", "action", "priority", "owner", "cookie", "group", "proto", "src", "dst",
                         "src_port", "dst_port", "payload", "offset", "value", "mask"]), children, max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(json_like)
def test_rule_from_dict_fuzz_only_rule_errors(data):
    try:
        rule = Rule.from_dict(data)
    except RuleError as exc:
        assert str(exc)
    else:
        assert Rule.from_dict(rule.to_dict()) == rule
