"""boxd probed as a hostile local user would (issue 11): each test is one probe that got through
before and is refused now.  The hostile side runs as uid 65534 (``setpriv``), the real boxd is a
process on the user engine over loopback, the legitimate boosters run as root."""

import asyncio
import json
import os
import socket
import stat

import aiohttp
import pytest

from boxcore.booster import Booster
from boxcore.rules import Match
from boxcore.procs import free_port
from boxcore.testing import BoxdProcess
from hostile import NOBODY, as_uid, outputs, shared_dir
from tests.loopback import bound_udp
from tests.polling import until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def workdir():
    with shared_dir() as path:
        yield path


@pytest.fixture
def ports():
    return {"box": free_port(socket.SOCK_DGRAM), "server": free_port(socket.SOCK_DGRAM)}


def listen(ports):
    return [f"udp:127.0.0.1:{ports['box']}=127.0.0.1:{ports['server']}"]


def hostile_boxd(workdir, ports, *extra, policy=None, http=False):
    """boxd whose control socket the hostile uid may reach (its group is nogroup)."""
    return BoxdProcess(workdir, listens=listen(ports), policy=policy, http=http,
                       extra=["--control-group", str(NOBODY), *extra])


NOTHING_FOR_NOBODY = '[[grant]]\nname = "root only"\nboosters = "root-*"\nuids = [0]\nsend = true\n'


async def test_control_socket_is_0660_of_a_group_and_state_is_0750(workdir, ports):
    async with BoxdProcess(workdir, listens=listen(ports), http=False) as boxd:
        st = os.stat(boxd.control)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 0
        assert stat.S_IMODE(os.stat(boxd.state).st_mode) == 0o750
        # a uid outside the group cannot even connect
        probe = as_uid(f"""
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect({str(boxd.control)!r})
                emit("connected")
            except PermissionError:
                emit("refused")
        """)
        assert outputs(probe) == ["refused"]
    async with hostile_boxd(workdir, ports) as boxd:
        assert os.stat(boxd.control).st_gid == NOBODY


def test_control_mode_may_not_be_world_writable(workdir):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "boxcore.boxd", "--state", str(workdir / "s"), "--control",
                          str(workdir / "c.sock"), "--control-mode", "0666"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "every local user" in out.stderr


async def test_nothing_but_hello_before_hello(workdir, ports):
    async with hostile_boxd(workdir, ports) as boxd:
        async with Booster("root-booster", control=boxd.control) as root:
            await root.copy(Match(proto="udp", dst_port=ports["server"]), lambda p: None)
            probe = as_uid(f"""
                c = Raw({str(boxd.control)!r})
                for what in ("status", "boosters", "rules", "directory"):
                    emit(c.request({{"t": "query", "what": what}}))
                emit(c.request({{"t": "dir_get", "key": "k"}}))
            """)
            replies = outputs(probe)
            assert all(r["status"] == "PERMISSION_DENIED" and r["reason"] == "say hello first" for r in replies)
            assert all("result" not in r for r in replies)


async def test_a_name_stays_with_its_uid_while_its_booster_is_down(workdir, ports):
    async with hostile_boxd(workdir, ports) as boxd:
        async with Booster("victim", control=boxd.control) as victim:
            await victim.directory.put("totals", {"packets": 7})
        probe = as_uid(f"""
            c = Raw({str(boxd.control)!r})
            emit(c.request({{"t": "hello", "name": "victim", "version": 1}}))
            emit(c.request({{"t": "dir_put", "key": "totals", "value": {{"packets": 10**9, "bytes": -5}}}}))
        """)
        hello, put = outputs(probe)
        assert hello["status"] == "PERMISSION_DENIED" and "bound to uid 0" in hello["reason"]
        assert put["status"] == "PERMISSION_DENIED"           # still not registered
        async with Booster("victim", control=boxd.control) as victim:   # not CONFLICT: the name is free
            assert await victim.directory.get("totals") == {"packets": 7}
    # persisted: a restarted boxd still binds the name
    async with hostile_boxd(workdir, ports) as boxd:
        probe = as_uid(f"""
            c = Raw({str(boxd.control)!r})
            emit(c.request({{"t": "hello", "name": "victim", "version": 1}}))
        """)
        assert outputs(probe)[0]["status"] == "PERMISSION_DENIED"


async def test_send_needs_a_source_the_policy_grants(workdir, ports):
    policy = workdir / "policy.toml"
    policy.write_text(NOTHING_FOR_NOBODY)
    target = bound_udp()
    tport = target.getsockname()[1]
    async with hostile_boxd(workdir, ports, policy=policy) as boxd:
        probe = as_uid(f"""
            c = Raw({str(boxd.control)!r})
            hello = c.request({{"t": "hello", "name": "spoofer", "version": 1}})
            emit(hello["status"])
            pkt = {{"proto": 17, "src": "127.0.0.1", "sport": {ports['box']}, "dst": "127.0.0.1",
                    "dport": {tport}, "payload": b"spoofed"}}
            emit(c.request({{"t": "send", "packet": pkt}}))
        """)
        status, reply = outputs(probe)
        assert status == "OK"
        assert reply["status"] == "PERMISSION_DENIED" and "may not send" in reply["reason"]
        counters = (await boxd.query("status"))["counters"]
        assert counters["send_refused"] == 1 and counters.get("packets_injected", 0) == 0
    with pytest.raises(BlockingIOError):
        target.recv(100)
    target.close()


async def test_data_channel_send_and_multicast_pass_the_policy(workdir, ports):
    """The data channel (booster.send, send_multicast) is checked like the control request."""
    target = bound_udp()
    tport = target.getsockname()[1]
    async with hostile_boxd(workdir, ports) as boxd:   # allow-all: still no spoofing for non-root
        probe = as_uid(f"""
            import array
            from boxcore import wire
            c = Raw({str(boxd.control)!r})
            c.sock.sendall(wire.encode({{"t": "hello", "id": 1, "name": "chan", "version": 1}}))
            msg, fds, _, _ = socket.recv_fds(c.sock, 65536, 4)
            channel = socket.socket(fileno=fds[0])
            channel.send(wire.pack_datagram(wire.Tag.SEND, 17, "127.0.0.1", {ports['box']}, "127.0.0.1",
                                            {tport}, b"spoofed"))
            # a group of 4096 times the same address: refused before any fan-out
            emit(c.request({{"t": "set_multicast_group", "group": 1, "members": [["127.0.0.1", {tport}]] * 4096}}))
            emit(c.request({{"t": "set_multicast_group", "group": 1, "members": [["127.0.0.1", {tport}]]}}))
            # fan-out from the box's own port, which it holds no rule for
            channel.send(wire.pack_datagram(wire.Tag.MULTICAST, 1, {ports['box']}, b"amplify"))
        """)
        duplicates, single = outputs(probe)
        assert duplicates["status"] == "INVALID" and "twice" in duplicates["reason"]
        assert single["status"] == "OK"

        # boxd reads the channel in order: once the last datagram is refused, all were handled
        async def both_refused():
            counters = (await boxd.query("status"))["counters"]
            return counters if counters.get("multicast_refused") else None
        counters = await until(both_refused, what="boxd to read the channel's datagrams")
        assert counters["send_refused"] == 1 and counters["multicast_refused"] == 1
        assert counters.get("packets_injected", 0) == 0 and counters.get("multicast_sent", 0) == 0
    with pytest.raises(BlockingIOError):
        target.recv(100)
    target.close()


async def test_a_booster_may_answer_from_the_port_it_redirects(workdir, ports):
    """The legitimate use of send (the reflector's): from the address and port its rule holds."""
    client = bound_udp()
    cport = client.getsockname()[1]
    async with hostile_boxd(workdir, ports) as boxd:
        probe = as_uid(f"""
            c = Raw({str(boxd.control)!r})
            c.request({{"t": "hello", "name": "replier", "version": 1}})
            emit(c.request({{"t": "rule", "action": "redirect", "match": {{"proto": 17, "src": "10.9.9.0/24",
                                                                        "dst_port": {ports['server']}}}}})["status"])
            pkt = {{"proto": 17, "src": "127.0.0.1", "sport": {ports['server']}, "dst": "10.9.9.9", "dport": {cport},
                    "payload": b"answer"}}
            emit(c.request({{"t": "send", "packet": pkt}})["status"])
            pkt["dst"] = "127.0.0.1"
            emit(c.request({{"t": "send", "packet": pkt}})["status"])
        """)
        assert outputs(probe) == ["OK", "OK", "PERMISSION_DENIED"]
    client.close()


async def test_unauthenticated_connections_expire_and_lock_nobody_out(workdir, ports):
    async with hostile_boxd(workdir, ports, "--hello-timeout", "2", "--max-sessions-per-uid", "20") as boxd:
        loop = asyncio.get_running_loop()
        probe = loop.run_in_executor(None, as_uid, f"""
            from boxcore import wire
            held = []
            for _ in range(100):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect({str(boxd.control)!r})
                    s.sendall(wire.encode({{"t": "heartbeat"}}))   # heartbeats keep nothing alive
                    held.append(s)
                except OSError:
                    pass
            alive = 0
            deadline = time.monotonic() + 20    # boxd's --hello-timeout (2 s) must close every one
            for s in held:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    alive += s.recv(1) != b""
                except socket.timeout:
                    alive += 1      # still open, and silent
                except OSError:
                    pass            # reset: closed by boxd
            emit(alive)
        """)
        async def refused():
            return (await boxd.query("status"))["counters"].get("connections_refused_unauthenticated", 0)
        await until(refused, what="the hostile connections", timeout=20)
        # while the hostile uid holds every connection it may, root boosters and boxctl get in
        async with Booster("legit", control=boxd.control) as legit:
            await legit.copy(Match(proto="udp", dst_port=ports["server"]), lambda p: None)
        assert (await boxd.query("status"))["engine"] == "user"
        assert outputs(await probe)[-1] == 0                     # every idle connection was closed
        counters = (await boxd.query("status"))["counters"]
        assert counters["sessions_expired_before_hello"] >= 16


async def test_copy_of_another_uids_traffic_needs_a_grant(workdir, ports):
    async with hostile_boxd(workdir, ports) as boxd:           # allow-all
        async with Booster("owner", control=boxd.control) as owner:
            await owner.redirect(Match(proto="udp", dst_port=ports["server"]), lambda p: None)
            probe = as_uid(f"""
                c = Raw({str(boxd.control)!r})
                c.request({{"t": "hello", "name": "snoop", "version": 1}})
                emit(c.request({{"t": "rule", "action": "copy", "match": {{"proto": 17, "dst_port": {ports['server']}}}}}))
                emit(c.request({{"t": "rule", "action": "copy", "match": {{"proto": 17, "dst_port": {ports['server'] + 1}}}}})["status"])
            """)
            foreign, own = outputs(probe)
            assert foreign["status"] == "PERMISSION_DENIED" and "another uid" in foreign["reason"]
            assert own == "OK"       # traffic nobody holds may be copied
    policy = workdir / "policy.toml"
    policy.write_text(f'[[grant]]\nname = "auditor"\nboosters = "snoop"\nuids = [{NOBODY}]\nactions = ["copy"]\n'
                      'copy_foreign = true\n[[grant]]\nboosters = "owner"\nuids = [0]\n')
    async with hostile_boxd(workdir, ports, policy=policy) as boxd:
        async with Booster("owner", control=boxd.control) as owner:
            await owner.redirect(Match(proto="udp", dst_port=ports["server"]), lambda p: None)
            probe = as_uid(f"""
                c = Raw({str(boxd.control)!r})
                c.request({{"t": "hello", "name": "snoop", "version": 1}})
                emit(c.request({{"t": "rule", "action": "copy", "match": {{"proto": 17, "dst_port": {ports['server']}}}}})["status"])
            """)
            assert outputs(probe) == ["OK"]      # the operator said yes


async def test_per_uid_limits(workdir, ports):
    async with hostile_boxd(workdir, ports, "--max-rules-per-uid", "3", "--max-groups-per-uid", "2",
                            "--max-group-members-per-uid", "3", "--max-directory-bytes-per-uid", "1000") as boxd:
        probe = as_uid(f"""
            a, b = Raw({str(boxd.control)!r}), Raw({str(boxd.control)!r})
            a.request({{"t": "hello", "name": "a", "version": 1}})
            b.request({{"t": "hello", "name": "b", "version": 1}})
            for i, c in enumerate([a, a, b, b]):
                emit(c.request({{"t": "rule", "action": "copy", "match": {{"proto": 17, "dst_port": 5000 + i}}}})["status"])
            emit(a.request({{"t": "set_multicast_group", "group": 1, "members": [["127.0.0.1", 1], ["127.0.0.1", 2]]}})["status"])
            emit(b.request({{"t": "set_multicast_group", "group": 2, "members": [["127.0.0.1", 1], ["127.0.0.1", 2]]}})["status"])
            emit(b.request({{"t": "set_multicast_group", "group": 2, "members": [["127.0.0.1", 3]]}})["status"])
            emit(b.request({{"t": "set_multicast_group", "group": 3, "members": []}})["status"])
            emit(a.request({{"t": "dir_put", "key": "x", "value": b"x" * 600}})["status"])
            emit(b.request({{"t": "dir_put", "key": "y", "value": b"y" * 600}}))
        """)
        out = outputs(probe)
        assert out[:4] == ["OK", "OK", "OK", "ERROR"]                # 3 rules per uid, over two boosters
        assert out[4:8] == ["OK", "ERROR", "OK", "OK"]              # 3 members over the uid's groups
        assert out[8] == "OK" and out[9]["status"] == "INVALID" and "quota" in out[9]["reason"]


async def test_control_directory_query_is_bounded_with_a_clear_error(workdir, ports):
    async with hostile_boxd(workdir, ports) as boxd:
        async with Booster("big", control=boxd.control) as big:
            for i in range(100):
                await big.directory.put(f"k{i:03}", "v" * 60_000)    # 6 MB: more than one reply
        probe = as_uid(f"""
            c = Raw({str(boxd.control)!r})
            c.request({{"t": "hello", "name": "reader", "version": 1, "observer": True}})
            emit(c.request({{"t": "query", "what": "directory"}}))
            emit(c.request({{"t": "query", "what": "status"}})["status"])
        """)
        reply, after = outputs(probe)
        assert reply["status"] == "ERROR" and "page by page" in reply["reason"]
        assert after == "OK"                                          # the session goes on


async def test_http_directory_and_boosters_need_the_token_and_are_paginated(workdir, ports):
    token_file = workdir / "token"
    token_file.write_text("s3cret-token-of-enough-length\n")
    async with hostile_boxd(workdir, ports, "--http-token-file", str(token_file), http=True) as boxd:
        async with Booster("big", control=boxd.control) as big:
            for i in range(30):
                await big.directory.put(f"k{i:03}", "v" * 50_000)
            async with aiohttp.ClientSession() as http:
                for path in ("/api/directory", "/api/boosters", "/api/directory?booster=big"):
                    async with http.get(boxd.http_url + path) as r:
                        assert r.status == 401
                    async with http.get(boxd.http_url + path, headers={"Authorization": "Bearer wrong"}) as r:
                        assert r.status == 401
                async with http.get(boxd.http_url + "/api/status") as r:
                    assert r.status == 200      # open on loopback
                auth = {"Authorization": "Bearer s3cret-token-of-enough-length"}
                async with http.get(boxd.http_url + "/api/directory", headers=auth) as r:
                    assert (await r.json())["boosters"]["big"]["keys"] == 30
                keys, after, pages = [], "", 0
                while after is not None:
                    url = f"{boxd.http_url}/api/directory?booster=big&limit=1000&after={after}"
                    async with http.get(url, headers=auth) as r:
                        body = await r.read()
                    assert len(body) < 2 << 20                       # no 30 MB answers
                    page = json.loads(body)
                    keys += [k for k, _ in page["items"]]
                    after, pages = page["next"], pages + 1
                assert keys == [f"k{i:03}" for i in range(30)] and pages >= 2


def test_http_off_loopback_needs_a_token(workdir):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "boxcore.boxd", "--state", str(workdir / "s"), "--control",
                          str(workdir / "c.sock"), "--http", "0.0.0.0:0"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "--http-token-file" in out.stderr


async def test_http_slow_headers_are_cut_off(workdir, ports):
    async with hostile_boxd(workdir, ports, http=True) as boxd:
        reader, writer = await asyncio.open_connection("127.0.0.1", boxd.http_port)
        writer.write(b"GET /api/status HTTP/1.1\r\n")
        closed = False
        for _ in range(40):        # one header line every half second: never a complete request
            writer.write(b"X-Slow: 1\r\n")
            try:
                data = await asyncio.wait_for(reader.read(100), 0.5)
            except asyncio.TimeoutError:
                continue
            if data == b"" or data.startswith(b"HTTP/1.1 4"):
                closed = True
                break
        writer.close()
        assert closed


class FdClient:
    """A blocking raw control client that keeps the descriptors boxd sends."""

    def __init__(self, path, name, features=()):
        from boxcore import wire
        self.wire = wire
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.decoder = wire.FrameDecoder()
        self.fds = []
        self.queue = []
        self.ids = iter(range(1, 1000))
        hello = {"t": "hello", "name": name, "version": 1}
        if features:
            hello["features"] = list(features)
        assert self.request(hello)[0]["status"] == "OK"

    def _read(self):
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 16)
        assert data, "boxd closed the connection"
        self.fds += fds
        for msg in self.decoder.feed(data):
            n = msg.get("nfds", 0)
            self.queue.append((msg, [self.fds.pop(0) for _ in range(n)]))

    def next(self, kind):
        while True:
            for i, (msg, fds) in enumerate(self.queue):
                if msg["t"] == kind:
                    del self.queue[i]
                    return msg, fds
            self._read()

    def request(self, msg):
        rid = next(self.ids)
        self.sock.sendall(self.wire.encode(dict(msg, id=rid)))
        while True:
            reply, fds = self.next("reply")
            if reply["id"] == rid:
                return reply, fds


async def test_a_delegated_socket_comes_back_when_the_copy_goes(workdir, ports):
    async with BoxdProcess(workdir, listens=listen(ports), http=False) as boxd:
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(None, FdClient, boxd.control, "first", ["delegate"])
        reply, fds = first.request({"t": "rule", "action": "redirect",
                                    "match": {"proto": 17, "dst_port": ports["server"]}})
        cookie = reply["result"]["cookie"]
        assert reply["result"]["delivery"]["kind"] == "socket" and len(fds) == 1
        for fd in fds:
            os.close(fd)
        async with Booster("second", control=boxd.control) as second:
            await second.copy(Match(proto="udp", dst_port=ports["server"]), lambda p: None)
            msg, _ = await loop.run_in_executor(None, first.next, "undelegate")
            assert msg["cookie"] == cookie
            rules = await boxd.query("rules")
            assert [r["delivery"] for r in rules if r["cookie"] == cookie] == ["channel"]
        # the copy is gone: the first booster gets its socket back
        msg, fds = await loop.run_in_executor(None, first.next, "delegate")
        assert msg["cookie"] == cookie and msg["delivery"]["kind"] == "socket" and len(fds) == 1
        given = socket.socket(fileno=fds[0])
        given.settimeout(5)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.sendto(b"straight to the booster", ("127.0.0.1", ports["box"]))
        assert given.recv(100) == b"straight to the booster"
        rules = await boxd.query("rules")
        assert [r["delivery"] for r in rules if r["cookie"] == cookie] == ["socket"]
        given.close()
        client.close()
        # a booster that does not speak "delegate" stays on its channel (today's library)
        first.sock.close()
        old = await loop.run_in_executor(None, FdClient, boxd.control, "old-library")
        reply, fds = old.request({"t": "rule", "action": "redirect",
                                  "match": {"proto": 17, "dst_port": ports["server"]}})
        for fd in fds:
            os.close(fd)
        async with Booster("third", control=boxd.control) as third:
            await third.copy(Match(proto="udp", dst_port=ports["server"]), lambda p: None)
        async def kept():      # the third booster's rules go in boxd's teardown, after its bye
            counters = (await boxd.query("status"))["engine_status"]["counters"]
            return counters if "sockets_kept_on_channel" in counters else None
        engine = await until(kept, what="the third booster's teardown")
        assert engine["sockets_redelegated"] == 1 and engine["sockets_kept_on_channel"] == 1
        old.sock.close()


async def test_source_checks_hold_on_every_engine():
    """The check is the controller's, before any engine's inject (the linux engine writes raw
    IPv4 as root): shown on the memory engine with a policy that grants rules but no send."""
    from boxcore.packet import Packet
    from boxcore.policy import Policy
    from boxcore.testing import MemoryBox

    policy = Policy.loads('[[grant]]\nboosters = "relay"\nactions = ["redirect"]\nprotocols = ["udp"]\n'
                          'dst_ports = [5000]\n')
    async with MemoryBox(policy=policy) as box:
        relay = await box.connect("relay")
        await relay.redirect(Match(proto="udp", dst_port=5000), lambda p: None)
        relay.send(Packet(17, "10.0.0.9", 4000, "10.0.0.1", 5000, b"re-injected"))  # lies in its rule
        relay.send(Packet(17, "10.0.0.1", 5000, "10.0.0.9", 4000, b"answer"))       # answers it
        relay.send(Packet(17, "10.0.0.1", 53, "10.0.0.9", 4000, b"forged"))         # neither
        await box.until(lambda: box.controller.stats["packets_injected"] + box.controller.stats["send_refused"] == 3,
                        what="boxd to handle the three sends")
        assert [p.payload for p in box.sent("inject")] == [b"re-injected", b"answer"]
        assert box.controller.stats["send_refused"] == 1
