"""run_booster: startup errors become one-line CLI errors (exit 2), the stop ends the run with
status 0 after the tear-down, and boxd going away or a critical task failing ends it loudly
with status 1.  MemoryBox.settle/advance/until raise instead of returning silently."""

import asyncio
import contextlib
import logging
import subprocess
import sys

import pytest

from boxcore.booster import Booster, Conflict, run_booster
from boxcore.packet import Packet
from boxcore.rules import Match
from boxcore.testing import MemoryBox, SettleTimeout
from cliruntime import ConfigError

pytestmark = pytest.mark.timeout(60)


def udp(payload=b"x", dport=7000):
    return Packet(17, "10.0.0.1", 5000, "10.0.0.2", dport, payload)


def recorder():
    """A serve() context manager that records how far it got, and the booster it served."""
    seen = {"setup": False, "teardown": False, "booster": None, "ready": asyncio.Event()}

    @contextlib.asynccontextmanager
    async def serve(booster: Booster):
        seen["booster"] = booster
        await booster.redirect(Match(proto="udp", dst_port=7000), lambda pkt: None)
        seen["setup"] = True
        seen["ready"].set()
        try:
            yield
        finally:
            seen["teardown"] = True
            seen["closed_at_teardown"] = booster.closed

    return serve, seen


async def test_unreachable_boxd_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot connect to boxd") as err:
        await run_booster("b", lambda booster: None, stop=asyncio.Event(), control=tmp_path / "no.sock")
    assert "\n" not in str(err.value)


async def test_refused_name_and_refused_rule_are_config_errors(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        holder = await box.connect("holder")
        await holder.redirect(Match(proto="udp", dst_port=7000), lambda pkt: None)
        with pytest.raises(ConfigError, match="boxd refused booster 'holder'"):
            await run_booster("holder", lambda booster: None, stop=asyncio.Event(), sock=box.control_socket())
        serve, seen = recorder()
        with pytest.raises(ConfigError, match="boxd refused: CONFLICT") as err:
            await run_booster("other", serve, stop=asyncio.Event(), sock=box.control_socket())
        assert isinstance(err.value.__context__, Conflict)
        assert not seen["setup"] and seen["booster"].closed
        assert [r["owner"] for r in box.rules()] == ["holder"]


async def test_stop_tears_down_while_connected_and_returns_0(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        serve, seen = recorder()
        stop = asyncio.Event()
        run = asyncio.create_task(run_booster("b", serve, stop=stop, sock=box.control_socket()))
        await asyncio.wait_for(seen["ready"].wait(), 5)
        assert (await box.inject(udp())).action == "consumed"       # the rule is installed
        stop.set()
        assert await asyncio.wait_for(run, 5) == 0
        assert seen["teardown"] and seen["closed_at_teardown"] is False
        assert seen["booster"].closed and seen["booster"].tasks.active == 0
        await box.until(lambda: not box.rules(), what="boxd removing the rules of a booster that left")


async def test_boxd_going_away_returns_1(tmp_path, caplog):
    async with MemoryBox(state=tmp_path) as box:
        serve, seen = recorder()
        run = asyncio.create_task(run_booster("b", serve, stop=asyncio.Event(), sock=box.control_socket()))
        await asyncio.wait_for(seen["ready"].wait(), 5)
        with caplog.at_level(logging.ERROR, logger="boxcore.booster"):
            await box.controller.stop()
            assert await asyncio.wait_for(run, 5) == 1
        assert seen["teardown"] and seen["closed_at_teardown"] is True
        assert any("boxd went away" in r.getMessage() for r in caplog.records)


async def test_a_critical_task_failure_ends_the_run_loudly(tmp_path, caplog):
    async with MemoryBox(state=tmp_path) as box:
        started = asyncio.Event()
        torn_down = []

        async def watchdog():
            started.set()
            raise RuntimeError("watchdog bug")

        async def per_request():
            raise ValueError("one request failed")

        @contextlib.asynccontextmanager
        async def serve(booster):
            booster.spawn(per_request(), name="request", critical=False)   # logged, counted, no stop
            await asyncio.sleep(0)
            booster.spawn(watchdog(), name="watchdog")
            yield
            torn_down.append(booster.tasks.snapshot())

        with caplog.at_level(logging.WARNING, logger="boxcore.booster"):
            status = await asyncio.wait_for(run_booster("b", serve, stop=asyncio.Event(),
                                                        sock=box.control_socket()), 5)
        assert status == 1 and started.is_set()
        assert torn_down and torn_down[0]["failures"] == {"request": 1, "watchdog": 1}
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("critical task watchdog failed" in m for m in errors)
        assert any("stopping because a critical task failed" in m and "watchdog bug" in m for m in errors)


async def test_a_plain_coroutine_serve(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        ready = asyncio.Event()

        async def setup_only(booster):
            await booster.copy(Match(proto="udp"), lambda pkt: None)
            ready.set()

        stop = asyncio.Event()
        run = asyncio.create_task(run_booster("plain", setup_only, stop=stop, sock=box.control_socket()))
        await asyncio.wait_for(ready.wait(), 5)
        assert (await box.inject(udp())).copies == 1
        stop.set()
        assert await asyncio.wait_for(run, 5) == 0


async def test_teardown_that_needs_boxd_after_it_left_is_logged_not_raised(tmp_path, caplog):
    async with MemoryBox(state=tmp_path) as box:
        ready = asyncio.Event()

        @contextlib.asynccontextmanager
        async def saves_at_exit(booster):
            ready.set()
            yield
            await booster.directory.put("k", 1)       # boxd is gone: BoxdGone

        run = asyncio.create_task(run_booster("saver", saves_at_exit, stop=asyncio.Event(),
                                              sock=box.control_socket()))
        await asyncio.wait_for(ready.wait(), 5)
        with caplog.at_level(logging.WARNING, logger="boxcore.booster"):
            await box.controller.stop()
            assert await asyncio.wait_for(run, 5) == 1
        assert any("tear-down could not reach boxd" in r.getMessage() for r in caplog.records)


def test_example_cli_without_boxd_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "boxcore.examples.udp_counter", "--control",
                           str(tmp_path / "missing.sock"), "--port", "9001"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("booster-example: error: cannot connect to boxd")


# ------------------------------------------------------------------ MemoryBox fails, never hangs silently

async def test_settle_raises_when_a_handler_never_finishes(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        b = await box.connect("stuck")
        never = asyncio.Event()

        async def on_copy(pkt):
            await never.wait()

        await b.copy(Match(proto="udp"), on_copy)
        await box.engine.process(udp())            # a copy: the box does not wait for it
        with pytest.raises(SettleTimeout, match="stuck"):
            await box.settle(timeout=0.2)
        never.set()
        await box.settle()                         # and settles once the handler returns


async def test_settle_raises_when_a_booster_stops_reading(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        b = await box.connect("deaf")
        await b.copy(Match(proto="udp"), lambda pkt: None)
        b.dispatch.detach()                        # its end of the data channel is gone
        box.engine.delivered[b.sid] += 1           # ... after the box pushed one more packet
        with pytest.raises(SettleTimeout, match="deaf"):
            await box.settle(timeout=0.2)


async def test_advance_raises_when_a_timer_coroutine_never_finishes(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        b = await box.connect("slow-timer")
        never = asyncio.Event()

        async def tick():
            await never.wait()

        b.call_later(1.0, tick)
        with pytest.raises(SettleTimeout, match="slow-timer"):
            await box.advance(1.0, timeout=0.2)
        never.set()
        assert await box.advance(1.0) == 0


async def test_until_raises_naming_what_it_waited_for(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        with pytest.raises(SettleTimeout, match="the impossible"):
            await box.until(lambda: False, timeout=0.05, what="the impossible")
        assert await box.until(lambda: 42) == 42
