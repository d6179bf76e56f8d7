"""``booster-lab``: a network lab of namespaces and veth pairs built from a small TOML topology.

Topology format (every key checked; unknown keys are an error)::

    name = "transparent"                 # default lab name (a random suffix is added)
    description = "client -> box -> server"

    [nodes.client]
    kind = "host"                        # host | router | box | switch
    routes = [{ dst = "default", via = "10.1.0.1" }]
    sysctls = { "net.ipv4.conf.all.rp_filter" = 0 }   # optional

    [nodes.box]
    kind = "box"                         # a router (ip_forward on) where boxd runs

    [[links]]                            # one veth pair
    a = { node = "client", iface = "eth0", addr = "10.1.0.2/24" }
    b = { node = "box", iface = "cli", addr = ["10.1.0.1/24"] }
    rate = "100mbit"                     # optional: tbf on both ends
    loss = 0.01                          # optional: random drop on receive, both ends

``router`` and ``box`` nodes forward IPv4; ``switch`` nodes hold a bridge that enslaves
all their links (a LAN), and their link ends take no address.

Names: a lab called ``NAME`` owns the namespaces ``bbNAME_<node>`` (lab names never contain
``_``), so ``down NAME`` finds everything by prefix even after a crash; veth pairs are created
in the root namespace under ``bb<hash of NAME>...`` temporary names, moved at once into their
namespaces and renamed, and ``down`` removes any such leftover too.  Addresses are only ever
configured inside the lab's namespaces.

Python API (used by tests, demos and experiments)::

    with Lab.up("boxcore/topologies/transparent.toml") as lab:   # or `async with`
        lab.ns("box")                 # -> "bbtransparent-1a2b_box"
        lab.addr("server")            # -> "10.2.0.2"
        proc = lab.popen("server", ["python", "-m", "x"])
        lab.run("client", ["ip", "route"])
        sock = lab.socket("client")   # a UDP socket living in the client's namespace
        lab.set_loss("box", 0.05, iface="srv")
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from cliruntime import ConfigError, make_parser, run_sync

log = logging.getLogger("boxcore.lab")


def _forget_wakeup_fd_in_child() -> None:
    # pyroute2 forks helpers (netns.create, NetNS) and stops them with SIGTERM.  A child that kept
    # the parent's signal wake-up descriptor (an asyncio loop's) would write that SIGTERM into the
    # parent's loop, which would then shut itself down.
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forget_wakeup_fd_in_child)


class LabError(RuntimeError):
    """A lab that cannot be built or taken down here (no root, name taken, links stay down...).

    booster-lab reports it as a configuration error (one line, exit status 2).
    """


class TopologyError(LabError, ValueError):
    """A topology (TOML file or mapping) that is malformed: says where and what is wrong."""

TOPOLOGY_DIR = Path(__file__).with_name("topologies")
STATE_DIR = Path(os.environ.get("BOOSTER_LAB_STATE", "/run/booster-lab"))
NETNS_DIR = Path("/run/netns")

NODE_KINDS = ("host", "router", "box", "switch")
FORWARDING_KINDS = ("router", "box")
LAB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
NODE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,14}$")
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
RATE_UNITS = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}
BRIDGE_NAME = "br0"
LOSS_CHAIN = "BB-LOSS"
# The only addresses a lab may configure: they never leave its namespaces.
LAB_RANGES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.0.0/16"))


# ---------------------------------------------------------------- topology model

@dataclass(frozen=True, slots=True)
class Route:
    dst: str            # "default" or a prefix
    via: str


@dataclass(slots=True)
class Node:
    name: str
    kind: str
    routes: list[Route] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)

    @property
    def forwards(self) -> bool:
        return self.kind in FORWARDING_KINDS


@dataclass(frozen=True, slots=True)
class End:
    node: str
    iface: str
    addrs: tuple[str, ...]      # "10.1.0.2/24" interfaces, possibly empty


@dataclass(frozen=True, slots=True)
class Link:
    a: End
    b: End
    rate_bps: int | None = None
    loss: float = 0.0


@dataclass(slots=True)
class Topology:
    name: str
    description: str
    nodes: dict[str, Node]
    links: list[Link]

    def ends(self, node: str) -> list[End]:
        return [end for link in self.links for end in (link.a, link.b) if end.node == node]


def _expect_keys(where: str, table: Mapping[str, Any], allowed: set[str], required: set[str] = frozenset()) -> None:
    if not isinstance(table, Mapping):
        raise TopologyError(f"{where}: expected a table, got {type(table).__name__}")
    unknown = set(table) - allowed
    if unknown:
        raise TopologyError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    missing = required - set(table)
    if missing:
        raise TopologyError(f"{where}: missing key(s) {', '.join(sorted(missing))}")


def parse_rate(text: str | int) -> int:
    """``"100mbit"`` -> bits per second (tc's units: bit/kbit/mbit/gbit)."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = RATE_RE.match(str(text).strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise TopologyError(f"bad rate {text!r}: expected e.g. '100mbit', '512kbit'")
    return int(float(match.group(1)) * RATE_UNITS[match.group(2)])


def parse_topology(data: Mapping[str, Any]) -> Topology:
    """Validate a topology mapping (a parsed TOML file) and return the model."""
    _expect_keys("topology", data, {"name", "description", "nodes", "links"}, {"nodes"})
    name = _typed("topology name", data.get("name", "lab"), str)
    _typed("topology description", data.get("description", ""), str)
    if not LAB_NAME_RE.match(name):
        raise TopologyError(f"topology name {name!r}: use lowercase letters, digits and '-' (max 40)")
    nodes: dict[str, Node] = {}
    raw_nodes = data["nodes"]
    if not isinstance(raw_nodes, Mapping) or not raw_nodes:
        raise TopologyError("topology: [nodes] must name at least one node")
    for node_name, spec in raw_nodes.items():
        where = f"node {node_name!r}"
        if not isinstance(node_name, str) or not NODE_NAME_RE.match(node_name):
            raise TopologyError(f"{where}: use lowercase letters, digits and '-' (max 32)")
        _expect_keys(where, spec, {"kind", "routes", "sysctls"}, {"kind"})
        kind = spec["kind"]
        if kind not in NODE_KINDS:
            raise TopologyError(f"{where}: kind must be one of {', '.join(NODE_KINDS)}, got {kind!r}")
        routes = []
        for i, route in enumerate(_typed(f"{where} routes", spec.get("routes", []), list)):
            _expect_keys(f"{where} route {i}", route, {"dst", "via"}, {"dst", "via"})
            dst = _typed(f"{where} route {i} dst", route["dst"], str)
            _typed(f"{where} route {i} via", route["via"], str)
            try:
                if dst != "default":
                    dst = str(ipaddress.ip_network(dst, strict=False))
                via = str(ipaddress.ip_address(route["via"]))
            except ValueError as exc:
                raise TopologyError(f"{where} route {i}: {exc}") from None
            routes.append(Route(dst, via))
        if kind == "switch" and routes:
            raise TopologyError(f"{where}: a switch takes no routes")
        sysctls = spec.get("sysctls", {})
        if not isinstance(sysctls, Mapping):
            raise TopologyError(f"{where}: sysctls must be a table")
        for key, value in sysctls.items():
            if not isinstance(key, str) or not re.match(r"^net\.[A-Za-z0-9_.-]+$", key):
                raise TopologyError(f"{where}: only net.* sysctls are per-namespace, got {key!r}")
            _typed(f"{where} sysctl {key}", value, (int, str, bool))
        nodes[node_name] = Node(node_name, kind, routes, {k: str(int(v) if isinstance(v, bool) else v) for k, v in sysctls.items()})

    links: list[Link] = []
    used_ifaces: dict[str, set[str]] = {name: {"lo"} for name in nodes}
    for i, spec in enumerate(_typed("topology links", data.get("links", []), list)):
        where = f"link {i}"
        _expect_keys(where, spec, {"a", "b", "rate", "loss"}, {"a", "b"})
        ends = []
        for side in ("a", "b"):
            end = spec[side]
            _expect_keys(f"{where}.{side}", end, {"node", "iface", "addr"}, {"node"})
            node_name = _typed(f"{where}.{side} node", end["node"], str)
            if node_name not in nodes:
                raise TopologyError(f"{where}.{side}: unknown node {node_name!r}")
            peer = spec["b" if side == "a" else "a"]
            iface = _typed(f"{where}.{side} iface", end.get("iface"), (str, type(None))) or _default_ifname(
                str(peer.get("node", "x")) if isinstance(peer, Mapping) else "x", used_ifaces[node_name])
            if not IFNAME_RE.match(iface) or iface == BRIDGE_NAME and nodes[node_name].kind == "switch":
                raise TopologyError(f"{where}.{side}: bad interface name {iface!r} (max 15 chars)")
            if iface in used_ifaces[node_name]:
                raise TopologyError(f"{where}.{side}: node {node_name!r} already has an interface {iface!r}")
            used_ifaces[node_name].add(iface)
            raw_addrs = _typed(f"{where}.{side} addr", end.get("addr", []), (str, list))
            if isinstance(raw_addrs, str):
                raw_addrs = [raw_addrs]
            addrs = []
            for text in _typed(f"{where}.{side} addr", raw_addrs, list):
                _typed(f"{where}.{side} addr", text, str)
                try:
                    iface_addr = ipaddress.ip_interface(text)
                except ValueError as exc:
                    raise TopologyError(f"{where}.{side}: {exc}") from None
                if iface_addr.version != 4 or not any(iface_addr.ip in net for net in LAB_RANGES):
                    raise TopologyError(f"{where}.{side}: {text!r}: use private IPv4 ranges (10.x, 192.168.x) only")
                if "/" not in text:
                    raise TopologyError(f"{where}.{side}: {text!r}: give a prefix length, e.g. 10.1.0.2/24")
                addrs.append(str(iface_addr))
            if nodes[node_name].kind == "switch" and addrs:
                raise TopologyError(f"{where}.{side}: a switch port takes no address")
            ends.append(End(node_name, iface, tuple(addrs)))
        if ends[0].node == ends[1].node:
            raise TopologyError(f"{where}: both ends on node {ends[0].node!r}")
        rate = parse_rate(spec["rate"]) if "rate" in spec else None
        loss = spec.get("loss", 0.0)
        if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not 0 <= loss <= 1:
            raise TopologyError(f"{where}: loss must be a probability in [0, 1], got {loss!r}")
        links.append(Link(ends[0], ends[1], rate, float(loss)))
    return Topology(name, str(data.get("description", "")), nodes, links)


def _typed(what: str, value: Any, kinds: type | tuple[type, ...]) -> Any:
    """``value`` if it has one of ``kinds`` (bool is never an int here), else a TopologyError."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("nothing" if k is type(None) else k.__name__ for k in kinds)
        raise TopologyError(f"{what}: expected {names}, got {type(value).__name__} {value!r:.40}")
    return value


def _default_ifname(peer: str, used: set[str]) -> str:
    base = peer[:13]
    candidate, n = base, 1
    while candidate in used:
        candidate = f"{base[:12]}{n}"
        n += 1
    return candidate


def load_topology(source: str | os.PathLike | Mapping[str, Any]) -> Topology:
    """A topology from a mapping, a file path, or the name of a shipped topology."""
    if isinstance(source, Mapping):
        return parse_topology(source)
    path = Path(source)
    if not path.exists() and not path.suffix:
        shipped = TOPOLOGY_DIR / f"{path.name}.toml"
        if shipped.exists():
            path = shipped
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise TopologyError(f"no topology file {str(source)!r} (shipped: {', '.join(shipped_topologies())})") from None
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{path}: bad TOML: {exc}") from None
    return parse_topology(data)


def shipped_topologies() -> list[str]:
    return sorted(p.stem for p in TOPOLOGY_DIR.glob("*.toml"))


# ---------------------------------------------------------------- names

def ns_name(lab: str, node: str) -> str:
    return f"bb{lab}_{node}"


def _ns_prefix(lab: str) -> str:
    return f"bb{lab}_"


def _tmp_prefix(lab: str) -> str:
    # Root-namespace veth names exist only for a moment, but a crash can strand them.
    return "bb" + hashlib.sha1(lab.encode()).hexdigest()[:6]


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _check_root() -> None:
    if os.geteuid() != 0:
        raise LabError("booster-lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to build namespaces")


# ---------------------------------------------------------------- the lab

class Lab:
    """A running lab.  Build it with :meth:`Lab.up`; use as a (sync or async) context manager."""

    def __init__(self, name: str, topology: Topology) -> None:
        self.name = name
        self.topology = topology
        self._closed = False

    # -- building

    @classmethod
    def up(cls, topology: str | os.PathLike | Mapping[str, Any] | Topology, name: str | None = None) -> "Lab":
        """Build the lab now and return it; tear it down with :meth:`down` or by leaving a ``with``."""
        _check_root()
        topo = topology if isinstance(topology, Topology) else load_topology(topology)
        if name is None:
            name = f"{topo.name[:33]}-{secrets.token_hex(3)}"
        if not LAB_NAME_RE.match(name):
            raise LabError(f"lab name {name!r}: use lowercase letters, digits and '-' (max 40)")
        existing = [ns for ns in _list_netns() if ns.startswith(_ns_prefix(name))]
        if existing:
            raise LabError(f"lab {name!r} is already up ({len(existing)} namespaces); run: booster-lab down {name}")
        lab = cls(name, topo)
        try:
            _off_loop(lab._build)
        except BaseException:
            _off_loop(down, name)
            raise
        return lab

    @classmethod
    async def up_async(cls, topology: str | os.PathLike | Mapping[str, Any] | Topology,
                       name: str | None = None) -> "Lab":
        """:meth:`up` without blocking the event loop."""
        return await asyncio.to_thread(cls.up, topology, name)

    def _build(self) -> None:
        from pyroute2 import IPRoute, NetNS, netns

        started = time.monotonic()
        self._write_state()
        topo = self.topology
        for node in topo.nodes.values():
            netns.create(self.ns(node.name))
        tmp = _tmp_prefix(self.name)
        with IPRoute() as ipr:
            for i, link in enumerate(topo.links):
                tmp_a, tmp_b = f"{tmp}{i:x}a", f"{tmp}{i:x}b"
                ipr.link("add", ifname=tmp_a, kind="veth", peer={"ifname": tmp_b})
                for tmp_name, end in ((tmp_a, link.a), (tmp_b, link.b)):
                    index = ipr.link_lookup(ifname=tmp_name)[0]
                    ipr.link("set", index=index, net_ns_fd=self.ns(end.node))
        for node in topo.nodes.values():
            ns = self.ns(node.name)
            with NetNS(ns) as nl:
                nl.link("set", index=nl.link_lookup(ifname="lo")[0], state="up")
                bridge = None
                if node.kind == "switch":
                    nl.link("add", ifname=BRIDGE_NAME, kind="bridge")
                    bridge = nl.link_lookup(ifname=BRIDGE_NAME)[0]
                    nl.link("set", index=bridge, state="up")
                for i, link in enumerate(topo.links):
                    for suffix, end in (("a", link.a), ("b", link.b)):
                        if end.node != node.name:
                            continue
                        index = nl.link_lookup(ifname=f"{tmp}{i:x}{suffix}")[0]
                        nl.link("set", index=index, ifname=end.iface)
                        for text in end.addrs:
                            iface_addr = ipaddress.ip_interface(text)
                            nl.addr("add", index=index, address=str(iface_addr.ip),
                                    prefixlen=iface_addr.network.prefixlen)
                        if bridge is not None:
                            nl.link("set", index=index, master=bridge)
                        nl.link("set", index=index, state="up")
                        if link.rate_bps:
                            # burst must hold at least one MTU-sized frame per timer tick
                            burst = max(link.rate_bps // 8 // 250, 16 * 1514)
                            nl.tc("add", "tbf", index, rate=link.rate_bps // 8, burst=burst, latency="50ms")
                for route in node.routes:
                    if route.dst == "default":
                        nl.route("add", dst="0.0.0.0/0", gateway=route.via)
                    else:
                        nl.route("add", dst=route.dst, gateway=route.via)
            sysctls = dict(node.sysctls)
            if node.forwards:
                sysctls.setdefault("net.ipv4.ip_forward", "1")
            if sysctls:
                self._sysctl(ns, sysctls)
        for link in topo.links:
            if link.loss:
                for end in (link.a, link.b):
                    self.set_loss(end.node, link.loss, iface=end.iface)
        self._wait_links_up()
        log.info("lab %s up: %d nodes, %d links in %.2fs", self.name, len(topo.nodes), len(topo.links),
                 time.monotonic() - started)

    def _wait_links_up(self, timeout: float = 5.0) -> None:
        """Return once every link end has carrier: a packet sent before that is dropped, and
        the ARP request it triggers is only retried a second later."""
        from pyroute2 import NetNS

        deadline = time.monotonic() + timeout
        for node in self.topology.nodes.values():
            wanted = {end.iface for end in self.topology.ends(node.name)}
            if not wanted:
                continue
            with NetNS(self.ns(node.name)) as nl:
                while True:
                    states = {link.get("ifname"): link.get("operstate") for link in nl.get_links()}
                    if all(states.get(iface) == "UP" for iface in wanted):
                        break
                    if time.monotonic() > deadline:
                        down_ifaces = sorted(i for i in wanted if states.get(i) != "UP")
                        raise LabError(f"lab {self.name}: {node.name} interfaces {down_ifaces} stay down")
                    time.sleep(0.01)

    @staticmethod
    def _sysctl(ns: str, values: Mapping[str, str]) -> None:
        from pyroute2 import netns

        # /proc/sys/net resolves against the calling thread's namespace
        netns.pushns(ns)
        try:
            for key, value in values.items():
                path = Path("/proc/sys") / key.replace(".", "/")
                try:
                    path.write_text(f"{value}\n")
                except OSError as exc:
                    raise LabError(f"sysctl {key}={value} in {ns}: {exc.strerror}") from None
        finally:
            netns.popns()

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            "name": self.name,
            "topology": self.topology.name,
            "pid": os.getpid(),
            "created": time.time(),
            "nodes": {n.name: {"kind": n.kind, "ns": self.ns(n.name),
                               "addrs": [a for end in self.topology.ends(n.name) for a in end.addrs]}
                      for n in self.topology.nodes.values()},
        }
        (STATE_DIR / f"{self.name}.json").write_text(json.dumps(state, indent=2) + "\n")

    # -- queries

    def ns(self, node: str) -> str:
        """The namespace name of ``node``."""
        if node not in self.topology.nodes:
            raise KeyError(f"lab {self.name!r} has no node {node!r} (nodes: {', '.join(self.topology.nodes)})")
        return ns_name(self.name, node)

    def addrs(self, node: str, iface: str | None = None) -> list[str]:
        """Every address of ``node`` (or of one of its interfaces), without prefix length."""
        self.ns(node)
        return [str(ipaddress.ip_interface(a).ip) for end in self.topology.ends(node)
                if iface is None or end.iface == iface for a in end.addrs]

    def addr(self, node: str, iface: str | None = None) -> str:
        """The first address of ``node`` (or of its interface ``iface``)."""
        found = self.addrs(node, iface)
        if not found:
            raise KeyError(f"node {node!r} has no address" + (f" on {iface!r}" if iface else ""))
        return found[0]

    def iface(self, node: str, peer: str) -> str:
        """The interface of ``node`` on its link to ``peer``."""
        for link in self.topology.links:
            for here, there in ((link.a, link.b), (link.b, link.a)):
                if here.node == node and there.node == peer:
                    return here.iface
        raise KeyError(f"no link between {node!r} and {peer!r}")

    @property
    def nodes(self) -> list[str]:
        return list(self.topology.nodes)

    # -- running things inside

    def command(self, node: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node), *argv]

    def popen(self, node: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` inside ``node``'s namespace."""
        return subprocess.Popen(self.command(node, argv), **kwargs)

    def run(self, node: str, argv: Sequence[str], check: bool = True, timeout: float = 30,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``node`` and wait; output captured as text."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(node, argv), check=check, timeout=timeout, **kwargs)

    def socket(self, node: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:
        """A socket created inside ``node``'s namespace (it stays there for its whole life)."""
        from pyroute2 import netns

        netns.pushns(self.ns(node))
        try:
            return socket.socket(family, type, proto)
        finally:
            netns.popns()

    @contextlib.contextmanager
    def inside(self, node: str) -> Iterator[None]:
        """Run a block with the calling thread inside ``node``'s namespace (sockets made there stay)."""
        from pyroute2 import netns

        netns.pushns(self.ns(node))
        try:
            yield
        finally:
            netns.popns()

    def set_loss(self, node: str, probability: float, iface: str | None = None) -> None:
        """Drop received packets at random with ``probability`` (0 removes the loss).

        No netem on this kernel: iptables ``statistic`` in the raw table's PREROUTING, so the
        drop hits both forwarded and locally delivered packets.
        """
        if not 0 <= probability <= 1:
            raise LabError(f"loss probability must be in [0, 1], got {probability}")
        chain = f"{LOSS_CHAIN}-{iface}" if iface else LOSS_CHAIN
        lines = ["*raw", f":{chain} - [0:0]", f"-F {chain}"]
        if probability > 0:
            lines.append(f"-A {chain} -m statistic --mode random --probability {probability:.6f} -j DROP")
        lines.append("COMMIT")
        self.run(node, ["iptables-restore", "--noflush"], input="\n".join(lines) + "\n")
        jump = ["PREROUTING"] + (["-i", iface] if iface else []) + ["-j", chain]
        present = self.run(node, ["iptables", "-t", "raw", "-C", *jump], check=False).returncode == 0
        if not present:
            self.run(node, ["iptables", "-t", "raw", "-I", *jump])

    # -- teardown

    def down(self) -> int:
        """Remove everything this lab made; returns how many objects were removed."""
        if self._closed:
            return 0
        self._closed = True
        return _off_loop(down, self.name)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    async def __aenter__(self) -> "Lab":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.down)

    def __repr__(self) -> str:
        return f"<Lab {self.name} nodes={','.join(self.topology.nodes)}>"


def _off_loop(fn, *args):
    """Call ``fn`` here, or in a worker thread when this thread runs an event loop.

    pyroute2's synchronous API drives its own event loop and refuses to run inside another.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def down(name: str) -> int:
    """Remove every namespace, stray veth and state file of lab ``name``, even after a crash.

    Processes still running in the lab's namespaces are killed (they would keep the
    namespace's interfaces alive).  Returns the number of objects removed.
    """
    from pyroute2 import IPRoute, netns

    if not LAB_NAME_RE.match(name):
        raise LabError(f"lab name {name!r}: use lowercase letters, digits and '-'")
    removed = 0
    mine = [ns for ns in _list_netns() if ns.startswith(_ns_prefix(name))]
    if mine:
        pids = netns.ns_pids()
        victims = [pid for ns in mine for pid in pids.get(ns, []) if pid != os.getpid()]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 2
        while victims and time.monotonic() < deadline:
            victims = [pid for pid in victims if Path(f"/proc/{pid}").exists()
                       and not _is_zombie(pid)]
            if victims:
                time.sleep(0.01)
    for ns in mine:
        try:
            netns.remove(ns)
            removed += 1
        except OSError as exc:
            log.warning("cannot remove namespace %s: %s", ns, exc)
    tmp = _tmp_prefix(name)
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifname = link.get("ifname") or ""
            if ifname.startswith(tmp):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=link["index"])
                    removed += 1
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{name}.json").unlink()
        removed += 1
    return removed


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def list_labs() -> list[dict[str, Any]]:
    """Labs known from state files, plus namespaces of labs whose state file is gone."""
    present = _list_netns()
    labs: dict[str, dict[str, Any]] = {}
    if STATE_DIR.exists():
        for path in sorted(STATE_DIR.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(path.read_text())
                name = state["name"]
                labs[name] = {"name": name, "topology": state.get("topology", "?"),
                              "nodes": sorted(state.get("nodes", {})), "namespaces": 0}
    for ns in present:
        if not ns.startswith("bb") or "_" not in ns:
            continue
        lab, _, node = ns[2:].partition("_")
        if not LAB_NAME_RE.match(lab):
            continue
        entry = labs.setdefault(lab, {"name": lab, "topology": "? (no state file)", "nodes": [], "namespaces": 0})
        entry["namespaces"] += 1
        if node not in entry["nodes"]:
            entry["nodes"].append(node)
    return sorted(labs.values(), key=lambda e: e["name"])


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "booster-lab",
        "Build and tear down network labs (namespaces + veth pairs) from TOML topologies.",
        examples=[
            "booster-lab up transparent                 # a shipped topology; lab named 'transparent'",
            "booster-lab up my.toml --name t1",
            "booster-lab ls",
            "booster-lab exec t1 client -- ip route",
            "booster-lab down t1",
        ],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_up = sub.add_parser("up", help="build a lab from a topology file (or a shipped topology name)")
    p_up.add_argument("topology", help=f"TOML file, or one of: {', '.join(shipped_topologies())}")
    p_up.add_argument("--name", help="lab name (default: the topology's name, plus a random suffix if taken)")
    p_up.add_argument("--json", action="store_true", help="print the lab as JSON")
    p_down = sub.add_parser("down", help="remove a lab and anything it left behind")
    p_down.add_argument("name")
    sub.add_parser("ls", help="list labs")
    p_exec = sub.add_parser("exec", help="run a command inside a node: exec [NAME] NODE -- CMD...")
    p_exec.add_argument("words", nargs=argparse.REMAINDER, help="[NAME] NODE -- CMD...")
    return parser


def _cli(args: argparse.Namespace, stats) -> int:
    if args.command == "ls":
        for entry in list_labs():
            gone = "  (gone: only its state file is left; `down` removes it)" if not entry["namespaces"] else ""
            print(f"{entry['name']:<32} {entry['topology']:<20} namespaces={entry['namespaces']:<3} "
                  f"nodes={','.join(entry['nodes'])}{gone}")
        return 0
    _check_root()
    if args.command == "up":
        name = args.name
        if name is None:
            # on the command line a lab is named after its topology (so `down transparent`
            # works), with a suffix only when that name is taken
            topo = load_topology(args.topology)
            taken = {e["name"] for e in list_labs()}
            name = topo.name if topo.name not in taken else None
        lab = Lab.up(args.topology, name=name)
        stats["nodes"] = len(lab.nodes)
        if args.json:
            print(json.dumps({"name": lab.name, "nodes": {n: {"ns": lab.ns(n), "addrs": lab.addrs(n)}
                                                        for n in lab.nodes}}, indent=2))
        else:
            print(lab.name)
            for node in lab.nodes:
                print(f"  {node:<12} {lab.topology.nodes[node].kind:<7} {lab.ns(node):<36} {' '.join(lab.addrs(node))}")
        return 0
    if args.command == "down":
        removed = down(args.name)
        stats["removed"] = removed
        if removed == 0:
            print(f"booster-lab: nothing left of lab {args.name!r}", file=sys.stderr)
        return 0
    if args.command == "exec":
        words = list(args.words)
        if "--" not in words:
            raise ConfigError("usage: booster-lab exec [NAME] NODE -- CMD...")
        cut = words.index("--")
        where, cmd = words[:cut], words[cut + 1:]
        if not cmd:
            raise ConfigError("no command after '--'")
        if len(where) == 2:
            lab, node = where
        elif len(where) == 1:
            labs = [e["name"] for e in list_labs() if e["namespaces"]]
            if len(labs) != 1:
                raise ConfigError(f"name the lab: {len(labs)} labs are up ({', '.join(labs) or 'none'})")
            lab, node = labs[0], where[0]
        else:
            raise ConfigError("usage: booster-lab exec [NAME] NODE -- CMD...")
        ns = ns_name(lab, node)
        if ns not in _list_netns():
            raise ConfigError(f"no node {node!r} in lab {lab!r} (namespace {ns} not found)")
        sys.stdout.flush()
        os.execvp("ip", ["ip", "netns", "exec", ns, *cmd])
    return 2


def main(argv: list[str] | None = None) -> int:
    return run_sync(build_parser(), _cli, argv, config_errors=(LabError,))


if __name__ == "__main__":
    sys.exit(main())
