"""Trace files: what the simulator (or SUMO) produced, what the generators replay.

One ``.npz`` file (numpy's zip of arrays, no pickle) holding:

- ``probes``: structured array ``PROBE_DTYPE`` (t, car, x, y, speed, heading, road), sorted by
  time then car.  ``road`` is the simulator's ground truth (-1 unknown); it never goes on the wire.
- ``lights``: structured array ``LIGHT_DTYPE`` (t, light, phase, green mask), sorted by time.
  At equal times probes come before light changes: a light change at ``t`` sees the probes of ``t``.
- ``city``: the city description as UTF-8 JSON bytes (``fcd.city.City.to_dict``).
- ``meta``: UTF-8 JSON bytes (seed, cars, duration, dt, source).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fcd.city import City

PROBE_DTYPE = np.dtype([("t", "<f8"), ("car", "<u4"), ("x", "<f4"), ("y", "<f4"),
                        ("speed", "<f4"), ("heading", "<f4"), ("road", "<i4")])
LIGHT_DTYPE = np.dtype([("t", "<f8"), ("light", "<u4"), ("phase", "u1"), ("green", "<u4")])


class TraceError(ValueError):
    """A trace file that cannot be read or does not hold a trace; the text says which and why."""


@dataclass
class Trace:
    city: City
    probes: np.ndarray
    lights: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path = Path(path)
        with open(path, "wb") as fh:
            np.savez(
                fh, probes=self.probes, lights=self.lights,
                city=np.frombuffer(json.dumps(self.city.to_dict()).encode(), dtype=np.uint8),
                meta=np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8),
            )

    @classmethod
    def load(cls, path: Path) -> "Trace":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                probes = data["probes"]
                lights = data["lights"]
                city = City.from_dict(json.loads(bytes(data["city"]).decode()))
                meta = json.loads(bytes(data["meta"]).decode())
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise TraceError(f"cannot read trace {path}: {exc}") from None
        if probes.dtype != PROBE_DTYPE or lights.dtype != LIGHT_DTYPE:
            raise TraceError(f"{path}: trace arrays have an unexpected layout")
        return cls(city, probes, lights, meta)

    @property
    def duration(self) -> float:
        ends = [a["t"].max() for a in (self.probes, self.lights) if len(a)]
        starts = [a["t"].min() for a in (self.probes, self.lights) if len(a)]
        return float(max(ends) - min(starts)) if ends else 0.0

    def steps(self) -> Iterator[tuple[float, np.ndarray, np.ndarray]]:
        """(t, probes at t, light changes at t) in time order."""
        times = np.union1d(np.unique(self.probes["t"]), np.unique(self.lights["t"]))
        p_bounds = np.searchsorted(self.probes["t"], times, side="left")
        p_ends = np.searchsorted(self.probes["t"], times, side="right")
        l_bounds = np.searchsorted(self.lights["t"], times, side="left")
        l_ends = np.searchsorted(self.lights["t"], times, side="right")
        for i, t in enumerate(times):
            yield float(t), self.probes[p_bounds[i]:p_ends[i]], self.lights[l_bounds[i]:l_ends[i]]
