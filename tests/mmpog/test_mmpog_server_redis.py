"""Two ``mmpog-server`` processes on one real Redis serve the same players; a SIGKILLed instance comes
back with nothing lost; a dead reflector's locations go to the live one.  Real processes, real sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import urllib.request

import aiohttp
import pytest

from boxcore.procs import ProcessGroup, free_port, python_module
from tests.redis_support import redis_cluster, redis_node  # noqa: F401  (fixtures)

API_KEY = "secret-key"
_games = itertools.count()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


class Game:
    """Reflectors and game server instances of one game, in one ProcessGroup."""

    def __init__(self, workdir, store_url: str, reflectors: int = 2) -> None:
        self.group = ProcessGroup(workdir)
        self.store_url = store_url
        self.reflectors: list[tuple[str, int]] = []      # (control URL, UDP port)
        self.reflector_roles = []
        for n in range(reflectors):
            self.reflectors.append((f"http://127.0.0.1:{free_port()}", free_port(socket.SOCK_DGRAM)))
        self.servers: dict[str, tuple[str, list[str]]] = {}

    async def start_reflector(self, n: int):
        url, udp = self.reflectors[n]
        role = self.group.start(f"reflector{n}", [
            *python_module("mmpog.reflector"), "--mode", "standalone", "--listen", f"127.0.0.1:{udp}",
            "--http", url.removeprefix("http://"), "--api-key", API_KEY, "--log-level", "warning"], stats=False)
        await self.group.wait_until(role, lambda: answers(url + "/health"), what="no /health")
        return role

    async def start_server(self, name: str, port: int | None = None, *extra: str, reflector_ttl: float = 10.0):
        port = port or free_port()
        argv = [*python_module("mmpog.server"), "--http", f"127.0.0.1:{port}", "--world", "2x2", "--cell", "10",
                "--api-key", API_KEY, "--store", self.store_url, "--reflector-check-interval", "0.1",
                "--reflector-ttl", str(reflector_ttl), "--log-level", "info", *extra]
        for url, udp in self.reflectors:
            argv += ["--reflector", f"{url}=127.0.0.1:{udp}"]
        role = self.group.start(name, argv, stats=False)
        await self.group.wait_for_log(role, "game server on http")
        base = f"http://127.0.0.1:{port}"
        self.servers[name] = (base, argv)
        return role, base


@pytest.fixture
async def game(redis_node, tmp_path):  # noqa: F811
    game = Game(tmp_path, f"{redis_node.url}?game=t{next(_games)}")
    try:
        yield game
    finally:
        await game.group.stop_all()


async def call(http, method, url, body=None, session=None):
    headers = {"Authorization": f"Bearer {session}"} if session else {}
    async with http.request(method, url, json=body, headers=headers) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if resp.content_type == "application/json" else text)


async def test_two_instances_serve_the_same_players_and_a_killed_one_loses_nothing(game):
    for n in range(2):
        await game.start_reflector(n)
    role_a, a = await game.start_server("server-a")
    _, b = await game.start_server("server-b")
    async with aiohttp.ClientSession() as http:
        # the same world and the same location -> reflector map from both
        assert (await call(http, "GET", a + "/world"))[1] == (await call(http, "GET", b + "/world"))[1]
        # two instances racing to register one name: exactly one wins
        results = await asyncio.gather(*(call(http, "POST", base + "/register",
                                              {"name": "zoe", "password": "zoe-plays-well"}) for base in (a, b, a, b)))
        assert sorted(status for status, _ in results) == [201, 409, 409, 409]
        # players registered on either instance, logged in on the other
        names = [f"player{n}" for n in range(8)]
        sessions = {}
        for n, name in enumerate(names):
            here, there = (a, b) if n % 2 else (b, a)
            assert (await call(http, "POST", here + "/register", {"name": name, "password": f"{name}-pw!"}))[0] == 201
            status, body = await call(http, "POST", there + "/login", {"name": name, "password": f"{name}-pw!"})
            assert status == 200
            sessions[name] = body["session"]
        # a session from one instance is valid on the other; a move made on one is seen by the other
        tokens = {}
        for n, name in enumerate(names):
            status, moved = await call(http, "POST", (a, b)[n % 2] + "/move", {"x": 5 + 10 * (n % 2), "y": 5},
                                       sessions[name])
            assert status == 200 and moved["changed"]
            status, again = await call(http, "POST", (b, a)[n % 2] + "/move", {"x": 6 + 10 * (n % 2), "y": 6},
                                       sessions[name])
            assert status == 200 and not again["changed"] and again["token"] == moved["token"]
            tokens[name] = moved["token"]
        stats_a, stats_b = [(await call(http, "GET", url + "/stats", session=API_KEY))[1] for url in (a, b)]
        assert stats_a["players"] == stats_b["players"] == 9 and stats_a["sessions"] == stats_b["sessions"] == 8
        assert stats_a["occupancy"] == stats_b["occupancy"] == {"0": 4, "1": 4}
        for url, _ in game.reflectors:       # each player is a member at exactly one reflector
            request = urllib.request.Request(url + "/stats", headers={"Authorization": f"Bearer {API_KEY}"})
            members = json.loads(urllib.request.urlopen(request, timeout=5).read())["locations"]
            assert sum(loc["members"] for loc in members.values()) == 4
        before = (stats_a["players"], stats_a["sessions"])

        # SIGKILL instance a in the middle of the game and start it again on the same address
        role_a.proc.kill()
        role_a.proc.wait()
        assert (await call(http, "GET", b + "/stats", session=API_KEY))[1]["players"] == before[0]
        _, a2 = await game.start_server("server-a2", port=int(a.rsplit(":", 1)[1]))
        stats = (await call(http, "GET", a2 + "/stats", session=API_KEY))[1]
        assert (stats["players"], stats["sessions"]) == before
        for n, name in enumerate(names):          # every session still works, on the restarted instance too
            status, moved = await call(http, "POST", a2 + "/move", {"x": 5 + 10 * (n % 2), "y": 5}, sessions[name])
            assert status == 200 and not moved["changed"] and moved["token"] == tokens[name]
        assert (await call(http, "POST", a2 + "/login", {"name": "player0", "password": "player0-pw!"}))[0] == 200


async def test_a_dead_reflectors_locations_go_to_the_live_one_and_its_players_follow(game):
    roles = [await game.start_reflector(n) for n in range(2)]
    # 3 s without one /health answer (read every 0.1 s) is dead: short for the test, long for a busy host
    _, a = await game.start_server("server-a", reflector_ttl=3.0)
    _, b = await game.start_server("server-b", reflector_ttl=3.0)
    async with aiohttp.ClientSession() as http:
        await call(http, "POST", a + "/register", {"name": "uma", "password": "uma-plays-well"})
        session = (await call(http, "POST", b + "/login", {"name": "uma", "password": "uma-plays-well"}))[1]["session"]
        status, moved = await call(http, "POST", a + "/move", {"x": 15, "y": 5}, session)     # location 1: reflector 1
        assert moved["reflector"] == f"127.0.0.1:{game.reflectors[1][1]}"
        roles[1].proc.kill()
        roles[1].proc.wait()
        # no event to wait on: the instances notice the silence after --reflector-ttl
        mapping = {}

        def moved_over() -> bool:
            mapping.update(json.loads(urllib.request.urlopen(b + "/world", timeout=2).read())["mapping"])
            return set(mapping.values()) == {0}
        await game.group.wait_until(game.group.roles[-1], moved_over, timeout=30, what="locations not reassigned")
        world_a = (await call(http, "GET", a + "/world"))[1]
        assert set(world_a["mapping"].values()) == {0}
        # the player's next /move (the same cell) moves it to the live reflector with a fresh token
        status, again = await call(http, "POST", b + "/move", {"x": 15, "y": 5}, session)
        assert status == 200 and again["changed"] and again["reflector"] == f"127.0.0.1:{game.reflectors[0][1]}"
        assert again["token"] != moved["token"]
        request = urllib.request.Request(game.reflectors[0][0] + "/stats", headers={"Authorization": f"Bearer {API_KEY}"})
        assert json.loads(urllib.request.urlopen(request, timeout=5).read())["locations"]["1"]["members"] == 1
        counters = [(await call(http, "GET", base + "/stats", session=API_KEY))[1]["counters"] for base in (a, b)]
        assert sum(c.get("locations_reassigned", 0) for c in counters) == 2         # locations 1 and 3, once
        assert sum(c.get("reflector_migrations", 0) for c in counters) == 1
        assert (await call(http, "POST", a + "/leave", {}, session))[1] == {"left": 1}


async def test_failed_logins_are_counted_across_instances(game):
    await game.start_reflector(0)
    _, a = await game.start_server("server-a", None, "--login-failures", "3")
    _, b = await game.start_server("server-b", None, "--login-failures", "3")
    async with aiohttp.ClientSession() as http:
        assert (await call(http, "POST", a + "/register", {"name": "vic", "password": "vic-plays-well"}))[0] == 201
        wrong = {"name": "vic", "password": "a-wrong-guess"}
        assert [(await call(http, "POST", base + "/login", wrong))[0] for base in (a, b, a)] == [401] * 3
        # three guesses spread over two instances are three for the account: both refuse now
        right = {"name": "vic", "password": "vic-plays-well"}
        assert [(await call(http, "POST", base + "/login", right))[0] for base in (a, b)] == [429, 429]


async def test_two_instances_on_a_redis_cluster(redis_cluster, tmp_path):  # noqa: F811
    game = Game(tmp_path, f"{redis_cluster.url}&game=c{next(_games)}", reflectors=1)
    try:
        await game.start_reflector(0)
        _, a = await game.start_server("server-a")
        _, b = await game.start_server("server-b")
        async with aiohttp.ClientSession() as http:
            assert (await call(http, "POST", a + "/register", {"name": "yan", "password": "yan-plays-well"}))[0] == 201
            status, login = await call(http, "POST", b + "/login", {"name": "yan", "password": "yan-plays-well"})
            status, moved = await call(http, "POST", a + "/move", {"x": 5, "y": 5}, login["session"])
            assert status == 200 and moved["changed"]
            status, again = await call(http, "POST", b + "/move", {"x": 6, "y": 6}, login["session"])
            assert status == 200 and not again["changed"] and again["token"] == moved["token"]
            assert (await call(http, "GET", b + "/stats", session=API_KEY))[1]["occupancy"] == {"0": 1}
    finally:
        await game.group.stop_all()


def test_unreachable_store_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mmpog.server", "--http", "127.0.0.1:0", "--store",
                           f"unix://{tmp_path}/nothing.sock", "--reflector", "http://127.0.0.1:9=127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot reach the game store" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


async def test_a_lost_redis_is_a_one_line_503_and_the_server_recovers_when_it_is_back(tmp_path):
    from boxcore.redisproc import RedisServer

    redis = RedisServer(tmp_path / "redis")
    await redis.start()
    game = Game(tmp_path / "game", redis.url)
    try:
        await game.start_reflector(0)
        server, a = await game.start_server("server-a")
        async with aiohttp.ClientSession() as http:
            assert (await call(http, "POST", a + "/register", {"name": "wes", "password": "wes-plays-well"}))[0] == 201
            session = (await call(http, "POST", a + "/login", {"name": "wes", "password": "wes-plays-well"}))[1]["session"]
            await redis.stop()
            for path, body in (("/move", {"x": 1, "y": 1}), ("/login", {"name": "wes", "password": "wes-plays-well"}),
                               ("/register", {"name": "xia", "password": "xia-plays-well"})):
                status, text = await call(http, "POST", a + path, body, session)
                assert status == 503 and "game store is unreachable" in text and "\n" not in text.strip(), text
            await redis.start()       # the same socket, empty (no persistence here): the server carries on
            assert server.returncode is None
            assert (await call(http, "POST", a + "/register", {"name": "xia", "password": "xia-plays-well"}))[0] == 201
            status, login = await call(http, "POST", a + "/login", {"name": "xia", "password": "xia-plays-well"})
            assert status == 200
            await game.group.wait_until(server, lambda: json.loads(urllib.request.urlopen(
                a + "/world", timeout=2).read())["mapping"] != {}, what="no map after the store came back")
            status, moved = await call(http, "POST", a + "/move", {"x": 1, "y": 1}, login["session"])
            assert status == 200 and moved["changed"]
            stats = (await call(http, "GET", a + "/stats", session=API_KEY))[1]
            assert stats["counters"]["store_unavailable"] >= 3
    finally:
        await game.group.stop_all()
        await redis.stop()
