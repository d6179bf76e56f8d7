"""Waiting, in tests, for a condition that has no event to wait on: the other side's state seen
from outside (boxd's counters over its control socket, a child's log, a kernel table).  One
helper with a deadline, so a test fails with what it waited for rather than hanging, and never
sleeps a guessed time.  Where an event exists (a reply, a datagram, an ``asyncio.Event``,
``MemoryBox.settle``/``until``), wait on that instead."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable

STEP = 0.01
# how long to wait for something that ends the wait itself when it comes (a search returning at its
# first hit): generous, since only a busy host ever waits that long, and a healthy run never does
EVENT_WAIT = 15.0


async def until(predicate: Callable[[], Any], what: str = "the condition", timeout: float = 10.0,
                step: float = STEP) -> Any:
    """Poll ``predicate`` (a function or a coroutine function) until it returns something true,
    and return that; AssertionError naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(step)


def until_sync(predicate: Callable[[], Any], what: str = "the condition", timeout: float = 10.0,
               step: float = STEP) -> Any:
    """:func:`until` for tests without an event loop."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)
    return value
