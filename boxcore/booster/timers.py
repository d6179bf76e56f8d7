"""``call_later`` / ``call_every`` on the booster's clock (the event loop, or a test's FakeClock)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
from typing import Any, Callable, Protocol

from boxcore.booster.inflight import InFlight

__all__ = ["Timer", "Timers", "Clock"]


class Clock(Protocol):
    def time(self) -> float: ...

    def call_at(self, when: float, fn: Callable, *args: Any) -> Any: ...

    def call_later(self, delay: float, fn: Callable, *args: Any) -> Any: ...


class Timer:
    """A pending ``call_later`` / ``call_every``; :meth:`cancel` stops it."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()


class Timers:
    """The booster's timers.  A timer function may be plain or a coroutine function; a
    coroutine runs as a supervised task, and ``inflight`` counts those still running."""

    def __init__(self, spawn: Callable[..., asyncio.Task], handler_failed: Callable[[Callable], None]) -> None:
        self.clock: Clock | None = None        # set when the booster connects
        self._spawn = spawn
        self._handler_failed = handler_failed
        self.inflight = InFlight()
        self.closed = False

    def close(self) -> None:
        """The booster closed: timers still scheduled do nothing when they come due."""
        self.closed = True

    def call_later(self, delay: float, fn: Callable, *args: Any) -> Timer:
        timer = Timer()

        def fire() -> None:
            if not (timer.cancelled or self.closed):
                self._fire(fn, args)

        timer.handle = self.clock.call_later(delay, fire)
        return timer

    def call_every(self, interval: float, fn: Callable, *args: Any) -> Timer:
        if interval <= 0:
            raise ValueError("interval must be positive")
        timer = Timer()
        clock = self.clock
        start = clock.time()
        ticks = itertools.count(1)

        def fire() -> None:
            if timer.cancelled or self.closed:
                return
            self._fire(fn, args)
            timer.handle = clock.call_at(start + next(ticks) * interval, fire)

        timer.handle = clock.call_at(start + next(ticks) * interval, fire)
        return timer

    def _fire(self, fn: Callable, args: tuple) -> None:
        try:
            result = fn(*args)
        except Exception:
            self._handler_failed(fn)
            return
        if inspect.isawaitable(result):
            self.inflight.enter()

            async def finish() -> None:
                try:
                    await result
                except Exception:
                    self._handler_failed(fn)
                finally:
                    self.inflight.leave()

            self._spawn(finish(), name=f"timer {getattr(fn, '__qualname__', fn)}", critical=False)
