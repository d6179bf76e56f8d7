"""The FCD UDP wire format, declared once: car probes and traffic-light changes.

Every datagram is one message, network byte order::

    header   magic "FC" | version u8 (=1) | kind u8 | generator u16 | seq u32
    probe    (kind 1)  car u32 | t f64 | x f32 | y f32 | speed f32 | heading f32      38 bytes
    light    (kind 2)  light u32 | t f64 | phase u8 | green u32                       27 bytes

``seq`` counts per generator (gaps = losses).  ``t`` is the sender's clock in seconds; x/y are
metres in the city's frame; speed m/s; heading degrees clockwise from north.  A car knows where
it is and how it moves, never which road it is on.  ``green`` has bit i set when the light's
i-th controlled road has green.

:func:`decode` checks one datagram strictly; :func:`decode_probe_batch` checks many probes at
once with numpy (same fields, same rules) for the high-rate paths.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from cliruntime.wirefields import Layout

MAGIC = b"FC"
VERSION = 1
KIND_PROBE = 1
KIND_LIGHT = 2

HEADER = Layout("!", (("magic", "2s"), ("version", "B"), ("kind", "B"), ("generator", "H"), ("seq", "I")))
PROBE = HEADER + (("car", "I"), ("t", "d"), ("x", "f"), ("y", "f"), ("speed", "f"), ("heading", "f"))
LIGHT = HEADER + (("light", "I"), ("t", "d"), ("phase", "B"), ("green", "I"))

# the names the rest of fcd uses
PROBE_STRUCT = PROBE.struct
LIGHT_STRUCT = LIGHT.struct
HEADER_STRUCT = HEADER.struct
PROBE_SIZE = PROBE.size
LIGHT_SIZE = LIGHT.size
PROBE_WIRE_DTYPE = PROBE.dtype

MAX_SPEED = 150.0          # m/s; anything faster is garbage
MAX_COORD = 1e7            # metres


class WireDecodeError(ValueError):
    """A datagram that is not a valid FCD message; the text says what was wrong."""


@dataclass(frozen=True, slots=True)
class CarProbe:
    generator: int
    seq: int
    car: int
    t: float
    x: float
    y: float
    speed: float
    heading: float


@dataclass(frozen=True, slots=True)
class LightChange:
    generator: int
    seq: int
    light: int
    t: float
    phase: int
    green: int


def encode(msg: CarProbe | LightChange) -> bytes:
    if isinstance(msg, CarProbe):
        return PROBE_STRUCT.pack(MAGIC, VERSION, KIND_PROBE, msg.generator, msg.seq, msg.car, msg.t,
                                 msg.x, msg.y, msg.speed, msg.heading)
    if isinstance(msg, LightChange):
        return LIGHT_STRUCT.pack(MAGIC, VERSION, KIND_LIGHT, msg.generator, msg.seq, msg.light, msg.t,
                                 msg.phase, msg.green)
    raise TypeError(f"cannot encode {type(msg).__name__}")


def _check_header(data: bytes) -> int:
    if len(data) < HEADER_STRUCT.size:
        raise WireDecodeError(f"datagram of {len(data)} bytes is shorter than the {HEADER_STRUCT.size}-byte header")
    magic, version, kind, _, _ = HEADER_STRUCT.unpack_from(data)
    if magic != MAGIC:
        raise WireDecodeError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireDecodeError(f"unsupported version {version}, expected {VERSION}")
    expected = {KIND_PROBE: PROBE_SIZE, KIND_LIGHT: LIGHT_SIZE}.get(kind)
    if expected is None:
        raise WireDecodeError(f"unknown message kind {kind}")
    if len(data) != expected:
        raise WireDecodeError(f"kind {kind} message must be {expected} bytes, got {len(data)}")
    return kind


def decode(data: bytes) -> CarProbe | LightChange:
    kind = _check_header(data)
    if kind == KIND_PROBE:
        _, _, _, gen, seq, car, t, x, y, speed, heading = PROBE_STRUCT.unpack(data)
        if not (math.isfinite(t) and t >= 0):
            raise WireDecodeError(f"probe time {t!r} is not a finite non-negative number")
        if not (math.isfinite(x) and math.isfinite(y) and abs(x) < MAX_COORD and abs(y) < MAX_COORD):
            raise WireDecodeError(f"probe position ({x!r}, {y!r}) out of range")
        if not (0.0 <= speed <= MAX_SPEED):
            raise WireDecodeError(f"probe speed {speed!r} outside [0, {MAX_SPEED}]")
        if not (0.0 <= heading < 360.0):
            raise WireDecodeError(f"probe heading {heading!r} outside [0, 360)")
        return CarProbe(gen, seq, car, t, x, y, speed, heading)
    _, _, _, gen, seq, light, t, phase, green = LIGHT_STRUCT.unpack(data)
    if not (math.isfinite(t) and t >= 0):
        raise WireDecodeError(f"light time {t!r} is not a finite non-negative number")
    return LightChange(gen, seq, light, t, phase, green)


def probe_valid_mask(arr: np.ndarray) -> np.ndarray:
    """The rules of :func:`decode`, vectorised over a ``PROBE_WIRE_DTYPE`` array."""
    with np.errstate(invalid="ignore"):
        return (
            (arr["magic"] == MAGIC) & (arr["version"] == VERSION) & (arr["kind"] == KIND_PROBE)
            & np.isfinite(arr["t"]) & (arr["t"] >= 0)
            & np.isfinite(arr["x"]) & np.isfinite(arr["y"])
            & (np.abs(arr["x"]) < MAX_COORD) & (np.abs(arr["y"]) < MAX_COORD)
            & (arr["speed"] >= 0) & (arr["speed"] <= MAX_SPEED)
            & (arr["heading"] >= 0) & (arr["heading"] < 360.0)
        )


def decode_probe_batch(datagrams: Iterable[bytes]) -> tuple[np.ndarray, list[bytes], int]:
    """Split datagrams into (valid probes as a numpy array, other-sized datagrams, invalid probe count).

    Datagrams of the probe size are checked vectorised; the rest (light changes and garbage) are
    returned for :func:`decode`.
    """
    probes, others = [], []
    for d in datagrams:
        (probes if len(d) == PROBE_SIZE else others).append(d)
    arr = np.frombuffer(b"".join(probes), dtype=PROBE_WIRE_DTYPE)
    ok = probe_valid_mask(arr)
    bad = int(len(arr) - ok.sum())
    return (arr if bad == 0 else arr[ok]), others, bad


def probes_from_trace(rows: np.ndarray, generator: int, first_seq: int) -> bytes:
    """Encode trace probe rows as consecutive wire datagrams (vectorised, for the generators)."""
    out = np.zeros(len(rows), dtype=PROBE_WIRE_DTYPE)
    out["magic"], out["version"], out["kind"], out["generator"] = MAGIC, VERSION, KIND_PROBE, generator
    out["seq"] = (first_seq + np.arange(len(rows), dtype=np.uint64)) & 0xFFFFFFFF
    for name in ("car", "t", "x", "y", "speed", "heading"):
        out[name] = rows[name]
    return out.tobytes()


DEFAULT_MAX_SKEW = 300.0   # seconds of data time a message may be ahead of the newest accepted one
DEFAULT_MAX_RATE = 100.0   # and, after a quiet time, this many data seconds more per wall second


class DataClock:
    """The newest data time accepted so far, and how far beyond it a message may be.

    Data time is the senders' own clock (replays run it at any speed), so it is never compared
    with the wall clock; but once data has arrived, one message far ahead of it (a spoofed probe
    with ``t=1e12``) would move the model's clock where the real data never catches up.  A
    message more than ``max_skew`` seconds past the newest accepted time, plus ``max_rate`` data
    seconds per wall second since that time was accepted, is refused and counted
    (``refused``): real data after a quiet hour gets in once the wall clock has moved on too
    (at ``max_rate``; a spoofed 1e12 would need centuries).  The first accepted time sets it.
    ``wall`` is the wall clock (monotonic seconds), injectable for tests.
    """

    def __init__(self, max_skew: float = DEFAULT_MAX_SKEW, max_rate: float = DEFAULT_MAX_RATE,
                 wall: Callable[[], float] = time.monotonic) -> None:
        for name, value in (("max_skew", max_skew), ("max_rate", max_rate)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, not {value!r}")
        self.max_skew, self.max_rate, self.wall = max_skew, max_rate, wall
        self.newest: float | None = None
        self.newest_at = 0.0          # wall time when newest was accepted
        self.refused = 0

    @property
    def limit(self) -> float:
        """The latest data time accepted now."""
        if self.newest is None:
            return math.inf
        return self.newest + self.max_skew + self.max_rate * max(0.0, self.wall() - self.newest_at)

    def admit(self, t: float) -> bool:
        """One message's time: True (and the clock advanced) or False (refused, counted)."""
        if t > self.limit:
            self.refused += 1
            return False
        self.advance(t)
        return True

    def admit_mask(self, ts: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """``ok`` without the entries of ``ts`` beyond the limit (counted); the clock is not
        advanced (:meth:`advance` once the batch's accepted times are known)."""
        limit = self.limit
        if limit == math.inf:
            return ok
        within = ts <= limit
        if within.all():          # usual: one comparison and one reduction per batch
            return ok
        ahead = ok & ~within
        self.refused += int(ahead.sum())
        return ok & within

    def advance(self, t: float) -> None:
        if self.newest is None or t > self.newest:
            self.newest = float(t)
            self.newest_at = self.wall()


class SeqTracker:
    """Received and lost counts per generator from sequence numbers (loss = gaps in the span)."""

    def __init__(self, max_generators: int = 4096) -> None:
        self.max_generators = max_generators
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.refused = 0

    def _update(self, gen: int, lo: int, hi: int, count: int) -> None:
        if gen not in self.first:
            if len(self.first) >= self.max_generators:
                self.refused += count
                return
            self.first[gen], self.last[gen], self.received[gen] = lo, hi, 0
        self.first[gen] = min(self.first[gen], lo)
        self.last[gen] = max(self.last[gen], hi)
        self.received[gen] += count

    def add(self, gen: int, seq: int) -> None:
        self._update(gen, seq, seq, 1)

    def add_batch(self, gens: np.ndarray, seqs: np.ndarray) -> None:
        """Datagrams' generators and sequence numbers, in any byte order (the wire's fields are
        big-endian: converted here once, numpy's sorting and reductions on them are ~1/3 slower)."""
        if len(gens) == 0:
            return
        gens, seqs = np.asarray(gens), np.asarray(seqs)
        gens = gens.astype(gens.dtype.newbyteorder("="), copy=False)
        seqs = seqs.astype(seqs.dtype.newbyteorder("="), copy=False)
        first = gens[0]
        if (gens == first).all():           # usual: one generator's run
            self._update(int(first), int(seqs.min()), int(seqs.max()), len(seqs))
            return
        for gen in np.unique(gens):
            sel = seqs[gens == gen]
            self._update(int(gen), int(sel.min()), int(sel.max()), len(sel))

    @property
    def total_received(self) -> int:
        return sum(self.received.values())

    @property
    def total_lost(self) -> int:
        return sum(max(0, self.last[g] - self.first[g] + 1 - self.received[g]) for g in self.first)

    def snapshot(self) -> dict[str, int]:
        return {"received": self.total_received, "lost": self.total_lost, "generators": len(self.first)}
