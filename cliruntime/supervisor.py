"""Supervised background tasks: none dies silently.

Every long-lived asyncio task of the suite is started through a :class:`Supervisor`.  When a task
ends with an exception (not a cancellation) the supervisor logs it with its traceback, counts it
under the task's name in :attr:`Supervisor.failures`, and then:

- a *critical* task (the default) fails the supervisor: :attr:`failed` holds the exception,
  :meth:`wait_failed` returns it (so the owner can stop what the task served, loudly), and
  ``on_failure`` is called;
- a task started with ``restart=True`` is started again from its factory after ``backoff``
  seconds (doubling to ``max_backoff``), counted in :attr:`restarts`;
- a task started with ``critical=False`` (per-request or per-connection work) is only logged and
  counted: it served one client, and that client's connection is what fails.

``async with Supervisor(...)`` cancels and awaits every task on exit, like a task group, but
does not cancel siblings when one per-request task fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

T = TypeVar("T")

log = logging.getLogger("cliruntime.supervisor")

Factory = Callable[[], Coroutine[Any, Any, Any]]


class TaskFailed(RuntimeError):
    """A critical supervised task ended with an exception (chained as ``__cause__``)."""


class Supervisor:
    def __init__(self, name: str, *, logger: logging.Logger | None = None,
                 on_failure: Callable[[str, BaseException], None] | None = None) -> None:
        self.name = name
        self._log = logger or log
        self._on_failure = on_failure
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._failed_event = asyncio.Event()
        self.failed: TaskFailed | None = None
        self.failures: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()

    # ------------------------------------------------------------------ starting tasks
    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str, critical: bool = True) -> asyncio.Task:
        """Run ``coro`` as a supervised task named ``name``."""
        if self._closing:
            coro.close()
            raise RuntimeError(f"supervisor {self.name} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, name, critical))
        return task

    def spawn_restarting(self, factory: Factory, *, name: str, backoff: float = 0.1,
                         max_backoff: float = 5.0) -> asyncio.Task:
        """Run ``factory()``; whenever it fails, log, count and start it again after a backoff."""

        async def keep_running() -> None:
            delay = backoff
            while True:
                try:
                    await factory()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.failures[name] += 1
                    self.restarts[name] += 1
                    self._log.error("%s: task %s failed, restarting in %.2fs: %s", self.name, name, delay, exc,
                                    exc_info=exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, max_backoff)

        return self.spawn(keep_running(), name=name, critical=True)

    def _done(self, task: asyncio.Task, name: str, critical: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self.failures[name] += 1
        if not critical:
            self._log.warning("%s: task %s failed: %r", self.name, name, exc, exc_info=exc)
            return
        self._log.error("%s: critical task %s failed: %r", self.name, name, exc, exc_info=exc)
        if self.failed is None:
            self.failed = TaskFailed(f"{self.name}: task {name} failed: {exc!r}")
            self.failed.__cause__ = exc
            self._failed_event.set()
        if self._on_failure is not None:
            self._on_failure(name, exc)

    # ------------------------------------------------------------------ watching
    @property
    def active(self) -> int:
        return len(self._tasks)

    async def wait_failed(self) -> TaskFailed:
        """Returns the first critical failure, when there is one."""
        await self._failed_event.wait()
        assert self.failed is not None
        return self.failed

    def raise_if_failed(self) -> None:
        if self.failed is not None:
            raise self.failed

    def snapshot(self) -> dict[str, Any]:
        return {"active": self.active, "failures": dict(self.failures), "restarts": dict(self.restarts)}

    # ------------------------------------------------------------------ stopping
    async def aclose(self) -> None:
        """Cancel every task and wait for them all to end."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> "Supervisor":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


async def first_of(*awaitables: Awaitable[Any]) -> Any:
    """Await whichever finishes first, cancel the rest; its result (or exception) is returned."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """``aw`` with a deadline (TimeoutError after ``timeout`` seconds), awaited in the calling task.

    Used instead of :func:`asyncio.wait_for`, which on Python 3.11 runs ``aw`` in a task of its own
    and returns its result when the caller is cancelled in the loop iteration where ``aw``
    finishes: that cancellation is lost, and a task being stopped goes on (a gnutella servent's stop
    once opened a link that nothing closed).  Awaited in place, under :func:`asyncio.timeout`, a
    cancellation always lands.
    """
    async with asyncio.timeout(timeout):
        return await aw
