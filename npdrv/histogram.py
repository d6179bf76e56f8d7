"""A fixed-size log-linear latency histogram (HDR style): bounded memory, ~3% precision."""

from __future__ import annotations

SUB_BUCKETS = 32          # linear sub-buckets per power of two
OCTAVES = 40              # up to 2**40 ns (~18 min)


class LatencyHistogram:
    """Records durations in nanoseconds; reports percentiles in microseconds."""

    def __init__(self) -> None:
        self.counts = [0] * (OCTAVES * SUB_BUCKETS)
        self.total = 0
        self.sum_ns = 0
        self.max_ns = 0
        self.min_ns: int | None = None

    @staticmethod
    def _index(ns: int) -> int:
        if ns < SUB_BUCKETS:
            return max(ns, 0)
        octave = ns.bit_length() - 6          # values in [32, 64) << octave; SUB_BUCKETS == 2**5
        sub = (ns >> octave) - SUB_BUCKETS     # 0..31 within the octave
        return min((octave + 1) * SUB_BUCKETS + sub, OCTAVES * SUB_BUCKETS - 1)

    @staticmethod
    def _value(index: int) -> float:
        """The midpoint of a bucket, in ns."""
        if index < SUB_BUCKETS:
            return float(index)
        octave = index // SUB_BUCKETS - 1
        sub = index % SUB_BUCKETS
        low = (SUB_BUCKETS + sub) << octave
        return low + ((1 << octave) - 1) / 2

    def record(self, ns: int) -> None:
        ns = int(ns)
        self.counts[self._index(ns)] += 1
        self.total += 1
        self.sum_ns += ns
        self.max_ns = max(self.max_ns, ns)
        self.min_ns = ns if self.min_ns is None else min(self.min_ns, ns)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) in microseconds, None when empty."""
        if not self.total:
            return None
        rank = max(1, round(q / 100 * self.total))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return self._value(index) / 1000
        return self.max_ns / 1000  # pragma: no cover - unreachable

    def summary(self) -> dict[str, float | int | None]:
        return {
            "count": self.total,
            "p50_us": self.percentile(50), "p90_us": self.percentile(90),
            "p99_us": self.percentile(99),
            "mean_us": self.sum_ns / self.total / 1000 if self.total else None,
            "min_us": self.min_ns / 1000 if self.min_ns is not None else None,
            "max_us": self.max_ns / 1000 if self.total else None,
        }

    def clear(self) -> None:
        self.__init__()
