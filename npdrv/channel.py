"""The driver's side of the control protocol, sans-IO.

:class:`ControlChannel` turns command lists into request frames, matches reply
frames to requests by correlator, reassembles fragmented replies, resends
idempotent requests when their timer fires, and reports each request's outcome
as an event.  It never touches a socket or a clock: ``now`` comes in, frames
and events come out (pulled with :meth:`frames_to_send` / :meth:`next_event`,
the next deadline with :meth:`get_timer`).
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

from npdrv import wire
from npdrv.wire import Body, Cmd, Command, Message, Status


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one request command: its reply and, for TABLE_DUMP, the entries."""

    request: Command
    reply: Command
    entries: tuple[Body, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reply.status is Status.OK


@dataclass(frozen=True, slots=True)
class Completed:
    correlator: int
    results: tuple[Result, ...]


@dataclass(frozen=True, slots=True)
class Failed:
    correlator: int
    reason: str
    command: Cmd | None = None


@dataclass(slots=True)
class _Pending:
    commands: tuple[Command, ...]
    frame: bytes
    deadline: float
    attempts: int
    retryable: bool
    fragments: dict[int, Message] = field(default_factory=dict)
    last_fragment: int | None = None


class ControlChannel:
    """Correlators, timeouts, retries and reassembly for one control interface."""

    def __init__(self, src_mac: bytes, dst_mac: bytes = wire.BROADCAST, *, timeout: float = 0.5,
                 retries: int = 3, max_pending: int = 64, max_fragments: int = 4096,
                 seed: int | None = None) -> None:
        if timeout <= 0 or retries < 0 or max_pending < 1 or max_fragments < 1:
            raise ValueError("timeout > 0, retries >= 0, max_pending >= 1 and max_fragments >= 1")
        self.src_mac = wire.mac_bytes(src_mac)
        self.dst_mac = wire.mac_bytes(dst_mac)
        self.timeout = timeout
        self.retries = retries
        self.max_pending = max_pending
        self.max_fragments = max_fragments
        # A random start keeps a restarted driver from matching a previous life's replies.
        self._next = random.Random(seed).randrange(1, 2 ** 32)
        self._pending: dict[int, _Pending] = {}
        self._outbox: collections.deque[bytes] = collections.deque()
        self._events: collections.deque[Completed | Failed] = collections.deque()
        self.stats: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------ requests
    @property
    def pending(self) -> int:
        return len(self._pending)

    def can_submit(self) -> bool:
        return len(self._pending) < self.max_pending

    def submit(self, commands: list[Command] | tuple[Command, ...], now: float) -> int:
        """Queue one request frame; returns its correlator.

        Raises ValueError if the commands do not fit in one frame (split them
        with :func:`npdrv.wire.split_commands`) or too many requests are pending.
        """
        commands = tuple(commands)
        if not commands:
            raise ValueError("a request needs at least one command")
        if not self.can_submit():
            self.stats["refused_busy"] += 1
            raise ValueError(f"{self.max_pending} requests already pending")
        correlator = self._allocate()
        message = Message(correlator, commands)
        data = wire.frame(self.dst_mac, self.src_mac, message)   # raises if too long
        retryable = all(cmd.type in wire.IDEMPOTENT for cmd in commands)
        self._pending[correlator] = _Pending(commands, data, now + self.timeout, 1, retryable)
        self._outbox.append(data)
        self.stats["requests"] += 1
        return correlator

    def cancel(self, correlator: int) -> None:
        self._pending.pop(correlator, None)

    def _allocate(self) -> int:
        while True:
            correlator = self._next
            self._next = self._next % 0xFFFFFFFF + 1     # 1..2^32-1; 0 is never used
            if correlator not in self._pending:
                return correlator

    # ------------------------------------------------------------ I/O
    def frames_to_send(self) -> list[bytes]:
        out = list(self._outbox)
        self._outbox.clear()
        self.stats["frames_sent"] += len(out)
        return out

    def next_event(self) -> Completed | Failed | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        return min((p.deadline for p in self._pending.values()), default=None)

    def handle_timer(self, now: float) -> None:
        for correlator, pending in list(self._pending.items()):
            if pending.deadline > now:
                continue
            if pending.retryable and pending.attempts <= self.retries:
                pending.attempts += 1
                pending.deadline = now + self.timeout
                pending.fragments.clear()
                pending.last_fragment = None
                self._outbox.append(pending.frame)
                self.stats["retries"] += 1
                continue
            del self._pending[correlator]
            self.stats["timeouts"] += 1
            first = pending.commands[0].type
            self._events.append(Failed(correlator, f"no reply after {pending.attempts} attempt(s)", first))

    def receive(self, data: bytes, now: float) -> None:
        """Take one frame from the control interface (anything malformed is counted, dropped)."""
        try:
            _, _, message = wire.parse_frame(data)
        except wire.GuidedFrameDecodeError:
            self.stats["malformed"] += 1
            return
        if not message.reply:
            self.stats["ignored_requests"] += 1
            return
        pending = self._pending.get(message.correlator)
        if pending is None:
            self.stats["stale"] += 1          # late reply to a finished or abandoned request
            return
        if message.fragment in pending.fragments or message.fragment >= self.max_fragments:
            self.stats["duplicate_fragments" if message.fragment < self.max_fragments
                       else "refused_fragments"] += 1
            return
        ends_at = message.fragment if not message.more else pending.last_fragment
        if ends_at is not None and (
                (not message.more and pending.last_fragment is not None)       # a second last fragment
                or any(i > ends_at for i in (*pending.fragments, message.fragment))):   # one beyond the last
            self.stats["refused_fragments"] += 1      # the reply cannot be put together: a retry asks again
            return
        pending.fragments[message.fragment] = message
        pending.last_fragment = ends_at
        last = pending.last_fragment
        if last is None or len(pending.fragments) != last + 1:
            return
        replies = [cmd for i in range(last + 1) for cmd in pending.fragments[i].commands]
        del self._pending[message.correlator]
        try:
            results = _match(pending.commands, replies)
        except wire.GuidedFrameDecodeError as exc:
            self.stats["malformed"] += 1
            self._events.append(Failed(message.correlator, f"bad reply: {exc}"))
            return
        self.stats["replies"] += 1
        self._events.append(Completed(message.correlator, results))


def _match(requests: tuple[Command, ...], replies: list[Command]) -> tuple[Result, ...]:
    """Pair each request command with its reply (and a dump with its entries)."""
    results = []
    pos = 0
    for req in requests:
        if pos >= len(replies):
            raise wire.GuidedFrameDecodeError(f"no reply for {req.type.name}")
        rep = replies[pos]
        pos += 1
        if rep.type is not req.type:
            raise wire.GuidedFrameDecodeError(f"reply {rep.type.name} where {req.type.name} was expected")
        entries: list[Body] = []
        if rep.type is Cmd.TABLE_DUMP and rep.ok:
            count = rep.body.count
            chunk = replies[pos:pos + count]
            if len(chunk) != count or any(c.type is not Cmd.ENTRY or not c.ok for c in chunk):
                raise wire.GuidedFrameDecodeError(f"TABLE_DUMP announced {count} entries")
            if any(c.body.table is not rep.body.table for c in chunk):
                raise wire.GuidedFrameDecodeError("TABLE_DUMP entry from another table")
            entries = [c.body.record for c in chunk]
            pos += count
        results.append(Result(req, rep, tuple(entries)))
    if pos != len(replies):
        raise wire.GuidedFrameDecodeError(f"{len(replies) - pos} unexpected commands in the reply")
    return tuple(results)
