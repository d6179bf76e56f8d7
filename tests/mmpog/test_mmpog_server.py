"""The game server's HTTP API against two real reflector processes, and the client adapter end to end."""

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from boxcore.procs import free_port
from mmpog.client import GameClient
from mmpog.reliability import Delivered, Joined, Received


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
            "--cell", "10", "--pbkdf2-iterations", "1000", *env_key, "--log-level", "warning"]
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
    assert call("POST", base + "/register", {"name": "carol", "password": "pw"})[0] == 201
    assert call("POST", base + "/register", {"name": "carol", "password": "pw"})[0] == 409
    assert call("POST", base + "/register", {"name": "bad name!", "password": "pw"})[0] == 400
    assert call("POST", base + "/login", {"name": "carol", "password": "nope"})[0] == 401
    status, login = call("POST", base + "/login", {"name": "carol", "password": "pw"})
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
    status, stats = call("GET", base + "/stats")
    assert stats["counters"]["location_changes"] == 2 and player >= 1


async def test_clients_exchange_reliable_updates_and_change_location(game):
    base, _ = game
    events = {"dave": [], "erin": []}
    async with aiohttp.ClientSession() as http:
        clients = {name: GameClient(base, name, "pw", http=http, on_event=events[name].append) for name in events}
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
