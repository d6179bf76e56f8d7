"""The game server's HTTP API against two real reflector processes, and the client adapter end to end."""

import asyncio
import json
import socket
import subprocess
import sys
import time
import threading
import urllib.error
import urllib.request

import aiohttp
import pytest

from boxcore.procs import free_port
from mmpog.client import GameClient
from mmpog.reliability import Delivered, Joined, Received
from tests.polling import until


def wait_http(url, proc):
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"{proc.args} did not start"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def game():
    procs, reflectors = [], []
    env_key = ["--api-key", "secret-key"]
    for _ in range(2):
        udp, http = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
        proc = subprocess.Popen([sys.executable, "-m", "mmpog.reflector", "--mode", "standalone", "--listen",
                                 f"127.0.0.1:{udp}", "--http", f"127.0.0.1:{http}", *env_key, "--log-level", "warning"])
        procs.append(proc)
        reflectors.append((f"http://127.0.0.1:{http}", ("127.0.0.1", udp)))
        wait_http(reflectors[-1][0] + "/health", proc)
    server_port = free_port(socket.SOCK_STREAM)
    argv = [sys.executable, "-m", "mmpog.server", "--http", f"127.0.0.1:{server_port}", "--world", "2x2",
            "--cell", "10", "--reflector-check-interval", "0.05", *env_key, "--log-level", "warning"]
    for url, (host, port) in reflectors:
        argv += ["--reflector", f"{url}={host}:{port}"]
    server = subprocess.Popen(argv)
    procs.append(server)
    base = f"http://127.0.0.1:{server_port}"
    wait_http(base + "/world", server)
    yield base, reflectors
    for proc in procs:
        proc.terminate()
    for proc in procs:
        assert proc.wait(10) == 0


def call(method, url, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def reflector_stats(url):
    request = urllib.request.Request(url + "/stats", headers={"Authorization": "Bearer secret-key"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())


def test_register_login_move_between_reflectors_and_leave(game):
    base, reflectors = game
    status, world = call("GET", base + "/world")
    assert world["locations"] == 4 and world["mapping"] == {"0": 0, "1": 1, "2": 0, "3": 1}
    assert call("POST", base + "/register", {"name": "carol", "password": "carol-plays-well"})[0] == 201
    assert call("POST", base + "/register", {"name": "carol", "password": "carol-plays-well"})[0] == 409
    assert call("POST", base + "/register", {"name": "bad name!", "password": "carol-plays-well"})[0] == 400
    assert call("POST", base + "/login", {"name": "carol", "password": "nope"})[0] == 401
    status, login = call("POST", base + "/login", {"name": "carol", "password": "carol-plays-well"})
    assert status == 200
    session, player = login["session"], login["player"]
    assert call("POST", base + "/move", {"x": 1, "y": 1})[0] == 401
    assert call("POST", base + "/move", {"x": 99, "y": 1}, token=session)[0] == 400
    status, moved = call("POST", base + "/move", {"x": 15, "y": 5}, token=session)      # location 1: reflector 2
    assert moved["location"] == 1 and moved["reflector"] == "127.0.0.1:%d" % reflectors[1][1][1] and moved["changed"]
    assert str(1) in reflector_stats(reflectors[1][0])["locations"]
    status, again = call("POST", base + "/move", {"x": 16, "y": 6}, token=session)     # same cell: same token
    assert not again["changed"] and again["token"] == moved["token"]
    status, moved = call("POST", base + "/move", {"x": 5, "y": 15}, token=session)     # location 2: reflector 1
    assert moved["location"] == 2 and moved["reflector"].endswith(str(reflectors[0][1][1]))
    assert str(1) not in reflector_stats(reflectors[1][0])["locations"]               # left location 1
    assert str(2) in reflector_stats(reflectors[0][0])["locations"]
    assert call("POST", base + "/leave", {}, token=session)[1] == {"left": 2}
    assert str(2) not in reflector_stats(reflectors[0][0])["locations"]
    status, stats = call("GET", base + "/stats", token="secret-key")
    assert stats["counters"]["location_changes"] == 2 and player >= 1


async def test_clients_exchange_reliable_updates_and_change_location(game):
    base, _ = game
    events = {"dave": [], "erin": []}
    async with aiohttp.ClientSession() as http:
        clients = {name: GameClient(base, name, f"{name}-plays-well", http=http, on_event=events[name].append) for name in events}
        for client in clients.values():
            await client.start()
            await client.register()
            await client.login()
            await client.move(2, 2)
        dave, erin = clients["dave"], clients["erin"]
        pid = dave.send(b"sword", reliable=True)
        erin.send(b"pos", reliable=False)
        for _ in range(200):
            if any(isinstance(e, Received) for e in events["erin"]) and any(
                    isinstance(e, Delivered) for e in events["dave"]):
                break
            await asyncio.sleep(0.01)
        [got] = [e for e in events["erin"] if isinstance(e, Received)]
        assert (got.sender, got.packet_id, got.payload, got.reliable) == (dave.player, pid, b"sword", True)
        assert [e.payload for e in events["dave"] if isinstance(e, Received)] in ([], [b"pos"])
        # erin walks to another location (another reflector): dave no longer hears her
        assert await erin.move(15, 15) == 3
        assert sum(isinstance(e, Joined) for e in events["erin"]) == 2
        before = len([e for e in events["dave"] if isinstance(e, Received)])
        erin.send(b"far away", reliable=True)
        await asyncio.sleep(0.2)
        assert len([e for e in events["dave"] if isinstance(e, Received)]) == before
        assert any(isinstance(e, Delivered) for e in events["erin"])
        # dave leaves and comes back to the same location: a new token, the same address
        await dave.leave()
        assert dave.location is None
        assert await dave.move(16, 16) == 3
        erin.send(b"welcome back", reliable=True)
        for _ in range(200):
            if any(isinstance(e, Received) and e.payload == b"welcome back" for e in events["dave"]):
                break
            await asyncio.sleep(0.01)
        assert any(isinstance(e, Received) and e.payload == b"welcome back" for e in events["dave"])
        await dave.leave()
        assert await dave.move(17, 17) == 3          # leave + move to the same cell again
        erin.send(b"again", reliable=True)
        for _ in range(200):
            if any(isinstance(e, Received) and e.payload == b"again" for e in events["dave"]):
                break
            await asyncio.sleep(0.01)
        assert any(isinstance(e, Received) and e.payload == b"again" for e in events["dave"])
        for client in clients.values():
            await client.close()


def test_server_needs_a_reflector_exit_2():
    proc = subprocess.run([sys.executable, "-m", "mmpog.server", "--http", "127.0.0.1:0"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "--reflector" in proc.stderr


# ---------------------------------------------------------------- hardening (issue 11), in process

import hashlib  # noqa: E402

from aiohttp.test_utils import TestServer  # noqa: E402

from mmpog.server import SCRYPT_N, GameServer, ReflectorInfo, World, json_depth_ok  # noqa: E402
from mmpog.store import StoreFull, StoreLimits  # noqa: E402


async def start_server(**options):
    # a reflector that is never called by these tests (no /move with a location change)
    server = GameServer(World(2, 2, 10.0), [ReflectorInfo("http://127.0.0.1:9", ("127.0.0.1", 9))],
                        reflector_check_interval=0, **options)
    test_server = TestServer(server.app())
    await test_server.start_server()
    return server, test_server


async def post(http, test_server, path, body, session=None, raw=None):
    headers = {"Authorization": f"Bearer {session}"} if session else {}
    async with http.post(test_server.make_url(path), json=None if raw is not None else body, data=raw,
                         headers=headers) as resp:
        return resp.status, await resp.text()


async def test_password_policy_length_common_list_and_name():
    server, test_server = await start_server()
    async with aiohttp.ClientSession() as http:
        for password, why in (("a", "at least 8"), ("password", "most common"), ("Qwerty123", "most common"),
                              ("frankfrank", None), ("Frank", "at least 8")):
            status, text = await post(http, test_server, "/register", {"name": "frank", "password": password})
            if why is None:
                assert status == 201
            else:
                assert status == 400 and why in text and "\n" not in text.strip()
        status, text = await post(http, test_server, "/register", {"name": "gina1234", "password": "GINA1234"})
        assert status == 400 and "name" in text
    await test_server.close()
    assert server.stats["weak_passwords_refused"] == 5


def test_passwords_hashed_with_scrypt_at_current_parameters():
    server = GameServer(World(1, 1, 1.0), [ReflectorInfo("http://127.0.0.1:9", ("127.0.0.1", 9))])
    salt = b"s" * 16
    assert server._hash("correct horse", salt) == hashlib.scrypt(b"correct horse", salt=salt, n=2 ** 14, r=8, p=1,
                                                                 maxmem=2 ** 25, dklen=32)
    assert SCRYPT_N >= 2 ** 14
    with pytest.raises(ValueError):
        GameServer(World(1, 1, 1.0), [], scrypt_n=2 ** 10)


async def test_an_old_hash_is_upgraded_at_the_next_login():
    server, test_server = await start_server()
    async with aiohttp.ClientSession() as http:
        credentials = {"name": "olga", "password": "olga-plays-well"}
        assert (await post(http, test_server, "/register", credentials))[0] == 201
        assert (await server.store.account("olga")).kdf == "scrypt:n=16384,r=8,p=1,dklen=32"
        server.scrypt_n = 2 ** 15                       # the operator raised the cost since
        assert (await post(http, test_server, "/login", credentials))[0] == 200
        account = await server.store.account("olga")
        assert account.kdf == "scrypt:n=32768,r=8,p=1,dklen=32" and server.stats["passwords_rehashed"] == 1
        assert account.pw_hash == hashlib.scrypt(b"olga-plays-well", salt=account.salt, n=2 ** 15, r=8, p=1,
                                                 maxmem=2 ** 26, dklen=32)
        assert (await post(http, test_server, "/login", credentials))[0] == 200
        assert (await post(http, test_server, "/login", {**credentials, "password": "wrong-guess"}))[0] == 401
    await test_server.close()
    assert server.stats["passwords_rehashed"] == 1


async def test_login_throttled_per_account_and_per_address():
    server, test_server = await start_server(login_failures_per_account=3, login_failures_per_address=5)
    async with aiohttp.ClientSession() as http:
        for name in ("hank", "iris", "jack"):
            assert (await post(http, test_server, "/register", {"name": name, "password": f"{name}-is-here"}))[0] == 201
        for _ in range(3):
            assert (await post(http, test_server, "/login", {"name": "hank", "password": "wrong-guess"}))[0] == 401
        # the account is locked for a while, even with the right password, and without hashing
        assert (await post(http, test_server, "/login", {"name": "hank", "password": "hank-is-here"}))[0] == 429
        assert (await post(http, test_server, "/login", {"name": "iris", "password": "iris-is-here"}))[0] == 200
        # the address: 5 failures over any accounts, then nothing more from it
        for _ in range(2):
            assert (await post(http, test_server, "/login", {"name": "iris", "password": "wrong-guess"}))[0] == 401
        status, text = await post(http, test_server, "/login", {"name": "jack", "password": "jack-is-here"})
        assert status == 429 and "\n" not in text.strip()
    await test_server.close()
    assert server.stats["login_failed"] == 5 and server.stats["logins_throttled"] == 2


async def test_sessions_capped_per_address_and_overall_without_evicting_others():
    server, test_server = await start_server(sessions_per_address=2, max_sessions=3)
    async with aiohttp.ClientSession() as http:
        names = ["kim1", "lou2", "max3"]
        sessions = {}
        for name in names:
            await post(http, test_server, "/register", {"name": name, "password": f"{name}-is-here"})
            status, text = await post(http, test_server, "/login", {"name": name, "password": f"{name}-is-here"})
            assert status == 200
            sessions[name] = json.loads(text)["session"]
        # the address holds 2: its oldest (kim1) was dropped, the others still work
        assert (await post(http, test_server, "/leave", {}, session=sessions["kim1"]))[0] == 401
        assert (await post(http, test_server, "/leave", {}, session=sessions["lou2"]))[0] == 200
        assert (await post(http, test_server, "/leave", {}, session=sessions["max3"]))[0] == 200
        # a second login of the same player replaces its session (one per player)
        status, text = await post(http, test_server, "/login", {"name": "max3", "password": "max3-is-here"})
        assert (await post(http, test_server, "/leave", {}, session=sessions["max3"]))[0] == 401
        assert await server.store.count_sessions(time.time()) == 2
        # overall cap: the third login from another address is refused rather than evicting anyone
        server.store.limits = StoreLimits(max_sessions=3, sessions_per_address=100)
        await server.store.open_session("someone-elses", 1, "10.9.9.8", time.time())
        with pytest.raises(StoreFull):
            await server.store.open_session("refused", 99, "10.9.9.9", time.time())
        assert await server.store.session_player("someone-elses", time.time()) == 1
        status, text = await post(http, test_server, "/login", {"name": "lou2", "password": "lou2-is-here"})
        assert status == 200          # lou2 replaces its own session: nobody else's is needed
    await test_server.close()
    assert server.counters()["sessions_refused"] == 1 and server.counters()["sessions_evicted_same_address"] == 1


async def test_deep_json_is_a_400_with_one_line_never_a_500():
    server, test_server = await start_server()
    async with aiohttp.ClientSession() as http:
        deep = ("[" * 5000 + "]" * 5000).encode()
        status, text = await post(http, test_server, "/register", None, raw=deep)
        assert status == 400 and "deeper than 32" in text and "\n" not in text.strip()
        tricky = json.dumps({"name": "[[[[" * 50, "password": "{{{{" * 50}).encode()    # brackets inside strings
        status, text = await post(http, test_server, "/register", None, raw=tricky)
        assert status == 400 and "name must be" in text
    await test_server.close()
    assert json_depth_ok('{"a": [[["\\"]]]]"]]]}', limit=4) and not json_depth_ok('{"a": [[[1]]]}', limit=3)


async def test_registrations_throttled_per_address_before_any_hashing():
    server, test_server = await start_server(registrations_per_address=3)
    async with aiohttp.ClientSession() as http:
        for n in range(3):
            assert (await post(http, test_server, "/register", {"name": f"reg{n}", "password": f"reg{n}-plays"}))[0] == 201
        status, text = await post(http, test_server, "/register", {"name": "reg9", "password": "reg9-plays"})
        assert status == 429 and "\n" not in text.strip()
        assert await server.store.account("reg9") is None
    await test_server.close()
    assert server.stats["registrations_throttled"] == 1 and server.stats["registered"] == 3


async def test_hashes_bounded_and_a_queue_beyond_the_bound_gets_503():
    server, test_server = await start_server(max_concurrent_hashes=1, max_waiting_hashes=1)
    release = threading.Event()
    inside = threading.Event()
    real_hash = server._hash

    def held_hash(*args):
        inside.set()
        release.wait(10)
        return real_hash(*args)

    server._hash = held_hash
    async with aiohttp.ClientSession() as http:
        first = asyncio.create_task(post(http, test_server, "/register", {"name": "una1", "password": "una1-plays"}))
        await asyncio.to_thread(inside.wait, 10)                         # one hash running ...
        second = asyncio.create_task(post(http, test_server, "/register", {"name": "una2", "password": "una2-plays"}))
        await until(lambda: server._hashes_waiting == 1, what="the second to wait for a hash slot")
        status, text = await post(http, test_server, "/login", {"name": "una1", "password": "una1-plays"})
        assert status == 503 and "\n" not in text.strip()                # ... one waiting: no more
        release.set()
        assert [(await t)[0] for t in (first, second)] == [201, 201]
        assert (await post(http, test_server, "/login", {"name": "una1", "password": "una1-plays"}))[0] == 200
    await test_server.close()
    assert server.stats["hashes_refused"] == 1


async def test_stats_need_the_api_key_and_world_names_no_control_api():
    server, test_server = await start_server(api_key="operator-key")
    async with aiohttp.ClientSession() as http:
        async with http.get(test_server.make_url("/stats")) as resp:
            assert resp.status == 401
        async with http.get(test_server.make_url("/stats"), headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with http.get(test_server.make_url("/stats"), headers={"Authorization": "Bearer operator-key"}) as resp:
            assert resp.status == 200 and "counters" in await resp.json()
        async with http.get(test_server.make_url("/world")) as resp:
            assert (await resp.json())["reflectors"] == [{"udp": "127.0.0.1:9"}]
    await test_server.close()
    assert server.stats["stats_unauthorized"] == 2


async def test_a_move_to_an_overflowing_number_is_a_400():
    server, test_server = await start_server()
    async with aiohttp.ClientSession() as http:
        await post(http, test_server, "/register", {"name": "vic1", "password": "vic1-plays"})
        _, text = await post(http, test_server, "/login", {"name": "vic1", "password": "vic1-plays"})
        status, text = await post(http, test_server, "/move", None, session=json.loads(text)["session"],
                                  raw=b'{"x": 1' + b"0" * 400 + b', "y": 1}')
        assert status == 400 and "move wants" in text
    await test_server.close()


def test_membership_pushed_again_when_a_reflector_restarts(tmp_path):
    """After a reflector restart a player can rejoin: the server notices the new instance and pushes its members."""
    udp, http_port, server_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    refl_argv = [sys.executable, "-m", "mmpog.reflector", "--mode", "standalone", "--listen", f"127.0.0.1:{udp}",
                 "--http", f"127.0.0.1:{http_port}", "--api-key", "secret-key", "--log-level", "warning"]
    refl_url = f"http://127.0.0.1:{http_port}"
    reflector = subprocess.Popen(refl_argv)
    wait_http(refl_url + "/health", reflector)
    server = subprocess.Popen([sys.executable, "-m", "mmpog.server", "--http", f"127.0.0.1:{server_port}",
                               "--world", "1x1", "--cell", "10", "--api-key", "secret-key",
                               "--reflector-check-interval", "0.05", "--reflector", f"{refl_url}=127.0.0.1:{udp}",
                               "--log-level", "warning"])
    base = f"http://127.0.0.1:{server_port}"
    try:
        wait_http(base + "/world", server)

        async def play() -> None:
            events = []
            async with aiohttp.ClientSession() as http:
                client = GameClient(base, "nora", "nora-plays-well", http=http, on_event=events.append)
                await client.start()
                await client.register()
                await client.login()
                await client.move(5, 5)
                reflector.terminate()
                assert reflector.wait(10) == 0
                restarted = subprocess.Popen(refl_argv)
                try:
                    wait_http(refl_url + "/health", restarted)
                    deadline = time.monotonic() + 10       # the server's watcher has no event to wait on
                    while reflector_stats(refl_url)["locations"].get("0", {}).get("members") != 1:
                        assert time.monotonic() < deadline, "membership was not pushed again"
                        await asyncio.sleep(0.05)
                    await client.move(5, 5, rejoin=True)
                    assert sum(isinstance(e, Joined) for e in events) == 2
                    await client.close()
                finally:
                    restarted.terminate()
                    restarted.wait(10)

        asyncio.run(play())
        status, stats = call("GET", base + "/stats", token="secret-key")
        assert stats["counters"]["membership_pushed_again"] == 1 and stats["counters"]["rejoins"] == 1
    finally:
        for proc in (server, reflector):
            if proc.poll() is None:
                proc.terminate()
            proc.wait(10)


async def test_default_store_moves_a_dead_reflectors_locations_to_a_live_one(tmp_path):
    """The in-memory default: of two reflectors one never answers; after --reflector-ttl its locations
    go to the live one, and a player placed there follows on its next /move."""
    from boxcore.procs import ProcessGroup, python_module

    group = ProcessGroup(tmp_path)
    udp, http_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    live_url = f"http://127.0.0.1:{http_port}"
    reflector = group.start("reflector", [*python_module("mmpog.reflector"), "--mode", "standalone", "--listen",
                                          f"127.0.0.1:{udp}", "--http", f"127.0.0.1:{http_port}",
                                          "--api-key", "secret-key", "--log-level", "warning"], stats=False)
    dead = ReflectorInfo(f"http://127.0.0.1:{free_port()}", ("127.0.0.1", free_port(socket.SOCK_DGRAM)))
    server = GameServer(World(2, 1, 10.0), [ReflectorInfo(live_url, ("127.0.0.1", udp)), dead], api_key="secret-key",
                        reflector_check_interval=0.05, reflector_ttl=1.0)
    test_server = TestServer(server.app())
    try:
        await group.wait_until(reflector, lambda: reflector_answers(live_url), what="no /health")
        await test_server.start_server()
        async with aiohttp.ClientSession() as http:
            await group.wait_until(reflector, lambda: server.stats["locations_reassigned"] == 1, timeout=30,
                                   what="location 1 not reassigned")
            async with http.get(test_server.make_url("/world")) as resp:
                assert (await resp.json())["mapping"] == {"0": 0, "1": 0}         # 1's home (l mod R) was dead
            await post(http, test_server, "/register", {"name": "pia", "password": "pia-plays-well"})
            status, text = await post(http, test_server, "/login", {"name": "pia", "password": "pia-plays-well"})
            status, text = await post(http, test_server, "/move", {"x": 15, "y": 5}, session=json.loads(text)["session"])
            assert status == 200 and json.loads(text)["reflector"] == f"127.0.0.1:{udp}"
    finally:
        await test_server.close()
        await group.stop_all()


def reflector_answers(url):
    try:
        urllib.request.urlopen(url + "/health", timeout=1).read()
        return True
    except OSError:
        return False
