"""Network namespace plumbing for the emulated card (iproute2 and setns(2), no boxcore).

The card's own topology, made by ``np4gs3-emu --create`` (names are per namespace)::

    port peers (given)      card namespace NAME               box namespace (--box-netns)
    NS0:IF0  ----veth----   p0   \\                    /   h0 ----veth---- np0   host iface of port 0
    NS1:IF1  ----veth----   p1    }-- np4gs3-emu ----{    h1 ----veth---- np1   host iface of port 1
                                                     \\   cp ----veth---- npc   control interface
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
CARD_PORTS = ("p0", "p1")
CARD_HOST_IFACES = ("h0", "h1")
CARD_CONTROL = "cp"
BOX_HOST_IFACES = ("np0", "np1")
BOX_CONTROL = "npc"

# The same topology as a booster-lab file (np4gs3-emu attaches to its "card" node).
LAB_TOPOLOGY = Path(__file__).with_name("topologies") / "np-transparent.toml"

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    """A namespace or link of the card that cannot be made, found or entered."""


def _setns_fd(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)}")


def enter(name: str) -> None:
    """Move the calling thread into namespace ``name`` for good (sockets made after live there)."""
    try:
        fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    except OSError as exc:
        raise NetnsError(f"no network namespace {name!r}: {exc.strerror}") from None
    try:
        _setns_fd(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(name: str | None) -> Iterator[None]:
    """Run a block in namespace ``name`` (None: stay), then come back."""
    if name is None:
        yield
        return
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter(name)
        try:
            yield
        finally:
            _setns_fd(saved)
    finally:
        os.close(saved)


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def ip(*argv: str, netns: str | None = None) -> str:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def link_mac(ifname: str, netns: str | None = None) -> str:
    (info,) = json.loads(ip("-j", "link", "show", "dev", ifname, netns=netns))
    return info["address"]


SEGMENTATION_OFFLOADS = ("tx-generic-segmentation", "tx-tcp-segmentation", "tx-tcp-ecn-segmentation",
                         "tx-tcp-mangleid-segmentation", "tx-tcp6-segmentation", "tx-udp-segmentation")


def no_segmentation_offload(ifname: str, netns: str | None = None) -> None:
    """Make the kernel hand ``ifname`` wire-sized frames (no TSO/GSO super-frames): the card,
    like a real NIC without segmentation offload, forwards frames as they come."""
    from pyroute2.ethtool import Ethtool

    with inside(netns):
        ethtool = Ethtool()
        try:
            features = ethtool.get_features(ifname)
            for name in SEGMENTATION_OFFLOADS:
                if name in features.features:
                    features.features[name].enable = False
            ethtool.set_features(ifname, features)
        finally:
            ethtool.close()


def _sysctl(netns: str, key: str, value: str) -> None:
    with inside(netns):
        with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
            fh.write(value)


@dataclass
class CardTopology:
    name: str
    box_netns: str
    host_macs: tuple[str, ...]


def create_card(name: str, box_netns: str, port_peers: list[tuple[str, str]]) -> CardTopology:
    """Create the card namespace and its veth pairs (see the module docstring)."""
    if exists(name):
        raise NetnsError(f"namespace {name!r} already exists")
    for ns in [box_netns] + [ns for ns, _ in port_peers]:
        if not exists(ns):
            raise NetnsError(f"no network namespace {ns!r}")
    ip("netns", "add", name)
    try:
        ip("link", "set", "lo", "up", netns=name)
        # The card is no IP host: no IPv6 chatter from its own interfaces.
        _sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")
        _sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1")
        pairs = [(CARD_PORTS[i], ns, ifname) for i, (ns, ifname) in enumerate(port_peers)]
        pairs += [(CARD_HOST_IFACES[i], box_netns, BOX_HOST_IFACES[i]) for i in range(len(port_peers))]
        pairs.append((CARD_CONTROL, box_netns, BOX_CONTROL))
        for card_if, peer_ns, peer_if in pairs:
            ip("link", "add", card_if, "type", "veth", "peer", "name", peer_if, "netns", peer_ns, netns=name)
            ip("link", "set", card_if, "up", netns=name)
            ip("link", "set", peer_if, "up", netns=peer_ns)
            no_segmentation_offload(peer_if, peer_ns)
        macs = tuple(link_mac(BOX_HOST_IFACES[i], box_netns) for i in range(len(port_peers)))
    except BaseException:
        destroy_card(name)
        raise
    return CardTopology(name, box_netns, macs)


def destroy_card(name: str) -> None:
    """Delete the card namespace: its veths go with it, and so do their peers elsewhere."""
    if exists(name):
        with contextlib.suppress(NetnsError):
            ip("netns", "delete", name)
