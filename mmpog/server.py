"""``mmpog-server``: the game's control plane (paper Fig. 10): players, the world, locations, reflectors.

The virtual world is a grid of ``--world COLSxROWS`` cells of ``--cell`` units;
each cell is a location (id = row * cols + col).  Location ``l``'s home is
reflector ``l % R``; when a reflector stops answering for ``--reflector-ttl``
its locations go to live ones.  The state (accounts, sessions, where players
are, the reflectors, the location map) is in a :class:`mmpog.store.Store`: in
this process by default, or in Redis with ``--store redis://...`` so several
instances serve one game (docs/mmpog.md).  The server never touches game data: it registers and logs players in, and as a player
moves it pushes the membership (player id + a fresh random token) to the
location's reflector and tells the player where to send and which token proves
it is the member.

HTTP API (JSON)::

    POST /register {"name", "password"}             -> {"player"}
    POST /login    {"name", "password"}             -> {"player", "session"}
    POST /move     {"x", "y", "rejoin"?} (Bearer)   -> {"location", "reflector": "host:port", "token": hex, "changed"}
                   ("rejoin": true issues a fresh token for the same location: a token is bound to the
                    address that first used it, so a player whose address changed needs a new one)
    POST /leave                     (Bearer session) -> {"left": location | null}
    GET  /world                                      -> grid, reflectors (UDP), location -> reflector mapping
    GET  /stats                     (Bearer API key) -> counters, reflectors, occupancy

Hardening (docs/mmpog.md): passwords of at least ``--min-password`` characters that are not
in the shipped common-password list nor the name; scrypt (n=2**14, r=8, p=1) hashes; failed
logins throttled per account and per address (429 while over the limit, without hashing; shared
by all instances); registrations throttled per address (``--registrations-per-address`` per
``--registration-window``, per instance) and every scrypt hash bounded (at most 4 at once, 256
waiting, then 503); sessions expire (``--session-ttl``), capped per address (the address's oldest
is dropped) and overall (503, nobody else's session is evicted), one per player; request
bodies of at most 16 KiB and JSON nested at most 32 deep (400 with one line).  The
reflectors' ``/health`` carries an instance id: when a reflector restarts, one server
instance pushes the membership of its players to it again, so players can rejoin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources

import aiohttp
from aiohttp import web

from cliruntime import ConfigError, RunContext, host_port, make_parser, non_negative_float, positive_int, run_async
from cliruntime.supervisor import Supervisor

from .store import (Account, AccountExists, MemoryStore, MovePlan, Presence, Store, StoreError, StoreFull, StoreLimits,
                    StoreUnavailable, Throttle)

log = logging.getLogger("mmpog.server")

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
TOKEN_BYTES = 16
MAX_JSON_DEPTH = 32
MAX_PASSWORD = 256
# scrypt at OWASP's current minimum (n=2**14, r=8, p=1: 16 MiB, tens of ms per hash)
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1


def load_common_passwords() -> frozenset[str]:
    text = resources.files("mmpog").joinpath("common_passwords.txt").read_text()
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#"))


COMMON_PASSWORDS = load_common_passwords()


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if brackets outside strings nest at most ``limit`` deep (checked before json.loads recurses)."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return False
        elif char in "]}":
            depth -= 1
    return True


@dataclass(frozen=True)
class ReflectorInfo:
    http: str                  # control API base URL
    udp: tuple[str, int]       # where clients send datagrams

    @classmethod
    def parse(cls, text: str) -> "ReflectorInfo":
        url, sep, udp = text.rpartition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise ConfigError(f"--reflector wants HTTP_URL=HOST:PORT, got {text!r}")
        try:
            addr = host_port(udp)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--reflector {text!r}: {exc}") from None
        return cls(url.rstrip("/"), addr)


@dataclass(frozen=True)
class World:
    cols: int
    rows: int
    cell: float

    @classmethod
    def parse(cls, text: str, cell: float) -> "World":
        match = re.fullmatch(r"(\d+)x(\d+)", text)
        if not match or int(match[1]) <= 0 or int(match[2]) <= 0:
            raise ConfigError(f"--world wants COLSxROWS with positive numbers, got {text!r}")
        if cell <= 0:
            raise ConfigError("--cell must be positive")
        return cls(int(match[1]), int(match[2]), cell)

    @property
    def locations(self) -> int:
        return self.cols * self.rows

    @property
    def size(self) -> tuple[float, float]:
        return self.cols * self.cell, self.rows * self.cell

    def location_at(self, x: float, y: float) -> int:
        if not (0 <= x < self.cols * self.cell and 0 <= y < self.rows * self.cell):
            raise ValueError(f"position ({x}, {y}) is outside the {self.size[0]}x{self.size[1]} world")
        return int(y // self.cell) * self.cols + int(x // self.cell)


KDF_RE = re.compile(r"scrypt:n=(\d+),r=(\d+),p=(\d+),dklen=(\d+)")
MOVE_LOCK_TTL = 15.0     # longer than a move's two reflector calls (5 s timeout each): a dead holder's lock lapses


def kdf_name(n: int, r: int = SCRYPT_R, p: int = SCRYPT_P, dklen: int = 32) -> str:
    return f"scrypt:n={n},r={r},p={p},dklen={dklen}"


def kdf_parameters(kdf: str) -> tuple[int, int, int, int]:
    """(n, r, p, dklen) of a stored hash, within sane bounds (a tampered store must not make us burn memory)."""
    match = KDF_RE.fullmatch(kdf)
    if match is None:
        raise ValueError(f"unknown password hash {kdf!r}")
    n, r, p, dklen = map(int, match.groups())
    if not (2 ** 10 <= n <= 2 ** 20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16 and 16 <= dklen <= 64):
        raise ValueError(f"password hash parameters out of bounds: {kdf!r}")
    return n, r, p, dklen


def session_key(session: str) -> str:
    """What the store keeps of a session token: its digest (reading the store gives no usable session)."""
    return hashlib.sha256(session.encode()).hexdigest()


@dataclass
class GameServer:
    world: World
    reflectors: list[ReflectorInfo]
    api_key: str | None = None
    max_players: int = 100000
    max_sessions: int = 100000
    sessions_per_address: int = 256
    session_ttl: float = 24 * 3600.0
    min_password: int = 8
    login_failures_per_account: int = 5      # within login_window seconds, then 429 until they age out
    login_failures_per_address: int = 20
    login_window: float = 60.0
    registrations_per_address: int = 100     # within registration_window seconds (per instance), then 429
    registration_window: float = 600.0
    max_concurrent_hashes: int = 4           # scrypt at once (16 MiB each); more requests wait ...
    max_waiting_hashes: int = 256            # ... up to this many, beyond which 503
    reflector_check_interval: float = 1.0    # how often the reflectors' /health is read (0: never)
    reflector_ttl: float = 10.0              # a reflector not heard for this long is dead: its locations move
    scrypt_n: int = SCRYPT_N
    store: Store | None = None               # None: a MemoryStore with the limits above (one instance)
    stats: Counter = field(default_factory=Counter)
    http: aiohttp.ClientSession | None = None
    instance: str = field(default_factory=lambda: secrets.token_hex(8))   # owner of this process's move locks
    _local_locks: dict[int, list] = field(default_factory=dict)
    _supervisor: Supervisor | None = None
    _hash_slots: asyncio.Semaphore | None = None
    _hashes_waiting: int = 0

    def __post_init__(self) -> None:
        if self.scrypt_n < SCRYPT_N or self.scrypt_n & (self.scrypt_n - 1):
            raise ValueError(f"scrypt n must be a power of two >= {SCRYPT_N}")
        if self.store is None:
            self.store = MemoryStore(self.limits())
        self._configured = {reflector.http: reflector for reflector in self.reflectors}
        self._registrations = Throttle(self.registrations_per_address, self.registration_window)

    def limits(self) -> StoreLimits:
        return StoreLimits(max_accounts=self.max_players, max_sessions=self.max_sessions,
                           sessions_per_address=self.sessions_per_address, session_ttl=self.session_ttl,
                           login_failures_per_account=self.login_failures_per_account,
                           login_failures_per_address=self.login_failures_per_address,
                           login_window=self.login_window)

    def _hash(self, password: str, salt: bytes, kdf: str | None = None) -> bytes:
        n, r, p, dklen = kdf_parameters(kdf) if kdf else (self.scrypt_n, SCRYPT_R, SCRYPT_P, 32)
        return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r, dklen=dklen)

    async def _hashed(self, password: str, salt: bytes, kdf: str | None = None) -> bytes:
        """:meth:`_hash` in a thread, at most ``max_concurrent_hashes`` at once (memory and CPU
        bounded however many logins arrive); with ``max_waiting_hashes`` already queued, 503."""
        if self._hash_slots is None:
            self._hash_slots = asyncio.Semaphore(self.max_concurrent_hashes)
        if self._hashes_waiting >= self.max_waiting_hashes:
            self.stats["hashes_refused"] += 1
            raise web.HTTPServiceUnavailable(text="too many logins at once: try again shortly")
        self._hashes_waiting += 1
        try:
            await self._hash_slots.acquire()
        finally:
            self._hashes_waiting -= 1
        try:
            return await asyncio.to_thread(self._hash, password, salt, kdf)
        finally:
            self._hash_slots.release()

    @property
    def _registration_ttl(self) -> float | None:
        return self.reflector_ttl if self.reflector_check_interval > 0 else None   # unwatched: never expires

    async def _reflector_info(self, reflector: str) -> ReflectorInfo:
        """A reflector by id: from our --reflector list, else from its registration (another instance's)."""
        if reflector in self._configured:
            return self._configured[reflector]
        for record in await self.store.reflectors(time.time()):
            if record.id == reflector:
                return ReflectorInfo(record.id, host_port(record.udp))
        raise web.HTTPServiceUnavailable(text=f"reflector {reflector} is not registered")

    # ------------------------------------------------------------------ reflector calls

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _reflector_call(self, method: str, reflector: ReflectorInfo, location: int, player: int,
                              body: dict | None = None) -> None:
        assert self.http is not None
        url = f"{reflector.http}/locations/{location}/members/{player}"
        try:
            async with self.http.request(method, url, json=body, headers=self._headers()) as resp:
                if resp.status >= 400 and not (method == "DELETE" and resp.status == 404):
                    text = await resp.text()
                    raise web.HTTPBadGateway(text=f"reflector answered {resp.status}: {text[:200]}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.stats["reflector_errors"] += 1
            raise web.HTTPBadGateway(text=f"reflector unreachable: {exc or type(exc).__name__}") from None
        self.stats[f"reflector_{method.lower()}"] += 1

    # ------------------------------------------------------------------ HTTP handlers

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024, middlewares=[self._store_errors])
        app.router.add_post("/register", self.register)
        app.router.add_post("/login", self.login)
        app.router.add_post("/move", self.move)
        app.router.add_post("/leave", self.leave)
        app.router.add_get("/world", self.get_world)
        app.router.add_get("/stats", self.get_stats)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    @web.middleware
    async def _store_errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except StoreUnavailable as exc:      # counted by the store (store_unavailable)
            raise web.HTTPServiceUnavailable(text=str(exc)) from None

    async def _startup(self, app: web.Application) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        now = time.time()
        for reflector in self.reflectors:
            await self.store.register_reflector(reflector.http, f"{reflector.udp[0]}:{reflector.udp[1]}", now,
                                                self._registration_ttl)
        await self._init_map()
        self._supervisor = Supervisor("mmpog-server", logger=log)
        if self.reflector_check_interval > 0:
            for reflector in self.reflectors:
                self._supervisor.spawn_restarting(lambda r=reflector: self._watch_reflector(r),
                                                  name=f"watch {reflector.http}")
            self._supervisor.spawn_restarting(self._reassign_dead, name="reassign dead reflectors' locations")

    async def _cleanup(self, app: web.Application) -> None:
        if self._supervisor is not None:
            await self._supervisor.aclose()
        if self.http is not None:
            await self.http.close()

    # ------------------------------------------------------------------ reflector liveness and restarts

    async def _watch_reflector(self, reflector: ReflectorInfo) -> None:
        """Read the reflector's /health: each answer is a heartbeat in the store (its registration lives
        ``reflector_ttl`` longer); when its instance changed (a restart), push the membership of its
        players again.  The store says "changed" to exactly one instance, so only one pushes."""
        while True:
            instance = await self._reflector_instance(reflector)
            if instance is not None:
                now = time.time()
                if await self.store.register_reflector(reflector.http, f"{reflector.udp[0]}:{reflector.udp[1]}",
                                                       now, self._registration_ttl):     # refusals: counted there
                    previous = await self.store.heartbeat(reflector.http, instance, now, self._registration_ttl)
                    if previous not in ("", instance):
                        await self.push_membership(reflector)
            await asyncio.sleep(self.reflector_check_interval)

    async def _reflector_instance(self, reflector: ReflectorInfo) -> str | None:
        assert self.http is not None
        try:
            async with self.http.get(f"{reflector.http}/health") as resp:
                body = await resp.json() if resp.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        return str(body.get("instance", "")) if isinstance(body, dict) else None

    async def _init_map(self) -> None:
        # location l's home is reflector l mod R; a location another instance already placed stays where it is
        await self.store.init_map([self.reflectors[location % len(self.reflectors)].http
                                   for location in range(self.world.locations)])

    async def _reassign_dead(self) -> None:
        """Give the locations of reflectors whose registration lapsed to live ones; their players move
        over on their next /move (``changed`` with the new reflector's address)."""
        while True:
            await self._init_map()       # a store that lost its data (Redis restarted empty) gets a map again
            changes = await self.store.reassign_dead(time.time())
            if changes:
                self.stats["locations_reassigned"] += len(changes)
                log.warning("reassigned %d locations of dead reflectors: %s", len(changes),
                            ", ".join(f"{loc}: {old} -> {new}" for loc, (old, new) in sorted(changes.items())[:10]))
            await asyncio.sleep(self.reflector_check_interval)

    async def push_membership(self, reflector: ReflectorInfo) -> int:
        """PUT every player present on ``reflector`` again, with its current token; returns how many."""
        pushed = 0
        for player, presence in await self.store.members_on(reflector.http):
            try:
                await self._reflector_call("PUT", reflector, presence.location, player, {"token": presence.token.hex()})
            except web.HTTPBadGateway:
                break       # it went away again: the watcher pushes once it is back
            pushed += 1
        self.stats["membership_pushed_again"] += pushed
        log.info("reflector %s came back: membership of %d players pushed again", reflector.http, pushed)
        return pushed

    # ------------------------------------------------------------------ request parsing

    async def _json(self, request: web.Request) -> dict:
        try:
            text = await request.text()
        except UnicodeDecodeError:
            raise web.HTTPBadRequest(text="body must be UTF-8 JSON") from None
        if not json_depth_ok(text):
            self.stats["json_too_deep"] += 1
            raise web.HTTPBadRequest(text=f"JSON nested deeper than {MAX_JSON_DEPTH}")
        try:
            body = json.loads(text)
        except (ValueError, RecursionError):
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    @staticmethod
    def _credentials(body: dict) -> tuple[str, str]:
        name, password = body.get("name"), body.get("password")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise web.HTTPBadRequest(text="name must be 1-32 characters of A-Z a-z 0-9 _ . -")
        if not isinstance(password, str) or not 1 <= len(password) <= MAX_PASSWORD:
            raise web.HTTPBadRequest(text=f"password must be a string of 1-{MAX_PASSWORD} characters")
        return name, password

    def password_problem(self, name: str, password: str) -> str | None:
        """Why ``password`` is refused for ``name``, or None."""
        if len(password) < self.min_password:
            return f"password must have at least {self.min_password} characters"
        lowered = password.lower()
        if lowered in COMMON_PASSWORDS:
            return "password is one of the most common passwords"
        if lowered == name.lower():
            return "password must not be the name"
        return None

    @staticmethod
    def _session_key(request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and len(auth) <= 256:
            return session_key(auth.removeprefix("Bearer "))
        return ""        # no session has this key

    async def _player(self, request: web.Request) -> int:
        player = await self.store.session_player(self._session_key(request), time.time())
        if player is None:
            self.stats["unauthorized"] += 1
            raise web.HTTPUnauthorized(text="log in first (Authorization: Bearer <session>)")
        return player

    async def register(self, request: web.Request) -> web.Response:
        name, password = self._credentials(await self._json(request))
        address, now = request.remote or "?", time.time()
        if self._registrations.blocked(address, now):
            # before hashing: one host cannot fill the game (max_players) nor burn our CPU
            self.stats["registrations_throttled"] += 1
            raise web.HTTPTooManyRequests(text="too many registrations from this address: try again later")
        problem = self.password_problem(name, password)
        if problem is not None:
            self.stats["weak_passwords_refused"] += 1
            raise web.HTTPBadRequest(text=problem)
        # both checked again atomically by the store; here they spare the hashing
        if await self.store.account(name) is not None:
            raise web.HTTPConflict(text=f"player {name!r} exists")
        if await self.store.count_accounts() >= self.store.limits.max_accounts:
            self.stats["registrations_refused"] += 1
            raise web.HTTPServiceUnavailable(text="the game is full")
        self._registrations.note(address, now)          # every attempt that reaches the hashing counts
        salt = secrets.token_bytes(16)
        pw_hash = await self._hashed(password, salt)
        try:
            player = await self.store.create_account(name, salt, pw_hash, kdf_name(self.scrypt_n))
        except AccountExists:      # lost a race while hashing (here or on another instance)
            raise web.HTTPConflict(text=f"player {name!r} exists") from None
        except StoreFull:
            self.stats["registrations_refused"] += 1
            raise web.HTTPServiceUnavailable(text="the game is full") from None
        self.stats["registered"] += 1
        return web.json_response({"player": player}, status=201)

    async def login(self, request: web.Request) -> web.Response:
        name, password = self._credentials(await self._json(request))
        address = request.remote or "?"
        now = time.time()
        if await self.store.login_throttled(name, address, now):
            # refused before hashing: a guessing flood costs neither CPU nor other players' logins
            self.stats["logins_throttled"] += 1
            raise web.HTTPTooManyRequests(text="too many failed logins: try again later")
        account = await self.store.account(name)
        try:
            attempt = await self._hashed(password, account.salt if account else b"\0" * 16,
                                         account.kdf if account else None)
        except ValueError as exc:     # a stored hash we do not accept: nobody logs in with it
            log.error("account %r: %s", name, exc)
            account, attempt = None, b""
        if account is None or not hmac.compare_digest(attempt, account.pw_hash):
            self.stats["login_failed"] += 1
            await self.store.login_failed(name, address, now)
            raise web.HTTPUnauthorized(text="unknown player or wrong password")
        if account.kdf != kdf_name(self.scrypt_n):
            await self._rehash(account, password)
        session = secrets.token_urlsafe(24)
        try:
            opened = await self.store.open_session(session_key(session), account.id, address, now)
        except StoreFull:       # counted by the store (sessions_refused), as its evictions are
            raise web.HTTPServiceUnavailable(text="too many sessions") from None
        self.stats["logins"] += 1
        if opened.replaced:
            self.stats["sessions_replaced"] += 1
        return web.json_response({"player": account.id, "session": session})

    async def _rehash(self, account: Account, password: str) -> None:
        """The password was right but hashed with older parameters: store it at today's (only we see
        the password, and only at login)."""
        salt = secrets.token_bytes(16)
        pw_hash = await self._hashed(password, salt)
        if await self.store.replace_password(account.name, account.pw_hash, salt, pw_hash, kdf_name(self.scrypt_n)):
            self.stats["passwords_rehashed"] += 1

    @contextlib.asynccontextmanager
    async def _move_lock(self, player: int):
        """One /move or /leave of a player at a time: queued behind the others in this process (as
        always), refused with 409 while another instance holds the store's lock."""
        entry = self._local_locks.setdefault(player, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                if not await self.store.try_lock(player, self.instance, time.time(), MOVE_LOCK_TTL):
                    self.stats["moves_refused_busy"] += 1
                    raise web.HTTPConflict(text="another move of this player is in progress")
                try:
                    yield
                finally:
                    await self.store.unlock(player, self.instance)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._local_locks[player]     # bounded: only players with a request in flight

    async def _delete_membership(self, presence: Presence, player: int) -> None:
        """Remove a membership; where the reflector no longer serves the location (it died and the location
        moved), removing it is best effort."""
        current = await self.store.reflector_of(presence.location)
        try:
            await self._reflector_call("DELETE", await self._reflector_info(presence.reflector), presence.location,
                                       player)
        except web.HTTPException:
            if current == presence.reflector:
                raise
            self.stats["stale_memberships_left"] += 1

    async def move(self, request: web.Request) -> web.Response:
        problem = None           # reported after the session check: a stranger learns nothing but 401
        try:
            body = await self._json(request)
            x, y = float(body["x"]), float(body["y"])
            location = self.world.location_at(x, y)
        except web.HTTPBadRequest as exc:
            problem, location = exc, 0
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            problem = web.HTTPBadRequest(text=f"move wants {{'x': number, 'y': number}} inside the world: {exc}")
            location = 0
        # one read for the request most players make most: the session, where it is, who serves the cell
        player, current, reflector_id = await self.store.move_context(self._session_key(request), time.time(),
                                                                      location)
        if player is None:
            self.stats["unauthorized"] += 1
            raise web.HTTPUnauthorized(text="log in first (Authorization: Bearer <session>)")
        if problem is not None:
            raise problem
        rejoin = body.get("rejoin", False) is True
        if reflector_id is not None and not MovePlan.decide(current, location, reflector_id, rejoin).put:
            self.stats["moves"] += 1
            return await self._moved(location, reflector_id, current, changed=False)
        async with self._move_lock(player):
            self.stats["moves"] += 1
            current = await self.store.presence(player)          # again, under the lock
            reflector_id = await self.store.reflector_of(location)
            if reflector_id is None:
                raise web.HTTPServiceUnavailable(text=f"location {location} has no reflector")
            reflector = await self._reflector_info(reflector_id)
            plan = MovePlan.decide(current, location, reflector_id, rejoin)
            presence = current
            if plan.put:
                # make before break: the player is a member at the new place before it leaves the old one
                presence = Presence(location, secrets.token_bytes(TOKEN_BYTES), reflector_id)
                await self._reflector_call("PUT", reflector, location, player, {"token": presence.token.hex()})
                await self.store.set_presence(player, presence)
                if current is None or current.location != location:
                    self.stats["location_changes"] += 1
                elif current.reflector != reflector_id:
                    self.stats["reflector_migrations"] += 1
                else:
                    self.stats["rejoins"] += 1
            if plan.delete_old is not None:
                await self._delete_membership(plan.delete_old, player)
        return await self._moved(location, reflector_id, presence, plan.changed)

    async def _moved(self, location: int, reflector_id: str, presence: Presence, changed: bool) -> web.Response:
        reflector = await self._reflector_info(reflector_id)
        return web.json_response({"location": location, "reflector": f"{reflector.udp[0]}:{reflector.udp[1]}",
                                  "token": presence.token.hex(), "changed": changed})

    async def leave(self, request: web.Request) -> web.Response:
        player = await self._player(request)
        async with self._move_lock(player):
            current = await self.store.presence(player)
            if current is not None:
                await self._delete_membership(current, player)
                await self.store.set_presence(player, None)
                self.stats["leaves"] += 1
        return web.json_response({"left": current.location if current else None})

    async def get_world(self, request: web.Request) -> web.Response:
        mapping = await self.store.location_map()
        known = [r.http for r in self.reflectors]
        known += sorted(set(mapping.values()) - set(known))         # placed by another instance's list
        infos = [await self._reflector_info(rid) for rid in known]
        index = {rid: n for n, rid in enumerate(known)}
        return web.json_response({
            "cols": self.world.cols, "rows": self.world.rows, "cell": self.world.cell,
            "size": list(self.world.size), "locations": self.world.locations,
            "reflectors": [{"udp": f"{r.udp[0]}:{r.udp[1]}"} for r in infos],      # not their control API
            "mapping": {str(loc): index[rid] for loc, rid in sorted(mapping.items()) if loc < self.world.locations},
        })

    async def get_stats(self, request: web.Request) -> web.Response:
        """For the operator: with an API key set, only with it (the reflectors, their instances and
        the players per location are not for strangers)."""
        if self.api_key is not None:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                self.stats["stats_unauthorized"] += 1
                raise web.HTTPUnauthorized(text="/stats needs the API key (Authorization: Bearer <key>)")
        now = time.time()
        occupancy = await self.store.occupancy()
        reflectors = [{"http": r.id, "udp": r.udp, "instance": r.instance, "live": now < r.deadline}
                      for r in await self.store.reflectors(now)]
        return web.json_response({"counters": self.counters(), "players": await self.store.count_accounts(),
                                  "sessions": await self.store.count_sessions(now), "store": self.store_kind,
                                  "reflectors": reflectors,
                                  "occupancy": {str(k): v for k, v in sorted(occupancy.items())}})

    @property
    def store_kind(self) -> str:
        return "memory" if isinstance(self.store, MemoryStore) else "redis"

    def counters(self) -> dict[str, int]:
        """This process's counters: the server's, and the store's (expired sessions purged here, ...)."""
        merged = Counter(self.store.stats)
        merged.update(self.stats)
        return dict(merged)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "mmpog-server",
        "Game control plane: registration, login, the world's locations and their reflectors.",
        examples=[
            "mmpog-server --http 127.0.0.1:7500 --world 4x4 --cell 100 "
            "--reflector http://127.0.0.1:7401=127.0.0.1:7400",
            "mmpog-server --http 127.0.0.1:7500 --world 8x8 --reflector http://10.0.0.2:7401=10.0.0.2:7400 "
            "--reflector http://10.0.0.3:7401=10.0.0.3:7400",
        ],
    )
    parser.add_argument("--http", type=host_port, default=("127.0.0.1", 7500), help="API address")
    parser.add_argument("--world", default="4x4", help="grid of locations, COLSxROWS")
    parser.add_argument("--cell", type=float, default=100.0, help="side of one location in world units")
    parser.add_argument("--reflector", action="append", default=[], metavar="HTTP_URL=HOST:PORT",
                        help="a reflector: its control API and its UDP address (repeat for several)")
    parser.add_argument("--api-key", default=os.environ.get("MMPOG_API_KEY"), help="bearer key for the reflectors' API")
    parser.add_argument("--max-players", type=positive_int, default=100000)
    parser.add_argument("--max-sessions", type=positive_int, default=100000)
    parser.add_argument("--sessions-per-address", type=positive_int, default=256,
                        help="sessions one client address may hold (its oldest is dropped past this)")
    parser.add_argument("--min-password", type=positive_int, default=8, help="shortest password accepted")
    parser.add_argument("--login-failures", type=positive_int, default=5,
                        help="failed logins per account per --login-window before 429 (per address: 4x)")
    parser.add_argument("--login-window", type=non_negative_float, default=60.0)
    parser.add_argument("--registrations-per-address", type=positive_int, default=100,
                        help="registrations one client address may attempt per --registration-window (then 429)")
    parser.add_argument("--registration-window", type=non_negative_float, default=600.0)
    parser.add_argument("--reflector-check-interval", type=non_negative_float, default=1.0,
                        help="seconds between /health reads; a restarted reflector gets the membership again")
    parser.add_argument("--reflector-ttl", type=non_negative_float, default=10.0,
                        help="a reflector whose /health nobody could read for this long is dead: its locations "
                             "go to live reflectors")
    parser.add_argument("--session-ttl", type=non_negative_float, default=24 * 3600.0, help="seconds a login lasts")
    parser.add_argument("--store", metavar="URL",
                        help="keep accounts, sessions, the location map and the reflectors in Redis "
                             "(redis://HOST:PORT/N, unix:///path?db=N, ?cluster=1, ?game=NAME) so several "
                             "instances serve the same players; default: in this process")
    return parser


def server_from_args(args: argparse.Namespace, store: Store | None = None) -> GameServer:
    if not args.reflector:
        raise ConfigError("at least one --reflector HTTP_URL=HOST:PORT is needed")
    for option in ("reflector_ttl", "session_ttl"):
        if getattr(args, option) <= 0:
            raise ConfigError(f"--{option.replace('_', '-')} must be positive")
    return GameServer(World.parse(args.world, args.cell), [ReflectorInfo.parse(r) for r in args.reflector],
                      api_key=args.api_key, max_players=args.max_players, max_sessions=args.max_sessions,
                      sessions_per_address=args.sessions_per_address, session_ttl=args.session_ttl,
                      min_password=args.min_password, login_failures_per_account=args.login_failures,
                      login_failures_per_address=4 * args.login_failures, login_window=args.login_window,
                      registrations_per_address=args.registrations_per_address,
                      registration_window=args.registration_window,
                      reflector_check_interval=args.reflector_check_interval, reflector_ttl=args.reflector_ttl,
                      store=store)


async def open_store(url: str, limits: StoreLimits) -> Store:
    """The Redis store of ``--store``; an unreachable one is a ConfigError (one line)."""
    from .store_redis import RedisStore

    try:
        return await RedisStore.open(url, limits)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    server = server_from_args(args)
    if args.store is not None:      # the same limits, kept by the store for every instance
        server.store = await open_store(args.store, server.limits())
    ctx.stats.providers["server"] = server.counters
    runner = web.AppRunner(server.app(), access_log=None)
    try:
        try:
            await runner.setup()
        except StoreUnavailable as exc:
            raise ConfigError(str(exc)) from None
        try:
            await web.TCPSite(runner, args.http[0], args.http[1]).start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on http {args.http[0]}:{args.http[1]}: {exc.strerror}") from None
        log.info("game server on http://%s:%d, %d locations over %d reflectors, %s store", *args.http,
                 server.world.locations, len(server.reflectors), server.store_kind)
        await ctx.stop.wait()
    finally:
        await runner.cleanup()
        await server.store.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
