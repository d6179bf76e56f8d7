"""The forwarding engine interface: what boxd asks of a data path.

boxd (the controller) owns every decision - policy, arbitration, ownership,
the forwarding table, multicast groups - and tells an :class:`Engine` what to
install.  An engine only moves packets: it installs a :class:`Rule` and answers
with a :class:`Delivery` that tells the booster library how the rule's packets
will reach the booster (see docs/ARCHITECTURE.md, the table of delivery kinds).

Engines are looked up by name (:func:`boxcore.engines.get_engine`) and built
from boxd's parsed arguments with :meth:`Engine.from_args`; an engine module may
add its own command-line options with :meth:`Engine.add_options`.
"""

from __future__ import annotations

import abc
import argparse
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # imported for annotations only: core-A's modules
    from boxcore.packet import Packet
    from boxcore.rules import Rule

# Every delivery kind an engine may answer with; receivers register under these names.
DELIVERY_KINDS = ("channel", "socket", "stream", "nfqueue", "nflog", "tproxy")


@dataclass(slots=True)
class Delivery:
    """How a rule's packets reach the booster.

    ``kind`` is one of :data:`DELIVERY_KINDS`; ``params`` are msgpack-able
    details (``{"queue": 3}`` for nfqueue, ``{"group": 5}`` for nflog,
    ``{"port": 15001}`` for tproxy, ``{"dst": ip, "dport": port}`` for socket, plus
    ``"orig_dst": True`` when the socket reports each datagram's original destination
    (IP_RECVORIGDSTADDR: a rule naming only a port sees traffic to many addresses).
    ``fds`` are file descriptors handed to the booster with the reply
    (SCM_RIGHTS); on the booster side they are the received descriptors.
    """

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    fds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in DELIVERY_KINDS:
            raise ValueError(f"unknown delivery kind {self.kind!r}")

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-able part (descriptors travel beside it)."""
        return {"kind": self.kind, "params": dict(self.params), "nfds": len(self.fds)}

    @classmethod
    def from_wire(cls, data: dict[str, Any], fds: list[int]) -> "Delivery":
        return cls(kind=data["kind"], params=dict(data.get("params") or {}), fds=list(fds))


@dataclass(frozen=True, slots=True)
class Route:
    """One forwarding-table entry: traffic to ``prefix`` goes via ``via`` out of ``dev``.

    ``via`` None means directly connected; ``dev`` None lets the engine choose.
    """

    prefix: str
    via: str | None = None
    dev: str | None = None
    metric: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "via": self.via, "dev": self.dev, "metric": self.metric}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Route":
        return cls(prefix=str(data["prefix"]), via=data.get("via"), dev=data.get("dev"),
                   metric=int(data.get("metric", 0)))


@dataclass(eq=False)
class BoosterSession:
    """One connected booster, as boxd sees it.

    Engines may read ``sid``, ``name``, ``uid``, ``pid`` (peer credentials from
    SO_PEERCRED).  ``channel`` is boxd's end of the booster's data channel (a
    Unix SOCK_DGRAM socketpair handed over at registration) for engines that
    deliver packets through boxd (kind ``channel``); engines send to it with
    :meth:`send_datagram`, which never blocks and counts what it had to drop.
    ``engine_state`` is a scratch dict an engine may keep per-session state in.
    ``send_event`` (set by the controller) pushes an asynchronous control
    message, optionally with file descriptors, to the booster (used by the
    ``stream`` delivery to hand over accepted connections).
    """

    sid: int
    name: str
    uid: int
    pid: int
    gid: int = -1
    channel: socket.socket | None = None
    engine_state: dict[str, Any] = field(default_factory=dict)
    channel_sent: int = 0
    channel_dropped: int = 0
    send_event: Any = None  # Callable[[dict, list[int]], None]
    features: frozenset[str] = frozenset()   # optional protocol features from its hello (wire.FEATURES)

    def send_datagram(self, data: bytes) -> bool:
        """Queue one datagram for the booster; False (and counted) when its queue is full."""
        if self.channel is None:
            self.channel_dropped += 1
            return False
        try:
            self.channel.send(data)
        except (BlockingIOError, InterruptedError, ConnectionError, OSError):
            self.channel_dropped += 1
            return False
        self.channel_sent += 1
        return True

    def describe(self) -> dict[str, Any]:
        return {"sid": self.sid, "name": self.name, "uid": self.uid, "pid": self.pid}


class EngineRefused(ValueError):
    """A rule or group the kernel or the engine's limits refuse (boxd answers INVALID with this reason)."""


def checked_group_members(group: int, members: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    """A multicast group's members as (IPv4 address, port) pairs, or :class:`EngineRefused` saying
    which member (or how many) the engine cannot take."""
    if len(members) > limit:
        raise EngineRefused(f"multicast group {group}: {len(members)} members, at most {limit}")
    for host, port in members:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise EngineRefused(f"multicast group {group}: bad member address {host!r}") from None
        if not 0 < int(port) <= 65535:
            raise EngineRefused(f"multicast group {group}: bad member port {port}")
    return [(h, int(p)) for h, p in members]


class EngineSetupError(RuntimeError):
    """An engine that cannot be set up as asked: a bad engine option (``from_args``) or a start-up
    failure here (a missing kernel feature, a port it cannot bind...).  Says what is wrong;
    boxd reports it as a configuration error (one line, exit status 2)."""


class Engine(abc.ABC):
    """A data path behind boxd.  All methods run on boxd's event loop."""

    name: ClassVar[str] = "?"

    # -- construction -----------------------------------------------------------
    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        """Add this engine's own boxd options (names should start with ``--<engine>-``
        unless shared, like the user engine's ``--listen``)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Engine":
        """Build the engine from boxd's arguments; raise EngineSetupError on bad options."""
        return cls()

    # -- lifecycle --------------------------------------------------------------
    @abc.abstractmethod
    async def start(self) -> None:
        """Clean stale state left by a crash, then set up."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Remove everything this engine installed."""

    # -- rules ------------------------------------------------------------------
    @abc.abstractmethod
    async def install(self, rule: "Rule", session: BoosterSession) -> Delivery:
        """Install ``rule`` (already checked and arbitrated by boxd) for ``session``."""

    async def install_tcp(self, rule: "Rule", session: BoosterSession) -> Delivery:
        """Intercept the TCP connections ``rule`` (a REDIRECT of proto 6) matches and hand each
        accepted connection to ``session`` (delivery ``stream``, or ``tproxy``).  Engines
        without TCP interception keep this default, which refuses (boxd answers INVALID)."""
        raise NotImplementedError(f"engine {self.name} cannot intercept TCP connections")

    @abc.abstractmethod
    async def remove(self, rule: "Rule") -> None:
        """Remove a rule installed earlier (unknown cookies are ignored)."""

    @abc.abstractmethod
    async def set_forwarding(self, routes: list[Route]) -> None:
        """Replace the default forwarding table."""

    @abc.abstractmethod
    async def set_multicast_group(self, group: int, members: list[tuple[str, int]]) -> None:
        """Create or replace a multicast group; an empty member list deletes it."""

    @abc.abstractmethod
    def counters(self) -> dict[int, tuple[int, int]]:
        """cookie -> (packets, bytes) for every installed rule."""

    def health(self, session: BoosterSession) -> str | None:
        """A reason ``session`` is unhealthy (boxd evicts it), or None."""
        return None

    # -- sessions and the data path from boosters --------------------------------
    async def attach(self, session: BoosterSession) -> None:
        """A booster registered (before any of its rules)."""

    async def detach(self, session: BoosterSession) -> None:
        """A booster left; boxd has already removed its rules."""

    def inject(self, pkt: "Packet", session: BoosterSession) -> None:
        """Send a packet built by a booster (``booster.send``) into the data path."""
        raise NotImplementedError(f"engine {self.name} cannot inject packets")

    def verdict(self, session: BoosterSession, token: int, verdict: int,
                payload: bytes | None) -> None:
        """A booster's verdict on a packet delivered on its channel with ``token``
        (verdict codes in :mod:`boxcore.wire`: CONSUME, PASS, MODIFY)."""

    def send_multicast(self, group: int, payload: bytes, src_port: int,
                       session: BoosterSession) -> None:
        """Fan ``payload`` out to every member of ``group`` (``booster.send_multicast``)."""
        raise NotImplementedError(f"engine {self.name} has no multicast")

    def status(self) -> dict[str, Any]:
        """Engine-specific figures for the management API (JSON-able)."""
        return {}


class TablesInBoxd(Engine):
    """An engine whose classifier, forwarding table and multicast groups live in boxd's own
    process (``user``, ``memory``): setting those tables is bookkeeping.  Subclasses set
    ``classifier``, ``routes`` and ``groups`` in ``__init__``."""

    classifier: Any
    routes: list[Route]
    groups: dict[int, list[tuple[str, int]]]

    async def set_forwarding(self, routes: list[Route]) -> None:
        self.routes = list(routes)

    async def set_multicast_group(self, group: int, members: list[tuple[str, int]]) -> None:
        if members:
            self.groups[group] = list(members)
        else:
            self.groups.pop(group, None)

    def counters(self) -> dict[int, tuple[int, int]]:
        return self.classifier.counters()
