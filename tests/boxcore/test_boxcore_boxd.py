"""boxd as a real process on loopback, with real boosters (in-test and as processes)."""

import asyncio
import json
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest

from boxcore.booster import Booster, BoxdGone, Conflict, PermissionDenied, Verdict
from boxcore.rules import Match
from boxcore.procs import free_port
from boxcore.testing import BoxdProcess
from tests.loopback import bound_udp, recv
from tests.polling import until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ports():
    return {"box": free_port(socket.SOCK_DGRAM), "server": free_port(socket.SOCK_DGRAM), "tbox": free_port(socket.SOCK_STREAM),
            "tserver": free_port(socket.SOCK_STREAM)}


def listens(ports):
    return [f"udp:127.0.0.1:{ports['box']}=127.0.0.1:{ports['server']}",
            f"tcp:127.0.0.1:{ports['tbox']}=127.0.0.1:{ports['tserver']}"]


def spawn_booster(control, port, *extra, name="udp-counter", stats=None):
    args = [sys.executable, "-m", "boxcore.examples.udp_counter", "--control", str(control),
            "--port", str(port), "--name", name, "--report-every", "0.2", *extra]
    if stats:
        args += ["--stats-json", str(stats)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_relay_udp_and_tcp_without_boosters(tmp_path, ports):
    server = bound_udp()
    server.close()
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", ports["server"]))
    server.setblocking(False)

    async def echo_upper(reader, writer):
        writer.write((await reader.read(100)).upper())
        await writer.drain()
        writer.close()

    tcp_server = await asyncio.start_server(echo_upper, "127.0.0.1", ports["tserver"])
    async with BoxdProcess(tmp_path, listens=listens(ports)):
        client = bound_udp()
        client.sendto(b"ping", ("127.0.0.1", ports["box"]))
        data, addr = await recv(server)
        assert data == b"ping"
        server.sendto(b"pong", addr)
        data, addr = await recv(client)
        assert (data, addr) == (b"pong", ("127.0.0.1", ports["box"]))
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["tbox"])
        writer.write(b"hello tcp")
        assert await asyncio.wait_for(reader.read(100), 2) == b"HELLO TCP"
        writer.close()
        client.close()
    tcp_server.close()
    server.close()


async def test_socket_delivery_and_pass_through_real_boxd(tmp_path, ports):
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", ports["server"]))
    server.setblocking(False)
    async with BoxdProcess(tmp_path, listens=listens(ports)) as boxd:
        seen = []
        async with Booster("fast", control=boxd.control) as booster:
            def handler(pkt):
                seen.append(pkt)
                if pkt.payload == b"bug":
                    raise RuntimeError("handler bug")
                return Verdict.PASS if pkt.payload.startswith(b"ok") else Verdict.CONSUME
            sub = await booster.redirect(Match(proto="udp", dst_port=ports["server"]), handler)
            assert sub.delivery.kind == "socket"
            client = bound_udp()
            for payload in (b"ok 1", b"no 2", b"bug", b"ok 3"):
                client.sendto(payload, ("127.0.0.1", ports["box"]))
            got = [(await recv(server))[0] for _ in range(2)]
            assert got == [b"ok 1", b"ok 3"]
            assert booster.stats["handler_errors"] == 1
            assert [p.dport for p in seen] == [ports["server"]] * 4
            assert seen[0].dst == "127.0.0.1" and seen[0].sport == client.getsockname()[1]
            # counts reported with heartbeats reach the rule counters
            async def counted():
                rules = await boxd.query("rules")
                return rules and rules[0]["packets"] == 4
            await until(counted)
            client.close()
    server.close()


async def test_stream_delivery_intercepts_tcp(tmp_path, ports):
    async with BoxdProcess(tmp_path, listens=listens(ports)) as boxd:
        async with Booster("tcp-int", control=boxd.control) as booster:
            async def on_conn(reader, writer, conn):
                line = await reader.readline()
                writer.write(b"%s via %s:%d\n" % (line.strip(), conn.original_dst[0].encode(), conn.original_dst[1]))
                await writer.drain()
            sub = await booster.intercept_tcp(Match(proto="tcp", dst_port=ports["tserver"]), on_conn)
            assert sub.delivery.kind == "stream"
            reader, writer = await asyncio.open_connection("127.0.0.1", ports["tbox"])
            writer.write(b"hi\n")
            answer = await asyncio.wait_for(reader.readline(), 3)
            assert answer == b"hi via 127.0.0.1:%d\n" % ports["tserver"]
            writer.close()


async def test_conflict_between_processes_and_sigkill_cleanup(tmp_path, ports):
    async with BoxdProcess(tmp_path, listens=listens(ports), heartbeat=0.2) as boxd:
        proc = spawn_booster(boxd.control, ports["server"])
        try:
            async def installed():
                rules = await boxd.query("rules")
                return rules if rules else None
            rules = await until(installed, timeout=15)
            assert rules[0]["owner"] == "udp-counter"
            async with Booster("rival", control=boxd.control) as rival:
                with pytest.raises(Conflict) as err:
                    await rival.redirect(Match(proto="udp", dst_port=ports["server"]), lambda p: None)
                assert err.value.holder == "udp-counter"
                proc.send_signal(signal.SIGKILL)

                async def gone():
                    return not [r for r in await boxd.query("rules") if r["owner"] == "udp-counter"]
                await until(gone, what="the killed booster's rules to go")
                status = await boxd.query("status")
                assert status["counters"]["rules_removed_on_leave"] >= 1
                # removed because its socket closed, not after missed heartbeats
                assert status["counters"].get("boosters_evicted", 0) == 0
                # the port is free again
                await rival.redirect(Match(proto="udp", dst_port=ports["server"]), lambda p: None)
        finally:
            proc.kill()
            proc.wait()


async def test_missed_heartbeats_evict(tmp_path, ports):
    async with BoxdProcess(tmp_path, listens=listens(ports), heartbeat=0.2, heartbeat_misses=2) as boxd:
        proc = spawn_booster(boxd.control, ports["server"])
        try:
            async def installed():
                return await boxd.query("rules")
            await until(installed, timeout=15)
            proc.send_signal(signal.SIGSTOP)  # alive but silent

            async def evicted():
                return not await boxd.query("rules")
            await until(evicted, timeout=3)
            assert (await boxd.query("status"))["counters"]["boosters_evicted"] == 1
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


async def test_directory_survives_boxd_restart(tmp_path, ports):
    async with BoxdProcess(tmp_path, listens=listens(ports)) as boxd:
        async with Booster("keeper", control=boxd.control) as b:
            await b.directory.put("state", {"seen": 42})
    async with BoxdProcess(tmp_path, listens=listens(ports)) as boxd:
        async with Booster("keeper", control=boxd.control) as b:
            assert await b.directory.get("state") == {"seen": 42}
        async with Booster("other", control=boxd.control) as b:
            assert await b.directory.get("state") is None  # per booster


async def test_example_booster_end_to_end_and_management_api(tmp_path, ports):
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", ports["server"]))
    server.setblocking(False)
    stats = tmp_path / "booster-stats.json"
    token_file = tmp_path / "token"
    token_file.write_text("a-long-enough-test-token\n")
    auth = {"Authorization": "Bearer a-long-enough-test-token"}
    async with BoxdProcess(tmp_path, listens=listens(ports), extra=["--http-token-file", str(token_file)]) as boxd:
        proc = spawn_booster(boxd.control, ports["server"], "--drop-prefix", "SPAM", stats=stats)
        try:
            await until(lambda: boxd.query("rules"), timeout=15)
            clients = [bound_udp() for _ in range(3)]
            for i in range(30):
                payload = b"SPAM %d" % i if i % 3 == 0 else b"data %d" % i
                clients[i % 3].sendto(payload, ("127.0.0.1", ports["box"]))
                await asyncio.sleep(0.002)
            received = []
            while len(received) < 20:
                received.append((await recv(server))[0])
            assert all(not p.startswith(b"SPAM") for p in received)
            async with aiohttp.ClientSession() as http:
                async def reported():
                    async with http.get(boxd.http_url + "/api/directory?booster=udp-counter", headers=auth) as r:
                        d = await r.json()
                    totals = dict(d["items"]).get("totals")
                    return totals if totals and totals["packets"] == 30 else None
                totals = await until(reported, timeout=5)
                assert totals["dropped"] == 10 and totals["passed"] == 20 and totals["sources"] == 3
                async def counted():  # socket-delivered packets are counted by the booster, sent with heartbeats
                    async with http.get(boxd.http_url + "/api/rules") as r:
                        rules = await r.json()
                    return rules if rules[0]["packets"] == 30 else None
                rules = await until(counted, timeout=5)
                assert rules[0]["bytes"] == sum(len(b"SPAM %d" % i if i % 3 == 0 else b"data %d" % i)
                                                for i in range(30))
                assert rules[0]["delivery"] == "socket"
                async with http.get(boxd.http_url + "/api/boosters", headers=auth) as r:
                    boosters = await r.json()
                assert boosters[0]["name"] == "udp-counter" and boosters[0]["pid"] == proc.pid
                async with http.get(boxd.http_url + "/api/status") as r:
                    status = await r.json()
                assert status["engine"] == "user" and status["rules"] == 1
                async with http.get(boxd.http_url + "/metrics") as r:
                    assert r.status == 200 and r.content_type == "text/plain"
                    metrics = await r.text()
                assert "# TYPE boxd_rule_packets_total counter" in metrics
                line = [l for l in metrics.splitlines() if l.startswith("boxd_rule_packets_total{")][0]
                assert 'owner="udp-counter"' in line and line.endswith(" 30")
                for l in metrics.splitlines():
                    assert l.startswith("#") or len(l.rsplit(" ", 1)) == 2
            # boxctl both ways
            out = subprocess.run([sys.executable, "-m", "boxcore.boxctl", "--control", str(boxd.control),
                                  "rules", "--json"], capture_output=True, text=True, timeout=20)
            assert out.returncode == 0 and json.loads(out.stdout)[0]["packets"] == 30
            out = subprocess.run([sys.executable, "-m", "boxcore.boxctl", "--http", boxd.http_url, "counters"],
                                 capture_output=True, text=True, timeout=20)
            assert out.returncode == 0 and "rule counters" in out.stdout
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
            seen = json.loads(stats.read_text())
            assert seen["totals"]["packets"] == 30
            for c in clients:
                c.close()
        finally:
            proc.kill()
            proc.wait()
    server.close()


async def test_sigterm_removes_rules_and_boosters_notice(tmp_path, ports):
    boxd = BoxdProcess(tmp_path, listens=listens(ports))
    await boxd.start()
    try:
        booster = Booster("watcher", control=boxd.control)
        await booster.connect()
        await booster.redirect(Match(proto="udp", dst_port=ports["server"]), lambda p: None)
        await booster.copy(Match(proto="udp", dst_port=1234), lambda p: None)
        assert await boxd.stop() == 0
        why = await asyncio.wait_for(booster.run_until_stopped(), 5)
        assert "shutting down" in why
        stats = json.loads((tmp_path / "boxd-stats.json").read_text())
        assert stats["rules"] == [] and stats["rules_installed"] == 2
        with pytest.raises(BoxdGone):
            await booster.redirect(Match(proto="udp", dst_port=9), lambda p: None)
        await booster.close()
    finally:
        await boxd.stop()


@pytest.mark.parametrize("args, needle", [
    (["--state", "{tmp}/s", "--control", "{tmp}/c.sock", "--policy", "{tmp}/missing.toml"], "policy file"),
    (["--state", "{tmp}/s", "--control", "{tmp}/c.sock", "--listen", "udp:nowhere"], "--listen"),
    (["--state", "{tmp}/s", "--control", "{tmp}/plainfile"], "not a socket"),
    (["--state", "{tmp}/s", "--control", "{tmp}/c.sock", "--engine", "warp"], "--engine"),
    (["--control", "{tmp}/c.sock"], "--state"),
    (["--state", "{tmp}/s", "--control", "{tmp}/c.sock", "--listen", "udp:127.0.0.1:5999=127.0.0.1:5999"],
     "relays to itself"),
    (["--state", "{tmp}/s", "--control", "{tmp}/c.sock", "--route", "10.0.0.0/8,via=nowhere"], "--route"),
])
def test_boxd_bad_config_exits_2_with_one_line(tmp_path, args, needle):
    (tmp_path / "plainfile").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    out = subprocess.run([sys.executable, "-m", "boxcore.boxd", *args], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.startswith("boxd: error:")]
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_booster_example_bad_args_and_no_boxd(tmp_path):
    out = subprocess.run([sys.executable, "-m", "boxcore.examples.udp_counter"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "--port" in out.stderr
    out = subprocess.run([sys.executable, "-m", "boxcore.boxctl", "--control", str(tmp_path / "none.sock"),
                          "status"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "cannot reach boxd" in out.stderr


async def test_policy_file_enforced_by_boxd(tmp_path, ports):
    policy = tmp_path / "policy.toml"
    policy.write_text('[[grant]]\nname = "counters"\nboosters = "udp-*"\nactions = ["redirect", "copy"]\n'
                      f'protocols = ["udp"]\ndst_ports = [{ports["server"]}]\n')
    async with BoxdProcess(tmp_path, listens=listens(ports), policy=policy, http=False) as boxd:
        async with Booster("udp-ok", control=boxd.control) as ok:
            await ok.copy(Match(proto="udp", dst_port=ports["server"]), lambda p: None)
            with pytest.raises(PermissionDenied) as err:
                await ok.redirect(Match(proto="udp", dst_port=ports["server"] + 1), lambda p: None)
            assert err.value.reason
            with pytest.raises(PermissionDenied):
                await ok.drop(Match(proto="udp", dst_port=ports["server"]))
        async with Booster("intruder", control=boxd.control) as bad:
            with pytest.raises(PermissionDenied):
                await bad.copy(Match(proto="udp", dst_port=ports["server"]), lambda p: None)
        status = await boxd.query("status")
        assert status["counters"]["permission_denied"] == 3 and status["rules"] == 0


def test_policy_file_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[grant]]\nboosters = 3\n")
    out = subprocess.run([sys.executable, "-m", "boxcore.boxd", "--state", str(tmp_path / "s"), "--control",
                          str(tmp_path / "c.sock"), "--policy", str(bad)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and out.stderr.count("boxd: error:") == 1 and "bad.toml" in out.stderr
