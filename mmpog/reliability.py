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
from .wire import COPY, RELIABLE, RETRANSMIT, Header, Kind, WireDecodeError

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
            # RTTVAR first, with the old SRTT (RFC 6298 2.3); set together with SRTT, never None here
            rttvar: float = self.rttvar  # type: ignore[assignment]
            self.rttvar = (1 - self.BETA) * rttvar + self.BETA * abs(self.srtt - rtt)
            self.srtt = (1 - self.ALPHA) * self.srtt + self.ALPHA * rtt
        self.rto = self._clamp(self.srtt + max(self.granularity, self.K * self.rttvar))
        self.samples += 1
        self.provisional = provisional

    def backoff(self) -> None:
        """(5.5): the retransmission timer expired: double the RTO (up to max_rto)."""
        self.rto = self._clamp(self.rto * 2)
        self.backoffs += 1


# ====================================================================== loss estimate (redundant copies)

MAX_COPIES = 3      # the most copies of one reliable update a sender or the reflector ever sends


class LossEstimator:
    """The loss rate of one leg of a path, from what the path shows, for loss-adaptive redundancy.

    Observations are trials and how many of them were lost: the client's own copies (each a round
    trip the reflector echoes or not), the reflector's seqs to a member (each original lost if the
    member NACKs it or reports that its COPY came first), so copies on or off the estimate is of the
    rate per datagram itself.  The estimate is lost / sent with a prior of ``prior_weight`` trials
    at ``prior``; older observations fade with ``half_life`` seconds.  Sans-IO: ``now`` comes in.
    """

    __slots__ = ("prior", "prior_weight", "half_life", "_sent", "_lost", "_at")

    def __init__(self, prior: float = 0.01, prior_weight: float = 20.0, half_life: float = 5.0) -> None:
        if not 0 < prior < 1 or prior_weight <= 0 or half_life <= 0:
            raise ValueError("need 0 < prior < 1, prior_weight > 0 and half_life > 0")
        self.prior = prior
        self.prior_weight = prior_weight
        self.half_life = half_life
        self._sent = 0.0        # trials (faded)
        self._lost = 0.0        # ... of which lost
        self._at: float | None = None

    def observe(self, now: float, sent: float, lost: float) -> None:
        if sent <= 0 and lost <= 0:
            return
        if self._at is not None and now > self._at:
            fade = 0.5 ** ((now - self._at) / self.half_life)
            self._sent *= fade
            self._lost *= fade
        if self._at is None or now > self._at:
            self._at = now
        self._sent += max(sent, 0.0)
        self._lost += max(lost, 0.0)

    @property
    def samples(self) -> float:
        """Trials observed (faded), the prior not included."""
        return self._sent

    def set_prior(self, prior: float) -> None:
        """Shrink toward another prior from now on (the reflector: the member's location, pooled)."""
        self.prior = min(0.999, max(1e-6, prior))

    def estimate(self) -> float:
        """The loss rate per datagram: the prior's trials and the observed ones together."""
        lost = self.prior * self.prior_weight + self._lost
        kept = (1 - self.prior) * self.prior_weight + max(0.0, self._sent - self._lost)
        return lost / (lost + kept)


def copies_for(loss: float, threshold: float, target: float, cap: int = MAX_COPIES) -> int:
    """How many copies of a reliable update to send over a leg losing ``loss``: one while the loss is
    at most ``threshold``, else the fewest k with loss**k <= ``target`` (at most ``cap``)."""
    if loss <= threshold:
        return 1
    copies = 2
    while copies < cap and loss ** copies > target * (1 + 1e-9):
        copies += 1
    return min(copies, cap)


def copy_rounds(datagrams: list[bytes]) -> list[list[bytes]]:
    """Split a batch so that no two equal datagrams (copies of one update) share a round: an adapter
    packs each round on its own, so every copy leaves in a datagram of its own (packed with the
    original, a copy would be lost with it)."""
    if len(datagrams) < 2:
        return [datagrams]
    rounds: list[list[bytes]] = []
    seen: dict[bytes, int] = {}
    for data in datagrams:
        index = seen.get(data, 0)
        seen[data] = index + 1
        if index == len(rounds):
            rounds.append([])
        rounds[index].append(data)
    return rounds


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


# ====================================================================== redundancy settings

@dataclass(slots=True)
class RedundancyConfig:
    """Loss-adaptive redundancy, as the client (its uplink) and the reflector (each member's downlink)
    share it: while a leg loses more than `redundancy_threshold`, every reliable update goes out k
    times (the fewest k with loss**k <= `redundancy_target`, at most `redundancy_max_copies`), copy
    i `redundancy_spacing` x i after the original.  A leg that has shown little is taken to lose
    `loss_prior`, worth `loss_prior_weight` observations; observations fade with `loss_half_life` s.

    A conservative start (10%): a session's first reliable updates go three times (0.1% left) until
    the evidence - one trial per copy (client: echoes; reflector: NACKs and LOSS reports of a COPY
    that came first), so copying does not slow the learning - shows the path clean: 2-3 s at a
    client on a clean or 1% path, about a second at the reflector.  A lossy path's first second is
    then as good as the rest (a 5% prior's two copies left 1% of a 10% path's deliveries to
    repairs: docs/mmpog.md, "Redundant copies")."""
    redundancy: bool = True
    redundancy_threshold: float = 0.025
    redundancy_target: float = 0.005
    redundancy_max_copies: int = MAX_COPIES
    redundancy_spacing: float = 0.0
    loss_prior: float = 0.10
    loss_prior_weight: float = 10.0
    loss_half_life: float = 10.0

    def validate_redundancy(self) -> None:
        if not 0 <= self.redundancy_threshold < 1 or not 0 < self.redundancy_target < 1:
            raise ValueError("need 0 <= redundancy_threshold < 1 and 0 < redundancy_target < 1")
        if not 1 <= self.redundancy_max_copies <= MAX_COPIES:
            raise ValueError(f"redundancy_max_copies must be 1..{MAX_COPIES}")
        if self.redundancy_spacing < 0:
            raise ValueError("redundancy_spacing must be non-negative")
        if not 0 < self.loss_prior < 1 or self.loss_prior_weight <= 0 or self.loss_half_life <= 0:
            raise ValueError("need 0 < loss_prior < 1, loss_prior_weight > 0 and loss_half_life > 0")


# ====================================================================== client

@dataclass(slots=True)
class ClientConfig(RedundancyConfig):
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
    # redundancy on the uplink (RedundancyConfig); the prior is worth 10 of the client's own echoes (5
    # let a fifth of the clients of a 5% path stop copying in their first second)
    loss_watch: int = 1024          # own updates whose echoes are counted (oldest settled first)
    loss_report_interval: float = 0.1   # LOSS reports (seqs that came first as a reflector's COPY): at most one per interval

    def validate(self) -> None:
        if not 0 < self.min_rto <= self.max_rto:
            raise ValueError("need 0 < min_rto <= max_rto")
        self.validate_redundancy()
        for name in ("max_pending", "dup_window", "max_missing", "recent_unreliable", "max_events",
                     "max_outgoing"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.loss_report_interval <= 0:
            raise ValueError("loss_report_interval must be positive")
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
    copies: int = 1          # copies sent so far (redundancy), the original included


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
        # the uplink's loss (redundancy): every copy of an own update sent is a round trip whose echo
        # comes back or not (the reflector echoes each copy it recognises); settled once old enough
        prior_round_trip = 1 - (1 - c.loss_prior) ** 2
        self.uplink_loss = LossEstimator(prior_round_trip, c.loss_prior_weight, c.loss_half_life)
        self._echo_watch: dict[int, list] = {}      # own packet id -> [sent at, copies sent, echoes back]
        self._copies_due: deque[tuple[float, int]] = deque()   # (when, packet id) of spaced copies
        self._copies = 1                             # copies per reliable update now (what the prior says)
        # the downlink's evidence for the reflector: seqs that reached us first as its COPY (their original
        # was lost), a running count (mod 2**32) sent in LOSS reports at most every loss_report_interval
        self._copies_first = 0
        # seq -> when its COPY came first: counted as a lost original only if the original has not come
        # within the settle time (a path may reorder the two: that is no loss); bounded by max_missing
        self._copy_wait: dict[int, float] = {}
        self._report_next = float("-inf")            # when the next LOSS report may go
        self._report_due: float | None = None        # when copies settle or a changed count may go
        self._unreported = False                     # the count changed since the last report
        if c.redundancy:
            self._copies = copies_for(self.uplink_leg_loss(), c.redundancy_threshold, c.redundancy_target,
                                      c.redundancy_max_copies)
        self.stats: dict[str, int] = dict.fromkeys((
            "sent", "sent_reliable", "sent_unreliable", "retransmitted", "delivered", "expired",
            "received", "received_reliable", "duplicates", "echo_duplicates", "nacks_sent", "nack_seqs",
            "retransmissions_received", "missing_detected", "seqs_accounted", "unrecoverable",
            "malformed", "wrong_location", "unexpected_kind", "before_join", "refused_pending",
            "dup_window_evicted", "missing_overflow", "events_dropped", "outgoing_dropped",
            "heartbeats", "timeouts", "nack_retries", "nack_retries_unbacked", "gaps_from_unreliable", "bundles",
            "gaps_from_heartbeat",
            "redundant_copies_sent", "copies_first", "loss_reports_sent", "copy_wait_evicted",
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
        self._copies_due.clear()
        self._report_due = None
        self._copy_wait.clear()
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
        if self.config.redundancy:
            self._watch_echo(packet_id, now)
        if reliable:
            self.stats["sent_reliable"] += 1
            bound = self.config.default_deadline if deadline is None else deadline
            rto = self.rtt.rto
            pending = self._pending[packet_id] = _Pending(data, now, now + bound, self._retx_at(now, rto, now + bound), rto)
            if self._copies > 1:
                self._send_copies(packet_id, pending, now)
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
            if header.seq > self._highest:
                self.stats["gaps_from_heartbeat"] += 1     # the probe told this member of a lost seq
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
        if self._report_due is not None and (earliest is None or self._report_due < earliest):
            earliest = self._report_due
        if self._copies_due:
            at = self._copies_due[0][0]
            if earliest is None or at < earliest:
                earliest = at
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
                watched = self._echo_watch.get(packet_id)
                if watched is not None:
                    watched[1] += 1                  # one more round trip that may come back
        copies_due = self._copies_due
        while copies_due and copies_due[0][0] <= now:
            _, packet_id = copies_due.popleft()
            copied = self._pending.get(packet_id)
            if copied is not None and copied.retries == 0:
                # (a spaced copy whose original was already echoed, or resent, is not needed)
                self._queue_copy(packet_id, copied)
        if self._report_due is not None and now >= self._report_due and not self.closed:
            self._settle_copies(now)
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
        out: dict[str, float | None] = dict(self.stats)
        out["srtt_ms"] = None if self.rtt.srtt is None else round(self.rtt.srtt * 1000, 3)
        out["rto_ms"] = round(self.rtt.rto * 1000, 3)
        out["pending"] = len(self._pending)
        out["missing"] = len(self._missing)
        accounted = self.stats["seqs_accounted"]
        out["loss"] = round(self.stats["missing_detected"] / accounted, 6) if accounted else 0.0
        out["uplink_loss"] = round(self.uplink_leg_loss(), 6)
        out["copies"] = self._copies
        return out

    def uplink_leg_loss(self) -> float:
        """The uplink's loss as estimated from the round trips of own copies: the client cannot tell
        which leg lost a copy or its echo, and takes both legs as equally lossy (1 - sqrt(1 - round
        trip)); on a path lossy only downward this sends copies up that were not needed."""
        return 1 - (1 - self.uplink_loss.estimate()) ** 0.5

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

    def _watch_echo(self, packet_id: int, now: float) -> None:
        """Count this update's echoes; settle the ones old enough into the uplink estimate and decide
        how many copies the next reliable update gets."""
        watch = self._echo_watch
        srtt = self.rtt.srtt
        horizon = now - max(0.1, 4 * srtt if srtt is not None else 0.0)   # an echo later than this is lost
        limit = self.config.loss_watch
        sent = lost = 0
        while watch:
            key = next(iter(watch))             # the oldest (insertion order)
            at, copies, echoes = watch[key]
            if at > horizon and len(watch) < limit:
                break
            del watch[key]
            sent += copies
            lost += max(0, copies - echoes)
        if sent:
            self.uplink_loss.observe(now, sent, lost)
            c = self.config
            self._copies = copies_for(self.uplink_leg_loss(), c.redundancy_threshold, c.redundancy_target,
                                      c.redundancy_max_copies)
        watch[packet_id] = [now, 1, 0]

    def _copy_arrived_first(self, seq: int, now: float) -> None:
        wait = self._copy_wait
        if len(wait) >= self.config.max_missing:
            del wait[next(iter(wait))]
            self.stats["copy_wait_evicted"] += 1
        wait[seq] = now + self._copy_settle()
        if self._report_due is None or wait[seq] < self._report_due:
            self._report_due = max(wait[seq], self._report_next)

    def _copy_settle(self) -> float:
        """How long an original may trail its copy and still be a reordering rather than a loss."""
        srtt = self.rtt.srtt
        return max(self.config.reorder_window, srtt if srtt is not None else 0.0)

    def _settle_copies(self, now: float) -> None:
        """Count the copies whose original did not follow in time; report the count if it may go now."""
        wait = self._copy_wait
        settled = 0
        while wait:
            seq = next(iter(wait))
            if wait[seq] > now:
                break
            del wait[seq]
            settled += 1
        if settled:
            self._copies_first = (self._copies_first + settled) & wire.MAX_U32
            self.stats["copies_first"] += settled
            self._unreported = True
        if self._unreported and now >= self._report_next:
            self._send_loss_report(now)
        if wait:
            self._report_due = max(next(iter(wait.values())), self._report_next)
        else:
            self._report_due = self._report_next if self._unreported else None

    def _send_loss_report(self, now: float) -> None:
        """The running count to the reflector (never answered: no amplification; rate-bounded)."""
        self._unreported = False
        self._report_next = now + self.config.loss_report_interval
        self.stats["loss_reports_sent"] += 1
        self._queue(wire.encode(Header(Kind.LOSS, rto_ms=self._rto_ms(), location=self.location, sender=self.player),
                                wire.LOSS_REPORT.pack(self._copies_first)))

    def _send_copies(self, packet_id: int, pending: _Pending, now: float) -> None:
        spacing = self.config.redundancy_spacing
        for index in range(1, self._copies):
            if spacing <= 0:
                self._queue_copy(packet_id, pending)   # apart from the original all the same: copy_rounds
            else:
                self._copies_due.append((now + index * spacing, packet_id))

    def _queue_copy(self, packet_id: int, pending: _Pending) -> None:
        pending.copies += 1
        self.stats["redundant_copies_sent"] += 1
        self._queue(pending.data)        # byte for byte the original: the reflector recognises it
        watched = self._echo_watch.get(packet_id)
        if watched is not None:
            watched[1] += 1

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
            # a reflector's COPY of a seq not yet received and not yet NACKed: its original was lost
            # (a NACKed seq is counted by the reflector from the NACK)
            copy_first = flags & COPY and seq not in self._nack_sent
            if seq == self._highest + 1:     # the next seq, nothing missed (_on_seq's common case)
                self._highest = seq
                stats["seqs_accounted"] += 1
                fresh_seq = True
            else:
                fresh_seq = self._on_seq(seq, now)
            if copy_first and fresh_seq:
                self._copy_arrived_first(seq, now)
            elif not fresh_seq and self._copy_wait and not flags & COPY:
                self._copy_wait.pop(seq, None)       # the original, after its copy: reordered, not lost
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
        watched = self._echo_watch.get(packet_id)
        if watched is not None:
            watched[2] += 1
        pending = self._pending.pop(packet_id, None)
        if pending is not None:
            if pending.retries == 0 and (pending.copies == 1 or self.config.redundancy_spacing <= 0):
                # (a spaced copy's echo is not the original's: Karn's rule; immediate copies left together)
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
class ReflectorConfig(RedundancyConfig):
    buffer_packets: int = 1024      # reliable packets kept per location for retransmission
    buffer_age: float = 2.0         # ... and for at most this long (game packets go stale)
    heartbeat_min: float = 0.002    # heartbeat interval = factor x members' smallest RTO, clamped to
    heartbeat_max: float = 1.0      #   [min, max], doubling while the location stays idle
    heartbeat_factor: float = 1.0   # a tail-loss probe: a receiver that lost the last packet hears of it this soon
    # a probe is skipped when the chance that some bound member heard of the location's last seq from
    # none of the datagrams that carried it (sum over members of p**n, p its downlink's loss, n the
    # separate datagrams: the original, its copies, later updates and probes) is below this; 0: always.
    # Far below the copies' 0.5%: skips add up (about 37 a second per location at 32x4 10%) and each
    # one that was needed leaves a member waiting for the next packet (0.5% made the max at 10% loss
    # 4x: docs/mmpog.md)
    probe_skip_target: float = 0.0001
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
    # redundancy on each member's downlink (RedundancyConfig), from what its NACKs and LOSS reports
    # show, re-decided per location at most every `loss_refresh` seconds; the prior (a new member's
    # and a new location's pool) is worth 25 seqs of the location's pool
    loss_prior_weight: float = 25.0
    loss_refresh: float = 0.1
    max_spaced_copies: int = 65536  # copies waiting for their spacing (the oldest dropped, counted)

    def validate(self) -> None:
        if self.buffer_packets <= 0 or self.buffer_age <= 0:
            raise ValueError("buffer_packets and buffer_age must be positive")
        self.validate_redundancy()
        if self.loss_refresh <= 0 or self.max_spaced_copies <= 0:
            raise ValueError("loss_refresh and max_spaced_copies must be positive")
        if not 0 < self.heartbeat_min <= self.heartbeat_max:
            raise ValueError("need 0 < heartbeat_min <= heartbeat_max")
        if self.heartbeat_factor <= 0:
            raise ValueError("heartbeat_factor must be positive")
        if not 0 <= self.probe_skip_target < 1:
            raise ValueError("probe_skip_target must be in [0, 1)")
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
    # the member's downlink (redundancy): seqs sent to it up to `counted_seq` are in `loss`; NACKed
    # seqs above `nack_high` are first asks (a lost seq) pending until the next refresh
    loss: LossEstimator | None = None
    copies: int = 1
    counted_seq: int = 0
    nack_high: int = 0
    lost_pending: int = 0
    copied: int = 0          # seqs sent to it with copies, of which `copy_losses` were reported as arriving
    copy_losses: int = 0     #   first as a COPY (original lost): a report is credited up to `copied`
    copy_report: int = 0     # the member's last running count of such seqs (LOSS, mod 2**32)


LOCATION_COUNTERS = (
    "received", "reliable", "unreliable", "fanout_datagrams", "retransmitted", "nacks",
    "nack_rate_limited", "nack_unavailable", "heartbeats", "hello_accepted", "hello_rejected",
    "not_member", "buffer_evicted_count", "buffer_evicted_age", "byes", "malformed_client_fields",
    "resends_recognised", "hello_rebind_refused", "nack_byte_limited", "redundant_copies_sent",
    "redundant_copies_received", "loss_reports", "loss_report_clipped", "heartbeat_datagrams",
    "heartbeats_skipped",
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
    # what told the members of last_seq so far: datagrams fanned out to all since it was sequenced
    # (counted when the adapter takes them: what it packs into one datagram is lost together), and
    # its copies (`copied_to`'s members, not its sender, got `member.copies - 1` more each)
    carriers: int = 0
    copied_to: tuple = ()
    last_sender: int = 0
    copy_members: tuple = ()        # bound members whose downlink gets redundant copies now
    loss: LossEstimator | None = None   # every member's downlink pooled: each member's prior
    loss_checked: float = float("-inf")   # when their copies were last re-decided
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
        self._copies_due: deque[tuple[float, bytes, Address]] = deque()   # spaced copies: (when, data, member)
        self._carrying: set[int] = set()   # locations that queued a datagram carrying their last seq since the last pull
        self.copies_queued = 0      # redundant copies handed out so far (an adapter's updates-relayed excludes them)
        self.stats: dict[str, int] = dict.fromkeys((
            "received", "malformed", "unknown_location", "not_member", "unexpected_kind",
            "outgoing_dropped", "locations_refused", "members_refused", "bundles", "spaced_copies_dropped",
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
        elif kind is Kind.LOSS:
            self._on_loss_report(loc, member, payload)
        elif kind is Kind.BYE:
            loc.stats["byes"] += 1
            self._unbind(loc, member)
        else:
            self.stats["unexpected_kind"] += 1

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Destination]]:
        """Datagrams to send: to an address, or (int destination) to every bound member of that location."""
        out, self._out = self._out, []
        if self._carrying:
            locations = self._locations
            for loc_id in self._carrying:
                loc = locations.get(loc_id)
                if loc is not None:
                    loc.carriers += 1
            self._carrying.clear()
        return out

    def get_timer(self) -> float | None:
        """When the next heartbeat (or spaced copy) may be due (possibly early: handle_timer then re-arms)."""
        due = self._heap[0][0] if self._heap else None
        if self._copies_due:
            at = self._copies_due[0][0]
            if due is None or at < due:
                due = at
        return due

    def handle_timer(self, now: float) -> None:
        """Heartbeats on idle locations (and age eviction of their retransmission buffers).

        A heap of (due, location) keeps this O(log L) per heartbeat; entries go
        stale when traffic postpones a heartbeat, and are re-armed when popped.
        """
        copies_due = self._copies_due
        while copies_due and copies_due[0][0] <= now:
            _, data, addr = copies_due.popleft()
            self._queue(data, addr)
            self.copies_queued += 1
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
                if self._probe_tells_nothing(loc):
                    # every member has almost surely heard of last_seq: no wake-up of all of them for it;
                    # the timer backs off as if it had gone (a new reliable packet re-arms it)
                    loc.stats["heartbeats_skipped"] += 1
                else:
                    loc.stats["heartbeats"] += 1
                    loc.stats["fanout_datagrams"] += len(loc.addresses)
                    loc.stats["heartbeat_datagrams"] += len(loc.addresses)
                    self._queue(wire.encode(Header(Kind.HEARTBEAT, location=loc.id, seq=loc.last_seq,
                                                   lowest=loc.lowest())), loc.id)
                    self._carrying.add(loc.id)
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

    def _queue(self, data: bytes, dest: Destination | None) -> None:
        if len(self._out) >= self.config.max_outgoing:
            self._out.pop(0)
            self.stats["outgoing_dropped"] += 1
        # (dest is None only for a member without an address; the callers act on packets from bound
        # members, so it does not happen; the annotation says what the lookups return)
        self._out.append((data, dest))  # type: ignore[arg-type]

    def _heartbeat_due(self, loc: _Location) -> float:
        base = loc.rto_floor or self.config.default_rto
        config = self.config
        interval = min(config.heartbeat_max,
                       max(config.heartbeat_min, base * config.heartbeat_factor) * (2 ** min(loc.idle_heartbeats, 16)))
        return loc.announced_at + interval

    def _probe_tells_nothing(self, loc: _Location) -> bool:
        """Would a tail-loss probe now tell no member anything (within `probe_skip_target`)?

        A probe's only news is last_seq (and lowest, which a member that needs it gets by NACKing).
        A member still unaware of last_seq lost every separate datagram that carried it: p**n with
        p its downlink's measured loss (the location's pool, or the prior, until it has one).  Summed
        over the bound members: the chance that the probe tells anyone anything.  The seq's sender is
        left out: its own retransmission timer covers a lost echo (the resend's echo brings the seq)."""
        target = self.config.probe_skip_target
        if target <= 0:
            return False
        if loc.last_seq == 0:
            return True                      # nothing reliable was ever sequenced: nothing to reveal
        carriers = loc.carriers
        if carriers == 0:
            return False                     # the last seq's datagram is still queued
        pooled = loc.loss.estimate() if loc.loss is not None else self.config.loss_prior
        # (spaced copies may not have left yet: counted only when they go with the original)
        copied = {member.player for member in loc.copied_to} if self.config.redundancy_spacing <= 0 else set()
        sender = loc.last_sender
        unaware = 0.0
        for member in loc.by_addr.values():
            if member.player == sender:
                continue
            n = carriers + member.copies - 1 if member.player in copied else carriers
            p = member.loss.estimate() if member.loss is not None else pooled
            unaware += p ** n
            if unaware >= target:
                return False
        return True

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
        member.copy_report = 0          # a new endpoint's LOSS count starts from 0 (a retry's is still 0)
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
                # the sender's resend after a lost echo, or a redundant copy (no RETRANSMIT flag): the
                # same update, already sequenced and fanned out; only the sender needs its echo again
                # (members that lost it NACK that seq)
                stats["resends_recognised" if header.flags & RETRANSMIT else "redundant_copies_received"] += 1
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
            if self.config.redundancy and now - loc.loss_checked >= self.config.loss_refresh:
                self._decide_copies(loc, now)
            copy_members = loc.copy_members
            loc.carriers = 0                 # counted when the adapter takes the original (with what it packs)
            loc.copied_to = copy_members
            loc.last_sender = header.sender
            self._carrying.add(loc.id)
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
            copy_members = ()
            self._carrying.add(loc.id)
        loc.announced_at = now
        self._queue(out, loc.id)
        if copy_members:
            self._send_copies(loc, header.sender, out, now)     # after the original

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
        if config.redundancy:
            self._count_lost(loc, member, ranges)
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

    # ------------------------------------------------------------------ redundancy (each member's downlink)

    def _count_lost(self, loc: _Location, member: _Member, ranges: list[tuple[int, int]]) -> None:
        """Seqs a member asks for the first time were lost on its downlink (every copy of them): counted
        for its loss estimate.  Clipped to the seqs sent to it since it was counted from: a member that
        names seqs that never existed cannot inflate its estimate beyond the seqs it was sent."""
        if member.loss is None:
            return                       # not counted from yet (bound since the last decision)
        high = member.nack_high
        last = loc.last_seq
        for first, count in ranges:
            start, end = max(first, high + 1), min(first + count - 1, last)
            if end >= start:
                member.lost_pending += end - start + 1
                high = end
        member.nack_high = high

    def _on_loss_report(self, loc: _Location, member: _Member, payload: bytes) -> None:
        """A member's running count of seqs that reached it first as a COPY: each such seq's original
        was lost on its downlink, a loss its NACKs never show while copies are on.  Counted like a NACKed
        seq (a lost original), credited only up to the seqs actually sent to it with copies: a member
        cannot report more losses than it was given the chance to have.  Never answered."""
        (count,) = wire.LOSS_REPORT.unpack(payload)
        stats = loc.stats
        stats["loss_reports"] += 1
        new = (count - member.copy_report) & wire.MAX_U32
        member.copy_report = count
        if not self.config.redundancy or member.loss is None:
            return
        credit = min(new, member.copied - member.copy_losses)
        if credit < new:
            stats["loss_report_clipped"] += new - credit
        member.copy_losses += credit
        member.lost_pending += credit

    def _decide_copies(self, loc: _Location, now: float) -> None:
        """Fold what each bound member was sent and lost since the last time into its estimate, and
        decide how many copies of a reliable update its downlink gets."""
        config = self.config
        loc.loss_checked = now
        last = loc.last_seq - 1          # (the seq being fanned out now is not yet sent)
        pooled = loc.loss
        if pooled is None:
            pooled = loc.loss = LossEstimator(config.loss_prior, config.loss_prior_weight, config.loss_half_life)
        members = loc.by_addr.values()
        for member in members:
            if member.loss is None:
                member.loss = LossEstimator(config.loss_prior, config.loss_prior_weight, config.loss_half_life)
                member.counted_seq = member.nack_high = max(member.nack_high, last)
                member.lost_pending = 0
            sent = last - member.counted_seq
            if sent > 0 or member.lost_pending:
                # every seq is one trial of its original: lost if NACKed (every copy lost) or reported
                # as arriving first as a COPY, so copies on or off the estimate is of p itself
                # (a seq NACKed now may have been counted as sent in an earlier round)
                member.loss.observe(now, max(sent, 0), member.lost_pending)
                pooled.observe(now, max(sent, 0), member.lost_pending)
                member.counted_seq = max(member.counted_seq, last)
                member.lost_pending = 0
        # with copies on, only losing every copy shows (a few NACKs a minute per member at 5%): one
        # member's own count says little, so each estimate is shrunk toward the location's pooled one
        # (empirical Bayes); a member whose path is worse than its location's still shows it
        prior = pooled.estimate()
        copy_members = []
        for member in members:
            estimator: LossEstimator = member.loss  # type: ignore[assignment]  # (made in the loop above)
            estimator.set_prior(prior)
            member.copies = copies_for(estimator.estimate(), config.redundancy_threshold,
                                       config.redundancy_target, config.redundancy_max_copies)
            if member.copies > 1:
                copy_members.append(member)
        loc.copy_members = tuple(copy_members)

    def _send_copies(self, loc: _Location, sender: int, out: bytes, now: float) -> None:
        """Extra copies of a reliable update to each bound member whose downlink loses enough (not to
        its sender, whose echo is only an acknowledgement): unicast, each a datagram of its own."""
        spacing = self.config.redundancy_spacing
        sent = 0
        # marked COPY: a member that gets this first knows the original was lost (its LOSS report)
        copy = bytearray(out)
        copy[wire.FLAGS_OFFSET] = (out[wire.FLAGS_OFFSET] & ~RETRANSMIT) | COPY
        out = bytes(copy)
        for member in loc.copy_members:
            addr = member.addr
            if addr is None or member.player == sender:
                continue
            member.copied += 1
            for index in range(1, member.copies):
                if spacing <= 0:
                    self._queue(out, addr)
                    self.copies_queued += 1
                else:
                    due = self._copies_due
                    if len(due) >= self.config.max_spaced_copies:
                        due.popleft()
                        self.stats["spaced_copies_dropped"] += 1
                    due.append((now + index * spacing, out, addr))
                sent += 1
        loc.stats["redundant_copies_sent"] += sent
