"""Test your booster without a box: an in-process boxd, a fake clock, helpers.

::

    from boxcore.testing import MemoryBox
    from boxcore.packet import Packet

    async def test_my_booster(tmp_path):
        async with MemoryBox(state=tmp_path) as box:
            booster = await box.connect("my-booster")      # a real Booster, in process
            await setup_my_booster(booster)                # your code: redirect/copy/timers...
            outcome = await box.inject(Packet(17, "10.0.0.1", 5000, "10.0.0.2", 7000, b"hi"))
            assert outcome.action == "consumed"
            assert box.sent() == []                        # nothing left the box
            await box.advance(1.0)                         # fire the booster's timers
            assert box.sent()[0].payload == b"summary"

``MemoryBox`` runs the real controller (policy, arbitration, directory) with
the ``memory`` engine; boosters talk to it over in-process socketpairs, so no
network socket is opened and every packet is handled before ``inject``
returns.  ``FakeClock`` drives the booster's ``call_later`` / ``call_every``;
``box.advance(seconds)`` moves it and waits for what the timers started.
``settle`` / ``advance`` / ``until`` raise :class:`SettleTimeout` rather than
return when what they wait for does not happen.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

from boxcore.booster import Booster
from boxcore.controller import Controller, ControllerConfig
from boxcore.engines.memory import MemoryEngine, Outcome
from boxcore.packet import Packet
from boxcore.procs import free_port
from cliruntime.supervisor import within

__all__ = ["FakeClock", "MemoryBox", "Outcome", "SettleTimeout", "BoxdProcess"]


class SettleTimeout(AssertionError):
    """The box or a booster did not get where a test waited for it in time."""


class _Handle:
    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when: float, fn: Callable, args: tuple) -> None:
        self.when, self.fn, self.args, self.cancelled = when, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A clock that moves only when told: ``time()``, ``call_later``, ``call_at``, ``advance``."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._heap: list[tuple[float, int, _Handle]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, fn: Callable, *args: Any) -> _Handle:
        handle = _Handle(when, fn, args)
        heapq.heappush(self._heap, (when, next(self._seq), handle))
        return handle

    def call_later(self, delay: float, fn: Callable, *args: Any) -> _Handle:
        return self.call_at(self.now + max(0.0, delay), fn, *args)

    def run_due(self) -> int:
        """Run every callback due at the current time; returns how many ran."""
        ran = 0
        while self._heap and self._heap[0][0] <= self.now:
            _, _, handle = heapq.heappop(self._heap)
            if not handle.cancelled:
                handle.fn(*handle.args)
                ran += 1
        return ran

    async def advance(self, seconds: float) -> int:
        """Move time forward, running timers in order; lets spawned coroutines run too."""
        target = self.now + seconds
        ran = 0
        while self._heap and self._heap[0][0] <= target:
            self.now = max(self.now, self._heap[0][0])
            ran += self.run_due()
            await _yield_loop()
        self.now = target
        await _yield_loop()
        return ran

    @property
    def pending(self) -> int:
        return sum(1 for _, _, h in self._heap if not h.cancelled)


async def _yield_loop(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class MemoryBox:
    """An in-process boxd on the memory engine (see the module docstring)."""

    def __init__(self, *, state: str | Path | None = None, policy: Any = None,
                 clock: FakeClock | None = None, verdict_timeout: float = 5.0) -> None:
        self.clock = clock or FakeClock()
        self.engine = MemoryEngine(verdict_timeout=verdict_timeout)
        self._tmp: tempfile.TemporaryDirectory | None = None
        if state is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bbmemorybox")
            state = self._tmp.name
        self.state = Path(state)
        self.policy = policy
        self.directory = None
        self.controller: Controller | None = None
        self.boosters: list[Booster] = []

    async def __aenter__(self) -> "MemoryBox":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def start(self) -> None:
        from boxcore.directory import Directory

        self.state.mkdir(parents=True, exist_ok=True)
        self.directory = Directory(self.state / "directory.sqlite3")
        # heartbeats are real time: make them irrelevant to a unit test
        config = ControllerConfig(control_path=None, heartbeat_interval=3600.0)
        self.controller = Controller(self.engine, config, policy=self.policy, directory=self.directory)
        await self.controller.start()

    async def stop(self) -> None:
        for booster in self.boosters:
            await booster.close()
        if self.controller is not None:
            await self.controller.stop()
        if self.directory is not None and hasattr(self.directory, "close"):
            self.directory.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def connect(self, name: str, **kwargs: Any) -> Booster:
        """A connected :class:`Booster` named ``name`` using this box's fake clock."""
        booster = Booster(name, control="<memory>", sock=self.control_socket(), clock=self.clock, **kwargs)
        await booster.connect()
        self.boosters.append(booster)
        return booster

    def control_socket(self) -> socket.socket:
        """A control connection to this box (the booster's end), for a Booster made elsewhere:
        ``run_booster(name, serve, stop=stop, sock=box.control_socket(), clock=box.clock)``."""
        boxd_end, booster_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.controller.adopt(boxd_end)
        return booster_end

    async def inject(self, pkt: Packet) -> Outcome:
        """Send ``pkt`` through the box; returns once every booster has handled it."""
        outcome = await self.engine.process(pkt)
        await self.settle()
        return outcome

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every booster has read what the box pushed to it (copies included) and its
        coroutine handlers have finished.  Raises :class:`SettleTimeout` after ``timeout`` seconds
        (a booster that stopped reading, or a handler that never returns)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # The data channel has no event to wait on: poll its read count (cheap, bounded).
        while True:
            behind = [b.name for b in self.boosters
                      if not b.closed and self._consumed(b) < self.engine.delivered.get(b.sid, 0)]
            if not behind:
                break
            if loop.time() >= deadline:
                raise SettleTimeout(f"boosters {behind} did not read what the box pushed within {timeout}s")
            await asyncio.sleep(0.001)
        running = [b for b in self.boosters if not b.closed and b.inflight.count]
        if running:
            try:
                await within(asyncio.gather(*(b.inflight.wait_idle() for b in running)),
                             max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise SettleTimeout(f"handlers of boosters {[b.name for b in running]} still running "
                                    f"after {timeout}s") from None
        await _yield_loop()

    async def advance(self, seconds: float, timeout: float = 5.0) -> int:
        """Move the fake clock and wait until the timers' coroutines (e.g. directory
        writes) have finished; returns how many timers fired.  Raises :class:`SettleTimeout`
        if they have not finished within ``timeout`` seconds."""
        ran = await self.clock.advance(seconds)
        running = [b for b in self.boosters if b.timers.inflight.count]
        if running:
            try:
                await within(asyncio.gather(*(b.timers.inflight.wait_idle() for b in running)), timeout)
            except asyncio.TimeoutError:
                raise SettleTimeout(f"timer coroutines of {[b.name for b in running]} still running "
                                    f"after {timeout}s") from None
        await self.settle(timeout=timeout)
        return ran

    async def until(self, predicate: Callable[[], Any], timeout: float = 5.0, what: str = "the condition") -> Any:
        """Wait until ``predicate()`` is true (for what has no event: e.g. the box handling a
        packet a booster sent); raises :class:`SettleTimeout` after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (value := predicate()):
            if loop.time() >= deadline:
                raise SettleTimeout(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.001)
        return value

    @staticmethod
    def _consumed(booster: Booster) -> int:
        return booster.stats["packets"] + booster.stats["packets_unclaimed"]

    def sent(self, why: str | None = None) -> list[Packet]:
        """Packets the box emitted (forwarded, modified, injected by boosters, multicast)."""
        return [e.packet for e in self.engine.emitted if why is None or e.why == why]

    def clear_sent(self) -> None:
        self.engine.emitted.clear()

    def rules(self) -> list[dict[str, Any]]:
        return self.controller.rules_view()


# ------------------------------------------------------------------ real processes


class BoxdProcess:
    """``boxd`` as a real child process (integration tests, the demo, benchmarks).

    ::

        async with BoxdProcess(workdir, listens=["udp:127.0.0.1:9000=127.0.0.1:9001"]) as boxd:
            ...  # boxd.control, boxd.http_url, await boxd.query("rules")
    """

    def __init__(self, workdir: str | Path, *, engine: str = "user", listens: list[str] = (),
                 http: bool = True, policy: str | Path | None = None, extra: list[str] = (),
                 state: str | Path | None = None, log_level: str = "info",
                 heartbeat: float | None = None, heartbeat_misses: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.engine = engine
        self.control = self.workdir / "boxd.sock"
        self.state = Path(state) if state else self.workdir / "state"
        self.http_port = free_port(socket.SOCK_STREAM) if http else None
        self.args = ["--engine", engine, "--control", str(self.control), "--state", str(self.state),
                     "--log-level", log_level, "--stats-json", str(self.workdir / "boxd-stats.json")]
        if http:
            self.args += ["--http", f"127.0.0.1:{self.http_port}"]
        if policy:
            self.args += ["--policy", str(policy)]
        if heartbeat is not None:
            self.args += ["--heartbeat", str(heartbeat)]
        if heartbeat_misses is not None:
            self.args += ["--heartbeat-misses", str(heartbeat_misses)]
        for spec in listens:
            self.args += ["--listen", spec]
        self.args += list(extra)
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = self.workdir / "boxd.log"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def __aenter__(self) -> "BoxdProcess":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def start(self, timeout: float = 15.0) -> None:
        import sys

        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "boxcore.boxd", *self.args, stdout=log, stderr=log)
        log.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"boxd exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                await self.query("status")
                if self.http_port is None or await self._http_ready():
                    return
            except (OSError, Exception):
                pass
            await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"boxd did not come up: {self.log_path.read_text()[-2000:]}")

    async def _http_ready(self) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.http_port)
        except OSError:
            return False
        writer.close()
        return True

    async def query(self, what: str, timeout: float = 2.0) -> Any:
        from boxcore.boxctl import query_control

        return await asyncio.get_running_loop().run_in_executor(None, query_control, str(self.control), what,
                                                                timeout)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit status."""
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return await within(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            return await self.proc.wait()
