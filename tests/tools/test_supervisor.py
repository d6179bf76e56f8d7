"""cliruntime.supervisor: a task that dies is logged, counted, and fails (or restarts) what it served."""

import asyncio
import logging

import pytest

from cliruntime.supervisor import Supervisor, TaskFailed, first_of


async def test_critical_failure_is_logged_counted_and_reported(caplog):
    seen = []
    async with Supervisor("box", on_failure=lambda name, exc: seen.append((name, str(exc)))) as sup:
        async def boom():
            raise RuntimeError("disk on fire")
        sup.spawn(boom(), name="watchdog")
        failed = await asyncio.wait_for(sup.wait_failed(), 5)
    assert isinstance(failed, TaskFailed) and "watchdog" in str(failed)
    assert isinstance(failed.__cause__, RuntimeError)
    assert sup.failures["watchdog"] == 1 and seen == [("watchdog", "disk on fire")]
    assert any("critical task watchdog failed" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    with pytest.raises(TaskFailed):
        sup.raise_if_failed()


async def test_non_critical_failure_does_not_fail_the_supervisor():
    async with Supervisor("srv") as sup:
        done = asyncio.Event()

        async def bad_request():
            try:
                raise ValueError("one client sent garbage")
            finally:
                done.set()
        sup.spawn(bad_request(), name="request", critical=False)
        await done.wait()
        await asyncio.sleep(0)
        assert sup.failures["request"] == 1 and sup.failed is None


async def test_restarting_task_comes_back():
    runs = []
    finished = asyncio.Event()

    async def flaky():
        runs.append(1)
        if len(runs) < 3:
            raise ConnectionError("peer went away")
        finished.set()
    async with Supervisor("link") as sup:
        sup.spawn_restarting(flaky, name="peer", backoff=0.001)
        await asyncio.wait_for(finished.wait(), 5)
    assert len(runs) == 3 and sup.restarts["peer"] == 2 and sup.failed is None


async def test_close_cancels_everything():
    sup = Supervisor("x")
    started = asyncio.Event()

    async def forever():
        started.set()
        await asyncio.Event().wait()
    task = sup.spawn(forever(), name="forever")
    await started.wait()
    await sup.aclose()
    assert task.cancelled() and sup.active == 0 and sup.failed is None
    with pytest.raises(RuntimeError):
        sup.spawn(forever(), name="late")


async def test_first_of_cancels_the_loser():
    loser_cancelled = asyncio.Event()

    async def slow():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            loser_cancelled.set()
            raise

    async def fast():
        return 7
    assert await first_of(slow(), fast()) == 7
    assert loser_cancelled.is_set()
