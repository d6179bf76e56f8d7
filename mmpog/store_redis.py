"""The game server's state in Redis: ``mmpog-server --store redis://HOST:PORT/N`` (or ``rediss://``,
``unix:///path?db=N``, ``?cluster=1``; ``?game=NAME`` names the game, default ``mmpog``).

Several ``mmpog-server`` instances on one store serve the same players; one that is killed and
started again finds everything.  Each operation is one Lua script (atomic: two instances never
interleave inside one), with the caller's ``now`` as an argument, so the semantics are exactly
those of :class:`mmpog.store.MemoryStore` (one conformance suite runs on both).

Layout, every key under the hash tag ``{GAME}`` (a Redis Cluster keeps a game on one slot, so a
script may touch all of them; the control plane of one game is small: a few hundred bytes per
account)::

    mmpog:{G}:acct        hash name -> player id       mmpog:{G}:acct:data  hash name -> msgpack [salt, hash, kdf]
    mmpog:{G}:acct:seq    last player id
    mmpog:{G}:s:player    hash session key -> player   mmpog:{G}:s:addr     hash session key -> "address\\0order"
    mmpog:{G}:s:deadline  zset session key -> expiry   mmpog:{G}:s:byplayer hash player -> session key
    mmpog:{G}:s:byaddr    zset (score 0) "address\\0order\\0key": an address's sessions, oldest first
    mmpog:{G}:s:seq       session order counter
    mmpog:{G}:where       hash player -> "location|token hex|reflector"
    mmpog:{G}:members     zset (score 0) "reflector\\0player": the players on a reflector
    mmpog:{G}:occupancy   hash location -> players present
    mmpog:{G}:locks       hash player -> "owner|deadline" (a /move in progress)
    mmpog:{G}:r:udp / r:instance   hash reflector -> UDP address / last /health instance
    mmpog:{G}:r:deadline  zset reflector -> registration expiry (+inf: never)
    mmpog:{G}:map         hash location -> reflector
    mmpog:{G}:fail:a:NAME / fail:ip:ADDRESS   zset of failed-login times (at most the limit, expire after
                          the window: their number is bounded by the rate the server can hash at)

Session keys are SHA-256 digests of the tokens (the server hashes them): reading Redis does not
give anyone a usable session.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
from collections import Counter
from typing import Any
from urllib.parse import parse_qs, urlencode

import msgpack

from boxcore.redisconn import first_line, redacted, unavailable_on_redis_errors

from .store import (PURGE_BATCH, Account, AccountExists, Presence, ReflectorRecord, SessionOpened, Store, StoreError,
                    StoreFull, StoreLimits, StoreUnavailable)

DEFAULT_GAME = "mmpog"
MAX_CONCURRENCY = 64      # calls in flight per instance: below redis-py's pool of 100 connections
GAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

CREATE_ACCOUNT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return -1 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return -2 end
local id = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], id)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return id
"""

# KEYS: acct:data; ARGV: name, the old blob, the new blob
REPLACE_PASSWORD = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

ACCOUNT = "return {redis.call('HGET', KEYS[1], ARGV[1]), redis.call('HGET', KEYS[2], ARGV[1])}"

# the session scripts share one way of dropping a session (KEYS: player, addr, deadline, byplayer, byaddr)
DROP_SESSION = """
local function drop(key)
  local player = redis.call('HGET', KEYS[1], key)
  if not player then return end
  local addr = redis.call('HGET', KEYS[2], key)
  redis.call('HDEL', KEYS[1], key)
  redis.call('HDEL', KEYS[2], key)
  redis.call('ZREM', KEYS[3], key)
  if redis.call('HGET', KEYS[4], player) == key then redis.call('HDEL', KEYS[4], player) end
  if addr then redis.call('ZREM', KEYS[5], addr .. '\\0' .. key) end
end
"""

# KEYS: the five above and the order counter; ARGV: key, player, address, now, ttl, per address, max, purge batch.
# Returns {1 opened | -1 full, replaced, evicted, expired}.
OPEN_SESSION = DROP_SESSION + """
local now = tonumber(ARGV[4])
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[8]))
for _, key in ipairs(expired) do drop(key) end
local replaced = 0
local old = redis.call('HGET', KEYS[4], ARGV[2])
if old then drop(old); replaced = 1 end
local low, high = '[' .. ARGV[3] .. '\\0', '(' .. ARGV[3] .. '\\1'
local evicted = 0
local held = redis.call('ZLEXCOUNT', KEYS[5], low, high)
local room = tonumber(ARGV[6])
if held >= room then
  for _, member in ipairs(redis.call('ZRANGEBYLEX', KEYS[5], low, high, 'LIMIT', 0, held - room + 1)) do
    drop(string.match(member, '%z([^%z]*)$'))
    evicted = evicted + 1
  end
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[7]) then return {-1, replaced, evicted, #expired} end
local addr = ARGV[3] .. '\\0' .. string.format('%016d', redis.call('INCR', KEYS[6]))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], addr)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[1])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[5], 0, addr .. '\\0' .. ARGV[1])
return {1, replaced, evicted, #expired}
"""

# KEYS: player, deadline; ARGV: key, now
SESSION_PLAYER = """
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not deadline or tonumber(deadline) <= tonumber(ARGV[2]) then return false end
return redis.call('HGET', KEYS[1], ARGV[1])
"""

COUNT_SESSIONS = "return redis.call('HLEN', KEYS[1]) - redis.call('ZCOUNT', KEYS[2], '-inf', ARGV[1])"

# KEYS: an account's and an address's failures (zsets of times); ARGV: now, window, account limit, address limit
LOGIN_THROTTLED = """
local since = '(' .. (tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZCOUNT', KEYS[1], since, '+inf') >= tonumber(ARGV[3]) then return 1 end
if redis.call('ZCOUNT', KEYS[2], since, '+inf') >= tonumber(ARGV[4]) then return 1 end
return 0
"""

# KEYS as above; ARGV: now, window, account limit, address limit, a unique member
LOGIN_FAILED = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  redis.call('ZADD', key, now, ARGV[5])
  redis.call('ZREMRANGEBYRANK', key, 0, -1 - tonumber(ARGV[2 + i]))
  redis.call('PEXPIRE', key, math.ceil(window * 1000))
end
return 0
"""

# KEYS: where, members, occupancy; ARGV: player, new value ('' none), new location, new reflector, padded player
SET_PRESENCE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local location, token, reflector = string.match(old, '^(%d+)|(%x*)|(.*)$')
  if redis.call('HINCRBY', KEYS[3], location, -1) <= 0 then redis.call('HDEL', KEYS[3], location) end
  redis.call('ZREM', KEYS[2], reflector .. '\\0' .. ARGV[5])
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
  redis.call('ZADD', KEYS[2], 0, ARGV[4] .. '\\0' .. ARGV[5])
end
return old or false
"""

# KEYS: where, members; ARGV: reflector.  {player1, presence1, ...}
MEMBERS_ON = """
local out = {}
for _, member in ipairs(redis.call('ZRANGEBYLEX', KEYS[2], '[' .. ARGV[1] .. '\\0', '(' .. ARGV[1] .. '\\1')) do
  local player = string.match(member, '%z(%d+)$')
  out[#out + 1] = player
  out[#out + 1] = redis.call('HGET', KEYS[1], tostring(tonumber(player)))
end
return out
"""

# KEYS: session player, session deadline, where, map; ARGV: session key, now, location
MOVE_CONTEXT = """
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not deadline or tonumber(deadline) <= tonumber(ARGV[2]) then return {false, false, false} end
local player = redis.call('HGET', KEYS[1], ARGV[1])
if not player then return {false, false, false} end
return {player, redis.call('HGET', KEYS[3], player), redis.call('HGET', KEYS[4], ARGV[3])}
"""

# KEYS: locks; ARGV: player, owner, now, ttl
TRY_LOCK = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  local owner, deadline = string.match(held, '^(.*)|([^|]*)$')
  if owner ~= ARGV[2] and tonumber(ARGV[3]) < tonumber(deadline) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. string.format('%.6f', tonumber(ARGV[3]) + tonumber(ARGV[4])))
return 1
"""

UNLOCK = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held or string.match(held, '^(.*)|[^|]*$') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

# KEYS: udp, instance, deadline; ARGV: reflector, udp, deadline ('+inf' or seconds), max reflectors
REGISTER = """
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then return 0 end
  redis.call('HSET', KEYS[2], ARGV[1], '')
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], 'GT', ARGV[3], ARGV[1])
return 1
"""

# KEYS as REGISTER; ARGV: reflector, instance, deadline.  The previous instance, or false if unregistered.
HEARTBEAT = """
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then return false end
local previous = redis.call('HGET', KEYS[2], ARGV[1]) or ''
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], 'GT', ARGV[3], ARGV[1])
return previous
"""

REFLECTORS = """
local out = {}
local scored = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
for i = 1, #scored, 2 do
  local id = scored[i]
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[1], id) or ''
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
  out[#out + 1] = scored[i + 1]
end
return out
"""

# KEYS: map; ARGV: the home reflector of location 0, 1, ...
INIT_MAP = """
for i, reflector in ipairs(ARGV) do redis.call('HSETNX', KEYS[1], i - 1, reflector) end
return #ARGV
"""

# KEYS: map, deadline; ARGV: now.  {location1, old1, new1, ...}
REASSIGN = """
if redis.call('ZCOUNT', KEYS[2], '-inf', ARGV[1]) == 0 then return {} end
local live, any = {}, false
for _, reflector in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')) do
  live[reflector] = 0
  any = true
end
if not any then return {} end
local all = redis.call('HGETALL', KEYS[1])
local dead = {}
for i = 1, #all, 2 do
  local reflector = all[i + 1]
  if live[reflector] then live[reflector] = live[reflector] + 1 else dead[#dead + 1] = tonumber(all[i]) end
end
table.sort(dead)
local out = {}
for _, location in ipairs(dead) do
  local best, load = nil, nil
  for reflector, n in pairs(live) do
    if best == nil or n < load or (n == load and reflector < best) then best, load = reflector, n end
  end
  local old = redis.call('HGET', KEYS[1], location)
  redis.call('HSET', KEYS[1], location, best)
  live[best] = load + 1
  out[#out + 1] = location
  out[#out + 1] = old
  out[#out + 1] = best
end
return out
"""


def split_store_url(url: str) -> tuple[str, str]:
    """(the Redis URL without ``game=``, the game name)."""
    base, _, query_text = url.partition("?")     # not urlsplit().geturl(): it turns unix:///p into unix:/p
    query = parse_qs(query_text)
    game = query.pop("game", [DEFAULT_GAME])[-1]
    if not GAME_RE.match(game):
        raise ValueError(f"game name must be 1-64 characters of A-Z a-z 0-9 _ . -, got {game!r}")
    rest = urlencode(query, doseq=True)
    return f"{base}?{rest}" if rest else base, game


_unavailable_on_redis_errors = unavailable_on_redis_errors(StoreUnavailable, "the game store", "store_unavailable",
                                                           slots="_slots")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _presence(value: bytes | None) -> Presence | None:
    if value is None:
        return None
    location, token, reflector = _text(value).split("|", 2)
    return Presence(int(location), bytes.fromhex(token), reflector)


def _deadline(ttl: float | None, now: float) -> str:
    return "+inf" if ttl is None else repr(now + ttl)


class RedisStore(Store):
    def __init__(self, client: Any, game: str = DEFAULT_GAME, limits: StoreLimits | None = None,
                 max_concurrency: int = MAX_CONCURRENCY) -> None:
        self.client = client
        self._slots = asyncio.Semaphore(max_concurrency)
        self.game = game
        self.limits = limits or StoreLimits()
        self.stats = Counter()
        prefix = f"mmpog:{{{game}}}"
        self.keys = {name: f"{prefix}:{name}" for name in (
            "acct", "acct:data", "acct:seq", "s:player", "s:addr", "s:deadline", "s:byplayer", "s:byaddr", "s:seq",
            "where", "members", "occupancy", "locks", "r:udp", "r:instance", "r:deadline", "map")}
        self._session_keys = [self.keys[k] for k in ("s:player", "s:addr", "s:deadline", "s:byplayer", "s:byaddr")]
        self._reflector_keys = [self.keys[k] for k in ("r:udp", "r:instance", "r:deadline")]
        self._scripts = {name: client.register_script(source) for name, source in (
            ("create_account", CREATE_ACCOUNT), ("account", ACCOUNT), ("open_session", OPEN_SESSION),
            ("session_player", SESSION_PLAYER), ("count_sessions", COUNT_SESSIONS), ("set_presence", SET_PRESENCE),
            ("members_on", MEMBERS_ON), ("try_lock", TRY_LOCK), ("unlock", UNLOCK), ("register", REGISTER),
            ("heartbeat", HEARTBEAT), ("reflectors", REFLECTORS), ("init_map", INIT_MAP), ("reassign", REASSIGN),
            ("login_throttled", LOGIN_THROTTLED), ("login_failed", LOGIN_FAILED), ("move_context", MOVE_CONTEXT),
            ("replace_password", REPLACE_PASSWORD))}
        self._prefix = prefix
        self._instance = secrets.token_hex(6)          # failure members unique across instances
        self._failure_ids = itertools.count()

    @classmethod
    async def open(cls, url: str, limits: StoreLimits | None = None) -> "RedisStore":
        """Connect and check the server answers; :class:`StoreUnavailable` (one line) if it does not."""
        from redis.exceptions import RedisError

        from boxcore.redisconn import open_redis

        try:
            redis_url, game = split_store_url(url)
            client = open_redis(redis_url)
        except ValueError as exc:
            raise StoreError(f"--store {redacted(url)}: {exc}") from None
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreUnavailable(f"cannot reach the game store at {redacted(url)}: {first_line(exc)}") from None
        return cls(client, game, limits)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._scripts[name](keys=keys, args=args)

    # ---------------------------------------------------------- accounts
    @_unavailable_on_redis_errors
    async def create_account(self, name: str, salt: bytes, pw_hash: bytes, kdf: str) -> int:
        blob = msgpack.packb([salt, pw_hash, kdf])
        result = await self._run("create_account", [self.keys["acct"], self.keys["acct:data"], self.keys["acct:seq"]],
                                 [name, blob, self.limits.max_accounts])
        if result == -1:
            raise AccountExists(f"player {name!r} exists")
        if result == -2:
            self.stats["accounts_refused"] += 1
            raise StoreFull("accounts", self.limits.max_accounts)
        return int(result)

    @_unavailable_on_redis_errors
    async def account(self, name: str) -> Account | None:
        player, blob = await self._run("account", [self.keys["acct"], self.keys["acct:data"]], [name])
        if player is None or blob is None:
            return None
        salt, pw_hash, kdf = msgpack.unpackb(blob)
        return Account(int(player), name, salt, pw_hash, kdf)

    @_unavailable_on_redis_errors
    async def replace_password(self, name: str, old_hash: bytes, salt: bytes, pw_hash: bytes, kdf: str) -> bool:
        player, old = await self._run("account", [self.keys["acct"], self.keys["acct:data"]], [name])
        if player is None or old is None or msgpack.unpackb(old)[1] != old_hash:
            return False
        return bool(await self._run("replace_password", [self.keys["acct:data"]],
                                    [name, old, msgpack.packb([salt, pw_hash, kdf])]))

    @_unavailable_on_redis_errors
    async def count_accounts(self) -> int:
        return int(await self.client.hlen(self.keys["acct"]))

    # ---------------------------------------------------------- sessions
    @_unavailable_on_redis_errors
    async def open_session(self, key: str, player: int, address: str, now: float) -> SessionOpened:
        if "\0" in address:
            raise ValueError("an address has no NUL byte")
        status, replaced, evicted, expired = await self._run(
            "open_session", [*self._session_keys, self.keys["s:seq"]],
            [key, player, address, repr(now), repr(self.limits.session_ttl), self.limits.sessions_per_address,
             self.limits.max_sessions, PURGE_BATCH])
        self.stats["sessions_evicted_same_address"] += evicted
        self.stats["sessions_expired"] += expired
        if status == -1:
            self.stats["sessions_refused"] += 1
            raise StoreFull("sessions", self.limits.max_sessions)
        return SessionOpened(bool(replaced), int(evicted))

    @_unavailable_on_redis_errors
    async def session_player(self, key: str, now: float) -> int | None:
        player = await self._run("session_player", [self.keys["s:player"], self.keys["s:deadline"]], [key, repr(now)])
        return None if player is None else int(player)

    @_unavailable_on_redis_errors
    async def count_sessions(self, now: float) -> int:
        return int(await self._run("count_sessions", [self.keys["s:player"], self.keys["s:deadline"]], [repr(now)]))

    def _failure_keys(self, name: str, address: str) -> list[str]:
        return [f"{self._prefix}:fail:a:{name}", f"{self._prefix}:fail:ip:{address}"]

    @_unavailable_on_redis_errors
    async def login_throttled(self, name: str, address: str, now: float) -> bool:
        limits = self.limits
        return bool(await self._run("login_throttled", self._failure_keys(name, address),
                                    [repr(now), repr(limits.login_window), limits.login_failures_per_account,
                                     limits.login_failures_per_address]))

    @_unavailable_on_redis_errors
    async def login_failed(self, name: str, address: str, now: float) -> None:
        limits = self.limits
        await self._run("login_failed", self._failure_keys(name, address),
                        [repr(now), repr(limits.login_window), limits.login_failures_per_account,
                         limits.login_failures_per_address, f"{now!r}:{self._instance}:{next(self._failure_ids)}"])

    # ---------------------------------------------------------- presence
    @_unavailable_on_redis_errors
    async def presence(self, player: int) -> Presence | None:
        return _presence(await self.client.hget(self.keys["where"], str(player)))

    @_unavailable_on_redis_errors
    async def set_presence(self, player: int, presence: Presence | None) -> Presence | None:
        if presence is None:
            value, location, reflector = "", "", ""
        else:
            if "\0" in presence.reflector:
                raise ValueError("a reflector id has no NUL byte")
            value = f"{presence.location}|{presence.token.hex()}|{presence.reflector}"
            location, reflector = str(presence.location), presence.reflector
        old = await self._run("set_presence", [self.keys["where"], self.keys["members"], self.keys["occupancy"]],
                              [str(player), value, location, reflector, f"{player:012d}"])
        return _presence(old)

    @_unavailable_on_redis_errors
    async def members_on(self, reflector: str) -> list[tuple[int, Presence]]:
        flat = await self._run("members_on", [self.keys["where"], self.keys["members"]], [reflector])
        return [(int(flat[i]), _presence(flat[i + 1])) for i in range(0, len(flat), 2) if flat[i + 1] is not None]

    @_unavailable_on_redis_errors
    async def occupancy(self) -> dict[int, int]:
        counts = await self.client.hgetall(self.keys["occupancy"])
        return {int(location): int(n) for location, n in counts.items() if int(n) > 0}

    @_unavailable_on_redis_errors
    async def move_context(self, key: str, now: float, location: int) -> tuple[int | None, Presence | None, str | None]:
        player, where, reflector = await self._run(
            "move_context", [self.keys["s:player"], self.keys["s:deadline"], self.keys["where"], self.keys["map"]],
            [key, repr(now), str(location)])
        if player is None:
            return None, None, None
        return int(player), _presence(where), None if reflector is None else _text(reflector)

    # ---------------------------------------------------------- move locks
    @_unavailable_on_redis_errors
    async def try_lock(self, player: int, owner: str, now: float, ttl: float) -> bool:
        return bool(await self._run("try_lock", [self.keys["locks"]], [str(player), owner, repr(now), repr(ttl)]))

    @_unavailable_on_redis_errors
    async def unlock(self, player: int, owner: str) -> bool:
        return bool(await self._run("unlock", [self.keys["locks"]], [str(player), owner]))

    # ---------------------------------------------------------- reflectors and the map
    @_unavailable_on_redis_errors
    async def register_reflector(self, reflector: str, udp: str, now: float, ttl: float | None) -> bool:
        done = await self._run("register", self._reflector_keys,
                               [reflector, udp, _deadline(ttl, now), self.limits.max_reflectors])
        if not done:
            self.stats["reflectors_refused"] += 1
        return bool(done)

    @_unavailable_on_redis_errors
    async def heartbeat(self, reflector: str, instance: str, now: float, ttl: float | None) -> str:
        previous = await self._run("heartbeat", self._reflector_keys, [reflector, instance, _deadline(ttl, now)])
        if previous is None:
            raise StoreError(f"reflector {reflector} is not registered")
        return _text(previous)

    @_unavailable_on_redis_errors
    async def reflectors(self, now: float) -> list[ReflectorRecord]:
        flat = await self._run("reflectors", self._reflector_keys, [])
        records = [ReflectorRecord(_text(flat[i]), _text(flat[i + 1]), _text(flat[i + 2]), float(flat[i + 3]))
                   for i in range(0, len(flat), 4)]
        return sorted(records, key=lambda record: record.id)

    @_unavailable_on_redis_errors
    async def init_map(self, homes: list[str]) -> None:
        await self._run("init_map", [self.keys["map"]], list(homes))

    @_unavailable_on_redis_errors
    async def location_map(self) -> dict[int, str]:
        return {int(location): _text(reflector)
                for location, reflector in (await self.client.hgetall(self.keys["map"])).items()}

    @_unavailable_on_redis_errors
    async def reflector_of(self, location: int) -> str | None:
        reflector = await self.client.hget(self.keys["map"], str(location))
        return None if reflector is None else _text(reflector)

    @_unavailable_on_redis_errors
    async def reassign_dead(self, now: float) -> dict[int, tuple[str, str]]:
        flat = await self._run("reassign", [self.keys["map"], self.keys["r:deadline"]], [repr(now)])
        return {int(flat[i]): (_text(flat[i + 1]), _text(flat[i + 2])) for i in range(0, len(flat), 3)}


__all__ = ["DEFAULT_GAME", "RedisStore", "split_store_url"]
