"""The fleet directory: the directory service on Redis, shared by the boxd of several boxes.

``boxd --directory redis://HOST:PORT/N`` (or ``rediss://``, ``unix:///path?db=N``, ``?cluster=1``;
``?fleet=NAME`` names the fleet, default ``boxes``) keeps what :class:`boxcore.directory.Directory`
keeps in SQLite - per-booster namespaces keyed by the bound name, names bound to uids for good,
per-booster key quotas, per-uid byte quotas, a bound on all bytes - in one Redis, so a booster of
the same name and uid finds its state on any box of the fleet, and a watcher on one box sees a put
made on another.

Layout, all under one hash tag ``{FLEET}`` so a Redis Cluster keeps a fleet's keys on one slot:

* ``bbdir:{F}:kv:<booster>``    hash key -> msgpack value
* ``bbdir:{F}:keys:<booster>``  sorted set of the keys (score 0: ordered by their UTF-8 bytes, as
  SQLite orders them), for prefix ranges and pages
* ``bbdir:{F}:counts`` / ``bbdir:{F}:bytes``  hash booster -> keys / bytes of values
* ``bbdir:{F}:names``  hash name -> uid;  ``bbdir:{F}:uidbytes``  hash uid -> bytes of its names
* ``bbdir:{F}:total``  bytes of every value of the fleet
* channel ``bbdir:{F}:changes``: one message per put or delete

Why one tag per fleet rather than one per booster: the per-uid bound spans every name of the uid
and the fleet-wide bound spans every booster, and a Lua script may only touch keys of one slot.
With per-booster tags those checks would be read-then-write across slots, and two boxes could
each pass them at once.  One slot keeps every check and write in one atomic script (exact
bounds); the price is that a cluster does not spread one fleet's directory over its nodes (a
fleet's directory is small: ``max_total_bytes``, 256 MiB by default; several fleets spread).

Watches: every boxd subscribes once to the fleet's channel and hands each message to its local
watchers (the same coalescing, bounded :class:`boxcore.directory.Watch` as SQLite, drops counted
in ``watch_overflow``).  On a cluster it subscribes on the node owning the fleet's slot, where the
scripts run and publish, so changes need no cluster bus and keep the order they were made in.  A
new watch goes live when a marker it publishes there comes back: it gets exactly the changes made
after it, never one made before it that was still on its way.  Pub/sub is at most once: while the
subscription is being re-established after a lost connection, changes are missed (counted in
``watch_resubscribes``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import re
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from boxcore.directory import (DEFAULT_MAX_KEY_CHARS, DEFAULT_MAX_KEYS, DEFAULT_MAX_PENDING,
                               DEFAULT_MAX_TOTAL_BYTES, DEFAULT_MAX_VALUE_BYTES, DEFAULT_MAX_WATCHERS,
                               DirectoryError, DirectoryOpenError, DirectoryUnavailable, QuotaExceeded, Watch,
                               check_key, check_prefix, check_value, decode_value, new_watch,
                               prefix_upper_bound, set_limits)
from boxcore.redisconn import first_line, redacted, unavailable_on_redis_errors
from cliruntime.supervisor import Supervisor, within

log = logging.getLogger("boxcore.directory")

DEFAULT_FLEET = "boxes"
FLEET_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# KEYS: kv, keys, counts, bytes, total, names, uidbytes
# ARGV: booster, key, blob, max_keys, max_total, uid_limit (-1: none), channel
PUT = """
local kv, zkeys, counts, sizes, total, names, uidbytes = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local booster, key, blob = ARGV[1], ARGV[2], ARGV[3]
local old = redis.call('HSTRLEN', kv, key)
local growth = #blob - old
local owner = redis.call('HGET', names, booster)
local uid_limit = tonumber(ARGV[6])
if uid_limit >= 0 and owner then
  local used = tonumber(redis.call('HGET', uidbytes, owner) or '0')
  if growth > uid_limit - used then return {'uid', used} end
end
local all = tonumber(redis.call('GET', total) or '0')
if growth > 0 and all + growth > tonumber(ARGV[5]) then return {'full', all} end
local count = tonumber(redis.call('HGET', counts, booster) or '0')
if old == 0 then
  if count >= tonumber(ARGV[4]) then return {'keys', count} end
  count = redis.call('HINCRBY', counts, booster, 1)
  redis.call('ZADD', zkeys, 0, key)
end
redis.call('HSET', kv, key, blob)
local size = redis.call('HINCRBY', sizes, booster, growth)
redis.call('INCRBY', total, growth)
if owner then redis.call('HINCRBY', uidbytes, owner, growth) end
redis.call('PUBLISH', ARGV[7], 'p ' .. count .. ' ' .. size .. ' ' .. #booster .. ' ' .. #key .. '|' .. booster .. key .. blob)
return {'ok', 0}
"""

# KEYS as PUT; ARGV: booster, key, channel.  Returns the bytes freed, -1 if the key was missing.
DELETE = """
local kv, zkeys, counts, sizes, total, names, uidbytes = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local booster, key = ARGV[1], ARGV[2]
local old = redis.call('HSTRLEN', kv, key)
if old == 0 then return -1 end
redis.call('HDEL', kv, key)
redis.call('ZREM', zkeys, key)
local count = redis.call('HINCRBY', counts, booster, -1)
local size = redis.call('HINCRBY', sizes, booster, -old)
if count <= 0 then redis.call('HDEL', counts, booster); redis.call('HDEL', sizes, booster); size = 0 end
redis.call('INCRBY', total, -old)
local owner = redis.call('HGET', names, booster)
if owner then redis.call('HINCRBY', uidbytes, owner, -old) end
redis.call('PUBLISH', ARGV[3], 'd ' .. count .. ' ' .. size .. ' ' .. #booster .. ' ' .. #key .. '|' .. booster .. key)
return old
"""

# KEYS: names, uidbytes, sizes; ARGV: name, uid.  Returns the uid the name is bound to.
BIND = """
local bound = redis.call('HGET', KEYS[1], ARGV[1])
if bound then return bound end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[2], tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0'))
return false
"""

# KEYS: names, uidbytes, sizes; ARGV: name.  Returns 1 if a binding was removed.
RELEASE = """
local bound = redis.call('HGET', KEYS[1], ARGV[1])
if not bound then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local size = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if size > 0 then redis.call('HINCRBY', KEYS[2], bound, 0 - size) end  -- never '-0': not an integer to Redis
return 1
"""

# KEYS: kv, keys; ARGV: min, max, limit.  One consistent page: key1, value1, key2, value2, ...
PAGE = """
local keys = redis.call('ZRANGEBYLEX', KEYS[2], ARGV[1], ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
if #keys == 0 then return {} end
local values = redis.call('HMGET', KEYS[1], unpack(keys))
local out = {}
for i, key in ipairs(keys) do out[#out + 1] = key; out[#out + 1] = values[i] end
return out
"""


def split_directory_url(url: str) -> tuple[str, str]:
    """(the Redis URL without ``fleet=``, the fleet name)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    fleet = query.pop("fleet", [DEFAULT_FLEET])[-1]
    if not FLEET_RE.match(fleet):
        raise DirectoryOpenError(f"fleet name {fleet!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    rest = urlencode([(k, v) for k, values in query.items() for v in values])
    # not geturl(): it drops the "//" of unix:///path
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{rest}" if rest else ""), fleet


_barrier_ids = itertools.count()
WATCH_START_SECONDS = 10.0          # a new watch waits this long for its marker to come back


_unavailable_on_redis_errors = unavailable_on_redis_errors(DirectoryUnavailable, "the fleet directory",
                                                           "unavailable")


def _parse_change(payload: bytes) -> tuple[bool, int, int, str, str, bytes]:
    """(deleted, keys, bytes, booster, key, blob) of one change message."""
    head, _, body = payload.partition(b"|")
    op, count, size, booster_len, key_len = head.split(b" ")
    b_end = int(booster_len)
    k_end = b_end + int(key_len)
    return (op == b"d", int(count), int(size), body[:b_end].decode(), body[b_end:k_end].decode(),
            body[k_end:])


class RedisDirectory:
    """The directory on Redis: the async interface of :class:`boxcore.directory.AsyncDirectory`
    (``get``/``put``/``delete``/``items``/``page``/names), ``watch`` and ``boosters`` synchronous.

    Open with :meth:`open` (checks the server answers); close with :meth:`aclose`."""

    is_async = True

    def __init__(self, client: Any, sub_client: Any, fleet: str = DEFAULT_FLEET, *,
                 max_keys_per_booster: int = DEFAULT_MAX_KEYS, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
                 max_key_chars: int = DEFAULT_MAX_KEY_CHARS, max_watchers: int = DEFAULT_MAX_WATCHERS,
                 max_pending: int = DEFAULT_MAX_PENDING, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES) -> None:
        set_limits(self, max_keys_per_booster=max_keys_per_booster, max_value_bytes=max_value_bytes,
                   max_key_chars=max_key_chars, max_watchers=max_watchers, max_pending=max_pending,
                   max_total_bytes=max_total_bytes)
        self.client = client
        self._sub_client = sub_client
        self.fleet = fleet
        self.stats: collections.Counter[str] = collections.Counter()
        base = f"bbdir:{{{fleet}}}"
        self._base = base
        self._counts_key, self._bytes_key = f"{base}:counts", f"{base}:bytes"
        self._total_key, self._names_key, self._uidbytes_key = f"{base}:total", f"{base}:names", f"{base}:uidbytes"
        self.channel = f"{base}:changes"
        self._scripts = {name: client.register_script(src) for name, src in
                         (("put", PUT), ("delete", DELETE), ("bind", BIND), ("release", RELEASE), ("page", PAGE))}
        self._watches: list[Watch] = []
        self._by_booster: dict[str, list[Watch]] = {}     # the listener's index
        self._summary: dict[str, dict[str, int]] = {}
        self._supervisor = Supervisor("directory-redis", logger=log)
        self._pubsub: Any = None
        self._subscribed = 0
        self._closed = False
        self._barriers: dict[bytes, tuple[asyncio.Future, Watch | None]] = {}   # token -> (arrived, to arm)

    # ---------------------------------------------------------- opening
    @classmethod
    async def open(cls, url: str, **limits: Any) -> "RedisDirectory":
        """Connect, check the server answers and subscribe to the fleet's changes; an unreachable
        or refusing server is a :class:`DirectoryOpenError` (one line)."""
        import redis.asyncio as aioredis
        from redis.asyncio.cluster import RedisCluster
        from redis.exceptions import RedisError

        from boxcore.redisconn import open_redis

        redis_url, fleet = split_directory_url(url)
        try:
            client = open_redis(redis_url)
        except ValueError as exc:
            raise DirectoryOpenError(f"directory {redacted(url)}: {exc}") from None
        sub_client = client
        try:
            if isinstance(client, RedisCluster):
                # Subscribe on the node that owns the fleet's slot: the scripts publish there, so their
                # changes reach us without the cluster bus, in the order they were made, and a
                # barrier published on the same node comes after every one of them.
                await client.initialize()
                node = client.get_node_from_key(f"bbdir:{{{fleet}}}")
                parts = urlsplit(redis_url)
                sub_client = aioredis.Redis(host=node.host, port=node.port, username=parts.username,
                                            password=parts.password, decode_responses=False)
            await client.ping()
            directory = cls(client, sub_client, fleet, **limits)
            await directory._subscribe()
        except (RedisError, OSError) as exc:
            await client.aclose()
            if sub_client is not client:
                await sub_client.aclose()
            raise DirectoryOpenError(f"cannot reach the directory at {redacted(url)}: {first_line(exc)}") from None
        return directory

    async def _subscribe(self) -> None:
        self._pubsub = self._sub_client.pubsub()
        await self._pubsub.subscribe(self.channel)
        await self._reload_summary()
        self._supervisor.spawn_restarting(self._listen, name="changes")

    async def _reload_summary(self) -> None:
        counts = await self.client.hgetall(self._counts_key)
        sizes = await self.client.hgetall(self._bytes_key)
        self._summary = {name.decode(): {"keys": int(n), "bytes": int(sizes.get(name, 0))}
                         for name, n in counts.items() if int(n) > 0}

    async def _listen(self) -> None:
        if self._subscribed:            # a restart: the subscription was lost, changes were missed
            self.stats["watch_resubscribes"] += 1
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = self._sub_client.pubsub()
            await self._pubsub.subscribe(self.channel)
            await self._reload_summary()
        self._subscribed += 1
        async for message in self._pubsub.listen():
            if message.get("type") != "message":
                continue
            if message["data"].startswith(b"s "):          # a barrier (sync_watches), maybe another box's
                arrived, to_arm = self._barriers.pop(message["data"], (None, None))
                if to_arm is not None:
                    to_arm.live = True                 # here, before the listener reads the next change
                if arrived is not None and not arrived.done():
                    arrived.set_result(None)
                continue
            try:
                deleted, count, size, booster, key, blob = _parse_change(message["data"])
                watches = self._by_booster.get(booster)
                value = None if deleted or not watches else decode_value(blob)
            except Exception:                          # not ours: whoever else may publish here
                self.stats["changes_malformed"] += 1
                continue
            if count > 0:
                self._summary[booster] = {"keys": count, "bytes": size}
            else:
                self._summary.pop(booster, None)
            for watch in watches or ():
                if watch.live and key.startswith(watch.prefix):
                    watch._offer(key, value)

    async def aclose(self) -> None:
        for watch in list(self._watches):
            watch.close()
        self._closed = True
        for arrived, _ in self._barriers.values():
            arrived.cancel()        # no marker will come now
        await self._supervisor.aclose()
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._sub_client is not self.client:
            await self._sub_client.aclose()
        await self.client.aclose()

    # ---------------------------------------------------------- keys of one booster
    def _keys(self, booster: str) -> list[str]:
        return [f"{self._base}:kv:{booster}", f"{self._base}:keys:{booster}", self._counts_key, self._bytes_key,
                self._total_key, self._names_key, self._uidbytes_key]

    def _check_key(self, booster: str, key: str) -> None:
        check_key(self.stats, self.max_key_chars, booster, key)

    # ---------------------------------------------------------- operations
    @_unavailable_on_redis_errors
    async def get(self, booster: str, key: str, default: Any = None) -> Any:
        self._check_key(booster, key)
        self.stats["gets"] += 1
        blob = await self.client.hget(f"{self._base}:kv:{booster}", key)
        return default if blob is None else decode_value(blob)

    @_unavailable_on_redis_errors
    async def put(self, booster: str, key: str, value: Any, *, uid: int | None = None,
                  max_uid_bytes: int | None = None) -> None:
        """Store ``value``; ``max_uid_bytes`` bounds the bytes of every name bound to ``booster``'s
        uid, fleet-wide (checked in the same script as the write).  Raises
        :class:`DirectoryError` / :class:`QuotaExceeded`."""
        self._check_key(booster, key)
        blob = check_value(self.stats, self.max_value_bytes, value)
        outcome, number = await self._scripts["put"](
            keys=self._keys(booster),
            args=[booster, key, blob, self.max_keys_per_booster, self.max_total_bytes,
                  -1 if max_uid_bytes is None else max_uid_bytes, self.channel])
        outcome = outcome.decode()
        if outcome == "uid":
            self.stats["refused_quota_bytes"] += 1
            raise QuotaExceeded(f"value of {len(blob)} bytes exceeds the byte quota of booster {booster!r}'s "
                                f"uid ({max(max_uid_bytes - number, 0)} bytes left)")
        if outcome == "full":
            self.stats["refused_directory_full"] += 1
            raise QuotaExceeded(f"the directory is full ({number} of {self.max_total_bytes} bytes)")
        if outcome == "keys":
            self.stats["refused_too_many_keys"] += 1
            raise QuotaExceeded(f"booster {booster!r} already has {number} keys (limit {self.max_keys_per_booster})")
        self.stats["puts"] += 1

    @_unavailable_on_redis_errors
    async def delete(self, booster: str, key: str) -> bool:
        self._check_key(booster, key)
        freed = await self._scripts["delete"](keys=self._keys(booster), args=[booster, key, self.channel])
        if freed < 0:
            return False
        self.stats["deletes"] += 1
        return True

    async def clear(self, booster: str) -> int:
        keys = [key for key, _ in await self.items(booster)]
        removed = 0
        for key in keys:
            removed += await self.delete(booster, key)
        return removed

    @_unavailable_on_redis_errors
    async def page(self, booster: str, prefix: str = "", after: str | None = None, limit: int = 100,
                   max_bytes: int = 1 << 20) -> tuple[list[tuple[str, Any]], str | None]:
        """As :meth:`boxcore.directory.Directory.page`: one consistent page (one script)."""
        check_prefix(prefix, after)
        upper = prefix_upper_bound(prefix)
        low = b"[" + prefix.encode() if after is None or after < prefix else b"(" + after.encode()
        high = b"+" if upper is None else b"(" + upper.encode()
        flat = await self._scripts["page"](keys=self._keys(booster)[:2], args=[low, high, limit + 1])
        out: list[tuple[str, Any]] = []
        size = 0
        for i in range(0, len(flat), 2):
            key, blob = flat[i].decode(), flat[i + 1]
            if len(out) >= limit or (out and size + len(blob) > max_bytes):
                return out, out[-1][0]
            out.append((key, decode_value(blob)))
            size += len(blob) + len(key)
        return out, None

    async def items(self, booster: str, prefix: str = "") -> list[tuple[str, Any]]:
        items, _ = await self.page(booster, prefix, limit=self.max_keys_per_booster,
                                   max_bytes=self.max_keys_per_booster * self.max_value_bytes)
        return items

    @_unavailable_on_redis_errors
    async def count(self, booster: str) -> int:
        return int(await self.client.hget(self._counts_key, booster) or 0)

    @_unavailable_on_redis_errors
    async def bytes_of(self, booster: str) -> int:
        return int(await self.client.hget(self._bytes_key, booster) or 0)

    @_unavailable_on_redis_errors
    async def uid_bytes(self, uid: int) -> int:
        return int(await self.client.hget(self._uidbytes_key, str(uid)) or 0)

    @_unavailable_on_redis_errors
    async def total_bytes(self) -> int:
        return int(await self.client.get(self._total_key) or 0)

    def boosters(self) -> dict[str, dict[str, int]]:
        """{booster: {"keys", "bytes"}} as this box's subscription last saw them (loaded at open,
        then kept by every change of the fleet): synchronous, for the management views."""
        return {name: dict(summary) for name, summary in self._summary.items()}

    # ---------------------------------------------------------- names
    @_unavailable_on_redis_errors
    async def bind_name(self, name: str, uid: int) -> int | None:
        bound = await self._scripts["bind"](keys=[self._names_key, self._uidbytes_key, self._bytes_key],
                                            args=[name, uid])
        if bound is None:
            self.stats["names_bound"] += 1
            return None
        return None if int(bound) == uid else int(bound)

    @_unavailable_on_redis_errors
    async def name_owner(self, name: str) -> int | None:
        bound = await self.client.hget(self._names_key, name)
        return None if bound is None else int(bound)

    @_unavailable_on_redis_errors
    async def names_of(self, uid: int) -> list[str]:
        names = await self.client.hgetall(self._names_key)
        return sorted(n.decode() for n, u in names.items() if int(u) == uid)

    @_unavailable_on_redis_errors
    async def keys(self, booster: str, prefix: str = "", limit: int = 100) -> list[str]:
        """The first ``limit`` key names of ``booster`` under ``prefix``, in order (UTF-8 bytes, as
        SQLite orders them); no value is read."""
        if limit < 0:
            raise DirectoryError(f"limit must not be negative, got {limit}")
        check_prefix(prefix)
        if limit == 0:
            return []
        upper = prefix_upper_bound(prefix)
        high = b"+" if upper is None else b"(" + upper.encode()
        names = await self.client.zrangebylex(f"{self._base}:keys:{booster}", b"[" + prefix.encode(), high,
                                              start=0, num=limit)
        return [name.decode() for name in names]

    @_unavailable_on_redis_errors
    async def release_name(self, name: str) -> bool:
        return bool(await self._scripts["release"](keys=[self._names_key, self._uidbytes_key, self._bytes_key],
                                                   args=[name]))

    # ---------------------------------------------------------- watching
    @_unavailable_on_redis_errors
    async def sync_watches(self, arm: Watch | None = None) -> None:
        """Return once every change published before this call has reached this box's watchers
        (a marker sent through the fleet's channel and waited for: the channel keeps order).
        ``arm``, a watch not yet live, goes live as the marker arrives: it gets exactly the changes
        published after it."""
        token = b"s %d %d" % (os.getpid(), next(_barrier_ids))
        arrived = asyncio.get_running_loop().create_future()
        self._barriers[token] = (arrived, arm)
        try:
            await self._sub_client.publish(self.channel, token)     # the subscription's own node
            if self._closed:        # closed meanwhile (redis-py may swallow a cancel mid-command)
                raise DirectoryUnavailable("the fleet directory is closed")
            await arrived
        finally:
            self._barriers.pop(token, None)

    def watch(self, booster: str, prefix: str = "", *, initial: bool = False,
              max_pending: int | None = None) -> Watch:
        """Watch changes of ``booster``'s keys under ``prefix`` made on any box of the fleet.

        The watch goes live when a marker it publishes comes back through the channel (await
        :meth:`Watch.ready`), so a change made before the watch, still on its way, is never
        delivered as new.  With ``initial`` the current items are queued next (read after the
        watch is live, so no change falls between; a change already pending for a key wins over
        its read value)."""
        watch = new_watch(self, booster, prefix, max_pending)
        watch.live = False
        self._watches.append(watch)
        self._by_booster.setdefault(booster, []).append(watch)
        watch.loading = self._supervisor.spawn(self._start_watch(watch, initial), name=f"watch-start-{booster}",
                                               critical=False)
        return watch

    async def _start_watch(self, watch: Watch, initial: bool) -> None:
        try:
            await within(self.sync_watches(arm=watch), WATCH_START_SECONDS)
        except asyncio.TimeoutError:            # the subscription is being re-established
            self.stats["unavailable"] += 1
            raise DirectoryUnavailable("the fleet directory's change channel did not answer within "
                                       f"{WATCH_START_SECONDS:g} s; try again") from None
        if not initial:
            return
        for key, value in await self.items(watch.booster, watch.prefix):
            if watch.closed:
                return
            if key not in watch._pending:
                watch._offer(key, value)

    def _unwatch(self, watch: Watch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)
            same = self._by_booster[watch.booster]
            same.remove(watch)
            if not same:
                del self._by_booster[watch.booster]

    @property
    def watcher_count(self) -> int:
        return len(self._watches)
