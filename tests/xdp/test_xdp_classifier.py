"""The BPF classifier against boxcore.classifier (the oracle), through BPF_PROG_TEST_RUN.

Random rules and packets: the XDP program must take the same decision (DROP = XDP_DROP,
everything else passes) and count the same packets and payload bytes against the same rules
(the terminal rule and every matching COPY) as ``Classifier.lookup``.  No traffic needed.
"""

import random

import pytest

from boxcore.classifier import Classifier
from boxcore.engines.xdp_maps import BUCKET, Datapath, DatapathRefused, payload_chunks
from boxcore.packet import Packet
from boxcore.rules import Action, Match, PayloadPattern, Rule

pytestmark = pytest.mark.root

ETH = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
XDP_DROP, XDP_PASS = 1, 2

SRCS = ["10.1.0.2", "10.1.0.3", "10.1.7.9", "192.168.1.1"]
DSTS = ["10.2.0.2", "10.2.0.3", "10.2.1.5", "10.3.0.1"]
SRC_PREFIXES = ["10.1.0.0/16", "10.1.0.0/24", "10.1.0.2/32", "0.0.0.0/0", "192.168.0.0/16"]
DST_PREFIXES = ["10.2.0.0/16", "10.2.0.0/24", "10.2.0.2/32", "10.0.0.0/8", "0.0.0.0/0", "10.2.1.0/24"]
PORTS = [53, 9000, 9001, 40000]


def frame(pkt: Packet) -> bytes:
    return ETH + pkt.to_ip()


def random_match(rng: random.Random) -> Match:
    kw = {}
    if rng.random() < 0.7:
        kw["proto"] = rng.choice([6, 17, 17, 1])
    if rng.random() < 0.4:
        kw["src"] = rng.choice(SRC_PREFIXES)
    if rng.random() < 0.5:
        kw["dst"] = rng.choice(DST_PREFIXES)
    if rng.random() < 0.3:
        kw["src_port"] = rng.choice([rng.choice(PORTS), (1000, 50000), (0, 100)])
    if rng.random() < 0.6:
        kw["dst_port"] = rng.choice([rng.choice(PORTS), (9000, 9001), (50, 60000)])
    if rng.random() < 0.3:
        offset = rng.randrange(0, 12)
        value = bytes(rng.choice(b"ab") for _ in range(rng.randrange(1, 6)))
        mask = None if rng.random() < 0.6 else bytes(rng.choice([0xFF, 0x0F, 0x00, 0xF0]) for _ in value)
        if mask is not None and not any(mask):
            mask = None
        kw["payload"] = (PayloadPattern(offset, value, mask),)
    if rng.random() < 0.1:   # an exact 5-tuple
        kw = {"proto": 17, "src": rng.choice(SRCS), "dst": rng.choice(DSTS), "src_port": rng.choice(PORTS),
              "dst_port": rng.choice(PORTS)}
    return Match(**kw)


def random_packet(rng: random.Random) -> Packet:
    proto = rng.choice([6, 17, 17, 1])
    payload = bytes(rng.choice(b"ab\x0f") for _ in range(rng.randrange(0, 24)))
    sport = dport = 0
    if proto in (6, 17):
        sport, dport = rng.choice(PORTS + [rng.randrange(1, 65536)]), rng.choice(PORTS + [rng.randrange(1, 65536)])
    return Packet(proto, rng.choice(SRCS), sport, rng.choice(DSTS), dport, payload)


def read_counters(dp: Datapath) -> dict[int, tuple[int, int]]:
    return dp.counters()


@pytest.mark.parametrize("seed", range(6))
def test_bpf_classifier_agrees_with_the_oracle(datapath, seed):
    rng = random.Random(seed)
    oracle = Classifier()
    copies = 0
    for cookie in range(1, 29):
        action = rng.choice([Action.REDIRECT, Action.DROP, Action.FORWARD, Action.COPY, Action.MULTICAST])
        if action is Action.COPY:
            copies += 1
            if copies > 8:
                action = Action.DROP
        rule = Rule(random_match(rng), action, priority=rng.choice([10, 100, 100, 200]), cookie=cookie,
                    group=7 if action is Action.MULTICAST else None)
        datapath.add(rule)
        oracle.add(rule)
    for _ in range(400):
        pkt = random_packet(rng)
        before = read_counters(datapath)
        expected = oracle.lookup(pkt)
        retval, _ = datapath.test_run(frame(pkt))
        after = read_counters(datapath)
        counted = {c for c in after if after[c] != before[c]}
        want = {r.cookie for r in expected}
        assert counted == want, (pkt, expected)
        for cookie in counted:
            assert after[cookie][0] - before[cookie][0] == 1
            assert after[cookie][1] - before[cookie][1] == len(pkt.payload)
        assert retval == (XDP_DROP if expected.action is Action.DROP else XDP_PASS), (pkt, expected)
    assert datapath.counters() == oracle.counters()


def test_removal_and_slot_reuse_keep_agreeing(datapath):
    rng = random.Random(99)
    oracle = Classifier()
    live = []
    for cookie in range(1, 200):
        if live and rng.random() < 0.45:
            victim = live.pop(rng.randrange(len(live)))
            datapath.remove(victim)
            oracle.remove(victim)
        action = rng.choice([Action.REDIRECT, Action.DROP, Action.FORWARD])
        rule = Rule(random_match(rng), action, priority=rng.choice([1, 50, 100]), cookie=cookie)
        try:
            datapath.add(rule)
        except DatapathRefused:
            continue
        oracle.add(rule)
        live.append(cookie)
    for _ in range(300):
        pkt = random_packet(rng)
        expected = oracle.lookup(pkt)
        retval, _ = datapath.test_run(frame(pkt))
        assert retval == (XDP_DROP if expected.action is Action.DROP else XDP_PASS), (pkt, expected)
    assert datapath.counters() == oracle.counters()


def test_limits_are_refused_not_mis_installed(datapath):
    for cookie in range(1, BUCKET + 1):
        datapath.add(Rule(Match(proto="udp", dst_port=7000), Action.DROP, cookie=cookie))
    with pytest.raises(DatapathRefused, match="candidate list"):
        datapath.add(Rule(Match(proto="udp", dst_port=7000), Action.DROP, cookie=999))
    with pytest.raises(DatapathRefused, match="IPv4"):
        datapath.add(Rule(Match(dst="2001:db8::/32"), Action.DROP, cookie=1000))
    with pytest.raises(DatapathRefused, match="windows"):
        payload_chunks(Rule(Match(payload=tuple(PayloadPattern(i * 20, b"x") for i in range(5))), Action.DROP))
    with pytest.raises(DatapathRefused, match="first"):
        payload_chunks(Rule(Match(payload=(PayloadPattern(1499, b"xy"),)), Action.DROP))


def test_prefix_rules_all_seen_whatever_their_length(datapath):
    """The LPM trie returns the longest prefix only: its list must hold the covering rules too."""
    oracle = Classifier()
    rules = [Rule(Match(dst="10.0.0.0/8"), Action.DROP, priority=300, cookie=1),
             Rule(Match(dst="10.2.0.0/16"), Action.FORWARD, priority=200, cookie=2),
             Rule(Match(dst="10.2.0.2/32"), Action.COPY, priority=1, cookie=3),
             Rule(Match(dst="10.2.0.0/24"), Action.REDIRECT, priority=100, cookie=4)]
    for rule in rules:
        datapath.add(rule)
        oracle.add(rule)
    pkt = Packet(17, "10.1.0.2", 5, "10.2.0.2", 9, b"x")
    assert datapath.test_run(frame(pkt))[0] == XDP_DROP
    oracle.lookup(pkt)
    datapath.remove(1)
    oracle.remove(1)
    assert datapath.test_run(frame(pkt))[0] == XDP_PASS
    oracle.lookup(pkt)
    assert datapath.counters() == oracle.counters()


def test_expired_lease_passes_everything(datapath):
    datapath.add(Rule(Match(proto="udp"), Action.DROP, cookie=1))
    pkt = Packet(17, "10.1.0.2", 5, "10.2.0.2", 9, b"x")
    assert datapath.test_run(frame(pkt))[0] == XDP_DROP
    datapath.set_config(lease_until_ns=0)
    assert datapath.test_run(frame(pkt))[0] == XDP_PASS
    assert datapath.stats()["lease_expired"] == 1
    assert datapath.counters()[1] == (1, 1)   # only the packet it really dropped


def test_pins_are_made_and_removed_by_name(datapath, tmp_path):
    """boxd pins every map and both programs under its directory; unpin removes exactly those."""
    import os
    import subprocess

    from boxcore.engines.xdp_maps import unpin

    mount = tmp_path / "bpffs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mount)], check=True)
    try:
        directory = str(mount / "boxd-1")
        datapath.pin(directory)
        names = set(os.listdir(directory))
        assert {"prog_xdp", "prog_tc", "map_rules", "map_counters", "map_socks", "map_copies"} <= names
        assert unpin(directory) == len(names)
        assert not os.path.exists(directory)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
