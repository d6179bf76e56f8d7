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
    POST /move     {"x", "y"}       (Bearer session) -> {"location", "reflector": "host:port", "token": hex, "changed"}
    POST /leave                     (Bearer session) -> {"left": location | null}
    GET  /world                                      -> grid, reflectors, location -> reflector mapping
    GET  /stats                                      -> counters
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from cliruntime import ConfigError, RunContext, host_port, make_parser, positive_int, run_async

log = logging.getLogger("mmpog.server")

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
TOKEN_BYTES = 16


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


@dataclass
class GameServer:
    world: World
    reflectors: list[ReflectorInfo]
    api_key: str | None = None
    max_players: int = 100000
    max_sessions: int = 100000
    pbkdf2_iterations: int = 20000
    players: dict[str, Player] = field(default_factory=dict)
    by_id: dict[int, Player] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)
    http: aiohttp.ClientSession | None = None
    _locks: dict[int, asyncio.Lock] = field(default_factory=dict)

    def reflector_for(self, location: int) -> ReflectorInfo:
        return self.reflectors[location % len(self.reflectors)]

    def _hash(self, password: str, salt: bytes) -> bytes:
        return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, self.pbkdf2_iterations)

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

    async def _cleanup(self, app: web.Application) -> None:
        if self.http is not None:
            await self.http.close()

    @staticmethod
    async def _json(request: web.Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    @staticmethod
    def _credentials(body: dict) -> tuple[str, str]:
        name, password = body.get("name"), body.get("password")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise web.HTTPBadRequest(text="name must be 1-32 characters of A-Z a-z 0-9 _ . -")
        if not isinstance(password, str) or not 1 <= len(password) <= 256:
            raise web.HTTPBadRequest(text="password must be a string of 1-256 characters")
        return name, password

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
        player = self.players.get(name)
        attempt = await asyncio.to_thread(self._hash, password, player.salt if player else b"\0" * 16)
        if player is None or not hmac.compare_digest(attempt, player.pw_hash):
            self.stats["login_failed"] += 1
            raise web.HTTPUnauthorized(text="unknown player or wrong password")
        if len(self.sessions) >= self.max_sessions:
            self.stats["sessions_evicted"] += 1
            del self.sessions[next(iter(self.sessions))]
        session = secrets.token_urlsafe(24)
        self.sessions[session] = player.id
        self.stats["logins"] += 1
        return web.json_response({"player": player.id, "session": session})

    async def move(self, request: web.Request) -> web.Response:
        player = self._player(request)
        body = await self._json(request)
        try:
            x, y = float(body["x"]), float(body["y"])
            location = self.world.location_at(x, y)
        except (KeyError, TypeError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"move wants {{'x': number, 'y': number}} inside the world: {exc}") from None
        lock = self._locks.setdefault(player.id, asyncio.Lock())
        async with lock:
            self.stats["moves"] += 1
            changed = location != player.location
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
                                  "token": player.token.hex(), "changed": changed})

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
    parser.add_argument("--pbkdf2-iterations", type=positive_int, default=20000)
    return parser


def server_from_args(args: argparse.Namespace) -> GameServer:
    if not args.reflector:
        raise ConfigError("at least one --reflector HTTP_URL=HOST:PORT is needed")
    return GameServer(World.parse(args.world, args.cell), [ReflectorInfo.parse(r) for r in args.reflector],
                      api_key=args.api_key, max_players=args.max_players,
                      pbkdf2_iterations=args.pbkdf2_iterations)


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
