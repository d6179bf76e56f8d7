"""LPM trie and multi-field table against brute-force references."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npdrv import wire
from npdrv.tables import LpmTable, RuleTable, TableFull
from npdrv.wire import NpAction, NpRule

from npdrv_strategies import networks, np_rules, u32


def _brute_lpm(prefixes: dict, addr: int):
    best = None
    for (net, plen), value in prefixes.items():
        if addr & wire.prefix_mask(plen) == net and (best is None or plen > best[0]):
            best = (plen, value)
    return best[1] if best else None


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), networks()), max_size=60), probes=st.lists(u32, max_size=30))
def test_lpm_matches_brute_force_under_inserts_and_deletes(ops, probes):
    table, reference = LpmTable(), {}
    for i, (insert, text) in enumerate(ops):
        net = ipaddress.IPv4Network(text)
        key = (int(net.network_address), net.prefixlen)
        if insert:
            table.add(key, i)
            reference[key] = i
        else:
            assert table.delete(key) == (key in reference)
            reference.pop(key, None)
    probes = probes + [net for net, _ in reference] + [net | 0xFF for net, _ in reference]
    for addr in probes:
        assert table.lookup(addr) == _brute_lpm(reference, addr)
    for net, plen in list(reference):
        table.delete((net, plen))
    assert not table._root.children     # churn leaves no empty nodes behind


def test_lpm_limit_refuses_and_counts():
    table = LpmTable(limit=2)
    table.add((0x0A000000, 8), "a")
    table.add((0x0A000000, 8), "a2")          # replacing an entry is not growth
    table.add((0x0B000000, 8), "b")
    with pytest.raises(TableFull):
        table.add((0x0C000000, 8), "c")
    assert table.stats["refused_full"] == 1


def _matches(rule: NpRule, proto, src, dst, sport, dport, payload) -> bool:
    if proto & rule.proto_mask != rule.proto or src & rule.src_mask != rule.src \
            or dst & rule.dst_mask != rule.dst:
        return False
    if (rule.sport, rule.dport) != ((0, 0xFFFF), (0, 0xFFFF)):
        if sport < 0 or not (rule.sport[0] <= sport <= rule.sport[1] and rule.dport[0] <= dport <= rule.dport[1]):
            return False
    for p in rule.patterns:
        chunk = payload[p.offset:p.offset + len(p.value)]
        if len(chunk) != len(p.value) or any(c & m != v for c, m, v in zip(chunk, p.mask, p.value)):
            return False
    return True


@st.composite
def bucketed_rules(draw):
    """Rules shaped to land in every index: exact 5-tuples, dst-port buckets and wildcards."""
    kind = draw(st.integers(0, 2))
    rid = draw(u32)
    prio = draw(st.integers(0, 5))
    action = draw(st.sampled_from([NpAction.REDIRECT, NpAction.COPY, NpAction.DROP, NpAction.FORWARD]))
    if kind == 0:
        return NpRule(rid, prio, action, proto=17, proto_mask=0xFF, src=draw(st.integers(1, 3)),
                      src_mask=0xFFFFFFFF, dst=draw(st.integers(1, 3)), dst_mask=0xFFFFFFFF,
                      sport=(s := draw(st.integers(1, 3)), s), dport=(d := draw(st.integers(1, 3)), d))
    if kind == 1:
        lo = draw(st.integers(1, 3))
        return NpRule(rid, prio, action, proto=17, proto_mask=0xFF, dport=(lo, lo + draw(st.integers(0, 2))))
    return draw(np_rules()).__class__(rid, prio, action, dst=draw(st.integers(0, 3)) & 2, dst_mask=2)


@settings(max_examples=100, deadline=None)
@given(rules=st.lists(st.one_of(bucketed_rules(), np_rules()), max_size=25, unique_by=lambda r: r.rule_id),
       packets=st.lists(st.tuples(st.sampled_from([6, 17, 1]), st.integers(0, 4), st.integers(0, 4),
                                  st.integers(0, 4), st.integers(0, 4), st.binary(max_size=8)), max_size=20),
       removed=st.sets(st.integers(0, 24), max_size=5))
def test_rule_table_matches_brute_force(rules, packets, removed):
    table = RuleTable()
    for rule in rules:
        table.insert(rule)
    live = [r for i, r in enumerate(rules) if i not in removed]
    for i in removed:
        if i < len(rules):
            assert table.delete(rules[i].rule_id)
    for proto, src, dst, sport, dport, payload in packets:
        if proto == 1:
            sport = dport = -1
        best, copies = table.lookup(proto, src, dst, sport, dport, payload)
        matching = [r for r in live if _matches(r, proto, src, dst, sport, dport, payload)]
        terminal = sorted((r for r in matching if r.action is not NpAction.COPY),
                          key=lambda r: (-r.priority, r.rule_id))
        assert (best.rule if best else None) == (terminal[0] if terminal else None)
        assert sorted(c.rule_id for c in copies) == sorted(r.rule_id for r in matching
                                                           if r.action is NpAction.COPY)


def test_rule_lookup_reads_one_bucket_whatever_the_rule_count():
    table = RuleTable(limit=5000)
    for port in range(1, 2001):
        table.insert(NpRule(port, 100, NpAction.REDIRECT, proto=17, proto_mask=0xFF, dport=(port, port)))
    # Everything but the packet's own (protocol, dst port) bucket is never looked at.
    assert len(table._buckets[(17, 1500)]) == 1 and not table._wild
    best, _ = table.lookup(17, 1, 2, 999, 1500, b"")
    assert best.rule_id == 1500
    with pytest.raises(TableFull):
        RuleTable(limit=0).insert(NpRule(1))
