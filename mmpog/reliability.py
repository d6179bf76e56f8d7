"""The game reliability protocol (paper section III-C), sans-IO.

Two state machines speak the wire format of :mod:`mmpog.wire`:

* :class:`ClientEndpoint` - one game client's membership of one location.  The
  game calls :meth:`~ClientEndpoint.send` with ``reliable=`` and a retry
  deadline, feeds datagrams from the reflector to
  :meth:`~ClientEndpoint.receive_datagram`, and pulls datagrams, a timer and
  events (:class:`Received`, :class:`Delivered`, :class:`Expired`,
  :class:`Unrecoverable`, :class:`Joined`, :class:`JoinFailed`).
* :class:`ReflectorCore` - the box side: locations, members bound to
  addresses by a token, sequence numbers, a bounded retransmission buffer,
  NACK service with a per-member rate limit, heartbeats on idle locations.

Neither touches a socket or a clock: every entry point takes ``now`` (seconds,
any monotonic origin) and the caller does the I/O, like aioquic.

Delivery semantics (stated precisely in docs/mmpog.md):

* the application receives each (sender, packet id) at most once
  (duplicate window of ``dup_window`` recent ids), in arrival order - there is
  no reordering buffer, a game wants the newest state as soon as it arrives;
* a reliable packet sequenced by the reflector after the receiver joined
  (seq > the ``last`` its WELCOME carried) is either received or its seq is
  reported in an :class:`Unrecoverable` event, once the receiver has heard of it
  (any later packet or heartbeat);
* the sender of a reliable packet gets exactly one of :class:`Delivered`
  (its echo came back from the reflector) or :class:`Expired` (no echo
  before its deadline - it may still have reached the location).
"""

from __future__ import annotations

import heapq
import hmac
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Union

from . import wire
from .wire import RELIABLE, RETRANSMIT, Header, Kind, WireDecodeError

Address = tuple[str, int]
_DATA, _HEARTBEAT, _WELCOME, _BUNDLE = Kind.DATA, Kind.HEARTBEAT, Kind.WELCOME, Kind.BUNDLE   # hot-path names


# ====================================================================== RTO (RFC 6298)

class RttEstimator:
    """RFC 6298 retransmission timeout, with game-suited bounds.

    ``initial_rto`` is used until the first sample (RFC: 1 s; games want less).
    The floor is what the path shows: SRTT + max(G, 4 RTTVAR), G the timer
    granularity of the endpoint and reflector loops (2 ms); ``min_rto`` is only a
    sanity bound (1 ms), not the RFC's 1 s nor a fixed 40 ms - on a loopback or
    LAN path (SRTT 0.3-0.8 ms) a fixed 40 ms floor *was* the p99 (docs/mmpog.md).
    ``max_rto`` caps the backoff.  Callers apply Karn's rule by never sampling a
    retransmitted packet; backoff is per packet (``_Pending.rto``), not the estimator's.
    """

    K = 4
    ALPHA = 1 / 8
    BETA = 1 / 4

    def __init__(self, initial_rto: float = 0.2, min_rto: float = 0.001, max_rto: float = 1.0,
                 granularity: float = 0.002) -> None:
        if not 0 < min_rto <= max_rto:
            raise ValueError(f"need 0 < min_rto <= max_rto, got {min_rto}, {max_rto}")
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.granularity = granularity
        self.srtt: float | None = None
        self.rttvar: float | None = None
        self.rto = self._clamp(initial_rto)
        self.samples = 0
        self.backoffs = 0
        self.provisional = False    # the only samples so far came from the join: the next one starts afresh

    def _clamp(self, value: float) -> float:
        return min(self.max_rto, max(self.min_rto, value))

    def update(self, rtt: float, provisional: bool = False) -> None:
        """(2.2)/(2.3): a new RTT measurement from a packet sent exactly once.

        ``provisional``: the join's HELLO/WELCOME sample - taken while a whole wave of players
        joins, it is used until the first game packet's sample, which then counts as the first
        (2.2), instead of decaying through RTTVAR for a second of play.
        """
        if rtt < 0:
            return
        if self.srtt is None or (self.provisional and not provisional):
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            # RTTVAR first, with the old SRTT (RFC 6298 2.3)
            self.rttvar = (1 - self.BETA) * self.rttvar + self.BETA * abs(self.srtt - rtt)
            self.srtt = (1 - self.ALPHA) * self.srtt + self.ALPHA * rtt
        self.rto = self._clamp(self.srtt + max(self.granularity, self.K * self.rttvar))
        self.samples += 1
        self.provisional = provisional

    def backoff(self) -> None:
        """(5.5): the retransmission timer expired: double the RTO (up to max_rto)."""
        self.rto = self._clamp(self.rto * 2)
        self.backoffs += 1


# ====================================================================== events

@dataclass(frozen=True, slots=True)
class Joined:
    location: int
    last_seq: int      # reliable packets with a higher seq are covered by the delivery guarantee


@dataclass(frozen=True, slots=True)
class JoinFailed:
    location: int


@dataclass(slots=True)     # not frozen: built for every update received (a frozen one costs 3.2 us, this 0.5)
class Received:
    sender: int
    packet_id: int
    payload: bytes
    reliable: bool
    seq: int           # 0 for unreliable packets
    now: float
    location: int = 0


@dataclass(frozen=True, slots=True)
class Delivered:
    packet_id: int
    rtt: float         # from the first transmission to the echo
    retransmitted: bool  # True: the echo may answer any copy, so rtt was not sampled (Karn)
    seq: int = 0       # the seq the reflector gave the echoed copy


@dataclass(frozen=True, slots=True)
class Expired:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Unrecoverable:
    first: int         # seqs first .. first+count-1 will never arrive
    count: int
    location: int = 0


Event = Union[Joined, JoinFailed, Received, Delivered, Expired, Unrecoverable]


class NotJoined(RuntimeError):
    """send() before the reflector welcomed this endpoint."""


class BufferFull(RuntimeError):
    """Too many reliable packets awaiting their echo (``max_pending``)."""


# ====================================================================== client

@dataclass(slots=True)
class ClientConfig:
    initial_rto: float = 0.2
    min_rto: float = 0.001          # sanity bound only: the RTO is SRTT + max(granularity, 4 RTTVAR)
    max_rto: float = 1.0
    granularity: float = 0.002      # timer granularity of the I/O loops (RFC 6298's G)
    default_deadline: float = 1.0   # how long a reliable packet is retried unless send() says otherwise
    reorder_window: float = 0.003   # a gap must persist min(this, SRTT/4) (RACK) before it is NACKed
    max_pending: int = 1024         # reliable packets awaiting their echo
    dup_window: int = 8192          # (sender, packet id) pairs remembered for duplicate detection
    max_missing: int = 4096         # missing seqs tracked; older ones are given up as unrecoverable
    recent_unreliable: int = 256    # own unreliable ids remembered for RTT samples
    max_events: int = 65536
    max_outgoing: int = 8192
    join_timeout: float = 5.0

    def validate(self) -> None:
        if not 0 < self.min_rto <= self.max_rto:
            raise ValueError("need 0 < min_rto <= max_rto")
        for name in ("max_pending", "dup_window", "max_missing", "recent_unreliable", "max_events",
                     "max_outgoing"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.default_deadline <= 0 or self.reorder_window < 0 or self.join_timeout <= 0:
            raise ValueError("deadline and join_timeout must be positive, reorder_window non-negative")


@dataclass(slots=True)
class _Pending:
    data: bytes
    first_sent: float
    deadline: float
    next_retx: float
    rto: float               # this packet's own timeout: doubles on each of *its* retransmissions
    retries: int = 0


class ClientEndpoint:
    """One client's membership of one location at one reflector.

    Usage (any I/O loop)::

        ep = ClientEndpoint(player=7, location=3, token=token)
        ep.connect(now)                      # queues a HELLO
        ... send ep.datagrams_to_send(now) to the reflector, feed replies to ep.receive_datagram(data, now),
        ... call ep.handle_timer(now) when ep.get_timer() passes, drain ep.next_event()
        pid = ep.send(b"state", now, reliable=True, deadline=0.5)
    """

    def __init__(self, player: int, location: int, token: bytes, config: ClientConfig | None = None,
                 rng: random.Random | None = None, rtt: RttEstimator | None = None) -> None:
        if not 0 < player <= wire.MAX_U32 or not 0 <= location <= wire.MAX_U32:
            raise ValueError("player must be 1..2**32-1 and location 0..2**32-1")
        if not wire.MIN_TOKEN <= len(token) <= wire.MAX_TOKEN:
            raise ValueError(f"token must be {wire.MIN_TOKEN}..{wire.MAX_TOKEN} bytes")
        self.config = config or ClientConfig()
        self.config.validate()
        self.player = player
        self.location = location
        self.token = bytes(token)
        rng = rng or random.Random()
        self._next_id = rng.getrandbits(32) or 1
        c = self.config
        self.rtt = RttEstimator(c.initial_rto, c.min_rto, c.max_rto, c.granularity)
        if rtt is not None:
            # the same path as a previous endpoint (e.g. the old location at the same reflector): start
            # from what it measured instead of the initial RTO
            self.rtt.srtt, self.rtt.rttvar, self.rtt.rto = rtt.srtt, rtt.rttvar, self.rtt._clamp(rtt.rto)
        self.joined = False
        self.closed = False
        self._hello_sent: dict[int, float] = {}   # packet id of each HELLO attempt -> when it went out
        self._hello_next: float | None = None
        self._hello_deadline = 0.0
        self._hello_retries = 0
        self._pending: dict[int, _Pending] = {}
        self._recent_unreliable: dict[int, float] = {}
        self._seen: set[tuple[int, int]] = set()
        self._seen_order: deque[tuple[int, int]] = deque()
        # Every seq <= _highest is received, missing (in _missing: seq -> when noticed) or given up.
        self._highest = 0
        self._lowest = 0
        # missing seq -> when it may be asked for (again): noticed + reorder window, then after each NACK
        # that asked for it, that NACK's own timeout (RTO doubling per attempt of *this* seq)
        self._missing: dict[int, float] = {}
        self._nack_tries: dict[int, int] = {}
        self._nack_sent: dict[int, float] = {}    # missing seq -> when a NACK last asked for it
        self._last_repair = float("-inf")         # when a retransmission from the reflector last arrived
        self._missing_due: float | None = None   # min(_missing.values()), kept up to date
        self._events: deque[Event] = deque()
        self._max_events = c.max_events
        self._out: list[bytes] = []
        self.stats: dict[str, int] = dict.fromkeys((
            "sent", "sent_reliable", "sent_unreliable", "retransmitted", "delivered", "expired",
            "received", "received_reliable", "duplicates", "echo_duplicates", "nacks_sent", "nack_seqs",
            "retransmissions_received", "missing_detected", "seqs_accounted", "unrecoverable",
            "malformed", "wrong_location", "unexpected_kind", "before_join", "refused_pending",
            "dup_window_evicted", "missing_overflow", "events_dropped", "outgoing_dropped",
            "heartbeats", "timeouts", "nack_retries", "nack_retries_unbacked", "gaps_from_unreliable", "bundles",
        ), 0)

    # ------------------------------------------------------------------ public API

    def connect(self, now: float) -> None:
        """Queue the HELLO (with the game server's token) that binds this endpoint's address."""
        self._hello_sent.clear()
        self._hello_deadline = now + self.config.join_timeout
        self._hello_retries = 0
        self._send_hello(now)

    def close(self, now: float) -> None:
        """Queue a BYE; reliable packets still awaiting their echo end as :class:`Expired` now."""
        if not self.closed:
            self._queue(wire.encode(Header(Kind.BYE, rto_ms=self._rto_ms(), location=self.location,
                                           sender=self.player, packet_id=self._new_id())))
        self.closed = True
        for packet_id in self._pending:
            self.stats["expired"] += 1
            self._event(Expired(packet_id))
        self._pending.clear()
        self._hello_next = None
        self._missing.clear()
        self._nack_tries.clear()
        self._nack_sent.clear()
        self._missing_due = None

    def send(self, payload: bytes, now: float, reliable: bool = False, deadline: float | None = None) -> int:
        """Queue one game packet; returns its packet id.

        ``reliable`` packets are retransmitted after each RTO until their echo
        returns or ``deadline`` seconds (default ``config.default_deadline``) pass.
        """
        if not self.joined or self.closed:
            raise NotJoined(f"location {self.location}: not joined")
        if reliable and len(self._pending) >= self.config.max_pending:
            self.stats["refused_pending"] += 1
            raise BufferFull(f"{len(self._pending)} reliable packets already await their echo")
        packet_id = self._new_id()
        flags = RELIABLE if reliable else 0
        data = wire.encode(Header(Kind.DATA, flags, self._rto_ms(), self.location, self.player,
                                  packet_id), payload)
        self._queue(data)
        self.stats["sent"] += 1
        if reliable:
            self.stats["sent_reliable"] += 1
            bound = self.config.default_deadline if deadline is None else deadline
            rto = self.rtt.rto
            self._pending[packet_id] = _Pending(data, now, now + bound, self._retx_at(now, rto, now + bound), rto)
        else:
            self.stats["sent_unreliable"] += 1
            recent = self._recent_unreliable
            if len(recent) >= self.config.recent_unreliable:
                del recent[next(iter(recent))]
            recent[packet_id] = now
        return packet_id

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Process one datagram from the reflector (malformed ones are counted and dropped)."""
        self.receive_datagrams(((data, now),))

    def receive_datagrams(self, datagrams: Iterable[tuple[bytes, float]]) -> None:
        """Process ``(datagram, arrival time)`` pairs in order: exactly :meth:`receive_datagram` for
        each, with the lookups done once per batch and a plain DATA datagram (a game update) handed
        straight to its handler (an adapter's wake-up reads several at once: ``mmpog.client``)."""
        # (self._on_data(...) rather than a bound local: on 3.11 the call needs no bound method, and a
        # wake-up often brings one datagram, so per-call setup costs more than it saves)
        stats, location, decode = self.stats, self.location, wire.decode
        for data, now in datagrams:
            try:
                header, payload = decode(data)
            except WireDecodeError:
                stats["malformed"] += 1
                continue
            if header[3] != location:
                stats["wrong_location"] += 1
                continue
            if self.closed:
                continue
            kind = header[0]
            if kind is _DATA and self.joined:
                self._on_data(header, payload, now)
            elif kind is _BUNDLE:
                try:
                    # each item checked to be of this location and unnested, and decoded, in one pass
                    items, malformed = wire.decode_bundle(header, payload)
                except WireDecodeError:
                    stats["malformed"] += 1
                    continue
                stats["bundles"] += 1
                if malformed:
                    stats["malformed"] += malformed    # one bad item loses nothing else of the bundle
                if self.joined:
                    for item_header, item_payload in items:
                        if item_header[0] is _DATA:    # the game's updates: straight to their handler
                            self._on_data(item_header, item_payload, now)
                        else:
                            self._handle(item_header, item_payload, now)
                else:
                    for item_header, item_payload in items:
                        self._handle(item_header, item_payload, now)
            else:
                self._handle(header, payload, now)
            due = self._missing_due
            if due is not None and due <= now:
                self._maybe_nack(now)      # once per datagram: a bundle's gaps go out in one NACK

    def _handle(self, header: Header, payload: bytes, now: float) -> None:
        kind = header.kind
        if kind is _DATA:
            if not self.joined:
                self.stats["before_join"] += 1
                return
            self._on_data(header, payload, now)
        elif kind is _HEARTBEAT:
            if not self.joined:
                self.stats["before_join"] += 1
                return
            self.stats["heartbeats"] += 1
            self._account_up_to(header.seq, now)
            self._on_lowest(header.lowest)
        elif kind is _WELCOME:
            self._on_welcome(header, now)
        else:
            self.stats["unexpected_kind"] += 1

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out, self._out = self._out, []
        return out

    @property
    def has_datagrams(self) -> bool:
        """True when :meth:`datagrams_to_send` would return something (lets adapters skip the call)."""
        return bool(self._out)

    def get_timer(self) -> float | None:
        """The earliest time at which :meth:`handle_timer` has work, or None."""
        # asked after every batch an adapter hands over: no list built, and nothing to scan in the
        # common case (no HELLO outstanding, few reliable packets awaiting their echo)
        earliest = self._missing_due
        if self._hello_next is not None:
            at = min(self._hello_next, self._hello_deadline)
            if earliest is None or at < earliest:
                earliest = at
        for pending in self._pending.values():
            at = min(pending.next_retx, pending.deadline)
            if earliest is None or at < earliest:
                earliest = at
        return earliest

    def handle_timer(self, now: float) -> None:
        if self._hello_next is not None and now >= self._hello_next:
            if now >= self._hello_deadline:
                self._hello_next = None
                self._event(JoinFailed(self.location))
            else:
                self._hello_retries += 1
                self.rtt.backoff()
                self._send_hello(now)
        for packet_id, pending in list(self._pending.items()):
            if now >= pending.deadline:
                del self._pending[packet_id]
                self.stats["expired"] += 1
                self._event(Expired(packet_id))
            elif now >= pending.next_retx:
                # this packet's timer, backed off for this packet only (5.5 applied per packet): one
                # lost packet must not make every later reliable update wait twice the RTO
                self.stats["timeouts"] += 1
                pending.retries += 1
                pending.rto = min(pending.rto * 2, self.config.max_rto)
                pending.next_retx = self._retx_at(now, pending.rto, pending.deadline)
                self.stats["retransmitted"] += 1
                self._queue(wire.restamp(pending.data, 0, 0, pending.data[wire.FLAGS_OFFSET] | RETRANSMIT))
        self._maybe_nack(now)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def events(self) -> deque[Event]:
        """The queue :meth:`next_event` pops from, oldest first: an adapter that drains it after every
        batch may ``popleft()`` from it directly (one call less per event)."""
        return self._events

    def snapshot(self) -> dict:
        """Counters plus the RTT estimator state (for ``--stats-json`` and experiments)."""
        out = dict(self.stats)
        out["srtt_ms"] = None if self.rtt.srtt is None else round(self.rtt.srtt * 1000, 3)
        out["rto_ms"] = round(self.rtt.rto * 1000, 3)
        out["pending"] = len(self._pending)
        out["missing"] = len(self._missing)
        accounted = self.stats["seqs_accounted"]
        out["loss"] = round(self.stats["missing_detected"] / accounted, 6) if accounted else 0.0
        return out

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def highest_seq(self) -> int:
        return self._highest

    @property
    def missing_seqs(self) -> list[int]:
        """Seqs this endpoint knows exist but has neither received nor given up (yet)."""
        return list(self._missing)

    # ------------------------------------------------------------------ internals

    def _new_id(self) -> int:
        packet_id = self._next_id
        self._next_id = (packet_id + 1) & wire.MAX_U32 or 1   # 0 is reserved (heartbeats carry none)
        return packet_id

    def _retx_at(self, now: float, rto: float, deadline: float) -> float:
        """When to resend a reliable packet sent (or resent) at ``now``: one RTO later - unless that
        is past the last moment a copy can still reach the location in time (deadline - SRTT: up to
        the reflector and on to the members).  Then at that last moment, so a packet whose RTO is a
        large part of its deadline (a long or queued path: the RTO follows what the path shows) gets
        one more try before it expires instead of none.  At least one timer granularity away."""
        at = now + rto
        srtt = self.rtt.srtt
        if srtt is None:
            return at
        last_useful = deadline - srtt
        if at > last_useful > now:
            return max(now + self.config.granularity, last_useful)
        return at

    def _rto_ms(self) -> int:
        # at least 1: 0 means "not reported" on the wire, and a sub-millisecond RTO is real on a LAN
        return max(1, min(wire.MAX_RTO_MS, round(self.rtt.rto * 1000)))

    def _queue(self, data: bytes) -> None:
        if len(self._out) >= self.config.max_outgoing:
            self._out.pop(0)
            self.stats["outgoing_dropped"] += 1
        self._out.append(data)

    def _event(self, event: Event) -> None:
        if len(self._events) >= self._max_events:
            self._events.popleft()
            self.stats["events_dropped"] += 1
        self._events.append(event)

    def _send_hello(self, now: float) -> None:
        # every attempt has its own packet id, which the WELCOME echoes: the answer says which attempt it
        # answers, so even a join that needed retries yields an RTT sample (no Karn ambiguity) and the
        # session does not start with a backed-off RTO (cold start as good as steady state)
        packet_id = self._new_id()
        self._hello_sent[packet_id] = now
        self._queue(wire.encode(Header(Kind.HELLO, rto_ms=self._rto_ms(), location=self.location,
                                       sender=self.player, packet_id=packet_id), self.token))
        self._hello_next = now + self.rtt.rto

    def _on_welcome(self, header: Header, now: float) -> None:
        sent_at = self._hello_sent.get(header.packet_id)
        if self.joined or header.sender != self.player or sent_at is None:
            self.stats["unexpected_kind" if header.sender != self.player else "echo_duplicates"] += 1
            return
        self.rtt.update(now - sent_at, provisional=True)
        self._hello_sent.clear()
        self.joined = True
        self._hello_next = None
        self._highest = header.seq
        self._lowest = header.lowest
        self._event(Joined(self.location, header.seq))

    def _on_data(self, header: Header, payload: bytes, now: float) -> None:
        # the per-update path (40k/s in a bot at 64 players x 1 location): fields unpacked once, the
        # in-order case of every step inline, the rest in the helpers it always called
        _, flags, _, _, sender, packet_id, seq, lowest = header
        stats = self.stats
        reliable = flags & RELIABLE
        if reliable:
            if seq == 0:
                stats["malformed"] += 1      # the reflector sequences every reliable packet it forwards
                return
            if flags & RETRANSMIT:
                stats["retransmissions_received"] += 1
                self._last_repair = now
            if seq == self._highest + 1:     # the next seq, nothing missed (_on_seq's common case)
                self._highest = seq
                stats["seqs_accounted"] += 1
                fresh_seq = True
            else:
                fresh_seq = self._on_seq(seq, now)
        else:
            fresh_seq = True
            if seq > self._highest:
                # an unreliable packet carries the location's last seq: it reveals a lost reliable one too
                stats["gaps_from_unreliable"] += 1
                self._account_up_to(seq, now)
        missing = self._missing
        if lowest > self._lowest or (missing and next(iter(missing)) < self._lowest):
            self._on_lowest(lowest)          # (missing seqs are kept in ascending order)
        if sender == self.player:
            self._on_echo(packet_id, seq, now)
            return
        key = (sender, packet_id)
        seen = self._seen
        if not fresh_seq or key in seen:
            stats["duplicates"] += 1
            return
        seen_order = self._seen_order
        if len(seen_order) >= self.config.dup_window:
            seen.discard(seen_order.popleft())
            stats["dup_window_evicted"] += 1
        seen.add(key)
        seen_order.append(key)
        stats["received"] += 1
        if reliable:
            stats["received_reliable"] += 1
        event = Received(sender, packet_id, payload, bool(reliable), seq, now, self.location)
        events = self._events
        if len(events) < self._max_events:
            events.append(event)             # _event's common case, without its frame
        else:
            self._event(event)

    def _on_echo(self, packet_id: int, seq: int, now: float) -> None:
        pending = self._pending.pop(packet_id, None)
        if pending is not None:
            if pending.retries == 0:
                self.rtt.update(now - pending.first_sent)
            self.stats["delivered"] += 1
            self._event(Delivered(packet_id, now - pending.first_sent, pending.retries > 0, seq))
            return
        sent_at = self._recent_unreliable.pop(packet_id, None)
        if sent_at is not None:
            self.rtt.update(now - sent_at)   # unreliable packets are sent once: always a valid sample
        else:
            self.stats["echo_duplicates"] += 1

    def _on_seq(self, seq: int, now: float) -> bool:
        """Account for a sequenced packet; False if this seq was already received or given up."""
        if seq > self._highest:
            self._account_up_to(seq - 1, now)
            self._highest = seq
            self.stats["seqs_accounted"] += 1
            return True
        if self._missing.pop(seq, None) is not None:
            self._nack_tries.pop(seq, None)
            self._nack_sent.pop(seq, None)
            self._recompute_missing_due()
            return True
        return False

    def _account_up_to(self, last: int, now: float) -> None:
        """Mark every seq in (highest, last] as missing (a data packet or heartbeat revealed them)."""
        if last <= self._highest:
            return
        first = self._highest + 1
        gap = last - first + 1
        self.stats["missing_detected"] += gap
        self.stats["seqs_accounted"] += gap
        limit = self.config.max_missing
        if gap > limit:
            # too many to track: the oldest are given up straight away
            self._report_unrecoverable(first, gap - limit)
            self.stats["missing_overflow"] += gap - limit
            first = last - limit + 1
        missing = self._missing
        ripe = now + self._reorder_window()
        for seq in range(first, last + 1):
            missing[seq] = ripe
        self._highest = last
        excess = len(missing) - limit
        if excess > 0:
            self.stats["missing_overflow"] += excess
            for seq in list(missing)[:excess]:
                del missing[seq]
                self._nack_tries.pop(seq, None)
                self._nack_sent.pop(seq, None)
                self._report_unrecoverable(seq, 1)
        self._recompute_missing_due()

    def _on_lowest(self, lowest: int) -> None:
        """Missing seqs below the reflector's lowest retransmittable seq can never be recovered."""
        if lowest > self._lowest:
            self._lowest = lowest
        missing = self._missing
        if not missing or next(iter(missing)) >= self._lowest:
            return
        lost = sorted(seq for seq in missing if seq < self._lowest)
        if not lost:
            return
        for seq in lost:
            del missing[seq]
            self._nack_tries.pop(seq, None)
            self._nack_sent.pop(seq, None)
        for first, count in wire.seqs_to_ranges(lost, max_ranges=len(lost)):
            self._report_unrecoverable(first, count)
        self._recompute_missing_due()

    def _report_unrecoverable(self, first: int, count: int) -> None:
        self.stats["unrecoverable"] += count
        self._event(Unrecoverable(first, count, self.location))

    def _reorder_window(self) -> float:
        """How long a gap must persist before it is loss (RACK: a quarter of the SRTT, at most the config's)."""
        srtt = self.rtt.srtt
        window = self.config.reorder_window
        return window if srtt is None else min(window, srtt / 4)

    def _recompute_missing_due(self) -> None:
        self._missing_due = min(self._missing.values()) if self._missing else None

    def _maybe_nack(self, now: float) -> None:
        """Ask for every missing seq whose own timer is due; each asked seq gets its own timeout.

        Several NACKs may be in flight: a seq noticed while an earlier request is unanswered is asked
        for as soon as its reorder window passes, and a seq whose request (or answer) was lost is asked
        again after *its* timeout.  That timeout doubles per attempt of that seq only, and only when no
        retransmission at all reached us since the seq was last asked for: silence is the correlated
        loss the paper guards against; repairs still arriving say the path works and this one loss was
        independent, so the seq is asked again after one RTO.
        """
        due = self._missing_due
        if due is None or due > now or self.closed:
            return
        missing, tries, sent_at = self._missing, self._nack_tries, self._nack_sent
        repaired_since = self._last_repair
        wanted = sorted(seq for seq, at in missing.items() if at <= now)
        rto, max_rto = self.rtt.rto, self.config.max_rto
        while wanted:
            ranges = wire.seqs_to_ranges(wanted)
            asked = [seq for first, count in ranges for seq in range(first, first + count)]
            self._queue(wire.encode(Header(Kind.NACK, rto_ms=self._rto_ms(), location=self.location,
                                           sender=self.player), wire.encode_nack_ranges(ranges)))
            self.stats["nacks_sent"] += 1
            self.stats["nack_seqs"] += len(asked)
            for seq in asked:
                attempt = tries.get(seq, 0)
                if attempt:
                    self.stats["nack_retries"] += 1
                    if repaired_since > sent_at[seq]:
                        attempt = 0          # the path works: no backoff for an independent loss
                        self.stats["nack_retries_unbacked"] += 1
                tries[seq] = attempt + 1
                sent_at[seq] = now
                missing[seq] = now + min(max_rto, rto * (2 ** min(attempt, 16)))
            wanted = wanted[len(asked):]
        self._recompute_missing_due()


# ====================================================================== reflector

@dataclass(slots=True)
class ReflectorConfig:
    buffer_packets: int = 1024      # reliable packets kept per location for retransmission
    buffer_age: float = 2.0         # ... and for at most this long (game packets go stale)
    heartbeat_min: float = 0.002    # heartbeat interval = factor x members' smallest RTO, clamped to
    heartbeat_max: float = 1.0      #   [min, max], doubling while the location stays idle
    heartbeat_factor: float = 1.0   # a tail-loss probe: a receiver that lost the last packet hears of it this soon
    default_rto: float = 0.2        # assumed for members that have not reported one yet
    nack_rate: float = 200.0        # retransmissions per second per member (token bucket) ...
    nack_burst: int = 64
    nack_bytes_rate: float = 256 * 1024   # ... and bytes per second per member
    nack_burst_bytes: int = 16 * 1024     # the most one NACK (or a burst of them) can make the reflector send
    max_locations: int = 4096
    max_members: int = 256          # per location
    max_outgoing: int = 65536       # queued datagrams between pulls
    # packing, done by the I/O adapter (mmpog.reflector.ReflectorService), configured with the rest
    pack: bool = True               # what one loop pass sends to a location leaves as BUNDLEs
    pack_budget: float = 0.0        # > 0: hold outgoing datagrams up to this long to pack more
    mtu: int = wire.MAX_DATAGRAM    # largest packed datagram

    def validate(self) -> None:
        if self.buffer_packets <= 0 or self.buffer_age <= 0:
            raise ValueError("buffer_packets and buffer_age must be positive")
        if not 0 < self.heartbeat_min <= self.heartbeat_max:
            raise ValueError("need 0 < heartbeat_min <= heartbeat_max")
        if self.heartbeat_factor <= 0:
            raise ValueError("heartbeat_factor must be positive")
        if self.nack_rate < 0 or self.nack_burst < 0 or self.nack_bytes_rate < 0 or self.nack_burst_bytes < 0:
            raise ValueError("nack_rate, nack_burst, nack_bytes_rate and nack_burst_bytes must be non-negative")
        if self.max_locations <= 0 or self.max_members <= 0 or self.max_outgoing <= 0:
            raise ValueError("max_locations, max_members and max_outgoing must be positive")
        if self.pack_budget < 0 or not 2 * wire.HEADER_SIZE + 2 <= self.mtu <= 65507:
            raise ValueError(f"pack_budget must be >= 0 and mtu {2 * wire.HEADER_SIZE + 2}..65507")


@dataclass(frozen=True, slots=True)
class MembersChanged:
    """The set of bound member addresses of a location changed (update the multicast group)."""
    location: int
    addresses: tuple[Address, ...]


@dataclass(slots=True)
class _Member:
    player: int
    token: bytes
    addr: Address | None = None
    rto: float | None = None
    tokens: float = 0.0
    byte_tokens: float = 0.0
    refilled: float = 0.0


LOCATION_COUNTERS = (
    "received", "reliable", "unreliable", "fanout_datagrams", "retransmitted", "nacks",
    "nack_rate_limited", "nack_unavailable", "heartbeats", "hello_accepted", "hello_rejected",
    "not_member", "buffer_evicted_count", "buffer_evicted_age", "byes", "malformed_client_fields",
    "resends_recognised", "hello_rebind_refused", "nack_byte_limited",
)


@dataclass(slots=True)
class _Location:
    id: int
    members: dict[int, _Member] = field(default_factory=dict)
    by_addr: dict[Address, _Member] = field(default_factory=dict)
    addresses: tuple[Address, ...] = ()
    last_seq: int = 0
    buffer: deque = field(default_factory=deque)     # (seq, forwarded bytes, stored_at), seqs contiguous
    seq_of: dict = field(default_factory=dict)       # (sender, packet id) -> seq, for every buffered packet
    announced_at: float = 0.0     # last time the current last_seq went out (reliable data or heartbeat)
    idle_heartbeats: int = 0
    rto_floor: float | None = None  # smallest RTO members reported since the last heartbeat
    heap_due: float | None = None  # the time of this location's live entry in the heartbeat heap
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LOCATION_COUNTERS, 0))

    def lowest(self) -> int:
        return self.buffer[0][0] if self.buffer else self.last_seq + 1

    def by_addr_of(self, player: int) -> Address | None:
        member = self.members.get(player)
        return member.addr if member is not None else None


Destination = Union[Address, int]   # an address, or a location id meaning "every bound member"


class ReflectorCore:
    """The reflector side of the protocol for any number of locations.

    Membership comes from the game server (:meth:`add_member` /
    :meth:`remove_member`, each with the player's token); a member's address
    is bound by a HELLO carrying that token, and only bound addresses may send
    into the location, so the reflector never fans out toward an address that
    did not prove it holds a token.
    """

    def __init__(self, config: ReflectorConfig | None = None) -> None:
        self.config = config or ReflectorConfig()
        self.config.validate()
        self._locations: dict[int, _Location] = {}
        self._heap: list[tuple[float, int]] = []      # (heartbeat due, location id), lazily re-armed
        self._retired: dict[str, int] = dict.fromkeys(LOCATION_COUNTERS, 0)   # counters of forgotten locations
        self._out: list[tuple[bytes, Destination]] = []
        self._events: deque[MembersChanged] = deque()
        self.stats: dict[str, int] = dict.fromkeys((
            "received", "malformed", "unknown_location", "not_member", "unexpected_kind",
            "outgoing_dropped", "locations_refused", "members_refused", "bundles",
        ), 0)

    # ------------------------------------------------------------------ membership (control plane)

    def add_member(self, location: int, player: int, token: bytes, now: float = 0.0) -> None:
        loc = self._locations.get(location)
        if loc is None:
            if len(self._locations) >= self.config.max_locations:
                self.stats["locations_refused"] += 1
                raise BufferFull(f"reflector already serves {len(self._locations)} locations")
            loc = self._locations[location] = _Location(location, announced_at=now)
        member = loc.members.get(player)
        if member is not None:
            if member.token != token:
                member.token = bytes(token)
                self._unbind(loc, member)   # a new token: the old binding is no longer proven
            return
        if len(loc.members) >= self.config.max_members:
            self.stats["members_refused"] += 1
            raise BufferFull(f"location {location} already has {len(loc.members)} members")
        loc.members[player] = _Member(player, bytes(token), tokens=float(self.config.nack_burst),
                                      byte_tokens=float(self.config.nack_burst_bytes), refilled=now)

    def remove_member(self, location: int, player: int) -> bool:
        loc = self._locations.get(location)
        if loc is None:
            return False
        member = loc.members.pop(player, None)
        if member is None:
            return False
        self._unbind(loc, member)
        if not loc.members:
            for name, value in loc.stats.items():
                self._retired[name] += value
            del self._locations[location]
        return True

    def locations(self) -> list[int]:
        return list(self._locations)

    def members(self, location: int) -> tuple[Address, ...]:
        loc = self._locations.get(location)
        return loc.addresses if loc is not None else ()

    def member_players(self, location: int) -> list[int]:
        loc = self._locations.get(location)
        return list(loc.members) if loc is not None else []

    # ------------------------------------------------------------------ data path

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        self.stats["received"] += 1
        try:
            header, payload = wire.decode(data)
        except WireDecodeError:
            self.stats["malformed"] += 1
            return
        loc = self._locations.get(header.location)
        if loc is None:
            self.stats["unknown_location"] += 1
            return
        kind = header.kind
        if kind is Kind.BUNDLE:
            try:
                items = wire.unpack(header, payload)
            except WireDecodeError:
                self.stats["malformed"] += 1
                return
            self.stats["bundles"] += 1
            for item in items:
                self.receive_datagram(item, addr, now)
            return
        if kind is Kind.HELLO:
            self._on_hello(loc, header, payload, addr, now)
            return
        member = loc.by_addr.get(addr)
        if member is None or member.player != header.sender:
            # not a bound member, or a member claiming someone else's id
            loc.stats["not_member"] += 1
            self.stats["not_member"] += 1
            return
        if header.rto_ms:
            member.rto = rto = header.rto_ms / 1000
            floor = loc.rto_floor
            if floor is None or rto < floor:
                self._note_rto(loc, rto)
        if kind is Kind.DATA:
            self._on_data(loc, header, data, now)
        elif kind is Kind.NACK:
            self._on_nack(loc, member, payload, now)
        elif kind is Kind.BYE:
            loc.stats["byes"] += 1
            self._unbind(loc, member)
        else:
            self.stats["unexpected_kind"] += 1

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Destination]]:
        """Datagrams to send: to an address, or (int destination) to every bound member of that location."""
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        """When the next heartbeat may be due (possibly early: handle_timer then just re-arms)."""
        return self._heap[0][0] if self._heap else None

    def handle_timer(self, now: float) -> None:
        """Heartbeats on idle locations (and age eviction of their retransmission buffers).

        A heap of (due, location) keeps this O(log L) per heartbeat; entries go
        stale when traffic postpones a heartbeat, and are re-armed when popped.
        """
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, loc_id = heapq.heappop(heap)
            loc = self._locations.get(loc_id)
            if loc is None or at != loc.heap_due:
                continue            # superseded by an earlier entry for the same location
            loc.heap_due = None
            if not loc.addresses:
                continue
            due = self._heartbeat_due(loc)
            if due <= now:
                self._evict(loc, now)
                loc.stats["heartbeats"] += 1
                loc.stats["fanout_datagrams"] += len(loc.addresses)
                self._queue(wire.encode(Header(Kind.HEARTBEAT, location=loc.id, seq=loc.last_seq,
                                               lowest=loc.lowest())), loc.id)
                loc.announced_at = now
                loc.idle_heartbeats += 1
                rtos = [m.rto for m in loc.by_addr.values() if m.rto]
                loc.rto_floor = min(rtos) if rtos else None
                due = self._heartbeat_due(loc)
            self._arm(loc, due)

    def next_event(self) -> MembersChanged | None:
        return self._events.popleft() if self._events else None

    def location_stats(self, location: int) -> dict:
        loc = self._locations[location]
        out = dict(loc.stats)
        out.update(members=len(loc.members), bound=len(loc.addresses), last_seq=loc.last_seq,
                   lowest=loc.lowest(), buffered=len(loc.buffer))
        return out

    def totals(self) -> dict[str, int]:
        """Per-location counters summed over every location, including ones already forgotten."""
        out = dict(self._retired)
        for loc in self._locations.values():
            for name, value in loc.stats.items():
                out[name] += value
        return out

    def snapshot(self) -> dict:
        return {"global": dict(self.stats), "totals": self.totals(),
                "locations": {str(loc_id): self.location_stats(loc_id) for loc_id in self._locations}}

    # ------------------------------------------------------------------ internals

    def _queue(self, data: bytes, dest: Destination) -> None:
        if len(self._out) >= self.config.max_outgoing:
            self._out.pop(0)
            self.stats["outgoing_dropped"] += 1
        self._out.append((data, dest))

    def _heartbeat_due(self, loc: _Location) -> float:
        base = loc.rto_floor or self.config.default_rto
        config = self.config
        interval = min(config.heartbeat_max,
                       max(config.heartbeat_min, base * config.heartbeat_factor) * (2 ** min(loc.idle_heartbeats, 16)))
        return loc.announced_at + interval

    def _note_rto(self, loc: _Location, rto: float | None) -> None:
        """A member reported a smaller RTO: heartbeats may be due sooner than the heap says."""
        if rto and (loc.rto_floor is None or rto < loc.rto_floor):
            loc.rto_floor = rto
            if loc.heap_due is not None:
                self._arm(loc, self._heartbeat_due(loc))

    def _arm(self, loc: _Location, due: float) -> None:
        """Make sure the heap wakes the location by ``due`` (one live entry per location; later ones are lazy)."""
        if loc.heap_due is None or due < loc.heap_due:
            loc.heap_due = due
            heapq.heappush(self._heap, (due, loc.id))

    def _bind(self, loc: _Location, member: _Member, addr: Address) -> None:
        if member.addr == addr:
            return
        other = loc.by_addr.get(addr)
        if other is not None and other is not member:
            self._unbind(loc, other)    # the address now proves a different player's token
        if member.addr is not None:
            loc.by_addr.pop(member.addr, None)
        member.addr = addr
        loc.by_addr[addr] = member
        self._note_rto(loc, member.rto)
        self._arm(loc, self._heartbeat_due(loc))
        self._members_changed(loc)

    def _unbind(self, loc: _Location, member: _Member) -> None:
        if member.addr is None:
            return
        loc.by_addr.pop(member.addr, None)
        member.addr = None
        self._members_changed(loc)

    def _members_changed(self, loc: _Location) -> None:
        loc.addresses = tuple(loc.by_addr)
        self._events.append(MembersChanged(loc.id, loc.addresses))

    def _on_hello(self, loc: _Location, header: Header, token: bytes, addr: Address, now: float) -> None:
        member = loc.members.get(header.sender)
        if member is None or not hmac.compare_digest(member.token, token):
            loc.stats["hello_rejected"] += 1   # silently: a spoofed source gets nothing back
            return
        if member.addr is not None and member.addr != addr:
            # the token is bound to the address that first proved it: someone who learnt the token
            # must not redirect the player's fan-out.  Moving needs a fresh token from the game server
            # (add_member with a new token unbinds).
            loc.stats["hello_rebind_refused"] += 1
            return
        loc.stats["hello_accepted"] += 1
        if header.rto_ms:
            member.rto = header.rto_ms / 1000
        self._bind(loc, member, addr)
        self._evict(loc, now)
        # WELCOME is smaller than the HELLO that caused it: no amplification
        self._queue(wire.encode(Header(Kind.WELCOME, location=loc.id, sender=member.player,
                                       packet_id=header.packet_id, seq=loc.last_seq,
                                       lowest=loc.lowest())), addr)

    def _on_data(self, loc: _Location, header: Header, data: bytes, now: float) -> None:
        if header.seq or header.lowest:
            loc.stats["malformed_client_fields"] += 1   # seq and lowest are the reflector's to set
            return
        stats = loc.stats
        stats["received"] += 1
        if header.flags & RELIABLE:
            key = (header.sender, header.packet_id)
            known = loc.seq_of.get(key)
            if known is not None:
                # the sender's resend after a lost echo: the same update, already sequenced and fanned
                # out; only the sender needs its echo again (members that lost it NACK that seq)
                stats["resends_recognised"] += 1
                lowest = loc.lowest()
                _, stored, _ = loc.buffer[known - lowest]
                self._queue(wire.restamp(stored, known, lowest, stored[wire.FLAGS_OFFSET] | RETRANSMIT),
                            loc.by_addr_of(header.sender))
                return
            stats["fanout_datagrams"] += len(loc.addresses)
            stats["reliable"] += 1
            loc.last_seq += 1
            seq = loc.last_seq
            buffer = loc.buffer
            buffer.append((seq, data, now))
            loc.seq_of[key] = seq
            if len(buffer) > self.config.buffer_packets:
                self._drop_oldest(loc)
                stats["buffer_evicted_count"] += 1
            if buffer[0][2] < now - self.config.buffer_age:
                self._evict(loc, now)
            out = wire.restamp(data, seq, buffer[0][0])
            if loc.idle_heartbeats:
                # the location was idle and its heartbeat backed off: the tail-loss probe for this packet
                # must come one interval after it, not at the backed-off time already in the heap
                loc.idle_heartbeats = 0
                loc.announced_at = now
                self._arm(loc, self._heartbeat_due(loc))
        else:
            stats["fanout_datagrams"] += len(loc.addresses)
            stats["unreliable"] += 1
            # unreliable packets carry the last seq too: every packet reveals a lost reliable one
            out = wire.restamp(data, loc.last_seq, loc.lowest())
        loc.announced_at = now
        self._queue(out, loc.id)

    def _evict(self, loc: _Location, now: float) -> None:
        buffer = loc.buffer
        horizon = now - self.config.buffer_age
        while buffer and buffer[0][2] < horizon:
            self._drop_oldest(loc)
            loc.stats["buffer_evicted_age"] += 1

    @staticmethod
    def _drop_oldest(loc: _Location) -> None:
        _, data, _ = loc.buffer.popleft()
        loc.seq_of.pop(wire.sender_and_id(data), None)

    def _on_nack(self, loc: _Location, member: _Member, payload: bytes, now: float) -> None:
        try:
            ranges = wire.decode_nack_ranges(payload)
        except WireDecodeError:
            self.stats["malformed"] += 1
            return
        stats = loc.stats
        stats["nacks"] += 1
        self._evict(loc, now)
        config = self.config
        elapsed = now - member.refilled
        member.tokens = min(float(config.nack_burst), member.tokens + elapsed * config.nack_rate)
        member.byte_tokens = min(float(config.nack_burst_bytes), member.byte_tokens + elapsed * config.nack_bytes_rate)
        member.refilled = now
        buffer = loc.buffer
        lowest, last = loc.lowest(), loc.last_seq
        unavailable = False
        for first, count in ranges:
            # clip to what the buffer holds before walking: a range over 4 billion seqs costs nothing
            start, end = max(first, lowest), min(first + count - 1, last)
            outside = count - max(0, end - start + 1)
            if outside:
                unavailable = True
                stats["nack_unavailable"] += outside
            for seq in range(start, end + 1):
                if member.tokens < 1:
                    stats["nack_rate_limited"] += end - seq + 1
                    break
                _, data, _ = buffer[seq - lowest]
                if member.byte_tokens < len(data):
                    # a byte budget as well as a packet count: one small NACK never answers with a burst
                    stats["nack_byte_limited"] += end - seq + 1
                    break
                member.tokens -= 1
                member.byte_tokens -= len(data)
                flags = data[wire.FLAGS_OFFSET] | RETRANSMIT
                self._queue(wire.restamp(data, seq, lowest, flags), member.addr)
                stats["retransmitted"] += 1
        if unavailable and member.tokens >= 1 and member.byte_tokens >= wire.HEADER_SIZE:
            # tell the requester at once what is still available, even on an idle location
            member.tokens -= 1
            member.byte_tokens -= wire.HEADER_SIZE
            self._queue(wire.encode(Header(Kind.HEARTBEAT, location=loc.id, seq=loc.last_seq,
                                           lowest=lowest)), member.addr)
