"""boxcore.policy: loading (with clear errors), grant coverage, reasons, and
check() against brute-force coverage over a small universe."""

import itertools
from pathlib import Path

import pytest
from hypothesis import example, given, settings, strategies as st

import boxcore
from boxcore.packet import Packet
from boxcore.policy import Policy, PolicyError, grant_region
from boxcore.rules import Action, Match, Rule

EXAMPLE = Path(boxcore.__file__).parent / "policy.example.toml"


def rule(action="redirect", **match):
    group = 1 if action == "multicast" else None
    return Rule(Match(**match), Action.parse(action), group=group)


def test_example_policy_loads_and_decides():
    policy = Policy.load(EXAMPLE)
    assert [g.name for g in policy.grants] == ["fcd", "gnutella", "mmpog", "monitoring"]
    ok = rule(proto="udp", dst="10.1.0.0/16", dst_port=(7000, 7005))
    assert policy.check("fcd-booster", 1000, ok) is None
    assert policy.check("fcd-booster", None, rule(proto="tcp", dst="127.0.0.1", dst_port=8000)) is None
    reason = policy.check("fcd-booster", 1000, rule(proto="udp", dst="10.1.0.0/16", dst_port=80))
    assert "destination ports 7000-7010, 8000, not 80" in reason and "'fcd'" in reason
    reason = policy.check("fcd-booster", 1000, rule(proto="udp", dst_port=7000))
    assert "not any address" in reason
    reason = policy.check("fcd-booster", 1000, rule("multicast", proto="udp", dst="10.0.0.0/8", dst_port=7000))
    assert "not MULTICAST" in reason
    # glob names; uid restrictions
    assert policy.check("gnutella-booster-2", 5, rule(proto="tcp", dst_port=6346)) is None
    assert policy.check("mmpog-reflector", 1000, rule("multicast", proto="udp", dst_port=9001)) is None
    reason = policy.check("mmpog-reflector", 1234, rule("multicast", proto="udp", dst_port=9001))
    assert "(uid 1234)" in reason and "grant 'mmpog' is only for uids 0, 1000" in reason
    assert "only for uids" in policy.check("mmpog-reflector", None, rule(proto="udp", dst_port=9001))
    assert policy.check("mmpog-reflector", None, rule("copy", proto="udp", src_port=53)) is None
    # the catch-all monitoring grant: copies of DNS replies only
    assert policy.check("anything", 7, rule("copy", proto="udp", src_port=53)) is None
    reason = policy.check("anything", 7, rule("redirect", proto="udp", src_port=53))
    assert "allows actions COPY, not REDIRECT" in reason
    # a booster with two applicable grants hears from both
    reason = policy.check("fcd-booster", 0, rule("redirect", proto="icmp"))
    assert "'fcd'" in reason and "'monitoring'" in reason


def test_allow_all():
    assert Policy.allow_all().check("x", None, rule(proto="udp")) is None
    assert Policy.loads("").check("x", 0, rule(proto="udp")) == "booster 'x' (uid 0): no grant in the policy applies"


def test_port_ranges_and_prefixes_are_merged():
    policy = Policy.loads("""
[[grant]]
boosters = "b"
dst_ports = [7000, "7001-7005", "7006"]
dst_prefixes = ["10.0.0.0/9", "10.128.0.0/9"]
""")
    assert policy.check("b", 0, rule(dst="10.0.0.0/8", dst_port=(7000, 7006))) is None
    assert policy.check("b", 0, rule(dst="10.0.0.0/8", dst_port=(7000, 7007))) is not None
    assert policy.check("b", 0, rule(dst="0.0.0.0/0", dst_port=7000)) is not None


def test_users_resolve_to_uids():
    policy = Policy.loads('[[grant]]\nboosters = "b"\nusers = ["root"]\n')
    assert policy.grants[0].uids == frozenset({0})
    assert policy.check("b", 0, rule()) is None
    assert policy.check("b", 1, rule()) is not None


@pytest.mark.parametrize("text, message", [
    ("[[grant]]\nboosters = 'b'\nprotocol = 'udp'\n", "<policy>:1: grant #1: unknown key(s) protocol"),
    ("\n\n[[grant]]\nboosters = 'a'\n[[grant]]\nboosters = 'b'\ndst_ports = ['70-x']\n",
     "<policy>:5: grant #2: dst_ports: '70-x' is not a port"),
    ("[[grant]]\nboosters = 'b'\ndst_ports = ['9-1']\n", "empty"),
    ("[[grant]]\nboosters = 'b'\ndst_ports = 70000\n", "0..65535"),
    ("[[grant]]\nactions = ['redirect']\n", "needs 'boosters'"),
    ("[[grant]]\nboosters = 'b'\nactions = ['teleport']\n", "action must be one of"),
    ("[[grant]]\nboosters = 'b'\nprotocols = ['sctp-ish']\n", "protocols:"),
    ("[[grant]]\nboosters = 'b'\ndst_prefixes = ['10.0.0.1/8']\n", "host bits"),
    ("[[grant]]\nboosters = 'b'\nuids = ['root']\n", "uids: 'root' has the wrong type"),
    ("[[grant]]\nboosters = 'b'\nusers = ['no-such-user-bb']\n", "no such user"),
    ("[[grant]]\nboosters = 'b'\ndst_ports = true\n", "wrong type"),
    ("[grant]\nboosters = 'b'\n", "array of tables"),
    ("[rules]\n", "unknown top-level key(s) rules"),
    ("[[grant]\n", "<policy>: "),
])
def test_bad_policies_raise_config_error(text, message):
    with pytest.raises(PolicyError) as info:
        Policy.loads(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy"):
        Policy.load(tmp_path / "missing.toml")
    bad = tmp_path / "p.toml"
    bad.write_text("[[grant]]\nboosters = 'b'\ncolour = 1\n")
    with pytest.raises(PolicyError, match=rf"{bad}:1: grant #1: unknown key"):
        Policy.load(bad)


def test_describe_is_json_able():
    import json
    json.dumps(Policy.load(EXAMPLE).describe())
    assert Policy.allow_all().describe() == [{"name": "allow-all"}]


# ----------------------------------------- check() vs brute-force coverage

U = [Packet(proto, src, sport, dst, dport, b"")
     for proto, src, dst, sport, dport in itertools.product(
         (6, 17, 1), ("10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"),
         ("10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"), (0, 1, 2, 3), (0, 1, 2, 3))]
PREFIXES = ["10.0.0.0/31", "10.0.0.0/30", "10.0.0.1", "10.0.0.0", "10.0.0.2"]
PORT_ITEMS = ["0", "1", "2", "0-1", "1-2"]


def toml_list(items):
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


@st.composite
def grant_text(draw):
    lines = ["[[grant]]", 'boosters = "b"']
    lines.append(f"actions = {toml_list(draw(st.sets(st.sampled_from(['redirect', 'copy']), min_size=1)))}")
    for key, pool in (("protocols", ["udp", "tcp"]), ("src_prefixes", PREFIXES), ("dst_prefixes", PREFIXES),
                      ("src_ports", PORT_ITEMS), ("dst_ports", PORT_ITEMS)):
        if draw(st.booleans()):
            lines.append(f"{key} = {toml_list(draw(st.sets(st.sampled_from(pool), min_size=1, max_size=3)))}")
    return "\n".join(lines)


small_port = st.one_of(st.none(), st.integers(0, 2),
                       st.tuples(st.integers(0, 2), st.integers(0, 2)).map(lambda t: tuple(sorted(t))))


@st.composite
def small_rule(draw):
    match = Match(proto=draw(st.sampled_from([None, 6, 17])),
                  src=draw(st.sampled_from([None] + PREFIXES)), dst=draw(st.sampled_from([None] + PREFIXES)),
                  src_port=draw(small_port), dst_port=draw(small_port))
    return Rule(match, draw(st.sampled_from([Action.REDIRECT, Action.COPY])))


@settings(max_examples=150, deadline=None)
@given(st.lists(grant_text(), min_size=1, max_size=3), small_rule())
@example(['[[grant]]\nboosters = "b"\ndst_prefixes = ["10.0.0.2", "10.0.0.0/31"]'],
         Rule(Match(dst="10.0.0.0/30"), Action.REDIRECT))
@example(['[[grant]]\nboosters = "b"\ndst_ports = ["0", "1-2"]'], Rule(Match(dst_port=(0, 2)), Action.COPY))
def test_check_equals_brute_force_cover(grants, candidate):
    policy = Policy.loads("\n\n".join(grants))
    in_rule = [p for p in U if candidate.match.matches(p)]

    def grant_allows(grant):
        region = grant_region(grant)
        return (candidate.action in grant.actions
                and all(any(m.matches(p) for m in region) for p in in_rule))

    expected = any(grant_allows(g) for g in policy.grants)
    assert (policy.check("b", 0, candidate) is None) == expected


# ---------------------------------------------------------------- beyond rules (issue 11)

BEYOND = """
[management]
uids = [1000]

[[grant]]
name = "reflector"
boosters = "mmpog-*"
uids = [1000]
actions = ["redirect", "multicast"]
protocols = ["udp"]
dst_prefixes = ["10.0.0.0/8"]
dst_ports = ["9000-9099"]
max_group_members = 3
member_prefixes = ["10.0.0.0/8"]
send = true

[[grant]]
name = "auditor"
boosters = "audit"
actions = ["copy"]
copy_foreign = true
"""


def test_names_bound_by_grants():
    policy = Policy.loads(BEYOND)
    assert policy.may_use_name("mmpog-r", 1000) is None
    assert "binds this name to uid 1000" in policy.may_use_name("mmpog-r", 65534)
    assert policy.may_use_name("unnamed", 65534) is None      # no grant names it: it may register, with nothing
    assert Policy.allow_all().may_use_name("mmpog-r", 65534) is None


def test_queries_need_root_or_management():
    policy = Policy.loads(BEYOND)
    assert policy.may_query(0) is None and policy.may_query(1000) is None
    assert "may not query" in policy.may_query(65534)
    assert Policy.allow_all().may_query(65534) is None


def test_send_needs_a_grant_with_send():
    policy = Policy.loads(BEYOND)
    assert policy.may_send("mmpog-r", 1000, 17, "10.1.1.1", 9000, "10.2.2.2", 9001) is None
    assert "may not send" in policy.may_send("mmpog-r", 1000, 17, "10.1.1.1", 9000, "192.168.1.1", 9001)
    assert "may not send" in policy.may_send("mmpog-r", 65534, 17, "10.1.1.1", 9000, "10.2.2.2", 9001)
    assert "may not send" in policy.may_send("audit", 0, 17, "10.1.1.1", 9000, "10.2.2.2", 9001)
    allow_all = Policy.allow_all()
    assert allow_all.may_send("x", 0, 17, "1.1.1.1", 1, "2.2.2.2", 2) is None
    assert allow_all.may_send("x", 65534, 17, "1.1.1.1", 1, "2.2.2.2", 2) is not None


def test_copy_foreign_and_groups():
    policy = Policy.loads(BEYOND)
    copy = Rule(match=Match(proto="udp", dst_port=9000), action=Action.COPY, priority=1, owner="a", cookie=1)
    assert policy.may_copy_foreign("audit", 65534, copy) is None
    assert "another uid" in policy.may_copy_foreign("mmpog-r", 1000, copy)
    assert Policy.allow_all().may_copy_foreign("x", 0, copy) is None
    assert Policy.allow_all().may_copy_foreign("x", 65534, copy) is not None
    members = [("10.0.0.1", 9000), ("10.0.0.2", 9001)]
    assert policy.check_group("mmpog-r", 1000, members) is None
    assert "does not cover member 192.168.0.1:9000" in policy.check_group("mmpog-r", 1000, [("192.168.0.1", 9000)])
    assert "allows 3 members" in policy.check_group("mmpog-r", 1000, members * 2)
    assert "does not allow multicast" in policy.check_group("audit", 0, members)


@pytest.mark.parametrize("text, message", [
    ("[management]\nuids = [-1]\n", "negative"),
    ("[management]\nwho = 1\n", "unknown key"),
    ('[[grant]]\nboosters = "x"\nsend = "yes"\n', "send must be true or false"),
    ('[[grant]]\nboosters = "x"\nmax_group_members = 0\n', "max_group_members"),
])
def test_bad_new_keys(text, message):
    with pytest.raises(PolicyError, match=message):
        Policy.loads(text)
