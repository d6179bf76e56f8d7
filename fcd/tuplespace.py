"""``fcd-tuplespace``: a Linda tuplespace (server, client library, in-process mode).

Operations: ``out`` (write, optional lease in seconds), ``rd``/``in_`` (read/take, block until a
match or a timeout), ``rdp``/``inp`` (non-blocking), ``rd_all``/``in_all`` (bulk), ``notify``
(a subscription that receives every tuple written that matches).

Templates are tuples of the same arity as the tuples they match; each field is either a value
(matched exactly, type included: ``1`` does not match ``1.0`` or ``True``) or a type used as a
typed wildcard (``int``, ``float``, ``str``, ``bytes``, ``bool``, ``list``, ``dict``, ``None``
for any value).  Among stored tuples the oldest match wins; blocked callers are served in arrival
order (FIFO): a written tuple satisfies every waiting reader in order and stops at the first
waiting taker.

Layers: :class:`Space` is the sans-IO core (every call takes ``now``, results and events are
returned, nothing blocks); :class:`SpaceDriver` runs it on an asyncio loop (futures, one timer);
:class:`LocalTupleSpace` is the in-process mode; :class:`TupleSpaceServer` serves it over TCP and
:class:`TupleSpaceClient` speaks to it.  Wire format: 4-byte big-endian length + one msgpack map
per frame (never pickle); wildcards are msgpack ext type 1 holding the type name.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import json
import os
import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgpack

from boxcore import framing
from boxcore.redisconn import is_redis_url
from cliruntime import ConfigError, host_port, make_parser, non_negative_float, positive_int, run_async
from cliruntime.supervisor import Supervisor, within

log = logging.getLogger("fcd.tuplespace")

ANY = None  # a template field of None matches any value
WILDCARD_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bytes": bytes, "bool": bool,
                                   "list": list, "dict": dict}
EXT_WILDCARD = 1
MAX_FRAME = 1 << 20


class TupleSpaceError(Exception):
    """A refused or failed tuplespace operation (the text says why)."""


class TupleSpaceConnectionError(TupleSpaceError):
    """The connection to the tuplespace is gone (closed by the server, idle timeout, restart):
    what a new connection cures, unlike a refused operation."""


class TupleDecodeError(ValueError):
    """A frame that is not a valid tuplespace message."""


# ---------------------------------------------------------------- matching

MAX_LIMIT = 10_000          # tuples one rd_all/in_all returns at most
MAX_SECONDS = 10 ** 9       # a lease or timeout longer than ~30 years is a mistake (or an attack)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_lease(lease: Any) -> None:
    """A lease (of a tuple or a subscription): None, or finite seconds > 0.  A NaN lease would
    enter the expiry heap and stop every expiry once it reached the top."""
    if lease is not None and not (_is_number(lease) and 0 < lease <= MAX_SECONDS):
        raise TupleSpaceError(f"a lease is None or seconds in (0, {MAX_SECONDS}], not {lease!r}")


def check_timeout(timeout: Any) -> None:
    """A blocking call's timeout: None (for ever), or finite seconds >= 0."""
    if timeout is not None and not (_is_number(timeout) and 0 <= timeout <= MAX_SECONDS):
        raise TupleSpaceError(f"a timeout is None or seconds in [0, {MAX_SECONDS}], not {timeout!r}")


def check_limit(limit: Any) -> int:
    """rd_all/in_all's limit: an integer 1..MAX_LIMIT (not a bool, not a float)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise TupleSpaceError(f"a limit is an integer in 1..{MAX_LIMIT}, not {limit!r}")
    return limit


def check_tuple(tup: tuple, lease: float | None) -> None:
    """What ``out`` accepts on either backend: a non-empty tuple of values and a positive lease."""
    if not isinstance(tup, tuple) or not tup:
        raise TupleSpaceError("a tuple is a non-empty tuple")
    if any(isinstance(f, type) or f is None for f in tup):
        raise TupleSpaceError("a tuple holds values, not wildcards")
    check_lease(lease)


def check_template(template: tuple) -> None:
    if not isinstance(template, (tuple, list)) or len(template) == 0:
        raise TupleSpaceError("a template is a non-empty tuple")
    for field in template:
        if isinstance(field, type) and field not in WILDCARD_TYPES.values():
            raise TupleSpaceError(f"unsupported wildcard type {field.__name__}")


def matches(template: tuple, tup: tuple) -> bool:
    if len(template) != len(tup):
        return False
    for want, have in zip(template, tup):
        if want is None:
            continue
        if isinstance(want, type):
            if type(have) is not want:
                return False
        elif type(have) is not type(want) or have != want:
            return False
    return True


# ---------------------------------------------------------------- sans-IO core

@dataclass(frozen=True, slots=True)
class Delivered:
    waiter: int
    tuple: tuple


@dataclass(frozen=True, slots=True)
class TimedOut:
    waiter: int


@dataclass(frozen=True, slots=True)
class Notified:
    subscription: int
    tuple: tuple


@dataclass(frozen=True, slots=True)
class SubscriptionExpired:
    subscription: int


@dataclass(slots=True)
class _Waiter:
    template: tuple
    take: bool
    deadline: float | None
    owner: Any = None


@dataclass(frozen=True)
class Quotas:
    """What one owner (a connection of :class:`TupleSpaceServer`) may hold of a :class:`Space`,
    so that no client can take what the others need: blocked calls, subscriptions, and tuples
    written without a lease (leased ones leave by themselves)."""

    waiters: int = 1_000
    subscriptions: int = 100
    unleased: int = 10_000


class Space:
    """The tuplespace state machine: bounded tuples (in number and in bytes, their msgpack
    size), waiters and subscriptions, per-owner quotas, and replies of at most ``max_reply``
    bytes of tuples (an ``rd_all``/``in_all`` returns fewer than its limit rather than more)."""

    def __init__(self, max_tuples: int = 100_000, max_waiters: int = 10_000, max_subscriptions: int = 1_000,
                 max_bytes: int = 64 * MAX_FRAME, max_reply: int = MAX_FRAME - 4096,
                 quotas: Quotas = Quotas()) -> None:
        self.max_tuples, self.max_waiters, self.max_subscriptions = max_tuples, max_waiters, max_subscriptions
        self.max_bytes, self.max_reply, self.quotas = max_bytes, max_reply, quotas
        self.tuples: OrderedDict[int, tuple[tuple, float | None]] = OrderedDict()
        self.sizes: dict[int, int] = {}           # each stored tuple's msgpack size
        self.bytes = 0
        self.unleased_owner: dict[int, Any] = {}  # an unleased tuple's writer (when it has one)
        self.held: dict[tuple[str, Any], int] = {}   # (kind, owner) -> how many it holds
        self.waiters: OrderedDict[int, _Waiter] = OrderedDict()
        self.subscriptions: dict[int, tuple[tuple, float | None]] = {}
        self.sub_owner: dict[int, Any] = {}
        self._ids = itertools.count(1)
        self._deadlines: list[tuple[float, int, str, int]] = []  # (when, seq, kind, id)
        self._seq = itertools.count()
        self.stats = {"out": 0, "taken": 0, "read": 0, "expired": 0, "timeouts": 0, "refused_full": 0,
                      "refused_waiters": 0, "notified": 0, "refused_bytes": 0, "replies_cut": 0,
                      "refused_quota_waiters": 0, "refused_quota_subscriptions": 0, "refused_quota_unleased": 0}

    # ------------------------------------------------------------ per-owner quotas
    def _hold(self, kind: str, owner: Any) -> None:
        if owner is None:
            return
        key = (kind, owner)
        held = self.held.get(key, 0)
        limit = getattr(self.quotas, kind)
        if held >= limit:
            self.stats[f"refused_quota_{kind}"] += 1
            raise TupleSpaceError(f"this connection holds {held} {kind} already (its quota)")
        self.held[key] = held + 1

    def _release(self, kind: str, owner: Any) -> None:
        if owner is None:
            return
        key = (kind, owner)
        held = self.held.get(key, 0) - 1
        if held > 0:
            self.held[key] = held
        else:
            self.held.pop(key, None)

    def _forget(self, ident: int) -> None:
        """A stored tuple is gone (taken or expired): its bytes and its owner's quota free."""
        del self.tuples[ident]
        self.bytes -= self.sizes.pop(ident, 0)
        self._release("unleased", self.unleased_owner.pop(ident, None))

    def _arm(self, when: float | None, kind: str, ident: int) -> None:
        if when is not None:
            heapq.heappush(self._deadlines, (when, next(self._seq), kind, ident))

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def out(self, tup: tuple, lease: float | None, now: float, owner: Any = None) -> tuple[int, list]:
        check_tuple(tup, lease)
        size = len(encode_tuple(tup))
        self.stats["out"] += 1
        events: list = []
        for sub, (template, _) in self.subscriptions.items():
            if matches(template, tup):
                events.append(Notified(sub, tup))
                self.stats["notified"] += 1
        ident = next(self._ids)
        for wid, waiter in list(self.waiters.items()):
            if matches(waiter.template, tup):
                del self.waiters[wid]
                self._release("waiters", waiter.owner)
                events.append(Delivered(wid, tup))
                if waiter.take:
                    self.stats["taken"] += 1
                    return ident, events
                self.stats["read"] += 1
        if len(self.tuples) >= self.max_tuples or self.bytes + size > self.max_bytes:
            self.tick(now)
        if len(self.tuples) >= self.max_tuples:
            self.stats["refused_full"] += 1
            raise TupleSpaceError(f"tuplespace full ({self.max_tuples} tuples)")
        if self.bytes + size > self.max_bytes:
            self.stats["refused_bytes"] += 1
            raise TupleSpaceError(f"tuplespace full ({self.max_bytes} bytes of tuples)")
        if lease is None:
            self._hold("unleased", owner)
            if owner is not None:
                self.unleased_owner[ident] = owner
        expires = None if lease is None else now + lease
        self.tuples[ident] = (tup, expires)
        self.sizes[ident] = size
        self.bytes += size
        self._arm(expires, "tuple", ident)
        return ident, events

    def _find(self, template: tuple, now: float, limit: int) -> list[int]:
        """The oldest matches: at most ``limit``, and at most ``max_reply`` bytes of them (at
        least one)."""
        found, size = [], 0
        for ident, (tup, expires) in self.tuples.items():
            if expires is not None and expires <= now:
                continue
            if matches(template, tup):
                size += self.sizes[ident]
                if found and size > self.max_reply:
                    self.stats["replies_cut"] += 1
                    break
                found.append(ident)
                if len(found) >= limit:
                    break
        return found

    def read(self, template: tuple, take: bool, now: float) -> tuple | None:
        check_template(template)
        found = self._find(template, now, 1)
        if not found:
            return None
        return self._collect(found, take)[0]

    def read_all(self, template: tuple, take: bool, now: float, limit: int = MAX_LIMIT) -> list[tuple]:
        check_template(template)
        check_limit(limit)
        return self._collect(self._find(template, now, limit), take)

    def _collect(self, idents: list[int], take: bool) -> list[tuple]:
        out = []
        for ident in idents:
            tup = self.tuples[ident][0]
            if take:
                self._forget(ident)
            out.append(tup)
        self.stats["taken" if take else "read"] += len(out)
        return out

    def wait(self, waiter: int, template: tuple, take: bool, deadline: float | None, owner: Any = None) -> None:
        """Queue a blocked caller (after :meth:`read` found nothing)."""
        check_template(template)
        if deadline is not None and not math.isfinite(deadline):
            raise TupleSpaceError(f"a deadline must be finite, not {deadline!r}")
        if len(self.waiters) >= self.max_waiters:
            self.stats["refused_waiters"] += 1
            raise TupleSpaceError(f"too many blocked callers ({self.max_waiters})")
        self._hold("waiters", owner)
        self.waiters[waiter] = _Waiter(tuple(template), take, deadline, owner)
        self._arm(deadline, "waiter", waiter)

    def cancel(self, waiter: int) -> None:
        gone = self.waiters.pop(waiter, None)
        if gone is not None:
            self._release("waiters", gone.owner)

    def subscribe(self, sub: int, template: tuple, lease: float | None, now: float, owner: Any = None) -> None:
        check_template(template)
        check_lease(lease)
        if len(self.subscriptions) >= self.max_subscriptions:
            raise TupleSpaceError(f"too many subscriptions ({self.max_subscriptions})")
        self._hold("subscriptions", owner)
        expires = None if lease is None else now + lease
        self.subscriptions[sub] = (tuple(template), expires)
        if owner is not None:
            self.sub_owner[sub] = owner
        self._arm(expires, "sub", sub)

    def unsubscribe(self, sub: int) -> None:
        if self.subscriptions.pop(sub, None) is not None:
            self._release("subscriptions", self.sub_owner.pop(sub, None))

    def tick(self, now: float) -> list:
        """Expire leases, time out waiters and subscriptions due by ``now``."""
        events: list = []
        while self._deadlines and self._deadlines[0][0] <= now:
            when, _, kind, ident = heapq.heappop(self._deadlines)
            if kind == "tuple":
                entry = self.tuples.get(ident)
                if entry is not None and entry[1] == when:
                    self._forget(ident)
                    self.stats["expired"] += 1
            elif kind == "waiter":
                waiter = self.waiters.get(ident)
                if waiter is not None and waiter.deadline == when:
                    del self.waiters[ident]
                    self._release("waiters", waiter.owner)
                    self.stats["timeouts"] += 1
                    events.append(TimedOut(ident))
            else:
                entry = self.subscriptions.get(ident)
                if entry is not None and entry[1] == when:
                    del self.subscriptions[ident]
                    self._release("subscriptions", self.sub_owner.pop(ident, None))
                    events.append(SubscriptionExpired(ident))
        return events


# ---------------------------------------------------------------- asyncio driver

class SpaceDriver:
    """Runs a :class:`Space` on the running loop: futures for blocked calls, one timer.

    ``clock`` (``time()`` and ``call_at(when, fn)`` returning a handle with ``cancel()``) is the
    loop by default; tests pass a :class:`boxcore.testing.FakeClock` to move time themselves.
    """

    def __init__(self, space: Space | None = None, clock: Any = None) -> None:
        self.space = space or Space()
        self.loop = asyncio.get_running_loop()
        self.clock = clock or self.loop
        self._futures: dict[int, tuple[asyncio.Future, bool]] = {}
        self._subs: dict[int, Callable[[tuple | None], None]] = {}
        self._ids = itertools.count(1)
        self._timer: Any = None
        self._watchers: list[tuple[Callable[[], bool], asyncio.Future]] = []

    def now(self) -> float:
        return self.clock.time()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; checked after every change of the space's state
        (how a test waits for a blocked caller to be queued, without sleeping)."""
        if predicate():
            return
        fut = self.loop.create_future()
        self._watchers.append((predicate, fut))
        await fut

    def _changed(self) -> None:
        if not self._watchers:
            return
        keep = []
        for predicate, fut in self._watchers:
            if fut.done():
                continue
            if predicate():
                fut.set_result(None)
            else:
                keep.append((predicate, fut))
        self._watchers = keep

    def _dispatch(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, Delivered):
                fut, take = self._futures.pop(ev.waiter, (None, False))
                if fut is not None and not fut.done():
                    fut.set_result(ev.tuple)
                elif take:  # the taker went away in the meantime: put the tuple back
                    self.out(ev.tuple, None)
            elif isinstance(ev, TimedOut):
                fut, _ = self._futures.pop(ev.waiter, (None, False))
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif isinstance(ev, Notified):
                callback = self._subs.get(ev.subscription)
                if callback is not None:
                    callback(ev.tuple)
            elif isinstance(ev, SubscriptionExpired):
                callback = self._subs.pop(ev.subscription, None)
                if callback is not None:
                    callback(None)
        self._rearm()

    def _rearm(self) -> None:
        deadline = self.space.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.clock.call_at(deadline, self._on_timer)
        self._changed()

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch(self.space.tick(self.now()))

    def out(self, tup: tuple, lease: float | None, owner: Any = None) -> int:
        ident, events = self.space.out(tuple(tup), lease, self.now(), owner)
        self._dispatch(events)
        return ident

    async def get(self, template: tuple, take: bool, timeout: float | None, owner: Any = None) -> tuple | None:
        template = tuple(template)
        found = self.space.read(template, take, self.now())
        if found is not None or timeout == 0:
            if found is not None and take:
                self._changed()
            return found
        wid = next(self._ids)
        fut = self.loop.create_future()
        deadline = None if timeout is None else self.now() + timeout
        self.space.wait(wid, template, take, deadline, owner)
        self._futures[wid] = (fut, take)
        self._rearm()
        try:
            return await fut
        finally:
            if not fut.done() or fut.cancelled():
                self.space.cancel(wid)
                self._futures.pop(wid, None)
                self._changed()

    def get_all(self, template: tuple, take: bool, limit: int) -> list[tuple]:
        found = self.space.read_all(tuple(template), take, self.now(), limit)
        self._changed()
        return found

    def subscribe(self, template: tuple, lease: float | None, callback: Callable[[tuple | None], None],
                  owner: Any = None) -> int:
        sub = next(self._ids)
        self.space.subscribe(sub, tuple(template), lease, self.now(), owner)
        self._subs[sub] = callback
        self._rearm()
        return sub

    def unsubscribe(self, sub: int) -> None:
        self.space.unsubscribe(sub)
        self._subs.pop(sub, None)
        self._changed()


class Subscription:
    """Tuples written that match a notify template; ``async for tup in sub``. Bounded queue."""

    def __init__(self, max_queue: int = 10_000) -> None:
        self.queue: asyncio.Queue = asyncio.Queue(max_queue)
        self.dropped = 0
        self.id = 0
        self._cancel: Callable[[], Any] | None = None

    def _push(self, tup: tuple | None) -> None:
        try:
            self.queue.put_nowait(tup)
        except asyncio.QueueFull:
            self.dropped += 1

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple:
        tup = await self.queue.get()
        if tup is None:
            raise StopAsyncIteration
        return tup

    async def get(self, timeout: float | None = None) -> tuple | None:
        try:
            return await within(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def cancel(self) -> None:
        if self._cancel is not None:
            result = self._cancel()
            if asyncio.iscoroutine(result):
                await result


class _Api:
    """The common client API; subclasses implement ``_call``."""

    async def out(self, tup: tuple, lease: float | None = None) -> int:
        return await self._call("out", tuple=tuple(tup), lease=lease)

    async def rd(self, template: tuple, timeout: float | None = None) -> tuple | None:
        return await self._call("rd", template=tuple(template), timeout=timeout)

    async def in_(self, template: tuple, timeout: float | None = None) -> tuple | None:
        return await self._call("in", template=tuple(template), timeout=timeout)

    async def rdp(self, template: tuple) -> tuple | None:
        return await self._call("rd", template=tuple(template), timeout=0)

    async def inp(self, template: tuple) -> tuple | None:
        return await self._call("in", template=tuple(template), timeout=0)

    async def rd_all(self, template: tuple, limit: int = 10_000) -> list[tuple]:
        return await self._call("rd_all", template=tuple(template), limit=limit)

    async def in_all(self, template: tuple, limit: int = 10_000) -> list[tuple]:
        return await self._call("in_all", template=tuple(template), limit=limit)


class LocalTupleSpace(_Api):
    """In-process mode: same API, no sockets."""

    def __init__(self, space: Space | None = None, driver: SpaceDriver | None = None) -> None:
        self.driver = driver or SpaceDriver(space)

    async def _call(self, op: str, **kw) -> Any:
        return await _execute(self.driver, op, kw)

    async def notify(self, template: tuple, lease: float | None = None, max_queue: int = 10_000) -> Subscription:
        sub = Subscription(max_queue)
        sub.id = self.driver.subscribe(tuple(template), lease, sub._push)
        sub._cancel = lambda: self.driver.unsubscribe(sub.id)
        return sub

    async def close(self) -> None:
        pass


async def _execute(driver: SpaceDriver, op: str, kw: dict, owner: Any = None) -> Any:
    """One operation; ``owner`` (a server's connection) is charged with what it holds."""
    if op == "out":
        return driver.out(kw["tuple"], kw.get("lease"), owner)
    if op in ("rd", "in"):
        timeout = kw.get("timeout")
        check_timeout(timeout)
        return await driver.get(kw["template"], op == "in", timeout, owner)
    if op in ("rd_all", "in_all"):
        return driver.get_all(kw["template"], op == "in_all", check_limit(kw.get("limit", MAX_LIMIT)))
    raise TupleSpaceError(f"unknown operation {op!r}")


# ---------------------------------------------------------------- wire

def _default(obj: Any) -> Any:
    if isinstance(obj, type):
        for name, kind in WILDCARD_TYPES.items():
            if obj is kind:
                return msgpack.ExtType(EXT_WILDCARD, name.encode())
    raise TypeError(f"cannot send {obj!r}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_WILDCARD:
        kind = WILDCARD_TYPES.get(data.decode("ascii", "replace"))
        if kind is None:
            raise TupleDecodeError(f"unknown wildcard type {data!r}")
        return kind
    raise TupleDecodeError(f"unknown msgpack extension {code}")


def encode_frame(msg: dict) -> bytes:
    return framing.encode_frame(msg, default=_default)


def encode_tuple(tup: tuple) -> bytes:
    """A tuple as the wire carries it (what :class:`Space` counts as its size)."""
    return msgpack.packb(list(tup), default=_default, use_bin_type=True)


def _require_map(msg: Any) -> dict:
    if not isinstance(msg, dict):
        raise TupleDecodeError("a frame must hold a map")
    return msg


def frame_decoder(max_frame: int = MAX_FRAME) -> framing.FrameDecoder:
    """The suite's framer with this protocol's wildcards and validator: messages (dicts) or
    :class:`TupleDecodeError` instances out; a lost boundary raises ``FramingError``."""
    return framing.FrameDecoder(max_frame, error=TupleDecodeError, validate=_require_map, ext_hook=_ext_hook)


def _as_tuple(value: Any, what: str) -> tuple:
    if not isinstance(value, list):
        raise TupleSpaceError(f"{what} must be an array")
    return tuple(value)


# ---------------------------------------------------------------- server

class TupleSpaceServer:
    """The space over TCP, hardened against clients that hold resources without using them.

    Bounds (each refusal counted in :attr:`stats`): at most ``max_connections`` connections;
    a frame at most ``max_frame`` bytes; at most ``max_buffered`` bytes of incomplete frames over
    all connections (the connection that would exceed it is closed); a frame must arrive whole
    within ``frame_timeout`` seconds of its first byte (slowloris); a connection with nothing
    blocked, no subscription and no bytes for ``idle_timeout`` seconds is closed; at most
    ``max_inflight`` requests per connection at once; a client that does not read its replies is
    closed once ``max_output`` bytes wait for it.
    """

    def __init__(self, space: Space | None = None, max_frame: int = MAX_FRAME, *, clock: Any = None,
                 max_connections: int = 256, max_buffered: int = 16 * MAX_FRAME, frame_timeout: float = 10.0,
                 idle_timeout: float = 300.0, max_inflight: int = 1024, max_output: int = 4 * MAX_FRAME) -> None:
        self.space = space or Space()
        self.max_frame = max_frame
        self.clock = clock
        self.max_connections, self.max_buffered = max_connections, max_buffered
        self.frame_timeout, self.idle_timeout = frame_timeout, idle_timeout
        self.max_inflight, self.max_output = max_inflight, max_output
        self.driver: SpaceDriver | None = None
        self.server: asyncio.base_events.Server | None = None
        self.supervisor = Supervisor("fcd-tuplespace", logger=log)
        self.conns: set[_Connection] = set()
        self.numbers = itertools.count(1)
        self.buffered = 0        # bytes of incomplete frames held over all connections
        self.stats = {"connections": 0, "requests": 0, "bad_frames": 0, "errors": 0,
                      "refused_connections": 0, "refused_buffer": 0, "frame_timeouts": 0, "idle_closed": 0,
                      "refused_inflight": 0, "slow_readers_closed": 0}

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.driver = SpaceDriver(self.space, clock=self.clock)
        self.server = await asyncio.get_running_loop().create_server(lambda: _Connection(self), host, port)
        return self.server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            conn.close()
        await self.supervisor.aclose()
        if self.server is not None:
            await self.server.wait_closed()

    def snapshot(self) -> dict[str, int]:
        return {**self.stats, "active_connections": len(self.conns), "buffered_bytes": self.buffered}

    async def _handle(self, msg: dict, conn: "_Connection") -> None:
        rid = msg.get("id")
        send = conn.send
        try:
            op = msg.get("op")
            if op == "notify":
                template = _as_tuple(msg.get("template"), "template")
                sub_box: dict[str, int] = {}

                def push(tup: tuple | None) -> None:
                    send({"event": "notify" if tup is not None else "expired", "sub": sub_box["id"],
                          "tuple": list(tup) if tup is not None else None})

                sub_box["id"] = self.driver.subscribe(template, msg.get("lease"), push, owner=conn.number)
                conn.subs.add(sub_box["id"])
                result: Any = sub_box["id"]
            elif op == "unnotify":
                sub = msg.get("sub", -1)
                if sub in conn.subs:          # only this connection's own subscriptions
                    conn.subs.discard(sub)
                    self.driver.unsubscribe(sub)
                result = True
            else:
                kw = {k: msg[k] for k in ("lease", "timeout", "limit") if k in msg}
                if "tuple" in msg:
                    kw["tuple"] = _as_tuple(msg["tuple"], "tuple")
                if "template" in msg:
                    kw["template"] = _as_tuple(msg["template"], "template")
                result = await _execute(self.driver, str(op), kw, owner=conn.number)
                if isinstance(result, tuple):
                    result = list(result)
                elif isinstance(result, list):
                    result = [list(t) for t in result]
            send({"id": rid, "ok": True, "result": result})
        except (TupleSpaceError, KeyError, TypeError, ValueError, OverflowError) as exc:
            self.stats["errors"] += 1
            send({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})


class _Connection(asyncio.Protocol):
    """One client of :class:`TupleSpaceServer`: bytes go straight into its framer (no stream
    buffer in between, so what a connection holds is what the framer holds), requests in
    flight, subscriptions, and one timer for the frame and idle timeouts."""

    def __init__(self, server: TupleSpaceServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.frames = frame_decoder(server.max_frame)
        self.number = next(server.numbers)     # this connection as an owner of the space's quotas
        self.counted = 0             # this connection's share of server.buffered
        self.inflight = 0
        self.subs: set[int] = set()
        self.frame_started = 0.0     # when the incomplete frame held now began
        self.last_data = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self.server
        if len(server.conns) >= server.max_connections:
            server.stats["refused_connections"] += 1
            transport.abort()
            return
        server.conns.add(self)
        server.stats["connections"] += 1
        self.transport = transport
        self.last_data = self.loop.time()
        self._arm()

    def data_received(self, data: bytes) -> None:
        server, stats = self.server, self.server.stats
        if self.transport is None:
            return
        had_partial = self.frames.buffered > 0
        self.last_data = self.loop.time()
        try:
            messages = self.frames.feed(data)
        except framing.FramingError as exc:
            stats["bad_frames"] += 1
            log.warning("closing connection: %s", exc)
            self.close()
            return
        if not self._account():
            stats["refused_buffer"] += 1
            log.warning("closing connection: incomplete frames over all connections exceed %d bytes",
                        server.max_buffered)
            self.close()
            return
        if self.frames.buffered and (messages or not had_partial):
            self.frame_started = self.last_data          # a new incomplete frame began in this chunk
            if self.timer is not None and self.timer.when() > self._deadline():
                self.timer.cancel()                      # its timeout comes before the idle one
                self._arm()
        for msg in messages:
            if isinstance(msg, TupleDecodeError):
                stats["bad_frames"] += 1
                self.send({"id": None, "ok": False, "error": str(msg)})
                continue
            stats["requests"] += 1
            if self.inflight >= server.max_inflight:
                stats["refused_inflight"] += 1
                self.send({"id": msg.get("id"), "ok": False,
                           "error": f"too many requests in flight ({server.max_inflight})"})
                continue
            self.inflight += 1
            server.supervisor.spawn(self._request(msg), name="request", critical=False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return
        self.transport = None
        server = self.server
        server.conns.discard(self)
        server.buffered -= self.counted
        self.counted = 0
        if self.timer is not None:
            self.timer.cancel()
        for sub in self.subs:
            server.driver.unsubscribe(sub)
        self.subs.clear()

    # ------------------------------------------------------------ helpers
    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()          # connection_lost follows and releases everything

    def send(self, msg: dict) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > self.server.max_output:
            self.server.stats["slow_readers_closed"] += 1       # replies are not queued without bound
            self.close()
            return
        transport.write(encode_frame(msg))

    def _account(self) -> bool:
        """Track this connection's incomplete frame in the server-wide total; False = over it."""
        server = self.server
        server.buffered += self.frames.buffered - self.counted
        self.counted = self.frames.buffered
        return server.buffered <= server.max_buffered

    def _deadline(self) -> float:
        if self.frames.buffered:
            return self.frame_started + self.server.frame_timeout
        return self.last_data + self.server.idle_timeout

    def _arm(self) -> None:
        self.timer = self.loop.call_at(self._deadline(), self._on_timer)

    def _on_timer(self) -> None:
        """One timer per connection, moved on lazily: fires, then checks what is due."""
        self.timer = None
        if self.transport is None:
            return
        stats = self.server.stats
        if self.loop.time() >= self._deadline():
            if self.frames.buffered:
                stats["frame_timeouts"] += 1
                self.close()
                return
            if not (self.inflight or self.subs):        # blocked callers and subscribers wait legitimately
                stats["idle_closed"] += 1
                self.close()
                return
            self.last_data = self.loop.time()
        self._arm()

    async def _request(self, msg: dict) -> None:
        try:
            await self.server._handle(msg, self)
        finally:
            self.inflight -= 1


# ---------------------------------------------------------------- client

class TupleSpaceClient(_Api):
    """A client of :class:`TupleSpaceServer`.  A request not answered within ``answer_timeout``
    seconds (beyond a blocking call's own timeout) fails with :class:`TupleSpaceError`
    (counted in ``stats["unanswered"]``): a server that never answers cannot hang the caller."""

    answer_timeout = 30.0

    def __init__(self) -> None:
        self.stats = {"unanswered": 0}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._subs: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._supervisor = Supervisor("tuplespace-client", logger=log)
        self._task: asyncio.Task | None = None

    @classmethod
    async def connect(cls, host: str, port: int) -> "TupleSpaceClient":
        self = cls()
        self.reader, self.writer = await asyncio.open_connection(host, port)
        self._task = self._supervisor.spawn(self._read_loop(), name="read")
        return self

    async def _read_loop(self) -> None:
        frames = frame_decoder()
        try:
            while data := await self.reader.read(65536):
                for msg in frames.feed(data):
                    if isinstance(msg, TupleDecodeError):
                        log.warning("tuplespace: ignoring a bad frame from the server: %s", msg)
                        continue
                    if "event" in msg:
                        sub = self._subs.get(msg.get("sub"))
                        if sub is not None:
                            sub._push(tuple(msg["tuple"]) if msg.get("tuple") is not None else None)
                        continue
                    fut = self._pending.pop(msg.get("id"), None)
                    if fut is None or fut.done():
                        continue
                    if msg.get("ok"):
                        fut.set_result(msg.get("result"))
                    else:
                        fut.set_exception(TupleSpaceError(str(msg.get("error"))))
        except (ConnectionError, framing.FramingError) as exc:
            log.warning("tuplespace connection lost: %s", exc)
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(TupleSpaceConnectionError("connection closed"))
            self._pending.clear()
            for sub in self._subs.values():
                sub._push(None)

    async def _request(self, msg: dict, wait: float | None = 0.0) -> Any:
        """Send one request and await its answer: for at most ``wait`` seconds (a blocking call's
        own timeout) plus ``answer_timeout``; ``wait=None``: a blocking call without a timeout,
        awaited for as long as it takes."""
        if self.writer is None or self.writer.is_closing() or (self._task and self._task.done()):
            raise TupleSpaceConnectionError("not connected")
        rid = next(self._ids)
        msg["id"] = rid
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.writer.write(encode_frame(msg))
        bound = None if wait is None else wait + self.answer_timeout
        try:
            return await within(fut, bound)
        except asyncio.TimeoutError:
            self.stats["unanswered"] += 1
            raise TupleSpaceError(f"{msg.get('op')}: no answer from the tuplespace within {bound:g} s") from None
        finally:
            self._pending.pop(rid, None)

    async def _call(self, op: str, **kw) -> Any:
        wait = 0.0
        if op in ("rd", "in"):
            timeout = kw.get("timeout")
            check_timeout(timeout)          # here too: the bound below is computed from it
            wait = timeout
        result = await self._request({"op": op, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}},
                                     wait)
        if op in ("rd", "in"):
            return tuple(result) if result is not None else None
        if op in ("rd_all", "in_all"):
            return [tuple(t) for t in result]
        return result

    async def notify(self, template: tuple, lease: float | None = None, max_queue: int = 10_000) -> Subscription:
        sub = Subscription(max_queue)
        sub.id = await self._request({"op": "notify", "template": list(template), "lease": lease})
        self._subs[sub.id] = sub

        async def cancel() -> None:
            self._subs.pop(sub.id, None)
            await self._request({"op": "unnotify", "sub": sub.id})

        sub._cancel = cancel
        return sub

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        await self._supervisor.aclose()


async def connect(address: str | tuple[str, int] | None) -> _Api:
    """``None`` or ``"local"``: an in-process space; a Redis URL (``redis://HOST:PORT/N``,
    ``unix:///path``, ``...?cluster=1``): the space on Redis; otherwise HOST:PORT of a server."""
    if address is None or address == "local":
        return LocalTupleSpace()
    if is_redis_url(address):
        from fcd.tuplespace_redis import RedisTupleSpace
        return await RedisTupleSpace.connect(address)
    host, port = host_port(address) if isinstance(address, str) else address
    return await TupleSpaceClient.connect(host, port)


# ---------------------------------------------------------------- CLI

def build_parser():
    p = make_parser("fcd-tuplespace", "Run a Linda tuplespace server (msgpack over TCP).", examples=[
        "fcd-tuplespace --listen 127.0.0.1:7400",
        "fcd-tuplespace --listen 127.0.0.1:7400 --max-tuples 200000 --stats-json ts.json",
    ])
    p.add_argument("--listen", type=host_port, default=("127.0.0.1", 7400))
    p.add_argument("--max-tuples", type=positive_int, default=100_000)
    p.add_argument("--max-waiters", type=positive_int, default=10_000)
    p.add_argument("--max-bytes", type=positive_int, default=64 * MAX_FRAME,
                   help="bytes of tuples held (their msgpack size; beyond: out refused, counted)")
    p.add_argument("--quota-waiters", type=positive_int, default=Quotas.waiters,
                   help="blocked rd/in calls one connection may have at once")
    p.add_argument("--quota-subscriptions", type=positive_int, default=Quotas.subscriptions,
                   help="notify subscriptions one connection may hold")
    p.add_argument("--quota-unleased", type=positive_int, default=Quotas.unleased,
                   help="tuples without a lease one connection may have written and not yet seen taken")
    p.add_argument("--max-frame", type=positive_int, default=MAX_FRAME, help="largest request frame (bytes)")
    p.add_argument("--max-connections", type=positive_int, default=256)
    p.add_argument("--max-buffered", type=positive_int, default=16 * MAX_FRAME,
                   help="bytes of incomplete frames held over all connections")
    p.add_argument("--frame-timeout", type=non_negative_float, default=10.0,
                   help="seconds a frame may take to arrive whole")
    p.add_argument("--idle-timeout", type=non_negative_float, default=300.0,
                   help="seconds before a connection with nothing blocked or subscribed and no bytes is closed")
    p.add_argument("--ready-file", type=Path, help="write the bound address as JSON here when listening")
    return p


async def amain(args, ctx) -> int:
    quotas = Quotas(args.quota_waiters, args.quota_subscriptions, args.quota_unleased)
    space = Space(args.max_tuples, args.max_waiters, max_bytes=args.max_bytes,
                  max_reply=max(1, args.max_frame - 4096), quotas=quotas)
    server = TupleSpaceServer(space, max_frame=args.max_frame,
                              max_connections=args.max_connections, max_buffered=args.max_buffered,
                              frame_timeout=args.frame_timeout, idle_timeout=args.idle_timeout)
    try:
        host, port = await server.start(*args.listen)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.listen[0]}:{args.listen[1]}: {exc.strerror}") from None
    log.info("tuplespace listening on %s:%d", host, port)
    print(f"fcd-tuplespace: listening on {host}:{port}", flush=True)
    if args.ready_file:
        args.ready_file.write_text(json.dumps({"listen": [host, port], "pid": os.getpid()}))
    ctx.stats.providers["server"] = server.snapshot
    ctx.stats.providers["space"] = lambda: {**server.space.stats, "tuples": len(server.space.tuples)}
    await ctx.stop.wait()
    await server.close()
    return 0


def main(argv=None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
