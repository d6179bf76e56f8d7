"""What every data-path benchmark counts: stamped packets, their arrival and one-way latency, and
one JSON case per measurement (``booster-loadgen datapath`` on every engine)."""

from __future__ import annotations

import statistics
import struct
import time

from tools.stats import percentile

STAMP = struct.Struct("!QQ")          # sequence, send time (monotonic ns)
SAMPLE_EVERY = 8                      # latency samples: every 8th packet
IDLE_END = 0.6                        # a receiver stops after this long without packets


class Tally:
    """Packets, first/last arrival and sampled one-way latency (from the payload's stamp)."""

    def __init__(self) -> None:
        self.count = 0
        self.first = self.last = 0.0
        self.latencies: list[float] = []

    def packet(self, payload: bytes) -> None:
        t = time.monotonic()
        if not self.count:
            self.first = t
        self.last = t
        self.count += 1
        if self.count % SAMPLE_EVERY == 0 and len(payload) >= STAMP.size:
            self.latencies.append((time.monotonic_ns() - STAMP.unpack_from(payload)[1]) / 1000.0)

    def result(self) -> dict:
        return {"received": self.count, "seconds": max(self.last - self.first, 1e-9),
                "latencies": self.latencies}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def summarize(name: str, blast: dict, paced: dict | None) -> dict:
    """One JSON case: throughput and loss of the blast, latency of the paced run (if any)."""
    lat = (paced or blast)["latencies"]
    out = {
        "case": name,
        "pps": round(blast["received"] / blast["seconds"], 1),
        "loss": round(max(0.0, 1.0 - blast["received"] / max(blast["sent"], 1)), 4),
        "sent": blast["sent"], "received": blast["received"],
        "latency_us": {"p50": _round(percentile(lat, 0.5)), "p99": _round(percentile(lat, 0.99)),
                       "mean": _round(statistics.fmean(lat)) if lat else None},
    }
    if paced is not None:
        out["paced_loss"] = round(max(0.0, 1.0 - paced["received"] / max(paced["sent"], 1)), 4)
    if blast.get("queue"):
        out["queue"] = blast["queue"]
    if "booster_seen" in blast:
        # with a fail-open queue, what the booster could not keep up with passed without it
        out["booster_seen"] = blast["booster_seen"]
        out["booster_share"] = round(blast["booster_seen"] / max(blast["received"], 1), 4)
    return out
