"""The fcd server side as workers on Redis streams (``fcd-server --store redis://...``).

One machine's ``fcd-server`` ingests, aggregates and models in one process.  With ``--store`` the
work is split:

- the **front** (``fcd-server --store URL``) keeps the XML-RPC endpoint for the boxes and the raw UDP
  ingest, but aggregates nothing: it validates, splits what it received by *partition* and appends
  it to that partition's stream (``XADD``): box reports as ``rep`` entries, runs of raw probes and
  light changes (in arrival order) as ``raw`` entries.  It also reads the reports the workers
  applied and runs the model on them (as the single server does) and serves ``/status``;
- **workers** (``fcd-server --worker --store URL``, or ``--workers N`` children of the front) read
  the streams as one consumer group.  Each partition is owned by one worker at a time (a lease in
  Redis; workers share the partitions evenly), which map-matches and aggregates its raw probes
  (the expensive part) and applies every road report.

Partitions are the city's districts (vertical stripes, as boxes and generators split a city): a
road belongs to the district of the junction it ends at (its light), a light to its junction's, a
probe to the district of the road it is most likely on (a precomputed table of position cells and
heading octants), so each road's reports come from one partition.  A car crossing a district
border is seen by two workers, as by two boxes.  Every key of a partition carries the hash tag
``{PREFIX.pN}``, so a partition lives on one node of a Redis Cluster and its scripts are atomic.

Exactly once in effect: applying an entry is one Lua script (:data:`APPLY`) that checks that the
worker still holds the partition's lease (a worker that lost it cannot apply), that the entry is
newer than the partition's last applied entry id (a redelivered entry is skipped and counted),
then adds the entry's counts, records the road reports (a report older than or as old as the
road's newest is a duplicate), appends them to the partition's report stream, stores the entry id,
acknowledges the entry and trims the stream below it, all atomically.  A worker that dies leaves
its delivered but unapplied entries pending: when its lease expires another worker takes the
partition and claims them (``XAUTOCLAIM``) before reading new ones.  Nothing is lost, nothing is
counted twice.

Memory: the backlog of a partition (datagrams and reports appended, not yet applied) is bounded
(``max_backlog``); an append beyond it is refused whole and counted (``refused_entries``,
``refused_items``), the report streams are trimmed to ``out_maxlen`` entries.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from cliruntime.supervisor import within
from fcd import wire
from fcd.aggregate import Aggregator, MapMatcher, RoadReport
from fcd.city import City

log = logging.getLogger("fcd.stream")

GROUP = b"fcd-workers"
DEFAULT_PREFIX = "fcd"
DEFAULT_PARTITIONS = 4
LIGHT_SIZE = wire.LIGHT_SIZE
PROBE_SIZE = wire.PROBE_SIZE


class StreamDecodeError(ValueError):
    """A stream entry that is not what a front appends; the text says what was wrong."""


# ---------------------------------------------------------------- keys

@dataclass(frozen=True)
class Keys:
    """The Redis keys of a deployment (``prefix``); a partition's keys share one hash tag."""

    prefix: str = DEFAULT_PREFIX

    def _p(self, p: int, what: str) -> str:
        return f"{self.prefix}:{{{self.prefix}.p{p}}}:{what}"

    def stream(self, p: int) -> str:      # entries appended by the front
        return self._p(p, "in")

    def state(self, p: int) -> str:       # hash: counters, last_id, backlog
        return self._p(p, "state")

    def last_t(self, p: int) -> str:      # hash: road -> time of its newest applied report
        return self._p(p, "last_t")

    def reports(self, p: int) -> str:     # stream of applied reports (the model's input)
        return self._p(p, "reports")

    def owner(self, p: int) -> str:       # the lease: the id of the worker owning the partition
        return self._p(p, "owner")

    @property
    def meta(self) -> str:
        return f"{self.prefix}:meta"

    @property
    def workers(self) -> str:             # sorted set: worker id -> lease expiry (ms)
        return f"{self.prefix}:workers"


# ---------------------------------------------------------------- scripts

# KEYS: state, stream.  ARGV: max backlog, items, then the entry's field/value pairs.
APPEND = """
local items = tonumber(ARGV[2])
local backlog = tonumber(redis.call('HGET', KEYS[1], 'backlog') or '0')
if backlog + items > tonumber(ARGV[1]) then
  redis.call('HINCRBY', KEYS[1], 'refused_entries', 1)
  redis.call('HINCRBY', KEYS[1], 'refused_items', items)
  return false
end
redis.call('HINCRBY', KEYS[1], 'backlog', items)
redis.call('HINCRBY', KEYS[1], 'appended_entries', 1)
redis.call('HINCRBY', KEYS[1], 'appended_items', items)
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
"""

# KEYS: state, last_t, reports, stream, owner.
# ARGV: entry id, worker, source, probes, lights, items, reports maxlen, group, then per report road, t, blob.
# Returns {accepted, duplicates} when applied, {-1} when already applied (redelivered), {-2} when not
# the owner (nothing done).
APPLY = """
if redis.call('GET', KEYS[5]) ~= ARGV[2] then return {-2} end
local function newer(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local last = redis.call('HGET', KEYS[1], 'last_id')
if last and not newer(ARGV[1], last) then
  redis.call('HINCRBY', KEYS[1], 'redelivered', 1)
  redis.call('XACK', KEYS[4], ARGV[8], ARGV[1])
  return {-1}
end
local accepted, duplicates = 0, 0
for i = 9, #ARGV, 3 do
  local road, t = ARGV[i], tonumber(ARGV[i + 1])
  local prev = redis.call('HGET', KEYS[2], road)
  if prev and t <= tonumber(prev) then
    duplicates = duplicates + 1
  else
    redis.call('HSET', KEYS[2], road, ARGV[i + 1])
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'r', ARGV[i + 2], 's', ARGV[3])
    accepted = accepted + 1
  end
end
redis.call('HSET', KEYS[1], 'last_id', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'applied_entries', 1)
redis.call('HINCRBY', KEYS[1], 'applied_items', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'backlog', -tonumber(ARGV[6]))
redis.call('HINCRBY', KEYS[1], 'probes', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'lights', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'reports_' .. ARGV[3], accepted)
redis.call('HINCRBY', KEYS[1], 'duplicate_reports', duplicates)
redis.call('HINCRBY', KEYS[1], 'applied_by:' .. ARGV[2], ARGV[6])
redis.call('XACK', KEYS[4], ARGV[8], ARGV[1])
redis.call('XTRIM', KEYS[4], 'MINID', ARGV[1])
return {accepted, duplicates}
"""

# KEYS: owner.  ARGV: worker, ttl ms.  1 when the lease is (still) ours.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: owner.  ARGV: worker.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# ---------------------------------------------------------------- partitions

class Partitioner:
    """Which partition a road, a light, a probe belongs to (see the module docstring)."""

    MAX_CELLS = 200_000

    def __init__(self, city: City, partitions: int, cell: float = 10.0) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.n = partitions
        self.city = city.with_districts(partitions)
        self.road = np.asarray(city.road_district(), dtype=np.int64)
        self.light = np.asarray(city.light_district(), dtype=np.int64).reshape(-1)
        xmin, ymin, xmax, ymax = city.bbox
        pad = city.match_distance + 2 * cell
        area = (xmax - xmin + 2 * pad) * (ymax - ymin + 2 * pad)
        self.cell = max(cell, math.sqrt(area / self.MAX_CELLS))
        self.ox, self.oy = xmin - pad, ymin - pad
        self.nx = int(math.ceil((xmax - xmin + 2 * pad) / self.cell))
        self.ny = int(math.ceil((ymax - ymin + 2 * pad) / self.cell))
        # the road nearest to each cell centre in each heading octant -> its partition
        matcher = MapMatcher(city, max_distance=city.match_distance + self.cell)
        ii, jj, hh = np.meshgrid(np.arange(self.nx), np.arange(self.ny), np.arange(8), indexing="ij")
        x = self.ox + (ii.ravel() + 0.5) * self.cell
        y = self.oy + (jj.ravel() + 0.5) * self.cell
        heading = hh.ravel() * 45.0
        roads = np.empty(len(x), dtype=np.int64)
        for lo in range(0, len(x), 50_000):
            roads[lo:lo + 50_000] = matcher.locate(x[lo:lo + 50_000], y[lo:lo + 50_000],
                                                   heading[lo:lo + 50_000])[0]
        by_position = city.district_of_xy(x, y)
        self.table = np.where(roads >= 0, self.road[np.maximum(roads, 0)], by_position).astype(np.int16)

    def of_probes(self, arr: np.ndarray) -> np.ndarray:
        """Partition of each probe of a ``PROBE_WIRE_DTYPE`` array."""
        x = arr["x"].astype(np.float64)
        y = arr["y"].astype(np.float64)
        i = np.clip(((x - self.ox) // self.cell).astype(np.int64), 0, self.nx - 1)
        j = np.clip(((y - self.oy) // self.cell).astype(np.int64), 0, self.ny - 1)
        octant = (np.round(arr["heading"].astype(np.float64) / 45.0).astype(np.int64)) % 8
        return self.table[(i * self.ny + j) * 8 + octant]


# ---------------------------------------------------------------- entries

def encode_raw(probes: np.ndarray, lights: list[bytes], at: list[int]) -> dict[bytes, bytes]:
    """A run of probes and the light changes among them: light k comes after the first ``at[k]`` probes."""
    return {b"k": b"raw", b"p": probes.tobytes(), b"l": b"".join(lights),
            b"a": np.asarray(at, dtype="<u4").tobytes()}


def encode_reports(box: str, reports: list[RoadReport]) -> dict[bytes, bytes]:
    return {b"k": b"rep", b"b": box.encode(), b"r": msgpack.packb([r.to_xmlrpc() for r in reports])}


@dataclass
class RawEntry:
    probes: np.ndarray
    lights: list[wire.LightChange]
    at: np.ndarray

    @property
    def items(self) -> int:
        return len(self.probes) + len(self.lights)


def decode_entry(fields: dict[bytes, bytes], n_roads: int) -> RawEntry | tuple[str, list[RoadReport]]:
    """Strict: raises :class:`StreamDecodeError` saying what is wrong."""
    kind = fields.get(b"k")
    if kind == b"raw":
        p, l, a = fields.get(b"p", b""), fields.get(b"l", b""), fields.get(b"a", b"")
        if len(p) % PROBE_SIZE or len(l) % LIGHT_SIZE or len(a) % 4:
            raise StreamDecodeError(f"raw entry sizes {len(p)}/{len(l)}/{len(a)} are not whole records")
        probes = np.frombuffer(p, dtype=wire.PROBE_WIRE_DTYPE)
        at = np.frombuffer(a, dtype="<u4")
        n_lights = len(l) // LIGHT_SIZE
        if len(at) != n_lights or (len(at) and (np.any(np.diff(at.astype(np.int64)) < 0) or at[-1] > len(probes))):
            raise StreamDecodeError("raw entry light positions do not match its lights and probes")
        if not wire.probe_valid_mask(probes).all():
            raise StreamDecodeError("raw entry holds an invalid probe")
        lights = []
        for k in range(n_lights):
            try:
                msg = wire.decode(l[k * LIGHT_SIZE:(k + 1) * LIGHT_SIZE])
            except wire.WireDecodeError as exc:
                raise StreamDecodeError(f"raw entry light {k}: {exc}") from None
            if not isinstance(msg, wire.LightChange):
                raise StreamDecodeError(f"raw entry light {k} is not a light change")
            lights.append(msg)
        return RawEntry(probes, lights, at)
    if kind == b"rep":
        try:
            box = fields[b"b"].decode()
            items = msgpack.unpackb(fields[b"r"], strict_map_key=False)
        except (KeyError, UnicodeDecodeError, ValueError, msgpack.UnpackException) as exc:
            raise StreamDecodeError(f"report entry: {exc}") from None
        if not isinstance(items, list):
            raise StreamDecodeError("report entry: reports must be a list")
        try:
            return box, [RoadReport.from_xmlrpc(item, n_roads) for item in items]
        except ValueError as exc:
            raise StreamDecodeError(f"report entry: {exc}") from None
    raise StreamDecodeError(f"unknown entry kind {kind!r}")


def report_blob(rep: RoadReport) -> bytes:
    return msgpack.packb(rep.to_xmlrpc())


async def ensure_groups(client, keys: Keys, partitions: int) -> None:
    from redis.exceptions import ResponseError
    for p in range(partitions):
        try:
            await client.xgroup_create(keys.stream(p), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


async def partition_states(redis, keys: Keys, partitions: int) -> list[dict[str, Any]]:
    """Every partition's counters (``HGETALL`` of its state), as numbers where they are."""
    out = []
    for p in range(partitions):
        raw = await redis.hgetall(keys.state(p))
        state: dict[str, Any] = {}
        for k, v in raw.items():
            k, v = k.decode(), v.decode()
            state[k] = int(v) if v.lstrip("-").isdigit() else v
        state["owner"] = ((await redis.get(keys.owner(p))) or b"").decode()
        out.append(state)
    return out


def totals(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters summed over partitions; ``applied_by`` per worker."""
    total: collections.Counter = collections.Counter()
    by_worker: collections.Counter = collections.Counter()
    for state in states:
        for k, v in state.items():
            if k.startswith("applied_by:"):
                by_worker[k.split(":", 1)[1]] += v
            elif isinstance(v, int):
                total[k] += v
    return {**dict(total), "applied_by": dict(by_worker)}


def city_fingerprint(city: City) -> str:
    """Front and workers must read one city: its roads' ends and lengths, hashed."""
    import hashlib
    digest = hashlib.sha256()
    digest.update(str(city.n_roads).encode())
    digest.update(np.asarray([(s[0, 0], s[0, 1], s[-1, 0], s[-1, 1]) for s in city.shapes], dtype="<f8").tobytes())
    digest.update(np.asarray(city.length, dtype="<f8").tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- the front

MAX_REFUSED_BOXES = 4096     # boxes whose store refusals are remembered until their next call


class StreamFront:
    """Validates and splits what the server receives; appends it to the partitions' streams.

    :meth:`raw` and :meth:`reports` are synchronous (called from the read path and the XML-RPC
    dispatcher): they queue entries, which :meth:`flush_loop` appends.  The queue is bounded
    (``max_queued`` items); what does not fit is refused and counted."""

    def __init__(self, redis, city: City, partitions: int, keys: Keys = Keys(), max_backlog: int = 200_000,
                 max_queued: int = 200_000) -> None:
        self.redis, self.keys, self.partitions = redis, keys, partitions
        self.city = city
        self.part = Partitioner(city, partitions)
        self.max_backlog, self.max_queued = max_backlog, max_queued
        self.queue: collections.deque = collections.deque()
        self.queued_items = 0
        self.wakeup = asyncio.Event()
        self.flushing = asyncio.Lock()      # one flush at a time: two would interleave a partition's entries
        self.seq = wire.SeqTracker()
        self.clock = wire.DataClock()       # fcd-server shares its own (FcdServer.use_front)
        self.stats = {"datagrams": 0, "probes": 0, "lights": 0, "malformed": 0, "queue_refused": 0,
                      "appended_entries": 0, "refused_entries": 0, "append_errors": 0, "time_ahead": 0}
        self.last_error = ""
        self.refused_by_box: dict[str, int] = {}    # reports refused by the store, not yet told
        self._append = redis.register_script(APPEND)
        self.states: list[dict[str, Any]] = []

    async def start(self) -> None:
        from cliruntime import ConfigError
        city = city_fingerprint(self.city)
        await self.redis.hsetnx(self.keys.meta, "city", city)
        await self.redis.hsetnx(self.keys.meta, "partitions", self.partitions)
        stored = int(await self.redis.hget(self.keys.meta, "partitions"))
        if stored != self.partitions:
            raise ConfigError(f"the store already holds {stored} partitions under prefix "
                              f"{self.keys.prefix!r}, not {self.partitions}")
        if (await self.redis.hget(self.keys.meta, "city")).decode() != city:
            raise ConfigError(f"the store's deployment {self.keys.prefix!r} was set up with another city "
                              "(use that city, or another --prefix)")
        await ensure_groups(self.redis, self.keys, self.partitions)

    def _queue(self, p: int, fields: dict[bytes, bytes], items: int, box: str | None = None) -> bool:
        """Queue one entry of ``items`` items (a box's reports: ``box``); False when refused."""
        if self.queued_items + items > self.max_queued:
            self.stats["queue_refused"] += items
            return False
        self.queue.append((p, fields, items, box))
        self.queued_items += items
        self.wakeup.set()
        return True

    def raw(self, slots: np.ndarray, lengths: np.ndarray) -> None:
        """Received datagrams in order, as rows of their first bytes (see
        :meth:`fcd.aggregate.Ingest.ingest_slots`) and lengths: probes and light changes per partition."""
        n = len(lengths)
        if not n:
            return
        self.stats["datagrams"] += n
        is_probe = lengths == PROBE_SIZE
        arr = np.ascontiguousarray(slots[is_probe, :PROBE_SIZE]).view(wire.PROBE_WIRE_DTYPE)[:, 0]
        valid = wire.probe_valid_mask(arr)
        bad = len(arr) - int(valid.sum())
        self.stats["malformed"] += bad
        clock = self.clock
        refused_before, limit = clock.refused, clock.limit     # the batch against the clock before it
        valid = clock.admit_mask(arr["t"], valid)
        ahead = clock.refused - refused_before
        self.stats["probes"] += len(arr) - bad - ahead
        part = self.part.of_probes(arr)
        good = arr[valid]
        self.seq.add_batch(good["generator"], good["seq"])
        # light changes, with how many probe-sized datagrams came before each
        lights: list[tuple[int, int, bytes]] = []     # (partition, probes before, datagram)
        if not is_probe.all():
            before = np.cumsum(is_probe)
            for i in np.flatnonzero(~is_probe).tolist():
                length = int(lengths[i])
                data = slots[i, :length].tobytes()
                try:
                    if length > slots.shape[1]:
                        raise wire.WireDecodeError(f"datagram of {length} bytes is longer than any FCD message")
                    msg = wire.decode(data)
                except wire.WireDecodeError as exc:
                    self.stats["malformed"] += 1
                    self.last_error = str(exc)
                    continue
                if not isinstance(msg, wire.LightChange):
                    continue
                if msg.t > limit:
                    clock.refused += 1
                    continue
                self.seq.add(msg.generator, msg.seq)
                if not 0 <= msg.light < len(self.part.light):
                    self.stats["malformed"] += 1
                    self.last_error = f"unknown light {msg.light}"
                    continue
                self.stats["lights"] += 1
                lights.append((int(self.part.light[msg.light]), int(before[i]), data))
                clock.advance(msg.t)
        if len(good):
            clock.advance(good["t"].max())
        self.stats["time_ahead"] += clock.refused - refused_before
        for p in range(self.partitions):
            sel = valid & (part == p)
            mine = [(k, d) for q, k, d in lights if q == p]
            if not sel.any() and not mine:
                continue
            cum = np.r_[0, np.cumsum(sel)]
            at = [int(cum[k]) for k, _ in mine]
            probes = arr[sel]
            self._queue(p, encode_raw(probes, [d for _, d in mine], at), len(probes) + len(mine))

    def reports(self, box: str, reports: list[RoadReport]) -> int:
        """Queue a box's reports; how many were taken (the rest: refused at the queue's bound)."""
        by_part: dict[int, list[RoadReport]] = collections.defaultdict(list)
        for rep in reports:
            by_part[int(self.part.road[rep.road])].append(rep)
        taken = 0
        for p, reps in by_part.items():
            if self._queue(p, encode_reports(box, reps), len(reps), box):
                taken += len(reps)
        return taken

    def refused_since(self, box: str) -> int:
        """Reports of ``box`` the store refused at a partition's backlog bound (after the box's
        call was answered) since the last time this was asked; the next answer tells the box."""
        return self.refused_by_box.pop(box, 0)

    async def flush(self) -> None:
        """Append everything queued: each partition's entries in order (one at a time: concurrent
        appends on several connections could reorder them), the partitions side by side."""
        async with self.flushing:
            if not self.queue:
                return
            by_part: dict[int, list] = collections.defaultdict(list)
            for p, fields, items, box in self.queue:
                by_part[p].append((fields, items, box))
            self.queue.clear()
            self.queued_items = 0
            await asyncio.gather(*(self._append_all(p, entries) for p, entries in by_part.items()))

    async def _append_all(self, p: int, entries: list) -> None:
        keys = [self.keys.state(p), self.keys.stream(p)]
        for fields, items, box in entries:
            args: list[Any] = [self.max_backlog, items]
            for k, v in fields.items():
                args += [k, v]
            try:
                res = await self._append(keys=keys, args=args)
            except Exception as exc:   # the store is down or refused: counted, the front keeps serving
                self.stats["append_errors"] += 1
                self.last_error = str(exc)
                continue
            self.stats["refused_entries" if res is None else "appended_entries"] += 1
            if res is None and box is not None and (box in self.refused_by_box
                                                    or len(self.refused_by_box) < MAX_REFUSED_BOXES):
                self.refused_by_box[box] = self.refused_by_box.get(box, 0) + items

    async def flush_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.wakeup.wait()
            self.wakeup.clear()
            await self.flush()
        await self.flush()

    async def refresh_states(self) -> None:
        self.states = await partition_states(self.redis, self.keys, self.partitions)

    def status(self) -> dict[str, Any]:
        return {"front": dict(self.stats), "partitions": self.states, "totals": totals(self.states)}


class ReportReader:
    """The front's model input: the reports the workers applied, read from every partition's report stream."""

    def __init__(self, redis, keys: Keys, partitions: int, n_roads: int) -> None:
        self.redis, self.n_roads = redis, n_roads
        self.last = {keys.reports(p): b"0" for p in range(partitions)}

    async def read(self, count: int = 1000) -> list[tuple[RoadReport, str]]:
        out = []
        for key, last in self.last.items():     # one stream at a time: partitions may live on other nodes
            resp = await self.redis.xread({key: last}, count=count)
            for _, entries in resp or ():
                for entry_id, fields in entries:
                    self.last[key] = entry_id
                    try:
                        rep = RoadReport.from_xmlrpc(msgpack.unpackb(fields[b"r"], strict_map_key=False), self.n_roads)
                    except (KeyError, ValueError, msgpack.UnpackException) as exc:
                        log.warning("bad applied report %s: %s", entry_id, exc)
                        continue
                    out.append((rep, fields.get(b"s", b"raw").decode()))
        return out


# ---------------------------------------------------------------- workers

class Worker:
    """One worker: takes a fair share of the partitions, aggregates and applies their entries."""

    def __init__(self, redis, city: City, keys: Keys = Keys(), name: str | None = None, lease: float = 3.0,
                 batch: int = 32, out_maxlen: int = 100_000, max_cars: int = 100_000) -> None:
        self.redis, self.city, self.keys = redis, city, keys
        self.name = name or f"w{os.getpid()}-{secrets.token_hex(2)}"
        self.lease_ms = int(lease * 1000)
        self.batch, self.out_maxlen, self.max_cars = batch, out_maxlen, max_cars
        self.partitions = 0
        self.part: Partitioner | None = None
        self.matcher: MapMatcher | None = None
        self.owned: dict[int, asyncio.Task] = {}
        self.stats = collections.Counter()
        self._apply = redis.register_script(APPLY)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)

    async def start(self, wait: float = 30.0) -> None:
        deadline = time.monotonic() + wait
        while (stored := await self.redis.hget(self.keys.meta, "partitions")) is None:
            if time.monotonic() > deadline:     # polled: the front's start has no event reaching here
                from cliruntime import ConfigError
                raise ConfigError(f"no fcd front has set up prefix {self.keys.prefix!r} in the store")
            await asyncio.sleep(0.1)
        self.partitions = int(stored)
        if (await self.redis.hget(self.keys.meta, "city") or b"").decode() != city_fingerprint(self.city):
            from cliruntime import ConfigError
            raise ConfigError(f"this worker's city is not the one of deployment {self.keys.prefix!r} "
                              "(front and workers must read the same --city)")
        self.part = Partitioner(self.city, self.partitions)
        self.matcher = MapMatcher(self.city)
        await ensure_groups(self.redis, self.keys, self.partitions)

    def status(self) -> dict[str, Any]:
        return {"worker": self.name, "owned": sorted(self.owned), **dict(self.stats)}

    # ------------------------------------------------------------ leases
    async def _live_workers(self) -> int:
        now = int(time.time() * 1000)
        await self.redis.zadd(self.keys.workers, {self.name: now + self.lease_ms})
        await self.redis.zremrangebyscore(self.keys.workers, "-inf", now)
        return max(1, await self.redis.zcard(self.keys.workers))

    async def balance(self, stop: asyncio.Event, tasks) -> None:
        """Keep leases: renew ours, release beyond a fair share, take free partitions up to it.
        Each owned partition is served by a task of ``tasks`` (a :class:`cliruntime.supervisor.Supervisor`):
        one that fails is logged and counted there, and its partition is left for the next round.

        A round gets one lease to finish: a store that does not answer within it has let our
        leases lapse anyway, and a round stuck on it (seen once: a worker whose leases lapsed
        never came back for its share, and did not stop) would hold this worker out of the
        deployment for good.  The round is cut (``balance_stalled``) and the next one starts
        over; cutting it is safe, as a lease taken but not recorded lapses by itself."""
        lease = self.lease_ms / 1000
        while not stop.is_set():
            try:
                await within(self._balance_round(tasks), lease)
            except asyncio.TimeoutError:
                self.stats["balance_stalled"] += 1
                log.warning("%s: a lease round got no answer from the store within %.1f s; starting over",
                            self.name, lease)
            try:
                await within(stop.wait(), lease / 3)
            except asyncio.TimeoutError:
                pass
        try:
            await within(self._release_all(), lease)
        except asyncio.TimeoutError:          # the leases lapse by themselves
            self.stats["release_stalled"] += 1
            log.warning("%s: releasing its partitions got no answer within %.1f s; they lapse", self.name, lease)

    async def _balance_round(self, tasks) -> None:
        live = await self._live_workers()
        share = math.ceil(self.partitions / live)
        for p, task in list(self.owned.items()):
            if task.done() or not await self._renew(keys=[self.keys.owner(p)], args=[self.name, self.lease_ms]):
                self._drop(p, "lease lost")
        while len(self.owned) > share:
            await self._hand_back(max(self.owned))
            self.stats["released"] += 1
        for p in range(self.partitions):
            if len(self.owned) >= share:
                break
            if p not in self.owned and await self.redis.set(self.keys.owner(p), self.name, nx=True,
                                                              px=self.lease_ms):
                self.stats["acquired"] += 1
                log.info("%s: took partition %d", self.name, p)
                self.owned[p] = tasks.spawn(self.serve(p), name=f"partition{p}", critical=False)

    async def _release_all(self) -> None:
        for p in list(self.owned):
            await self._hand_back(p)
        await self.redis.zrem(self.keys.workers, self.name)

    async def _hand_back(self, p: int) -> None:
        """Stop serving partition ``p`` and release its lease for another worker to take now."""
        await self._stop_partition(p)
        await self._release(keys=[self.keys.owner(p)], args=[self.name])

    def _drop(self, p: int, why: str) -> None:
        task = self.owned.pop(p, None)
        if task is not None:
            if task.done() and not task.cancelled() and task.exception() is not None:
                self.stats["partition_failures"] += 1       # logged by the supervisor
            task.cancel()
        log.info("%s: left partition %d (%s)", self.name, p, why)

    async def _stop_partition(self, p: int) -> None:
        task = self.owned.pop(p, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # ------------------------------------------------------------ one partition
    async def serve(self, p: int) -> None:
        """Entries of partition ``p``: first those pending (delivered to a worker that died), then new ones."""
        stream = self.keys.stream(p)
        aggregator = Aggregator(self.city, max_cars=self.max_cars, matcher=self.matcher)
        start = "0-0"
        while True:          # claim every pending entry before any new one: entries apply in order
            start, entries, _ = await self.redis.xautoclaim(stream, GROUP, self.name, min_idle_time=0,
                                                             start_id=start, count=self.batch)
            for entry_id, fields in entries:
                self.stats["claimed"] += 1
                if not await self._process(p, aggregator, entry_id, fields):
                    return
            if start in (b"0-0", "0-0"):
                break
        while True:
            # the server answers a 500 ms block by then; a read that never returns would keep a
            # partition whose lease balance() goes on renewing: it fails instead, and is retaken
            resp = await within(self.redis.xreadgroup(GROUP, self.name, {stream: ">"}, count=self.batch, block=500),
                                0.5 + self.lease_ms / 1000)
            for _, entries in resp or ():
                for entry_id, fields in entries:
                    if not await self._process(p, aggregator, entry_id, fields):
                        return

    async def _process(self, p: int, aggregator: Aggregator, entry_id: bytes, fields: dict | None) -> bool:
        """Apply one entry; False when the partition's lease is no longer ours (nothing applied)."""
        if fields is None:          # trimmed: it was applied
            return True
        part = self.part
        probes = lights = items = 0
        source = "raw"
        try:
            entry = decode_entry(fields, self.city.n_roads)
        except StreamDecodeError as exc:
            self.stats["malformed_entries"] += 1
            log.warning("%s: entry %s of partition %d: %s", self.name, entry_id, p, exc)
            reports: list[RoadReport] = []
        else:
            if isinstance(entry, RawEntry):
                reports = aggregator.feed_with_lights(entry.probes, entry.at,
                                                      [(light.light, light.t, light.green) for light in entry.lights])
                # only this partition's roads (roads without a light are reported by every aggregator)
                reports = [r for r in reports if part.road[r.road] == p]
                probes, lights, items = len(entry.probes), len(entry.lights), entry.items
            else:
                source = "box"
                _, reports = entry
                items = len(reports)
        args: list[Any] = [entry_id, self.name, source, probes, lights, items, self.out_maxlen, GROUP]
        for rep in reports:
            args += [rep.road, repr(float(rep.t)), report_blob(rep)]
        k = self.keys
        result = await self._apply(keys=[k.state(p), k.last_t(p), k.reports(p), k.stream(p), k.owner(p)], args=args)
        if result[0] == -2:
            self.stats["not_owner"] += 1
            return False
        if result[0] == -1:
            self.stats["redelivered"] += 1
            return True
        self.stats["applied_entries"] += 1
        self.stats["applied_items"] += items
        self.stats["reports"] += int(result[0])
        return True
