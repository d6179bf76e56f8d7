"""booster-lab: topology validation (no privileges needed)."""

import pytest
from hypothesis import given, settings, strategies as st

from boxcore.lab import Topology, TopologyError, load_topology, parse_rate, parse_topology, shipped_topologies


def minimal(**link_overrides):
    link = {"a": {"node": "h1", "iface": "eth0", "addr": "10.1.0.1/24"},
            "b": {"node": "h2", "iface": "eth0", "addr": "10.1.0.2/24"}}
    link.update(link_overrides)
    return {"name": "t", "nodes": {"h1": {"kind": "host"}, "h2": {"kind": "host"}}, "links": [link]}


def test_shipped_topologies_parse():
    assert {"transparent", "three-clusters"} <= set(shipped_topologies())
    transparent = load_topology("transparent")
    assert transparent.nodes["box"].forwards and not transparent.nodes["client"].forwards
    clusters = load_topology("three-clusters")
    hosts = [n for n in clusters.nodes.values() if n.kind == "host"]
    servent_addrs = [a for n in hosts for end in clusters.ends(n.name) for a in end.addrs]
    assert len(servent_addrs) >= 20
    assert sum(1 for link in clusters.links if link.rate_bps) == 3


def test_minimal_topology():
    topo = parse_topology(minimal(rate="10mbit", loss=0.1))
    assert isinstance(topo, Topology)
    assert topo.links[0].rate_bps == 10_000_000 and topo.links[0].loss == 0.1


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t["nodes"]["h1"].update(kind="laptop"), "kind must be one of"),
    (lambda t: t["nodes"]["h1"].update(colour="red"), "unknown key"),
    (lambda t: t["links"][0]["a"].update(node="nobody"), "unknown node"),
    (lambda t: t["links"][0]["a"].update(iface="a-very-long-interface"), "bad interface name"),
    (lambda t: t["links"][0]["a"].update(addr="8.8.8.8/24"), "private IPv4"),
    (lambda t: t["links"][0]["a"].update(addr="172.16.0.1/24"), "private IPv4"),
    (lambda t: t["links"][0]["a"].update(addr="10.1.0.1"), "prefix length"),
    (lambda t: t["links"][0]["a"].update(addr="10.1.0.300/24"), "10.1.0.300"),
    (lambda t: t["links"][0].update(rate="fast"), "bad rate"),
    (lambda t: t["links"][0].update(loss=2), "loss must be"),
    (lambda t: t["links"][0]["b"].update(node="h1", iface="eth1"), "both ends"),
    (lambda t: t["nodes"]["h1"].update(routes=[{"dst": "default", "via": "nowhere"}]), "route 0"),
    (lambda t: t["nodes"]["h1"].update(sysctls={"kernel.panic": 1}), "only net."),
    (lambda t: t.update(name="Bad_Name"), "topology name"),
])
def test_bad_topologies_are_refused_with_a_reason(mutate, message):
    topo = minimal()
    mutate(topo)
    with pytest.raises(TopologyError, match=message):
        parse_topology(topo)


def test_duplicate_interface_refused():
    topo = minimal()
    topo["nodes"]["h3"] = {"kind": "host"}
    topo["links"].append({"a": {"node": "h1", "iface": "eth0"}, "b": {"node": "h3"}})
    with pytest.raises(TopologyError, match="already has an interface"):
        parse_topology(topo)


def test_default_interface_names_are_unique_and_short():
    topo = {"nodes": {"a": {"kind": "router"}, "b-node-with-a-long-name": {"kind": "router"}},
            "links": [{"a": {"node": "a"}, "b": {"node": "b-node-with-a-long-name"}}] * 3}
    parsed = parse_topology(topo)
    names = [link.a.iface for link in parsed.links]
    assert len(set(names)) == 3 and all(len(n) <= 15 for n in names)


def test_missing_file_names_shipped_ones(tmp_path):
    with pytest.raises(TopologyError, match="transparent"):
        load_topology(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("nodes = [")
    with pytest.raises(TopologyError, match="bad TOML"):
        load_topology(bad)


@settings(max_examples=100)
@given(st.integers(1, 10_000), st.sampled_from(["bit", "kbit", "mbit", "gbit"]))
def test_parse_rate_units(value, unit):
    factor = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit]
    assert parse_rate(f"{value}{unit}") == int(value * factor)


@settings(max_examples=100)
@given(st.text(max_size=12))
def test_parse_rate_never_crashes(text):
    try:
        assert parse_rate(text) > 0
    except TopologyError:
        pass


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False, width=32),
              st.sampled_from(["host", "box", "switch", "router", "10.1.0.1/24", "10.1.0.1", "default", "eth0",
                               "100mbit", "a", "b"]), st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(["a", "b", "node", "iface", "addr", "kind", "routes",
                                                                "dst", "via", "rate", "loss", "sysctls", "x"]),
                                               children, max_size=4)),
    max_leaves=12)


def _paths(value, prefix=()):
    """Every path into a nested dict/list structure."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, prefix + (i,))


def _replace(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


VALID = {"name": "t", "description": "d",
         "nodes": {"a": {"kind": "router", "routes": [{"dst": "default", "via": "10.1.0.2"}],
                         "sysctls": {"net.ipv4.conf.all.rp_filter": 0}},
                   "b": {"kind": "host"}, "s": {"kind": "switch"}},
         "links": [{"a": {"node": "a", "iface": "eth0", "addr": ["10.1.0.1/24"]},
                    "b": {"node": "b", "addr": "10.1.0.2/24"}, "rate": "10mbit", "loss": 0.1},
                   {"a": {"node": "s"}, "b": {"node": "a", "iface": "lan", "addr": "10.2.0.1/24"}}]}
ALL_PATHS = list(_paths(VALID))


@settings(max_examples=300)
@given(st.sampled_from(ALL_PATHS), json_values)
def test_malformed_topologies_are_config_errors(path, value):
    """Any one field of a valid topology replaced by anything: a Topology or a TopologyError."""
    assert isinstance(parse_topology(VALID), Topology)
    try:
        assert isinstance(parse_topology(_replace(VALID, path, value)), Topology)
    except TopologyError:
        pass
