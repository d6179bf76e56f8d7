"""What the game server keeps: accounts, sessions, where each player is, the reflectors and the
location -> reflector map.  One interface, two implementations:

* :class:`MemoryStore` (this module): dicts in the server's process, the default (one instance,
  ``make demo``; a restart loses everything, as it always did);
* :class:`mmpog.store_redis.RedisStore`: the same state in Redis (``mmpog-server --store
  redis://HOST:PORT/N``), so several ``mmpog-server`` instances behind one address serve the same
  players and a restarted instance loses nothing.  Every change is one server-side Lua script.

Both pass one conformance suite (``tests/mmpog/test_mmpog_store.py``).  Time is an argument
(``now``, wall-clock seconds from the caller), never read here: expiry is deterministic under test
and the same on every instance (instances of one game should keep their clocks in sync; a skew of
s seconds moves an expiry by s).

Bounds (:class:`StoreLimits`), each refusal or eviction counted in ``stats`` of the instance that
saw it: accounts (``max_accounts``: refused), sessions (one per player: a new login replaces the
old one; ``sessions_per_address``: that address's oldest is dropped; ``max_sessions`` in all:
refused, nobody else is evicted; expired sessions are purged, at most ``PURGE_BATCH`` per login),
reflector registrations (``max_reflectors``: refused).  Presence and move locks are one entry per
player at most, so they are bounded by the accounts.
"""

from __future__ import annotations

import abc
import bisect
import itertools
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass

PURGE_BATCH = 100     # expired sessions removed per login: the work of one login stays bounded


class StoreError(Exception):
    """Base of the store's errors (one line each)."""


class AccountExists(StoreError):
    pass


class StoreFull(StoreError):
    """A bound was reached: ``what`` is ``accounts``, ``sessions`` or ``reflectors``."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"too many {what} (at most {limit})")
        self.what, self.limit = what, limit


class StoreUnavailable(StoreError):
    """The store did not answer (a lost Redis): the request fails with 503, nothing is half done."""


@dataclass(frozen=True)
class StoreLimits:
    max_accounts: int = 100_000
    max_sessions: int = 100_000
    sessions_per_address: int = 256
    session_ttl: float = 24 * 3600.0
    max_reflectors: int = 1024
    login_failures_per_account: int = 5      # within login_window seconds; then logins are refused
    login_failures_per_address: int = 20
    login_window: float = 60.0
    max_throttle_keys: int = 100_000         # accounts and addresses with recent failures (memory store)


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    salt: bytes
    pw_hash: bytes
    kdf: str            # how pw_hash was made, e.g. "scrypt:n=16384,r=8,p=1,dklen=32"


@dataclass(frozen=True)
class Presence:
    """Where a player is a member: the location, its token there, and the reflector that has it."""

    location: int
    token: bytes
    reflector: str      # the reflector's id (its control URL)


@dataclass(frozen=True)
class SessionOpened:
    replaced: bool              # the player's previous session was dropped (one per player)
    evicted_same_address: int   # sessions of the same address dropped to make room


@dataclass(frozen=True)
class ReflectorRecord:
    id: str             # control URL
    udp: str            # HOST:PORT where players send
    instance: str       # what its /health said last ('' before the first answer)
    deadline: float     # live while now < deadline (inf: never expires)


class Store(abc.ABC):
    """The game server's state; every method is one atomic step (safe between instances)."""

    limits: StoreLimits
    stats: Counter

    # ---------------------------------------------------------- accounts
    @abc.abstractmethod
    async def create_account(self, name: str, salt: bytes, pw_hash: bytes, kdf: str) -> int:
        """The new account's id (1, 2, ...); :class:`AccountExists`, or :class:`StoreFull`."""

    @abc.abstractmethod
    async def account(self, name: str) -> Account | None: ...

    @abc.abstractmethod
    async def replace_password(self, name: str, old_hash: bytes, salt: bytes, pw_hash: bytes, kdf: str) -> bool:
        """Store a new hash (stronger parameters) if the account still has ``old_hash``."""

    @abc.abstractmethod
    async def count_accounts(self) -> int: ...

    # ---------------------------------------------------------- sessions
    @abc.abstractmethod
    async def open_session(self, key: str, player: int, address: str, now: float) -> SessionOpened:
        """Bind session ``key`` to ``player`` until ``now + session_ttl`` (see the bounds above);
        :class:`StoreFull` when ``max_sessions`` other sessions are live."""

    @abc.abstractmethod
    async def session_player(self, key: str, now: float) -> int | None:
        """The player of a live session, else None."""

    @abc.abstractmethod
    async def count_sessions(self, now: float) -> int:
        """Live sessions."""

    @abc.abstractmethod
    async def login_throttled(self, name: str, address: str, now: float) -> bool:
        """True while the account or the address has had its limit of failed logins in the window."""

    @abc.abstractmethod
    async def login_failed(self, name: str, address: str, now: float) -> None:
        """Count one failed login against both (shared by every instance: k instances give no k-fold guesses)."""

    # ---------------------------------------------------------- presence
    @abc.abstractmethod
    async def presence(self, player: int) -> Presence | None: ...

    @abc.abstractmethod
    async def set_presence(self, player: int, presence: Presence | None) -> Presence | None:
        """Replace the player's presence (None: nowhere); returns the previous one."""

    @abc.abstractmethod
    async def members_on(self, reflector: str) -> list[tuple[int, Presence]]:
        """Every player whose presence is on ``reflector``, by player id."""

    @abc.abstractmethod
    async def occupancy(self) -> dict[int, int]:
        """location -> players present (locations with none are left out)."""

    async def move_context(self, key: str, now: float, location: int) -> tuple[int | None, Presence | None, str | None]:
        """(the session's player or None, its presence, the location's reflector) read at one instant:
        a /move that changes nothing needs no more (one round trip to a remote store)."""
        player = await self.session_player(key, now)
        if player is None:
            return None, None, None
        return player, await self.presence(player), await self.reflector_of(location)

    # ---------------------------------------------------------- move locks
    @abc.abstractmethod
    async def try_lock(self, player: int, owner: str, now: float, ttl: float) -> bool:
        """Hold the player's move lock until ``now + ttl`` unless someone else holds it."""

    @abc.abstractmethod
    async def unlock(self, player: int, owner: str) -> bool:
        """Release the lock if ``owner`` still holds it."""

    # ---------------------------------------------------------- reflectors and the location map
    @abc.abstractmethod
    async def register_reflector(self, reflector: str, udp: str, now: float, ttl: float | None) -> bool:
        """Create the registration or extend its life to at least ``now + ttl`` (None: forever),
        leaving its instance alone; False (counted) when ``max_reflectors`` others are registered."""

    @abc.abstractmethod
    async def heartbeat(self, reflector: str, instance: str, now: float, ttl: float | None) -> str:
        """The reflector answered as ``instance``: it lives until ``now + ttl``; returns the instance
        registered before ('' if none).  A difference is a restart: exactly one caller sees it."""

    @abc.abstractmethod
    async def reflectors(self, now: float) -> list[ReflectorRecord]:
        """Every registration (live or not), by id."""

    @abc.abstractmethod
    async def init_map(self, homes: list[str]) -> None:
        """Give location ``l`` (of ``len(homes)``) to ``homes[l]`` unless it already has a reflector
        (idempotent: every instance of a game calls it at start)."""

    @abc.abstractmethod
    async def location_map(self) -> dict[int, str]: ...

    @abc.abstractmethod
    async def reflector_of(self, location: int) -> str | None: ...

    @abc.abstractmethod
    async def reassign_dead(self, now: float) -> dict[int, tuple[str, str]]:
        """Give every location of a reflector whose registration lapsed to the live reflector with
        the fewest locations (ties: the smallest id); returns location -> (old, new).  Nothing moves
        when no reflector is live."""

    async def aclose(self) -> None:
        pass


class Throttle:
    """At most ``limit`` events (failed logins, registrations) per key within ``window`` seconds;
    bounded (oldest keys evicted, counted)."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit, self.window, self.max_keys = limit, window, max_keys
        self._failures: OrderedDict[object, list[float]] = OrderedDict()
        self.evicted = 0

    def blocked(self, key: object, now: float) -> bool:
        times = self._failures.get(key)
        if not times:
            return False
        while times and times[0] <= now - self.window:
            times.pop(0)
        if not times:
            del self._failures[key]
            return False
        return len(times) >= self.limit

    def note(self, key: object, now: float) -> None:
        times = self._failures.pop(key, [])
        times.append(now)
        del times[:-self.limit]
        self._failures[key] = times
        if len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)
            self.evicted += 1



def pick_least_loaded(loads: dict[str, int]) -> str:
    """The reflector with the fewest locations; ties go to the smallest id (both stores agree)."""
    return min(loads, key=lambda rid: (loads[rid], rid))


@dataclass
class _Session:
    player: int
    address: str
    deadline: float
    order: int


class MemoryStore(Store):
    """The state in this process: the default, exactly what one ``mmpog-server`` always kept."""

    def __init__(self, limits: StoreLimits | None = None) -> None:
        self.limits = limits or StoreLimits()
        self.stats = Counter()
        self._accounts: dict[str, Account] = {}
        self._sessions: dict[str, _Session] = {}
        self._by_player: dict[int, str] = {}
        self._by_address: dict[str, dict[str, None]] = {}       # insertion order = oldest first
        self._deadlines: list[tuple[float, int, str]] = []       # sorted (deadline, order, key)
        self._order = itertools.count()
        self._presence: dict[int, Presence] = {}
        self._occupancy: Counter = Counter()
        self._locks: dict[int, tuple[str, float]] = {}
        self._reflectors: dict[str, ReflectorRecord] = {}
        self._map: dict[int, str] = {}
        self._account_failures = Throttle(self.limits.login_failures_per_account, self.limits.login_window,
                                          self.limits.max_throttle_keys)
        self._address_failures = Throttle(self.limits.login_failures_per_address, self.limits.login_window,
                                          self.limits.max_throttle_keys)

    # ---------------------------------------------------------- accounts
    async def create_account(self, name: str, salt: bytes, pw_hash: bytes, kdf: str) -> int:
        if name in self._accounts:
            raise AccountExists(f"player {name!r} exists")
        if len(self._accounts) >= self.limits.max_accounts:
            self.stats["accounts_refused"] += 1
            raise StoreFull("accounts", self.limits.max_accounts)
        account = Account(len(self._accounts) + 1, name, salt, pw_hash, kdf)
        self._accounts[name] = account
        return account.id

    async def account(self, name: str) -> Account | None:
        return self._accounts.get(name)

    async def replace_password(self, name: str, old_hash: bytes, salt: bytes, pw_hash: bytes, kdf: str) -> bool:
        account = self._accounts.get(name)
        if account is None or account.pw_hash != old_hash:
            return False
        self._accounts[name] = Account(account.id, name, salt, pw_hash, kdf)
        return True

    async def count_accounts(self) -> int:
        return len(self._accounts)

    # ---------------------------------------------------------- sessions
    def _drop(self, key: str) -> None:
        session = self._sessions.pop(key, None)
        if session is None:
            return
        if self._by_player.get(session.player) == key:
            del self._by_player[session.player]
        mine = self._by_address.get(session.address)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_address[session.address]
        index = bisect.bisect_left(self._deadlines, (session.deadline, session.order, key))
        if index < len(self._deadlines) and self._deadlines[index][2] == key:
            del self._deadlines[index]

    def _purge(self, now: float, batch: int) -> None:
        while batch and self._deadlines and self._deadlines[0][0] <= now:
            self._drop(self._deadlines[0][2])
            self.stats["sessions_expired"] += 1
            batch -= 1

    async def open_session(self, key: str, player: int, address: str, now: float) -> SessionOpened:
        self._purge(now, PURGE_BATCH)
        replaced = False
        old = self._by_player.get(player)
        if old is not None:
            self._drop(old)
            replaced = True
        evicted = 0
        mine = self._by_address.get(address, {})
        while len(mine) >= self.limits.sessions_per_address:
            self._drop(next(iter(mine)))
            evicted += 1
        self.stats["sessions_evicted_same_address"] += evicted
        if len(self._sessions) >= self.limits.max_sessions:
            self.stats["sessions_refused"] += 1
            raise StoreFull("sessions", self.limits.max_sessions)
        session = _Session(player, address, now + self.limits.session_ttl, next(self._order))
        self._sessions[key] = session
        self._by_player[player] = key
        self._by_address.setdefault(address, {})[key] = None
        bisect.insort(self._deadlines, (session.deadline, session.order, key))
        return SessionOpened(replaced, evicted)

    async def session_player(self, key: str, now: float) -> int | None:
        session = self._sessions.get(key)
        return session.player if session is not None and now < session.deadline else None

    async def count_sessions(self, now: float) -> int:
        expired = bisect.bisect_right(self._deadlines, (now, math.inf, ""))
        return len(self._sessions) - expired

    async def login_throttled(self, name: str, address: str, now: float) -> bool:
        return self._account_failures.blocked(name, now) or self._address_failures.blocked(address, now)

    async def login_failed(self, name: str, address: str, now: float) -> None:
        self._account_failures.note(name, now)
        self._address_failures.note(address, now)
        self.stats["throttle_keys_evicted"] = self._account_failures.evicted + self._address_failures.evicted

    # ---------------------------------------------------------- presence
    async def presence(self, player: int) -> Presence | None:
        return self._presence.get(player)

    async def set_presence(self, player: int, presence: Presence | None) -> Presence | None:
        old = self._presence.pop(player, None)
        if old is not None:
            self._occupancy[old.location] -= 1
            if not self._occupancy[old.location]:
                del self._occupancy[old.location]
        if presence is not None:
            self._presence[player] = presence
            self._occupancy[presence.location] += 1
        return old

    async def members_on(self, reflector: str) -> list[tuple[int, Presence]]:
        return sorted((player, p) for player, p in self._presence.items() if p.reflector == reflector)

    async def occupancy(self) -> dict[int, int]:
        return dict(self._occupancy)

    # ---------------------------------------------------------- move locks
    async def try_lock(self, player: int, owner: str, now: float, ttl: float) -> bool:
        held = self._locks.get(player)
        if held is not None and held[0] != owner and now < held[1]:
            return False
        self._locks[player] = (owner, now + ttl)
        return True

    async def unlock(self, player: int, owner: str) -> bool:
        held = self._locks.get(player)
        if held is None or held[0] != owner:
            return False
        del self._locks[player]
        return True

    # ---------------------------------------------------------- reflectors and the map
    async def register_reflector(self, reflector: str, udp: str, now: float, ttl: float | None) -> bool:
        deadline = math.inf if ttl is None else now + ttl
        old = self._reflectors.get(reflector)
        if old is None and len(self._reflectors) >= self.limits.max_reflectors:
            self.stats["reflectors_refused"] += 1
            return False
        self._reflectors[reflector] = ReflectorRecord(reflector, udp, old.instance if old else "",
                                                      max(deadline, old.deadline) if old else deadline)
        return True

    async def heartbeat(self, reflector: str, instance: str, now: float, ttl: float | None) -> str:
        old = self._reflectors.get(reflector)
        if old is None:
            raise StoreError(f"reflector {reflector} is not registered")
        deadline = math.inf if ttl is None else now + ttl
        self._reflectors[reflector] = ReflectorRecord(reflector, old.udp, instance, max(deadline, old.deadline))
        return old.instance

    async def reflectors(self, now: float) -> list[ReflectorRecord]:
        return [self._reflectors[rid] for rid in sorted(self._reflectors)]

    async def init_map(self, homes: list[str]) -> None:
        for location, reflector in enumerate(homes):
            self._map.setdefault(location, reflector)

    async def location_map(self) -> dict[int, str]:
        return dict(self._map)

    async def reflector_of(self, location: int) -> str | None:
        return self._map.get(location)

    async def reassign_dead(self, now: float) -> dict[int, tuple[str, str]]:
        live = {rid for rid, record in self._reflectors.items() if now < record.deadline}
        if not live:
            return {}
        loads = Counter({rid: 0 for rid in live})
        loads.update(rid for rid in self._map.values() if rid in live)
        changes = {}
        for location in sorted(self._map):
            old = self._map[location]
            if old in live:
                continue
            new = pick_least_loaded(loads)
            loads[new] += 1
            self._map[location] = new
            changes[location] = (old, new)
        return changes


@dataclass
class MovePlan:
    """What a /move does, decided from the player's presence and the location's reflector (pure)."""

    put: bool                    # give the player a fresh token at the location's reflector
    delete_old: Presence | None  # then remove it where it was (make before break)
    changed: bool                # the client must join again

    @classmethod
    def decide(cls, current: Presence | None, location: int, reflector: str, rejoin: bool) -> "MovePlan":
        if current is None:
            return cls(True, None, True)
        if current.location != location or current.reflector != reflector:
            # another location, or the same one now served by another reflector (its old one died)
            return cls(True, current, True)
        if rejoin:
            return cls(True, None, True)
        return cls(False, None, False)


__all__ = ["Account", "AccountExists", "MemoryStore", "MovePlan", "Presence", "ReflectorRecord",
           "SessionOpened", "Store", "StoreError", "StoreFull", "StoreLimits", "StoreUnavailable",
           "pick_least_loaded", "PURGE_BATCH", "Throttle"]
