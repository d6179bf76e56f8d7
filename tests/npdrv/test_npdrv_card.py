"""The emulated card's data path and control point, in memory (scapy checks the bytes)."""

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from npdrv import wire
from npdrv.card import COPY_MAC, Card, CardConfig, complete_l4_checksum, host
from npdrv.controlpoint import ControlPoint, CommandFailed
from npdrv.wire import Cmd, NpAction, NpRule, Scope, Status, Table

P0, P1 = "02:00:00:00:00:a0", "02:00:00:00:00:a1"
NH1 = "02:00:00:00:00:b1"
CLIENT = "02:00:00:00:00:c0"


@pytest.fixture
def cp():
    card = Card(CardConfig(port_macs=(wire.mac_bytes(P0), wire.mac_bytes(P1))))
    point = ControlPoint(card, wire.mac_bytes("02:00:00:00:00:ff"))
    point.execute(wire.request(wire.CodeLoad("booster")))
    point.execute(wire.request(wire.FwdAdd("10.2.0.0/24", 1, NH1)))
    point.execute(wire.request(wire.FwdAdd("10.1.0.0/24", 0, CLIENT)))
    return point


def udp(dport=7000, payload=b"hello", dst="10.2.0.5", ttl=64):
    return bytes(Ether(src=CLIENT, dst=P0) / IP(src="10.1.0.2", dst=dst, ttl=ttl) / UDP(sport=5555, dport=dport)
                 / payload)


def checked(frame: bytes) -> Ether:
    pkt = Ether(frame)
    ip_csum, udp_csum = pkt[IP].chksum, pkt[UDP].chksum if UDP in pkt else None
    del pkt[IP].chksum
    if UDP in pkt:
        del pkt[UDP].chksum
    again = Ether(bytes(pkt))
    assert again[IP].chksum == ip_csum
    if udp_csum is not None:
        assert again[UDP].chksum == udp_csum
    return again


def test_forwarding_rewrites_macs_decrements_ttl_and_keeps_checksums_valid(cp):
    out = cp.card.process(0, udp())
    assert len(out) == 1 and out[0][0] == 1
    pkt = checked(out[0][1])
    assert (pkt.src, pkt.dst, pkt[IP].ttl) == (P1, NH1, 63)
    assert cp.card.ports[0].rx_packets == 1 and cp.card.ports[1].tx_packets == 1


def test_exception_path_to_host(cp):
    miss = udp(dst="192.0.2.9")
    assert cp.card.process(0, miss) == [(host(0), miss)]
    expiring = udp(ttl=1)
    assert cp.card.process(0, expiring) == [(host(0), expiring)]
    arp = bytes(Ether(src=CLIENT, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.1.0.2", pdst="10.1.0.1"))
    assert cp.card.process(0, arp) == [(host(0), arp)]
    other = bytes(Ether(src=CLIENT, dst="02:99:99:99:99:99") / IP(dst="10.2.0.5") / ICMP())
    assert cp.card.process(0, other) == []
    assert cp.card.stats["dropped_not_for_us"] == 1
    cp.execute(wire.request(wire.FwdAdd("10.1.0.1/32", wire.PORT_HOST)))
    local = udp(dst="10.1.0.1")
    assert cp.card.process(0, local) == [(host(0), local)]
    assert cp.card.process(host(1), local) == [(1, local)]      # the host's frames go out of the port


def test_redirect_copy_drop_and_counters(cp):
    cp.execute(wire.request(NpRule(1, 100, NpAction.REDIRECT, proto=17, proto_mask=0xFF, dport=(7000, 7000))))
    cp.execute(wire.request(NpRule(2, 50, NpAction.COPY, proto=17, proto_mask=0xFF, dport=(7001, 7001))))
    cp.execute(wire.request(NpRule(3, 100, NpAction.DROP, proto=17, proto_mask=0xFF, dport=(7002, 7002))))
    cp.execute(wire.request(NpRule(4, 100, NpAction.DROP, proto=17, proto_mask=0xFF, dport=(0, 0xFFFF),
                                   patterns=(wire.Pattern(0, b"BAD", b"\xff\xff\xff"),))))
    frame = udp(7000)
    assert cp.card.process(0, frame) == [(host(0), frame)]
    out = cp.card.process(0, udp(7001))
    assert [iface for iface, _ in out] == [host(0), 1]
    assert out[0][1][:6] == COPY_MAC and out[0][1][6:] == udp(7001)[6:]
    assert cp.card.process(0, udp(7002)) == []
    assert cp.card.process(0, udp(7003, payload=b"BADxx")) == []
    assert len(cp.card.process(0, udp(7003, payload=b"GOODx"))) == 1
    counters, _ = cp.execute(wire.request(wire.CounterRef(Scope.RULE, 1), Cmd.COUNTERS_READ))
    assert (counters.packets, counters.bytes) == (1, len(frame) - 14)
    record, _ = cp.execute(wire.request(wire.RuleRef(3), Cmd.RULE_READ))
    assert record.packets == 1
    cp.execute(wire.request(wire.CounterRef(Scope.RULE, wire.ALL), Cmd.COUNTERS_CLEAR))
    assert cp.execute(wire.request(wire.RuleRef(3), Cmd.RULE_READ))[0].packets == 0


def test_multicast_sends_one_stored_frame_to_every_member(cp):
    cp.execute(wire.request(wire.McastSet(7, (("10.2.0.7", 4000), ("10.2.0.8", 4001), ("10.1.0.9", 4002)))))
    cp.execute(wire.request(NpRule(9, 100, NpAction.MULTICAST, group=7, proto=17, proto_mask=0xFF,
                                   dst=wire.ip_int("10.1.0.1"), dst_mask=0xFFFFFFFF, dport=(9000, 9000))))
    out = cp.card.process(0, udp(9000, payload=b"game", dst="10.1.0.1"))
    got = sorted((iface, checked(f)[IP].src, checked(f)[UDP].sport, checked(f)[IP].dst, checked(f)[UDP].dport,
                  bytes(checked(f)[UDP].payload)) for iface, f in out)
    sender = ("10.1.0.2", 5555)       # copies keep the source: members answer the sender
    assert got == [(0, *sender, "10.1.0.9", 4002, b"game"), (1, *sender, "10.2.0.7", 4000, b"game"),
                   (1, *sender, "10.2.0.8", 4001, b"game")]
    # The host's own packets to the group address are fanned out by the card too.
    assert len(cp.card.process(host(0), udp(9000, payload=b"from box", dst="10.1.0.1"))) == 3


def test_control_point_statuses(cp):
    with pytest.raises(CommandFailed) as err:
        cp.execute(wire.request(wire.RuleRef(77), Cmd.RULE_DELETE))
    assert err.value.status is Status.NOT_FOUND
    rule = NpRule(5, 1, NpAction.REDIRECT)
    cp.execute(wire.request(rule))
    cp.execute(wire.request(rule))            # same insert again: idempotent
    with pytest.raises(CommandFailed) as err:
        cp.execute(wire.request(NpRule(5, 2, NpAction.REDIRECT)))
    assert err.value.status is Status.EXISTS
    with pytest.raises(CommandFailed) as err:
        cp.execute(wire.request(wire.FwdAdd("10.9.0.0/16", 5)))
    assert err.value.status is Status.BAD_PORT
    cp.execute(wire.request(wire.CodeLoad("filter")))
    with pytest.raises(CommandFailed) as err:
        cp.execute(wire.request(NpRule(6, 1, NpAction.REDIRECT)))
    assert err.value.status is Status.UNSUPPORTED
    head, entries = cp.execute(wire.request(wire.DumpRequest(Table.FORWARDING)))
    assert head.count == 2 and {e.network for e in entries} == {"10.1.0.0/24", "10.2.0.0/24"}


def test_complete_l4_checksum_fills_a_partial_checksum():
    good = udp(payload=b"x" * 101)
    partial = bytearray(good)
    partial[40:42] = b"\x12\x34"              # what CHECKSUM_PARTIAL leaves: not the real sum
    assert complete_l4_checksum(bytes(partial)) == good


def test_host_multicast_transmit_keeps_the_source(cp):
    from npdrv.card import mcast_tx_mac

    cp.execute(wire.request(wire.McastSet(9, (("10.2.0.7", 4000), ("10.1.0.9", 4002)))))
    raw = bytes(IP(src="10.1.0.1", dst="0.0.0.0") / UDP(sport=6000, dport=0) / b"tick")
    frame = mcast_tx_mac(9) + wire.mac_bytes(P0) + b"\x08\x00" + raw
    got = sorted((iface, checked(f)[IP].src, checked(f)[UDP].sport, checked(f)[IP].dst, checked(f)[UDP].dport)
                 for iface, f in cp.card.process(host(0), frame))
    assert got == [(0, "10.1.0.1", 6000, "10.1.0.9", 4002), (1, "10.1.0.1", 6000, "10.2.0.7", 4000)]
    assert cp.card.process(host(0), mcast_tx_mac(10) + frame[6:]) == []      # no such group


from hypothesis import given, settings          # noqa: E402
from hypothesis import strategies as st         # noqa: E402


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=120), pos=st.integers(0, 200), byte=st.integers(0, 255),
       iface=st.sampled_from([0, 1, host(0), host(1)]))
def test_fuzz_data_path_and_control_point_never_raise(data, pos, byte, iface):
    card = Card(CardConfig(port_macs=(wire.mac_bytes(P0), wire.mac_bytes(P1))))
    point = ControlPoint(card, wire.mac_bytes("02:00:00:00:00:ff"))
    point.execute(wire.request(wire.CodeLoad("booster")))
    point.execute(wire.request(wire.FwdAdd("10.2.0.0/24", 1, NH1)))
    point.execute(wire.request(wire.McastSet(3, (("10.2.0.7", 4000),))))
    point.execute(wire.request(NpRule(1, 100, NpAction.MULTICAST, group=3, **{"proto": 17, "proto_mask": 0xFF})))
    point.execute(wire.request(NpRule(2, 200, NpAction.COPY, patterns=(wire.Pattern(1, b"\x01", b"\x01"),))))
    mutated = bytearray(udp(payload=data[:40]))
    mutated[pos % len(mutated)] = byte
    for frame in (data, bytes(mutated), bytes(mutated[:pos % len(mutated)])):
        for out_iface, out in card.process(iface, frame):
            assert out_iface in (0, 1, host(0), host(1)) and len(out) >= 14
        point.handle_frame(frame)
        point.handle_frame(wire.ETH_HEADER.pack(wire.BROADCAST, wire.mac_bytes(CLIENT), wire.ETHERTYPE) + frame)


from npdrv_strategies import request_commands    # noqa: E402


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(st.lists(request_commands(), min_size=1, max_size=4), min_size=1, max_size=4))
def test_fuzz_every_valid_request_gets_a_status_per_command(batches):
    card = Card(CardConfig(port_macs=(wire.mac_bytes(P0), wire.mac_bytes(P1)), rule_limit=5, group_limit=2))
    point = ControlPoint(card, wire.mac_bytes("02:00:00:00:00:ff"))
    for correlator, batch in enumerate(batches, 1):
        group = wire.split_commands(batch)[0]
        replies = point.handle_frame(wire.frame(wire.BROADCAST, wire.mac_bytes(CLIENT), wire.Message(correlator,
                                                                                                      tuple(group))))
        answered = [c for r in replies for c in wire.parse_frame(r)[2].commands if c.type is not wire.Cmd.ENTRY]
        assert [c.type for c in answered] == [c.type for c in group]
    assert len(card.rules) <= 5 and len(card.groups) <= 2


def test_booster_rules_map_to_the_card_format():
    from boxcore.engines.linux import EngineRefused
    from boxcore.engines.np import card_rule
    from boxcore.rules import Action, Match, PayloadPattern, Rule

    rule = Rule(Match(proto="udp", src="10.1.0.0/16", dst="10.2.0.9", src_port=(1000, 2000), dst_port=7000,
                      payload=(PayloadPattern(2, b"\x01\x02", b"\xff\x0f"),)), Action.REDIRECT, priority=-5, cookie=9)
    np_rule = card_rule(rule, 77)
    assert (np_rule.rule_id, np_rule.priority, np_rule.action) == (77, -5, NpAction.REDIRECT)
    assert (np_rule.proto, np_rule.proto_mask) == (17, 0xFF)
    assert (np_rule.src, np_rule.src_mask) == (wire.ip_int("10.1.0.0"), 0xFFFF0000)
    assert (np_rule.dst, np_rule.dst_mask) == (wire.ip_int("10.2.0.9"), 0xFFFFFFFF)
    assert (np_rule.sport, np_rule.dport) == ((1000, 2000), (7000, 7000))
    assert np_rule.patterns == (wire.Pattern(2, b"\x01\x02", b"\xff\x0f"),)
    wild = card_rule(Rule(Match(), Action.COPY), 1)
    assert (wild.proto_mask, wild.src_mask, wild.dst_mask, wild.sport, wild.dport) == (0, 0, 0, (0, 65535), (0, 65535))
    # The same packets match on the card as in boxcore's own classifier.
    card = Card(CardConfig())
    card.rules.insert(np_rule)
    best, _ = card.rules.lookup(17, wire.ip_int("10.1.3.4"), wire.ip_int("10.2.0.9"), 1500, 7000, b"\x00\x00\x01\x32")
    assert best is not None and best.rule_id == 77
    best, _ = card.rules.lookup(17, wire.ip_int("10.1.3.4"), wire.ip_int("10.2.0.9"), 1500, 7000, b"\x00\x00\x02\x02")
    assert best is None
    with pytest.raises(EngineRefused, match="payload pattern"):
        card_rule(Rule(Match(payload=(PayloadPattern(0, b"x" * 33),)), Action.DROP), 2)
