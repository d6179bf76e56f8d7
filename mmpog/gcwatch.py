"""How long the garbage collector stops a process: ``GcWatch`` records every collection of generation 1
or 2 (a full, generation-2 collection walks every tracked object of the heap and stops everything the
process serves - all of a bots worker's players at once, or a reflector's whole fan-out).

Used by the bots (each worker's pauses during play go into ``mmpog-bots``' JSON, ``bots_gc``) and by
``mmpog-reflector`` (``/stats`` ``gc``).  Both collect and freeze (``gc.freeze``) what their start-up
left before they serve: measured in docs/mmpog.md ("Cold start"), the first full collection otherwise
came 0.7-0.8 s into play and stopped every bots worker for 110-140 ms.
"""

from __future__ import annotations

import collections
import gc
import time


def freeze_startup_heap() -> None:
    """Collect once, then move every surviving object to the permanent generation: what start-up left
    (imports, the HTTP stack, logins) is long-lived, and later full collections no longer walk it."""
    gc.collect()
    gc.freeze()


class GcWatch:
    """A ``gc.callbacks`` entry (``start()`` / ``stop()``): each collection of generation 1 or 2 as
    ``(monotonic start, generation, milliseconds)``, the last ``keep`` of them, and totals."""

    def __init__(self, keep: int = 4096) -> None:
        self.pauses: collections.deque = collections.deque(maxlen=keep)
        self.count = {1: 0, 2: 0}
        self.max_ms = {1: 0.0, 2: 0.0}
        self._began = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        generation = info["generation"]
        if generation == 0:
            return
        if phase == "start":
            self._began = time.monotonic()
            return
        ms = (time.monotonic() - self._began) * 1000
        self.pauses.append((self._began, generation, ms))
        self.count[generation] += 1
        self.max_ms[generation] = max(self.max_ms[generation], ms)

    def start(self) -> "GcWatch":
        gc.callbacks.append(self)
        return self

    def stop(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def since(self, t0: float) -> list[list]:
        """The recorded pauses from ``t0`` on, as [seconds since t0, generation, ms]."""
        return [[round(began - t0, 4), generation, round(ms, 3)] for began, generation, ms in self.pauses
                if began >= t0]

    def snapshot(self) -> dict:
        return {"gen1_collections": self.count[1], "gen1_max_ms": round(self.max_ms[1], 3),
                "gen2_collections": self.count[2], "gen2_max_ms": round(self.max_ms[2], 3),
                "frozen_objects": gc.get_freeze_count()}
