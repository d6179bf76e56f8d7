"""Where a real bots worker's CPU goes: ``CpuAccount`` wraps named callables and times every
``every``-th call of each with the thread's CPU clock (``time.thread_time``: about 1 us a reading on
this host, so timing every call would be the cost measured); a part's CPU is then its mean sampled
cost times its call count.  Parts may nest (the read inside the wake-up): each is its own estimate.

Used by ``mmpog-bots`` with ``MMPOG_BOTS_ACCOUNT=PREFIX`` in the environment: each bots worker writes
``PREFIX.<pid>.json`` (docs/mmpog.md, "A real bots worker's CPU, part by part").
"""

from __future__ import annotations

import resource
import time
from typing import Any, Callable


class CpuAccount:
    def __init__(self, every: int = 8) -> None:
        if every < 1:
            raise ValueError("every must be at least 1")
        self.every = every
        self.calls: dict[str, int] = {}
        self.sampled: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self._process_start = 0.0
        self._wall_start = 0.0
        self._process = 0.0
        self._wall = 0.0
        self.clock_us = 0.0         # what a timed call of nothing measures: the timing's own share of a window

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function``, timed on every ``every``-th call under ``name`` (one count for all the
        callables wrapped under one name)."""
        calls, sampled, cpu, every = self.calls, self.sampled, self.cpu, self.every
        calls.setdefault(name, 0)
        sampled.setdefault(name, 0)
        cpu.setdefault(name, 0.0)
        clock = time.thread_time

        def timed(*args: Any, **kwargs: Any) -> Any:
            count = calls[name] = calls[name] + 1
            if count % every:
                return function(*args, **kwargs)
            began = clock()
            try:
                return function(*args, **kwargs)
            finally:
                cpu[name] += clock() - began
                sampled[name] += 1

        return timed

    def start(self) -> None:
        """The window the parts are compared with (the process's whole CPU in it): from now to stop()."""
        self.calls.update(dict.fromkeys(self.calls, 0))
        self.sampled.update(dict.fromkeys(self.sampled, 0))
        self.cpu.update(dict.fromkeys(self.cpu, 0.0))
        self.clock_us = _timed_nothing_us()
        self._process_start = _process_cpu()
        self._wall_start = time.monotonic()

    def stop(self) -> None:
        self._process = _process_cpu() - self._process_start
        self._wall = time.monotonic() - self._wall_start

    def report(self) -> dict:
        """Per part: calls, CPU microseconds per call as timed and net of ``clock_us`` (what timing a
        call of nothing measures), CPU seconds (net per call times calls); and the process's own CPU
        seconds and the wall seconds of the window.  Parts that contain timed parts still include
        those parts' timing (about ``2 * clock_us`` per timed inner call)."""
        parts = {}
        for name, calls in self.calls.items():
            sampled = self.sampled[name]
            per_call = self.cpu[name] / sampled * 1e6 if sampled else 0.0
            net = max(0.0, per_call - self.clock_us) if sampled else 0.0
            parts[name] = {"calls": calls, "sampled": sampled, "cpu_s": round(net * calls / 1e6, 4),
                           "us_per_call": round(net, 2), "us_per_call_timed": round(per_call, 2)}
        return {"every": self.every, "clock_us": round(self.clock_us, 3), "process_cpu_s": round(self._process, 4),
                "wall_s": round(self._wall, 4), "parts": parts}


def _timed_nothing_us(rounds: int = 256) -> float:
    """The median CPU microseconds a timed window measures around a call that does nothing."""
    account = CpuAccount.__new__(CpuAccount)
    account.every, account.calls, account.sampled, account.cpu = 1, {}, {}, {}
    nothing = account.wrap("nothing", lambda: None)
    samples = []
    for _ in range(rounds):
        before = account.cpu["nothing"]
        nothing()
        samples.append(account.cpu["nothing"] - before)
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
