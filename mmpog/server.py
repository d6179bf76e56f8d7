"""``mmpog-server``: the game's control plane (paper Fig. 10): players, the world, locations, reflectors.

The virtual world is a grid of ``--world COLSxROWS`` cells of ``--cell`` units;
each cell is a location (id = row * cols + col).  Locations are spread over the
reflectors round-robin (location ``l`` -> reflector ``l % R``).  The server
never touches game data: it registers and logs players in, and as a player
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
    GET  /world                                      -> grid, reflectors, location -> reflector mapping
    GET  /stats                                      -> counters

Hardening (docs/mmpog.md): passwords of at least ``--min-password`` characters that are not
in the shipped common-password list nor the name; scrypt (n=2**14, r=8, p=1) hashes; failed
logins throttled per account and per address (429 while over the limit, without hashing);
sessions capped per address (the address's oldest is dropped) and overall (503, nobody
else's session is evicted), one per player; request bodies of at most 16 KiB and JSON
nested at most 32 deep (400 with one line).  The reflectors' ``/health`` carries an
instance id: when a reflector comes back (restarted, or reachable again), the server
pushes the membership of its locations to it again, so players can rejoin.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from importlib import resources

import aiohttp
from aiohttp import web

from cliruntime import ConfigError, RunContext, host_port, make_parser, non_negative_float, positive_int, run_async
from cliruntime.supervisor import Supervisor

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


class Throttle:
    """At most ``limit`` failures per key within ``window`` seconds; bounded (oldest keys evicted, counted)."""

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

    def failed(self, key: object, now: float) -> None:
        times = self._failures.pop(key, [])
        times.append(now)
        del times[:-self.limit]
        self._failures[key] = times
        if len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)
            self.evicted += 1


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


@dataclass
class Player:
    id: int
    name: str
    salt: bytes
    pw_hash: bytes
    location: int | None = None
    token: bytes | None = None
    session: str | None = None      # one session per player: a new login replaces the old one


@dataclass
class GameServer:
    world: World
    reflectors: list[ReflectorInfo]
    api_key: str | None = None
    max_players: int = 100000
    max_sessions: int = 100000
    sessions_per_address: int = 256
    min_password: int = 8
    login_failures_per_account: int = 5      # within login_window seconds, then 429 until they age out
    login_failures_per_address: int = 20
    login_window: float = 60.0
    reflector_check_interval: float = 1.0    # how often the reflectors' /health is read (0: never)
    scrypt_n: int = SCRYPT_N
    players: dict[str, Player] = field(default_factory=dict)
    by_id: dict[int, Player] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)
    http: aiohttp.ClientSession | None = None
    _locks: dict[int, asyncio.Lock] = field(default_factory=dict)
    _address_sessions: dict[str, OrderedDict] = field(default_factory=dict)
    _session_address: dict[str, str] = field(default_factory=dict)
    _reflector_instances: dict[str, str | None] = field(default_factory=dict)
    _supervisor: Supervisor | None = None

    def __post_init__(self) -> None:
        if self.scrypt_n < SCRYPT_N or self.scrypt_n & (self.scrypt_n - 1):
            raise ValueError(f"scrypt n must be a power of two >= {SCRYPT_N}")
        self._account_throttle = Throttle(self.login_failures_per_account, self.login_window)
        self._address_throttle = Throttle(self.login_failures_per_address, self.login_window)

    def reflector_for(self, location: int) -> ReflectorInfo:
        return self.reflectors[location % len(self.reflectors)]

    def _hash(self, password: str, salt: bytes) -> bytes:
        return hashlib.scrypt(password.encode(), salt=salt, n=self.scrypt_n, r=SCRYPT_R, p=SCRYPT_P,
                              maxmem=256 * self.scrypt_n * SCRYPT_R, dklen=32)

    # ------------------------------------------------------------------ reflector calls

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _reflector_call(self, method: str, location: int, player: int, body: dict | None = None) -> None:
        assert self.http is not None
        url = f"{self.reflector_for(location).http}/locations/{location}/members/{player}"
        try:
            async with self.http.request(method, url, json=body, headers=self._headers()) as resp:
                if resp.status >= 400 and not (method == "DELETE" and resp.status == 404):
                    text = await resp.text()
                    raise web.HTTPBadGateway(text=f"reflector answered {resp.status}: {text[:200]}")
        except aiohttp.ClientError as exc:
            self.stats["reflector_errors"] += 1
            raise web.HTTPBadGateway(text=f"reflector unreachable: {exc}") from None
        self.stats[f"reflector_{method.lower()}"] += 1

    # ------------------------------------------------------------------ HTTP handlers

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024)
        app.router.add_post("/register", self.register)
        app.router.add_post("/login", self.login)
        app.router.add_post("/move", self.move)
        app.router.add_post("/leave", self.leave)
        app.router.add_get("/world", self.get_world)
        app.router.add_get("/stats", self.get_stats)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._supervisor = Supervisor("mmpog-server", logger=log)
        if self.reflector_check_interval > 0:
            for reflector in self.reflectors:
                self._supervisor.spawn_restarting(lambda r=reflector: self._watch_reflector(r),
                                                  name=f"watch {reflector.http}")

    async def _cleanup(self, app: web.Application) -> None:
        if self._supervisor is not None:
            await self._supervisor.aclose()
        if self.http is not None:
            await self.http.close()

    # ------------------------------------------------------------------ reflector restarts

    async def _watch_reflector(self, reflector: ReflectorInfo) -> None:
        """Read the reflector's /health; when its instance changes (a restart) or it answers again after
        failing, push the membership of every location it serves again."""
        while True:
            instance = await self._reflector_instance(reflector)
            known = self._reflector_instances.get(reflector.http, "unknown")
            self._reflector_instances[reflector.http] = instance
            if instance is not None and known != "unknown" and instance != known:
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

    async def push_membership(self, reflector: ReflectorInfo) -> int:
        """PUT every player located on ``reflector`` again, with its current token; returns how many."""
        pushed = 0
        for player in list(self.by_id.values()):
            location, token = player.location, player.token
            if location is None or token is None or self.reflector_for(location) != reflector:
                continue
            try:
                await self._reflector_call("PUT", location, player.id, {"token": token.hex()})
            except web.HTTPBadGateway:
                return pushed       # it went away again: the watcher pushes once it is back
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

    def _player(self, request: web.Request) -> Player:
        auth = request.headers.get("Authorization", "")
        session = auth.removeprefix("Bearer ")
        player_id = self.sessions.get(session) if auth.startswith("Bearer ") else None
        if player_id is None:
            self.stats["unauthorized"] += 1
            raise web.HTTPUnauthorized(text="log in first (Authorization: Bearer <session>)")
        return self.by_id[player_id]

    async def register(self, request: web.Request) -> web.Response:
        name, password = self._credentials(await self._json(request))
        problem = self.password_problem(name, password)
        if problem is not None:
            self.stats["weak_passwords_refused"] += 1
            raise web.HTTPBadRequest(text=problem)
        if name in self.players:
            raise web.HTTPConflict(text=f"player {name!r} exists")
        if len(self.players) >= self.max_players:
            self.stats["registrations_refused"] += 1
            raise web.HTTPServiceUnavailable(text="the game is full")
        salt = secrets.token_bytes(16)
        pw_hash = await asyncio.to_thread(self._hash, password, salt)
        if name in self.players:      # lost a race while hashing
            raise web.HTTPConflict(text=f"player {name!r} exists")
        player = Player(len(self.players) + 1, name, salt, pw_hash)
        self.players[name] = player
        self.by_id[player.id] = player
        self.stats["registered"] += 1
        return web.json_response({"player": player.id}, status=201)

    async def login(self, request: web.Request) -> web.Response:
        name, password = self._credentials(await self._json(request))
        address = request.remote or "?"
        now = time.monotonic()
        if self._account_throttle.blocked(name, now) or self._address_throttle.blocked(address, now):
            # refused before hashing: a guessing flood costs neither CPU nor other players' logins
            self.stats["logins_throttled"] += 1
            raise web.HTTPTooManyRequests(text="too many failed logins: try again later")
        player = self.players.get(name)
        attempt = await asyncio.to_thread(self._hash, password, player.salt if player else b"\0" * 16)
        if player is None or not hmac.compare_digest(attempt, player.pw_hash):
            self.stats["login_failed"] += 1
            self._account_throttle.failed(name, now)
            self._address_throttle.failed(address, now)
            raise web.HTTPUnauthorized(text="unknown player or wrong password")
        session = self._new_session(player, address)
        self.stats["logins"] += 1
        return web.json_response({"player": player.id, "session": session})

    def _new_session(self, player: Player, address: str) -> str:
        """One session per player; at most sessions_per_address per address (its oldest is dropped) and
        max_sessions in all (refused: a login flood from one place never evicts other players)."""
        if player.session is not None:
            self._drop_session(player.session)
        mine = self._address_sessions.setdefault(address, OrderedDict())
        if len(mine) >= self.sessions_per_address:
            self.stats["sessions_evicted_same_address"] += 1
            self._drop_session(next(iter(mine)))
        if len(self.sessions) >= self.max_sessions:
            self.stats["sessions_refused"] += 1
            raise web.HTTPServiceUnavailable(text="too many sessions")
        session = secrets.token_urlsafe(24)
        self.sessions[session] = player.id
        player.session = session
        mine[session] = None
        self._session_address[session] = address
        return session

    def _drop_session(self, session: str) -> None:
        player_id = self.sessions.pop(session, None)
        if player_id is not None and self.by_id[player_id].session == session:
            self.by_id[player_id].session = None
        address = self._session_address.pop(session, None)
        if address is not None:
            mine = self._address_sessions.get(address)
            if mine is not None:
                mine.pop(session, None)
                if not mine:
                    del self._address_sessions[address]

    async def move(self, request: web.Request) -> web.Response:
        player = self._player(request)
        body = await self._json(request)
        try:
            x, y = float(body["x"]), float(body["y"])
            location = self.world.location_at(x, y)
        except (KeyError, TypeError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"move wants {{'x': number, 'y': number}} inside the world: {exc}") from None
        rejoin = body.get("rejoin", False) is True
        lock = self._locks.setdefault(player.id, asyncio.Lock())
        async with lock:
            self.stats["moves"] += 1
            changed = location != player.location
            if not changed and rejoin:
                # same location, fresh token (the player's address changed, or its reflector restarted):
                # the reflector unbinds the old address until a HELLO proves the new token
                token = secrets.token_bytes(TOKEN_BYTES)
                await self._reflector_call("PUT", location, player.id, {"token": token.hex()})
                player.token = token
                self.stats["rejoins"] += 1
            if changed:
                token = secrets.token_bytes(TOKEN_BYTES)
                # make before break: the player is a member of the new location before it leaves the old one
                await self._reflector_call("PUT", location, player.id, {"token": token.hex()})
                old = player.location
                player.location, player.token = location, token
                if old is not None:
                    await self._reflector_call("DELETE", old, player.id)
                self.stats["location_changes"] += 1
        reflector = self.reflector_for(location)
        return web.json_response({"location": location, "reflector": f"{reflector.udp[0]}:{reflector.udp[1]}",
                                  "token": player.token.hex(), "changed": changed or rejoin})

    async def leave(self, request: web.Request) -> web.Response:
        player = self._player(request)
        lock = self._locks.setdefault(player.id, asyncio.Lock())
        async with lock:
            old = player.location
            if old is not None:
                await self._reflector_call("DELETE", old, player.id)
                player.location = player.token = None
                self.stats["leaves"] += 1
        return web.json_response({"left": old})

    async def get_world(self, request: web.Request) -> web.Response:
        return web.json_response({
            "cols": self.world.cols, "rows": self.world.rows, "cell": self.world.cell,
            "size": list(self.world.size), "locations": self.world.locations,
            "reflectors": [{"http": r.http, "udp": f"{r.udp[0]}:{r.udp[1]}"} for r in self.reflectors],
            "mapping": {str(loc): loc % len(self.reflectors) for loc in range(self.world.locations)},
        })

    async def get_stats(self, request: web.Request) -> web.Response:
        occupancy = Counter(p.location for p in self.by_id.values() if p.location is not None)
        return web.json_response({"counters": dict(self.stats), "players": len(self.players),
                                  "sessions": len(self.sessions),
                                  "occupancy": {str(k): v for k, v in sorted(occupancy.items())}})


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
    parser.add_argument("--reflector-check-interval", type=non_negative_float, default=1.0,
                        help="seconds between /health reads; a restarted reflector gets the membership again")
    return parser


def server_from_args(args: argparse.Namespace) -> GameServer:
    if not args.reflector:
        raise ConfigError("at least one --reflector HTTP_URL=HOST:PORT is needed")
    return GameServer(World.parse(args.world, args.cell), [ReflectorInfo.parse(r) for r in args.reflector],
                      api_key=args.api_key, max_players=args.max_players, max_sessions=args.max_sessions,
                      sessions_per_address=args.sessions_per_address, min_password=args.min_password,
                      login_failures_per_account=args.login_failures,
                      login_failures_per_address=4 * args.login_failures, login_window=args.login_window,
                      reflector_check_interval=args.reflector_check_interval)


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    server = server_from_args(args)
    ctx.stats.providers["server"] = lambda: dict(server.stats)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.http[0], args.http[1]).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on http {args.http[0]}:{args.http[1]}: {exc.strerror}") from None
    log.info("game server on http://%s:%d, %d locations over %d reflectors", *args.http,
             server.world.locations, len(server.reflectors))
    try:
        await ctx.stop.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
