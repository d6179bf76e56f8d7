"""Every background task of the controller is supervised: the watchdog dying fails boxd loudly,
a per-session worker dying closes that session (logged, counted) and nothing else."""

import asyncio
import logging
import socket
import time

import pytest

from boxcore import wire
from boxcore.controller import OPERATIONS, ControlSession, Controller, ControllerConfig
from boxcore.engines.base import Engine
from boxcore.engines.memory import MemoryEngine
from boxcore.testing import MemoryBox
from cliruntime.supervisor import TaskFailed

pytestmark = pytest.mark.timeout(30)


async def test_watchdog_death_is_critical_and_logged(caplog):
    controller = Controller(MemoryEngine(), ControllerConfig(control_path=None, heartbeat_interval=0.01))
    await controller.start()
    try:
        boxd_end, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sess = controller.adopt(boxd_end)
        sess.observer = True                        # authenticated (a boxctl session)...
        sess.last_seen = time.monotonic() - 3600    # ...and overdue: the watchdog will evict it

        def broken_evict(session, reason):
            raise RuntimeError("evict is broken")

        controller.evict = broken_evict
        with caplog.at_level(logging.ERROR, logger="boxcore.controller"):
            failed = await asyncio.wait_for(controller.wait_failed(), 5)
        assert isinstance(failed, TaskFailed) and "watchdog" in str(failed)
        assert "critical task watchdog failed" in caplog.text and "evict is broken" in caplog.text
        peer.close()
    finally:
        await controller.stop()


async def test_a_dying_session_worker_closes_only_that_session(caplog, monkeypatch):
    async with MemoryBox() as box:
        healthy = await box.connect("healthy")
        original = ControlSession._handle

        async def crash_for_victim(self, msg):
            if isinstance(msg, dict) and msg.get("name") == "victim":
                raise RuntimeError("worker bug")
            return await original(self, msg)

        monkeypatch.setattr(ControlSession, "_handle", crash_for_victim)
        boxd_end, raw = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        victim = box.controller.adopt(boxd_end)
        raw.sendall(wire.encode({"t": "hello", "id": 1, "name": "victim", "version": 1}))
        with caplog.at_level(logging.WARNING):
            await box.until(lambda: victim.closed, what="the victim's session to close")
        assert raw.recv(100) == b""                      # its connection is closed
        assert any(name.startswith("session-") for name in box.controller.tasks.failures)
        assert "worker bug" in caplog.text
        assert box.controller.tasks.failed is None       # boxd goes on
        assert (await healthy.directory.put("k", 1)) is None and await healthy.directory.get("k") == 1


def test_operations_are_an_explicit_table_and_install_tcp_is_on_the_engine():
    assert set(OPERATIONS) == set(wire.REQUESTS)
    assert {name for name, op in OPERATIONS.items() if op.serialized} == {"rule", "cancel", "set_multicast_group"}
    for name, op in OPERATIONS.items():
        assert callable(getattr(Controller, op.handler)), name
    assert "install_tcp" in Engine.__dict__


async def test_set_multicast_group_waits_its_turn_in_the_fifo():
    async with MemoryBox() as box:
        booster = await box.connect("mc")
        async with box.controller._table_lock:            # another table operation is running
            pending = asyncio.ensure_future(booster.set_multicast_group(7, [("10.0.0.1", 5)]))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not pending.done() and 7 not in box.engine.groups
        await pending
        assert box.engine.groups[7] == [("10.0.0.1", 5)]
