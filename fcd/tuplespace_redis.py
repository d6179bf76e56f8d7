"""The tuplespace on Redis: the same Linda semantics as :mod:`fcd.tuplespace`, shared by many machines.

Selected with a URL wherever a tuplespace address is taken (``--tuplespace redis://HOST:PORT/N``,
``unix:///path/redis.sock``, ``redis://HOST:PORT?cluster=1``).  Every operation that must be atomic
runs as one server-side Lua script, so several servers and thousands of routers on many machines
see one space:

- **out** stores the tuple and, in the same script, serves blocked callers in arrival order (every
  waiting reader gets it, the first waiting taker takes it and it is not stored), then publishes it
  to ``notify`` subscribers;
- **rd/in** look for the oldest match; if there is none and the caller may wait, the same script
  queues the caller as a waiter (FIFO by a sequence number), which then blocks on its own inbox list
  (``BLPOP``) until ``out`` pushes a tuple there or its timeout ends;
- a waiter that gives up runs ``cancel``: it leaves the queue and takes whatever ``out`` pushed in
  the meantime, so a tuple is never lost between a timeout and a delivery;
- leases are expiry times (``ZSET`` by time): expired tuples are never returned and are purged as
  scripts run; waiters carry a deadline refreshed while they wait, so a crashed client's waiter
  expires instead of swallowing tuples.

Keys of one space share the hash tag ``{ts:NAME}``, so a Redis Cluster keeps a space on one slot
(scripts need it).  Fields are stored as a type code and a canonical msgpack encoding, so matching
keeps the core's rules (``1`` does not match ``1.0`` or ``True``; ``int`` does not match ``bool``).
Scans follow the most selective index among arity, first field and second field.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from typing import Any

import msgpack

from cliruntime.supervisor import Supervisor
from fcd.tuplespace import (MAX_LIMIT, Subscription, TupleSpaceConnectionError, TupleSpaceError, _Api,
                            check_lease, check_limit, check_template, check_timeout, check_tuple, matches)

log = logging.getLogger("fcd.tuplespace_redis")

TYPE_CODES: dict[type, bytes] = {int: b"i", float: b"f", str: b"s", bytes: b"b", bool: b"o", list: b"l",
                                 dict: b"d", tuple: b"l"}
WILDCARD = b"\x00"
BLOCK_CHUNK = 2.0          # seconds a waiter blocks before refreshing its deadline
FETCH_BATCH = 1024         # tuples a bulk read fetches per round trip
WAITER_GRACE_MS = 5_000    # how long past its refresh a silent waiter is kept
INBOX_TTL_MS = 60_000      # a delivered tuple waits this long for a waiter that died


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value, key=repr)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value == 0.0:
        return 0.0                      # -0.0 == 0.0 in Python: one encoding for both
    return value


def field_key(value: Any) -> bytes:
    """A stored field: its type code then its canonical msgpack encoding."""
    code = TYPE_CODES.get(type(value))
    if code is None:
        raise TupleSpaceError(f"unsupported field type {type(value).__name__}")
    return code + msgpack.packb(_canonical(value), use_bin_type=True)


def template_key(field: Any) -> bytes:
    """A template field: empty for any value, NUL + type code for a typed wildcard, else the value."""
    if field is None:
        return b""
    if isinstance(field, type):
        return WILDCARD + TYPE_CODES[field]
    return field_key(field)


NO_EXPIRY = b"0" * 16      # an index member's expiry field for a tuple without a lease
# values whose stored encoding is equal exactly when ``matches`` finds them equal (not float: NaN)
_EXACT_KEY_TYPES = (int, str, bytes, bool)


def index_matcher(template: tuple, keyed: int | None):
    """``matches(template, fields)`` for the decoded fields of an index's members, without
    re-checking what that index already guarantees: the arity, and for a ``k1``/``k2`` index the
    field it is keyed by (``keyed``: 0 or 1; None for the arity index) when its encoding decides
    equality."""
    typed, valued = [], []
    for i, want in enumerate(template):
        if want is None or (i == keyed and type(want) in _EXACT_KEY_TYPES):
            continue
        if isinstance(want, type):
            typed.append((i, want))
        else:
            valued.append((i, want))

    def accept(fields: list) -> bool:
        for i, want in typed:
            if type(fields[i]) is not want:
                return False
        for i, want in valued:
            have = fields[i]
            if type(have) is not type(want) or have != want:
                return False
        return True

    return accept


def _pack_for_lua(fields: list[bytes]) -> bytes:
    """An array of byte strings as Redis's Lua cmsgpack reads it (raw strings: it has no bin type)."""
    return msgpack.packb(fields, use_bin_type=False)


_COMMON = r"""
local P = KEYS[1]
local DATA, SIG, EXP = P .. ':data', P .. ':sig', P .. ':exp'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function field_ok(want, have)
  if want == '' then return true end
  if string.byte(want, 1) == 0 then return string.sub(want, 2, 2) == string.sub(have, 1, 1) end
  return want == have
end
local function tmatch(tpl, sig)
  if #tpl ~= #sig then return false end
  for i = 1, #tpl do
    if not field_ok(tpl[i], sig[i]) then return false end
  end
  return true
end
local function index_keys(sig)
  local n = #sig
  local keys = {P .. ':a:' .. n, P .. ':k1:' .. n .. ':' .. redis.sha1hex(sig[1])}
  if n >= 2 then keys[3] = P .. ':k2:' .. n .. ':' .. redis.sha1hex(sig[2]) end
  return keys
end
-- index members are the entry itself: 16 digits of id, 16 of expiry (0 = none), then the tuple, so a
-- bulk read is one ZRANGE with nothing else to fetch
local HEAD = 32
local function member_of(id, expires, data) return string.format('%016d%016d', id, expires) .. data end
local function expiry_of(member) return tonumber(string.sub(member, 17, 32)) end
local function live(member, now)
  local e = expiry_of(member)
  return e == 0 or e > now
end
local function remove(id, sig)
  local member = redis.call('HGET', DATA, id)
  if member then
    for _, k in ipairs(index_keys(sig)) do redis.call('ZREM', k, member) end
  end
  redis.call('HDEL', DATA, id)
  redis.call('HDEL', SIG, id)
  redis.call('ZREM', EXP, id)
end
local function purge(now, limit)
  local due = redis.call('ZRANGEBYSCORE', EXP, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    local s = redis.call('HGET', SIG, id)
    if s then remove(id, cmsgpack.unpack(s)) else redis.call('ZREM', EXP, id) end
    redis.call('HINCRBY', P .. ':stats', 'expired', 1)
  end
end
local function candidates(tpl)
  local n = #tpl
  local best = P .. ':a:' .. n
  local best_n = redis.call('ZCARD', best)
  for i = 1, math.min(2, n) do
    local f = tpl[i]
    if f ~= '' and string.byte(f, 1) ~= 0 then
      local k = P .. ':k' .. i .. ':' .. n .. ':' .. redis.sha1hex(f)
      local c = redis.call('ZCARD', k)
      if c < best_n then best, best_n = k, c end
    end
  end
  return best
end
local function find(tpl, limit, take, now)
  local key = candidates(tpl)
  local ids, sigs, datas = {}, {}, {}
  local start = 0
  while #ids < limit do
    local batch = redis.call('ZRANGE', key, start, start + 255)
    if #batch == 0 then break end
    for _, member in ipairs(batch) do
      if live(member, now) then
        local id = tostring(tonumber(string.sub(member, 1, 16)))
        local sig = cmsgpack.unpack(redis.call('HGET', SIG, id))
        if tmatch(tpl, sig) then
          ids[#ids + 1] = id
          sigs[#sigs + 1] = sig
          datas[#datas + 1] = string.sub(member, HEAD + 1)
          if #ids >= limit then break end
        end
      end
    end
    start = start + 256
  end
  local out = {}
  for i, id in ipairs(ids) do
    out[i] = datas[i]
    if take then remove(id, sigs[i]) end
  end
  redis.call('HINCRBY', P .. ':stats', take and 'taken' or 'read', #out)
  return out
end
local function drop_waiter(n, wid)
  redis.call('ZREM', P .. ':w:' .. n, wid)
  redis.call('HDEL', P .. ':wt', wid)
end
"""

# KEYS[1] prefix; ARGV: data, packed sig, lease_ms ('' = none), max_tuples
_OUT = _COMMON + r"""
local now = now_ms()
purge(now, 64)
local data, sig = ARGV[1], cmsgpack.unpack(ARGV[2])
local n = #sig
local id = redis.call('INCR', P .. ':seq')
redis.call('HINCRBY', P .. ':stats', 'out', 1)
redis.call('PUBLISH', P .. ':notify', data)
for _, wid in ipairs(redis.call('ZRANGE', P .. ':w:' .. n, 0, -1)) do
  local raw = redis.call('HGET', P .. ':wt', wid)
  if not raw then
    redis.call('ZREM', P .. ':w:' .. n, wid)
  else
    local w = cmsgpack.unpack(raw)          -- {take, deadline_ms, template}
    if w[2] <= now then
      drop_waiter(n, wid)
      redis.call('HINCRBY', P .. ':stats', 'stale_waiters', 1)
    elseif tmatch(w[3], sig) then
      local inbox = P .. ':in:' .. wid
      redis.call('RPUSH', inbox, data)
      redis.call('PEXPIRE', inbox, tonumber(ARGV[5]))
      drop_waiter(n, wid)
      if w[1] == 1 then
        redis.call('HINCRBY', P .. ':stats', 'taken', 1)
        return id
      end
      redis.call('HINCRBY', P .. ':stats', 'read', 1)
    end
  end
end
if redis.call('HLEN', DATA) >= tonumber(ARGV[4]) then purge(now, 100000) end
if redis.call('HLEN', DATA) >= tonumber(ARGV[4]) then
  redis.call('HINCRBY', P .. ':stats', 'refused_full', 1)
  return redis.error_reply('tuplespace full (' .. ARGV[4] .. ' tuples)')
end
local expires = 0
if ARGV[3] ~= '' then
  expires = now + tonumber(ARGV[3])
  redis.call('ZADD', EXP, expires, id)
end
local member = member_of(id, expires, data)
redis.call('HSET', DATA, id, member)
redis.call('HSET', SIG, id, ARGV[2])
for _, k in ipairs(index_keys(sig)) do redis.call('ZADD', k, id, member) end
return id
"""

# KEYS[1] prefix; ARGV: packed template, take (0/1), wait (0/1), deadline_ms (relative), max_waiters
# -> {1, data} found, {0} nothing, {2, waiter_id} queued
_GET = _COMMON + r"""
local now = now_ms()
purge(now, 64)
local tpl = cmsgpack.unpack(ARGV[1])
local take = ARGV[2] == '1'
local found = find(tpl, 1, take, now)
if #found > 0 then return {1, found[1]} end
if ARGV[3] ~= '1' then return {0} end
if redis.call('HLEN', P .. ':wt') >= tonumber(ARGV[5]) then
  redis.call('HINCRBY', P .. ':stats', 'refused_waiters', 1)
  return redis.error_reply('too many blocked callers (' .. ARGV[5] .. ')')
end
local wid = redis.call('INCR', P .. ':wseq')
redis.call('HSET', P .. ':wt', wid, cmsgpack.pack({take and 1 or 0, now + tonumber(ARGV[4]), tpl}))
redis.call('ZADD', P .. ':w:' .. #tpl, wid, wid)
return {2, wid}
"""

# KEYS[1] prefix; ARGV: waiter id, arity, keep (1 = refresh the deadline by ARGV[4] ms, 0 = leave)
# -> {1, data} delivered meanwhile, {0} not delivered (refreshed or removed), {3} gone (re-queue)
_WAITER = _COMMON + r"""
local wid, n = ARGV[1], ARGV[2]
local delivered = redis.call('LPOP', P .. ':in:' .. wid)
if delivered then return {1, delivered} end
local raw = redis.call('HGET', P .. ':wt', wid)
if ARGV[3] == '0' then
  drop_waiter(n, wid)
  return {0}
end
if not raw then return {3} end
local w = cmsgpack.unpack(raw)
w[2] = now_ms() + tonumber(ARGV[4])
redis.call('HSET', P .. ':wt', wid, cmsgpack.pack(w))
return {0}
"""

# KEYS[1] prefix; ARGV: start, count, index keys (the smallest is ranged)
# -> {now_ms, position of the index ranged (1-based), members}: a bulk read in one round trip
_RANGE = r"""
local best, best_i, best_n = ARGV[3], 1, nil
if #ARGV > 3 then
  for i = 3, #ARGV do
    local c = redis.call('ZCARD', ARGV[i])
    if best_n == nil or c < best_n then best, best_i, best_n = ARGV[i], i - 2, c end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local start = tonumber(ARGV[1])
return {now, best_i, redis.call('ZRANGE', best, start, start + tonumber(ARGV[2]) - 1)}
"""

# KEYS[1] prefix; ARGV: packed template, take (0/1), limit
_GET_ALL = _COMMON + r"""
local now = now_ms()
purge(now, 64)
return find(cmsgpack.unpack(ARGV[1]), tonumber(ARGV[3]), ARGV[2] == '1', now)
"""


class RedisTupleSpace(_Api):
    """A tuplespace client on Redis; same API as :class:`fcd.tuplespace.LocalTupleSpace`."""

    def __init__(self, client: Any, *, name: str = "fcd", max_tuples: int = 100_000,
                 max_waiters: int = 10_000, block_chunk: float = BLOCK_CHUNK,
                 waiter_grace: float = WAITER_GRACE_MS / 1000, pubsub_client: Any | None = None) -> None:
        self.client = client
        self.prefix = f"{{ts:{name}}}"
        self.max_tuples = max_tuples
        self.max_waiters = max_waiters
        self.block_chunk = block_chunk
        self._waiter_ttl_ms = round((block_chunk + waiter_grace) * 1000)
        self._pubsub_client = pubsub_client or client
        self._scripts = {op: client.register_script(src) for op, src in
                         (("out", _OUT), ("get", _GET), ("waiter", _WAITER), ("get_all", _GET_ALL),
                                                       ("range", _RANGE))}
        self._subs: dict[int, tuple[tuple, Subscription]] = {}
        self._sub_ids = itertools.count(1)
        self._pubsub: Any | None = None
        self._supervisor = Supervisor("tuplespace-redis", logger=log)
        self.stats = {"notify_dropped": 0}

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> "RedisTupleSpace":
        from boxcore.redisconn import open_redis
        from redis.asyncio.cluster import RedisCluster

        client = open_redis(url)
        pubsub_client = None
        if isinstance(client, RedisCluster):
            # cluster PUBLISH reaches every node: subscribe on one node's plain connection
            await client.initialize()
            import redis.asyncio as aioredis
            node = client.get_random_node()
            pubsub_client = aioredis.Redis(host=node.host, port=node.port, decode_responses=False)
        else:
            await client.ping()
        return cls(client, pubsub_client=pubsub_client, **kwargs)

    async def _run(self, op: str, *args: Any) -> Any:
        import redis.exceptions

        try:
            return await self._scripts[op](keys=[self.prefix], args=list(args))
        except redis.exceptions.ResponseError as exc:
            raise TupleSpaceError(str(exc)) from None
        except redis.exceptions.ConnectionError as exc:
            raise TupleSpaceConnectionError(f"tuplespace store unreachable: {exc}") from None

    # ---------------------------------------------------------------- operations
    async def _call(self, op: str, **kw: Any) -> Any:
        if op == "out":
            return await self._out(kw["tuple"], kw.get("lease"))
        if op in ("rd", "in"):
            timeout = kw.get("timeout")
            check_timeout(timeout)
            return await self._get(tuple(kw["template"]), op == "in", timeout)
        if op == "rd_all":
            return await self._read_all(tuple(kw["template"]), check_limit(kw.get("limit", MAX_LIMIT)))
        if op == "in_all":
            found = await self._run("get_all", self._pack_template(tuple(kw["template"])), 1,
                                    check_limit(kw.get("limit", MAX_LIMIT)))
            return [self._decode(data) for data in found]
        raise TupleSpaceError(f"unknown operation {op!r}")

    async def _out(self, tup: tuple, lease: float | None) -> int:
        check_tuple(tup, lease)
        sig = _pack_for_lua([field_key(f) for f in tup])
        data = msgpack.packb(list(tup), use_bin_type=True)
        lease_ms = "" if lease is None else str(max(1, round(lease * 1000)))
        return int(await self._run("out", data, sig, lease_ms, self.max_tuples, INBOX_TTL_MS))

    async def _read_all(self, template: tuple, limit: int) -> list[tuple]:
        """A bulk read matched here, not in Redis: the store only ranges an index (its members are
        the tuples), so thousands of readers on many machines spend their own CPU, not the
        store's.  One round trip per batch of ``FETCH_BATCH`` (the ``range`` script picks the most
        selective index and reads the store's clock in the same call).  Each tuple returned was in
        the space when its batch was read."""
        check_template(template)
        keys, keyed = self._index_keys_for(template)
        out: list[tuple] = []
        start = 0
        while len(out) < limit:
            now_ms, chosen, members = await self._run("range", start, FETCH_BATCH, *keys)
            if start == 0:                     # later batches range the same index
                keys, keyed = [keys[int(chosen) - 1]], keyed[int(chosen) - 1]
                accept = index_matcher(template, keyed)
            now_ms = int(now_ms)
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=True)
            # one decoder pass over the whole batch; most tuples carry no lease (expiry 0)
            unpacker.feed(b"".join([m[32:] for m in members
                                    if m[16:32] == NO_EXPIRY or int(m[16:32]) > now_ms]))
            for fields in unpacker:
                if accept(fields):
                    out.append(tuple(fields))
                    if len(out) >= limit:
                        break
            if len(members) < FETCH_BATCH:
                break
            start += FETCH_BATCH
        return out

    def _index_keys_for(self, template: tuple) -> tuple[list[str], list[int | None]]:
        """The index keys a template may range (the layout of the scripts' ``index_keys``), and
        for each the template field it is keyed by (None: the arity index)."""
        n = len(template)
        keys, keyed = [f"{self.prefix}:a:{n}"], [None]
        for position, field in enumerate(template[:2], start=1):
            if field is not None and not isinstance(field, type):
                keys.append(f"{self.prefix}:k{position}:{n}:{hashlib.sha1(field_key(field)).hexdigest()}")
                keyed.append(position - 1)
        return keys, keyed

    @staticmethod
    def _pack_template(template: tuple) -> bytes:
        check_template(template)
        return _pack_for_lua([template_key(f) for f in template])

    @staticmethod
    def _decode(data: bytes) -> tuple:
        return tuple(msgpack.unpackb(data, raw=False, strict_map_key=False))

    async def _get(self, template: tuple, take: bool, timeout: float | None) -> tuple | None:
        packed = self._pack_template(template)
        wait = timeout is None or timeout > 0
        registering = asyncio.ensure_future(
            self._run("get", packed, int(take), int(wait), self._waiter_ttl_ms, self.max_waiters))
        try:
            reply = await asyncio.shield(registering)
        except asyncio.CancelledError:
            # cancelled while the script ran: what it did stands, so undo it before leaving (a
            # queued waiter would otherwise stay until its deadline, a taken tuple be lost)
            await asyncio.wait([registering])
            if not registering.cancelled() and registering.exception() is None:
                done = registering.result()
                if done[0] == 1 and take:
                    await self._out(self._decode(done[1]), None)
                elif done[0] == 2:
                    await self._leave(self._waiter_id(done[1]), len(template), take)
            raise
        if reply[0] == 1:
            return self._decode(reply[1])
        if reply[0] == 0:
            return None
        waiter = self._waiter_id(reply[1])
        deadline = None if timeout is None else time.monotonic() + timeout
        inbox = f"{self.prefix}:in:{waiter}"
        try:
            while True:
                remaining = self.block_chunk if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    break
                chunk = min(remaining, self.block_chunk)
                popped = await self.client.blpop([inbox], timeout=chunk)
                if popped is not None:
                    return self._decode(popped[1])
                refreshed = await self._run("waiter", waiter, len(template), 1, self._waiter_ttl_ms)
                if refreshed[0] == 1:
                    return self._decode(refreshed[1])
                if refreshed[0] == 3:    # our entry was dropped as stale (we were too slow): queue again
                    return await self._get(template, take, None if deadline is None
                                           else max(0.0, deadline - time.monotonic()))
        except BaseException:
            await self._leave(waiter, len(template), take)     # cancelled or failed while blocked
            raise
        final = await self._run("waiter", waiter, len(template), 0)
        return self._decode(final[1]) if final[0] == 1 else None

    @staticmethod
    def _waiter_id(raw) -> str:
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def _leave(self, waiter: str, arity: int, take: bool) -> None:
        """Leave the waiters' queue; a tuple already taken for us goes back into the space rather
        than being lost."""
        rescued = await asyncio.shield(self._run("waiter", waiter, arity, 0))
        if rescued[0] == 1 and take:
            await self._out(self._decode(rescued[1]), None)

    # ---------------------------------------------------------------- notify
    async def notify(self, template: tuple, lease: float | None = None, max_queue: int = 10_000) -> Subscription:
        template = tuple(template)
        check_template(template)
        check_lease(lease)
        if self._pubsub is None:
            self._pubsub = self._pubsub_client.pubsub()
            await self._pubsub.subscribe(f"{self.prefix}:notify")
            self._supervisor.spawn(self._pump(), name="notify-pump")
        sub = Subscription(max_queue)
        sub.id = next(self._sub_ids)
        self._subs[sub.id] = (template, sub)
        expiry = None
        if lease is not None:
            expiry = asyncio.get_running_loop().call_later(lease, self._expire, sub.id)

        def cancel() -> None:
            if expiry is not None:
                expiry.cancel()
            self._subs.pop(sub.id, None)

        sub._cancel = cancel
        return sub

    def _expire(self, sub_id: int) -> None:
        entry = self._subs.pop(sub_id, None)
        if entry is not None:
            entry[1]._push(None)

    async def _pump(self) -> None:
        assert self._pubsub is not None
        async for message in self._pubsub.listen():
            if message.get("type") != "message":
                continue
            try:
                tup = self._decode(message["data"])
            except Exception:   # not ours to judge: count and go on
                self.stats["notify_dropped"] += 1
                continue
            for template, sub in list(self._subs.values()):
                if matches(template, tup):
                    sub._push(tup)

    async def server_stats(self) -> dict[str, int]:
        raw = await self.client.hgetall(f"{self.prefix}:stats")
        out = {k.decode(): int(v) for k, v in raw.items()}
        out["tuples"] = int(await self.client.hlen(f"{self.prefix}:data"))
        return out

    async def close(self) -> None:
        for _, sub in list(self._subs.values()):
            sub._push(None)
        self._subs.clear()
        await self._supervisor.aclose()
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._pubsub_client is not self.client:
            await self._pubsub_client.aclose()
        await self.client.aclose()
