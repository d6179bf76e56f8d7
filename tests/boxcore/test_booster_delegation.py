"""A delegated socket taken back for a COPY comes back to the booster when the COPY goes (issue
11), through the booster library and a real boxd on loopback, with a steady stream flowing the
whole time: the redirecting booster sees every packet exactly once, on its socket, on the data
channel while the copy runs, and on its socket again after."""

import asyncio
import os
import socket
import threading
import time

import pytest

from boxcore.booster import Booster
from boxcore.rules import Match
from boxcore.procs import free_port
from boxcore.testing import BoxdProcess
from tests.polling import until

pytestmark = pytest.mark.timeout(90)

POLICY = """
[management]
users = ["root"]

[[grant]]
name = "owner"
boosters = "owner"
actions = ["redirect"]
protocols = ["udp"]
dst_prefixes = ["127.0.0.1/32"]
dst_ports = [{port}]

[[grant]]
name = "watcher"
boosters = "watcher"
actions = ["copy"]
protocols = ["udp"]
dst_prefixes = ["127.0.0.1/32"]
dst_ports = [{port}]
copy_foreign = true
"""


class Seen:
    """Sequence numbers a handler saw; ``await seen.more(n)`` waits for ``n`` more of them."""

    def __init__(self) -> None:
        self.numbers: list[int] = []
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def __call__(self, pkt) -> None:     # a REDIRECT handler returning None consumes the packet
        self.numbers.append(int(pkt.payload))
        for entry in list(self._waiters):
            if len(self.numbers) >= entry[0] and not entry[1].done():
                entry[1].set_result(None)
                self._waiters.remove(entry)

    async def more(self, n: int, timeout: float = 10.0) -> None:
        target = len(self.numbers) + n
        if len(self.numbers) >= target:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        await asyncio.wait_for(fut, timeout)


class SteadyStream(threading.Thread):
    """Numbered datagrams to the box at about 1 kpps from a thread of its own, so that the stream
    keeps flowing while the test holds its event loop (and with it the boosters) still."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            while not self.halt.is_set():
                client.sendto(b"%08d" % self.sent, ("127.0.0.1", self.port))
                self.sent += 1
                time.sleep(0.001)       # pacing, not synchronisation


async def while_the_boosters_stall(coro, stall: float = 0.3):
    """Run ``coro`` while the event loop (and with it every booster) is held still: first
    ``stall`` seconds for the stream to pile up where it is delivered now, then ``coro``'s first
    step (which writes its request to boxd) runs before any pending read, then ``stall`` seconds
    more in which boxd answers, sends its event and goes on delivering.  The booster then finds
    all of it waiting at once, a backlog that boxd sent before its event included."""
    time.sleep(stall)
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)      # ready callbacks run in order: the task's step before any read
    time.sleep(stall)
    return await task


async def test_delegated_socket_comes_back_after_a_copy_with_nothing_lost(tmp_path):
    box_port, server_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(port=server_port))
    async with BoxdProcess(tmp_path, listens=[f"udp:127.0.0.1:{box_port}=127.0.0.1:{server_port}"],
                           http=False, policy=policy, extra=["--user-verdict-timeout", "10"]) as boxd:
        async with Booster("owner", control=boxd.control, heartbeat=0.05) as owner, \
                Booster("watcher", control=boxd.control) as watcher:
            seen = Seen()
            sub = await owner.redirect(Match(proto="udp", dst="127.0.0.1", dst_port=server_port), seen)
            assert sub.delivery.kind == "socket" and sub.delegated_socket is not None
            stream = SteadyStream(box_port)
            stream.start()
            try:
                await seen.more(100)                               # on the delegated socket
                copies = Seen()
                copy = await while_the_boosters_stall(
                    watcher.copy(Match(proto="udp", dst="127.0.0.1", dst_port=server_port), copies))
                await until(lambda: sub.delivery.kind == "channel", "the owner to move to its channel")
                assert sub.delegated_socket is None and owner.stats["undelegated"] == 1
                on_channel = owner.stats["packets"]
                await seen.more(100)
                await copies.more(50)
                assert owner.stats["packets"] > on_channel         # these came on the data channel
                await while_the_boosters_stall(copy.cancel())
                await until(lambda: sub.delivery.kind == "socket", "the socket to come back")
                assert owner.stats["delegated_again"] == 1
                assert sub.delegated_socket is not None and sub.delegated_socket.getsockname() == (
                    "127.0.0.1", box_port)
                read_from_socket = owner.dispatch.counter(sub.cookie).packets
                await seen.more(300)                               # the channel's backlog, then the socket
                assert owner.dispatch.counter(sub.cookie).packets > read_from_socket
            finally:
                stream.halt.set()
                await asyncio.get_running_loop().run_in_executor(None, stream.join)
            sent = stream.sent
            await until(lambda: len(seen.numbers) >= sent, f"all {sent} packets at the owner")
            assert sorted(seen.numbers) == list(range(sent)), "lost or duplicated packets"
            assert owner.stats["handler_errors"] == 0 and owner.stats["packets_unclaimed"] == 0

            async def counted():    # boxd's count for the rule: engine's while shared, the owner's else
                rules = {r["cookie"]: r for r in await boxd.query("rules")}
                return rules[sub.cookie]["packets"] == sent and rules[sub.cookie]

            rule = await until(counted, "boxd's count of the rule")
            assert rule["delivery"] == "socket"
            engine = (await boxd.query("status"))["engine_status"]["counters"]
            assert engine["sockets_undelegated"] == 1 and engine["sockets_redelegated"] == 1
            assert engine.get("verdict_timeouts", 0) == 0


async def test_a_delegation_for_a_rule_the_booster_no_longer_holds_is_closed(tmp_path):
    """boxd's give-back crossing the booster's own cancel: the descriptor is closed, counted."""
    box_port, server_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    async with BoxdProcess(tmp_path, listens=[f"udp:127.0.0.1:{box_port}=127.0.0.1:{server_port}"],
                           http=False) as boxd:
        async with Booster("owner", control=boxd.control) as owner:
            sub = await owner.redirect(Match(proto="udp", dst_port=server_port), lambda p: None)
            spare = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            fd = spare.detach()
            owner._on_event("delegate", {"t": "delegate", "cookie": sub.cookie + 99,
                                         "delivery": {"kind": "socket", "params": {}, "nfds": 1}, "nfds": 1}, [fd])
            assert owner.stats["delegate_refused"] == 1
            with pytest.raises(OSError):
                os.fstat(fd)                    # closed, not leaked
            assert sub.delivery.kind == "socket" and sub.delegated_socket is not None
