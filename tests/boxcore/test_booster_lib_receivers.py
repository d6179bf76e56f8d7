"""Receivers use only their ReceiverContext (checked in the source and at run time), and the
Subscription's capabilities (delegated_socket, connect_onward, receive_batches) work the same
whatever delivery boxd chose."""

import ast
import asyncio
import socket
from pathlib import Path

import pytest

import boxcore.receivers
from boxcore.booster import Booster, ReceiverContext, RuleCounter, Verdict
from boxcore.booster.core import Booster as CoreBooster
from boxcore.packet import Packet
from boxcore.rules import Match
from boxcore.procs import free_port
from boxcore.testing import BoxdProcess, MemoryBox
from tests.loopback import bound_udp, recv
from tests.polling import until

pytestmark = pytest.mark.timeout(60)

RECEIVER_SOURCES = sorted(Path(boxcore.receivers.__file__).parent.glob("*.py"))
CONTEXT_API = {name for name in dir(ReceiverContext) if not name.startswith("_")} | {"rule", "cookie", "redirect",
                                                                                      "stats", "loop"}
COUNTER_API = {name for name in dir(RuleCounter) if not name.startswith("_")} | {"packets", "bytes"}


# ------------------------------------------------------------------ in the source

def _is_ctx(node: ast.AST) -> bool:
    """``ctx`` or ``self.ctx``."""
    return (isinstance(node, ast.Name) and node.id == "ctx") or (
        isinstance(node, ast.Attribute) and node.attr == "ctx" and isinstance(node.value, ast.Name)
        and node.value.id == "self")


def receiver_problems(source: str) -> list[str]:
    """Where receiver code reaches past its ReceiverContext."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            if _is_ctx(node.value) and node.attr not in CONTEXT_API:
                problems.append(f"line {node.lineno}: {ast.unparse(node)} is not ReceiverContext API")
            elif private and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                problems.append(f"line {node.lineno}: reaches into {ast.unparse(node)}")
            if node.attr == "booster":
                problems.append(f"line {node.lineno}: holds the booster itself ({ast.unparse(node)})")
        elif isinstance(node, ast.arg) and node.arg == "booster":
            problems.append(f"line {node.lineno}: takes the booster itself")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("boxcore.booster"):
            names = {alias.name for alias in node.names}
            if "Booster" in names or node.module in ("boxcore.booster.core", "boxcore.booster.dispatch"):
                problems.append(f"line {node.lineno}: imports {node.module} {sorted(names)}")
    return problems


@pytest.mark.parametrize("path", RECEIVER_SOURCES, ids=lambda p: p.name)
def test_receivers_touch_nothing_private_of_the_booster(path):
    assert receiver_problems(path.read_text()) == []


def test_the_source_check_catches_what_receivers_used_to_do():
    old_style = (
        "from boxcore.booster import Booster\n"
        "class R:\n"
        "    async def start(self, booster, rule, delivery, handler):\n"
        "        self.booster = booster\n"
        "        booster._channel_handlers[rule.cookie] = (handler, True)\n"
        "        self.booster._spawn(handler(None))\n"
        "    def undelegate(self):\n"
        "        self.ctx._dispatch.channel_handlers.clear()\n"
        "        self.ctx.count_packets(1, 2)\n")
    found = "\n".join(receiver_problems(old_style))
    for expected in ("imports boxcore.booster ['Booster']", "takes the booster itself",
                     "booster._channel_handlers", "self.booster._spawn", "self.ctx._dispatch",
                     "self.ctx.count_packets is not ReceiverContext API"):
        assert expected in found


# ------------------------------------------------------------------ at run time

class StrictContext:
    """A ReceiverContext that refuses every name outside the public API (and records use)."""

    def __init__(self, real: ReceiverContext, used: set) -> None:
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_used", used)

    def __getattr__(self, name):
        if name not in CONTEXT_API:
            raise AttributeError(f"receiver used ctx.{name}, which is not ReceiverContext API")
        self._used.add(name)
        return getattr(self._real, name)

    def __setattr__(self, name, value):
        raise AttributeError(f"receiver set ctx.{name}")


@pytest.fixture
def strict_contexts(monkeypatch):
    used: set = set()
    real = CoreBooster._receiver_context
    monkeypatch.setattr(CoreBooster, "_receiver_context", lambda self, rule: StrictContext(real(self, rule), used))
    return used


@pytest.fixture
def net():
    ports = {"box": free_port(socket.SOCK_DGRAM), "server": free_port(socket.SOCK_DGRAM),
             "tbox": free_port(socket.SOCK_STREAM), "tserver": free_port(socket.SOCK_STREAM)}
    ports["listen"] = [f"udp:127.0.0.1:{ports['box']}=127.0.0.1:{ports['server']}",
                       f"tcp:127.0.0.1:{ports['tbox']}=127.0.0.1:{ports['tserver']}"]
    return ports


async def test_channel_receiver_through_a_strict_context(tmp_path, strict_contexts):
    async with MemoryBox(state=tmp_path) as box:
        b = await box.connect("strict")

        async def async_pass(pkt):
            return Verdict.PASS

        sub = await b.redirect(Match(proto="udp", dst_port=7000), async_pass)
        out = await box.inject(Packet(17, "10.0.0.1", 5000, "10.0.0.2", 7000, b"x"))
        assert out.action == "forwarded"
        assert sub.delegated_socket is None             # the box classifies: no socket handed over
        assert sub.receive_batches(lambda payloads: None) is False
        with pytest.raises(TypeError, match="does not intercept TCP"):
            await sub.connect_onward(_conn(sub.cookie))
        await sub.cancel()
        assert (await box.inject(Packet(17, "10.0.0.1", 5000, "10.0.0.2", 7000, b"y"))).action == "forwarded"
    assert strict_contexts >= {"listen_on_channel", "stop_listening"}


def _conn(cookie):
    from boxcore.booster import InterceptedConnection
    return InterceptedConnection(("127.0.0.1", 1), ("127.0.0.1", 2), cookie)


async def test_delegated_socket_capability_and_socket_receiver(tmp_path, net, strict_contexts):
    client = bound_udp()
    server = bound_udp(net["server"])
    try:
        async with BoxdProcess(tmp_path, listens=net["listen"], http=False) as boxd:
            async with Booster("owner", control=boxd.control, heartbeat=0.05) as a, \
                    Booster("spy", control=boxd.control) as b:
                seen = []
                sub = await a.redirect(Match(proto="udp", dst_port=net["server"]),
                                       lambda pkt: (seen.append(pkt.payload), Verdict.PASS)[1])
                sock = sub.delegated_socket
                assert sock is not None and sock.getsockname() == ("127.0.0.1", net["box"])
                # the booster answers from the box's own address, no hop through boxd
                sock.sendto(b"from the box", client.getsockname())
                assert await recv(client) == (b"from the box", ("127.0.0.1", net["box"]))
                client.sendto(b"one", ("127.0.0.1", net["box"]))
                assert (await recv(server))[0] == b"one"        # PASS re-injected through boxd
                assert seen == [b"one"]

                async def counted():
                    rules = {r["cookie"]: r for r in await boxd.query("rules")}
                    return rules[sub.cookie]["packets"] == 1 and rules[sub.cookie]["bytes"] == 3

                # counted by the receiver, reported with heartbeats
                await until(counted, what="boxd's count of the delegated socket's packet")
                # boxd takes the socket back when another rule comes to share the port
                await b.copy(Match(proto="udp", dst_port=net["server"]), lambda pkt: None)
                await until(lambda: sub.delegated_socket is None, what="undelegate")
                assert sock.fileno() == -1 and sub.delivery.kind == "channel"
                client.sendto(b"two", ("127.0.0.1", net["box"]))
                assert (await recv(server))[0] == b"two"
                await until(lambda: seen == [b"one", b"two"], what="the handler on the channel")
                await sub.cancel()
                assert sub.delegated_socket is None
    finally:
        client.close()
        server.close()
    assert strict_contexts >= {"counter", "verdict", "send", "listen_on_channel", "forget_counter"}


async def test_socket_receiver_fails_open_beyond_the_handler_bound(tmp_path, net, strict_contexts):
    client = bound_udp()
    server = bound_udp(net["server"])
    try:
        async with BoxdProcess(tmp_path, listens=net["listen"], http=False) as boxd:
            async with Booster("held", control=boxd.control, max_handlers_in_flight=1) as b:
                gate = asyncio.Event()

                async def held(pkt):
                    await gate.wait()
                    return Verdict.modify(pkt.payload.upper())

                sub = await b.redirect(Match(proto="udp", dst_port=net["server"]), held)
                assert sub.delegated_socket is not None         # the socket receiver reads it
                client.sendto(b"one", ("127.0.0.1", net["box"]))
                await until(lambda: b.inflight.count == 1, what="the first handler running")
                client.sendto(b"two", ("127.0.0.1", net["box"]))
                assert (await recv(server))[0] == b"two"        # the bound is reached: passed unchanged
                assert b.stats["handlers_refused"] == 1
                gate.set()
                assert (await recv(server))[0] == b"ONE"        # the held one, decided by its handler
                await sub.cancel()
    finally:
        client.close()
        server.close()
    assert "finish_in_task" in strict_contexts


async def test_connect_onward_on_relayed_interception(tmp_path, net, strict_contexts):
    async def upper(reader, writer):
        writer.write((await reader.readline()).upper())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upper, "127.0.0.1", net["tserver"])
    try:
        async with BoxdProcess(tmp_path, listens=net["listen"], http=False) as boxd:
            async with Booster("splicer", control=boxd.control) as booster:
                subs = {}

                async def on_conn(reader, writer, conn):
                    line = await reader.readline()
                    onward_reader, onward_writer = await subs[conn.cookie].connect_onward(conn, timeout=3)
                    onward_writer.write(b"via booster: " + line)
                    await onward_writer.drain()
                    writer.write(await onward_reader.readline())
                    await writer.drain()
                    onward_writer.close()

                sub = await booster.intercept_tcp(Match(proto="tcp", dst_port=net["tserver"]), on_conn)
                subs[sub.cookie] = sub
                reader, writer = await asyncio.open_connection("127.0.0.1", net["tbox"])
                writer.write(b"hello\n")
                assert await asyncio.wait_for(reader.readline(), 5) == b"VIA BOOSTER: HELLO\n"
                writer.close()
                assert sub.delegated_socket is None
                # a link of the booster's own, past its interception
                own_reader, own_writer = await sub.connect_onward(("127.0.0.1", net["tserver"]), timeout=3)
                own_writer.write(b"own link\n")
                assert await asyncio.wait_for(own_reader.readline(), 5) == b"OWN LINK\n"
                own_writer.close()
                with pytest.raises(ValueError, match="intercepted by rule"):
                    await sub.connect_onward(_conn(sub.cookie + 1))
                assert booster.stats["handler_errors"] == 0
    finally:
        server.close()
    assert strict_contexts >= {"accept_streams", "stop_streams"}


# ------------------------------------------------------------------ connect_onward goes to the receiver

class _OnwardReceiver:
    def __init__(self):
        self.calls = []

    async def connect_onward(self, conn, *, spoof_client, timeout):
        self.calls.append((conn, spoof_client, timeout))
        return "reader", "writer"


def _subscription(receiver, cookie=7):
    from boxcore.booster import Subscription
    from boxcore.engines.base import Delivery
    from boxcore.rules import Action, Rule

    rule = Rule(Match(proto="tcp", dst_port=6346), Action.REDIRECT, cookie=cookie)
    return Subscription(None, rule, Delivery("tproxy", {"port": 1}), receiver)


async def test_connect_onward_hands_the_options_to_the_delivery():
    receiver = _OnwardReceiver()
    sub = _subscription(receiver)
    assert await sub.connect_onward(_conn(7), spoof_client=True, timeout=2.5) == ("reader", "writer")
    assert await sub.connect_onward(("10.0.0.9", 6346)) == ("reader", "writer")
    (conn, spoof, timeout), (own, own_spoof, own_timeout) = receiver.calls
    assert (conn, spoof, timeout) == (_conn(7), True, 2.5)
    # the booster's own link: nobody's address to borrow
    assert own.original_dst == ("10.0.0.9", 6346) and own.cookie == 7 and own_spoof is False and own_timeout == 10.0


def test_transparent_interception_connects_onward_marked_and_spoofing():
    import boxcore.receivers.linux as linux
    from boxcore.receivers import get_receiver

    assert get_receiver("tproxy").connect_onward is linux.connect_onward
    assert get_receiver("stream").connect_onward is not linux.connect_onward
