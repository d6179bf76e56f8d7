"""The one percentile behind every published figure (and the one reading of a process's CPU time).

Definition: linear interpolation between closest ranks (Hyndman & Fan type 7, numpy's and
Excel's default): for n sorted samples x[0..n-1] and quantile q in [0, 1], the rank is
h = (n - 1) q and the value x[floor h] + (h - floor h) (x[floor h + 1] - x[floor h]).
p0 is the minimum and p100 the maximum; no samples give None rather than a number.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-quantile (q in [0, 1]) of ``values`` by the type-7 definition above."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside [0, 1]")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summary(values: Sequence[float], quantiles: Sequence[int] = (50, 99), *, scale: float = 1.0,
            digits: int = 2, with_max: bool = False) -> dict[str, float | None]:
    """``{"p50": ..., "p99": ...}`` (and ``"max"``) of ``values`` times ``scale``, rounded."""
    ordered = sorted(v * scale for v in values)

    def rounded(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    out = {f"p{q:g}": rounded(percentile(ordered, q / 100)) for q in quantiles}
    if with_max:
        out["max"] = rounded(ordered[-1] if ordered else None)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far, from /proc/PID/stat (a role
    behind ``ip netns exec`` is the same pid: it execs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sleeps(pid: int) -> int:
    """How many times the process's threads went to sleep (voluntary context switches): each is a
    wake-up to pay for later, which a per-update CPU figure does not show."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    total += int(line.split()[1])
        except OSError:
            pass            # a thread that ended meanwhile
    return total
