"""Hypothesis strategies for guided-frame bodies (shared by the npdrv tests)."""

from hypothesis import strategies as st

from npdrv import wire

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
macs = st.binary(min_size=6, max_size=6)


@st.composite
def networks(draw):
    plen = draw(st.integers(0, 32))
    addr = draw(u32) & wire.prefix_mask(plen)
    return f"{wire.ip_text(addr)}/{plen}"


@st.composite
def value_masks(draw, bits):
    mask = draw(st.integers(0, (1 << bits) - 1))
    return draw(st.integers(0, (1 << bits) - 1)) & mask, mask


@st.composite
def port_ranges(draw):
    lo = draw(u16)
    return lo, draw(st.integers(lo, 0xFFFF))


@st.composite
def patterns(draw):
    length = draw(st.integers(1, wire.MAX_PATTERN_LEN))
    mask = draw(st.binary(min_size=length, max_size=length))
    value = bytes(v & m for v, m in zip(draw(st.binary(min_size=length, max_size=length)), mask))
    return wire.Pattern(draw(st.integers(0, wire.MAX_PATTERN_OFFSET)), value, mask)


@st.composite
def np_rules(draw):
    action = draw(st.sampled_from(list(wire.NpAction)))
    group = draw(st.integers(1, 0xFFFF)) if action is wire.NpAction.MULTICAST else 0
    proto, proto_mask = draw(value_masks(8))
    src, src_mask = draw(value_masks(32))
    dst, dst_mask = draw(value_masks(32))
    return wire.NpRule(draw(u32), draw(st.integers(-(2 ** 31), 2 ** 31 - 1)), action, group, proto,
                       proto_mask, src, src_mask, dst, dst_mask, draw(port_ranges()), draw(port_ranges()),
                       tuple(draw(st.lists(patterns(), max_size=wire.MAX_PATTERNS))))


ips = u32.map(wire.ip_text)
members = st.tuples(ips, st.integers(1, 0xFFFF))

request_bodies = st.one_of(
    st.builds(wire.Echo, st.binary(max_size=64)),
    st.builds(wire.PortConfig, st.integers(0, 0xFE), st.booleans(), st.integers(68, 9216), macs),
    st.builds(wire.FwdAdd, networks(), st.integers(0, 0xFF), macs),
    st.builds(wire.FwdDelete, networks()),
    np_rules(),
    st.builds(wire.McastSet, st.integers(1, 0xFFFF), st.lists(members, max_size=20).map(tuple)),
    st.builds(wire.CodeLoad, st.from_regex(r"\A[a-z0-9][a-z0-9_.-]{0,31}\Z")),
    st.builds(wire.DumpRequest, st.sampled_from(list(wire.Table))),
)


@st.composite
def request_commands(draw):
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return wire.request(wire.RuleRef(draw(u32)), draw(st.sampled_from([wire.Cmd.RULE_DELETE,
                                                                           wire.Cmd.RULE_READ])))
    if choice == 1:
        return wire.request(wire.CounterRef(draw(st.sampled_from(list(wire.Scope))), draw(u32)),
                            draw(st.sampled_from([wire.Cmd.COUNTERS_READ, wire.Cmd.COUNTERS_CLEAR])))
    return wire.request(draw(request_bodies))
