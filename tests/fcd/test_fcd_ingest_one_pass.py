"""The one-pass ingest (Aggregator.feed_with_lights, Ingest) gives what feeding run by run gives.

A received batch holds probes with light changes among them; a light change must see exactly the
probes before it.  ``Aggregator.feed_per_run`` does that literally (feed each run, then the light
change); ``feed_with_lights`` sorts, slots, map-matches and analyses the whole batch once.  Random
streams from real traces (reordered and stale probes, unknown and very large car ids, probes off
every road and inside junctions, unknown lights, light changes side by side, periodic reports
falling due inside a batch, a car table small enough to evict) go through both, and reports,
counters and every car's state must be equal bit for bit (floats compared with ==).
"""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fcd import wire
from fcd.aggregate import NATIVE_PROBE_DTYPE, Aggregator, Ingest, MapMatcher
from fcd.city import from_sumo_net
from fcd.sim import Simulator

NET = Path(__file__).parent / "data" / "tiny.net.xml"
STATE = ("loc", "road", "lane", "seg", "to_end", "last_road", "entry_t", "entry_valid", "speed", "t_last",
         "car_id", "departures", "crossed", "crossing_time", "samples", "distance", "last_change")


@pytest.fixture(scope="module")
def traces(small_trace):
    """Two cities: the generated grid (lights everywhere) and the SUMO net (internal lanes, a
    junction shape, roads without a light), each with its matcher built once."""
    tiny = Simulator(from_sumo_net(NET), cars=30, seed=1).run(120.0)
    return {name: (trace, MapMatcher(trace.city)) for name, trace in (("grid", small_trace), ("sumo", tiny))}


def _stream(trace, rng: np.random.Generator, steps: int, cars: int, mess: float):
    """Probes of ``steps`` consecutive trace steps (up to ``cars`` cars), messed up: swapped
    neighbours, stale copies sent late, foreign and huge car ids, probes pushed forward along
    their heading (past a lane's end, into a junction) or far off every road.  As native records."""
    times = np.unique(trace.probes["t"])
    first = rng.integers(0, len(times) - steps)
    p = trace.probes[(trace.probes["t"] >= times[first]) & (trace.probes["t"] < times[first + steps])]
    p = p[np.isin(p["car"], rng.permutation(np.unique(p["car"]))[:cars])]
    out = np.empty(len(p), dtype=NATIVE_PROBE_DTYPE)
    for name in NATIVE_PROBE_DTYPE.names:
        out[name] = p[name]
    n = len(out)
    for i in rng.integers(0, max(n - 1, 1), size=int(mess * n)):          # neighbours swapped
        out[[i, i + 1]] = out[[i + 1, i]]
    forward = rng.random(n) < mess                                         # into the junction ahead
    dist = rng.uniform(5, 40, size=n)
    out["x"] = np.where(forward, out["x"] + dist * np.sin(np.radians(out["heading"])), out["x"])
    out["y"] = np.where(forward, out["y"] + dist * np.cos(np.radians(out["heading"])), out["y"])
    off = rng.random(n) < mess / 4
    out["x"] = np.where(off, out["x"] + 5000, out["x"])
    foreign = rng.random(n) < mess / 4
    out["car"] = np.where(foreign, rng.choice([7777, 4_000_000_000, 1 << 21], size=n), out["car"])
    # stale copies: probe i again up to 300 places later
    src = rng.integers(0, n, size=int(mess * n / 2))
    dest = np.minimum(src + rng.integers(1, 300, size=len(src)), n)
    key = np.r_[2 * np.arange(n), 2 * dest + 1]
    return np.concatenate([out, out[src]])[np.argsort(key, kind="stable")]


def _lights(trace, rng: np.random.Generator, probes: np.ndarray, count: int):
    """``count`` light changes at random places (some side by side), at the probes' times there;
    some for lights that do not exist."""
    n_lights = len(trace.city.lights)
    at = np.sort(rng.integers(0, len(probes) + 1, size=count))
    lights = []
    for k in at.tolist():
        t = float(probes["t"][min(k, len(probes) - 1)]) if len(probes) else 0.0
        light = int(rng.integers(0, n_lights + 2))                         # n_lights, n_lights + 1: unknown
        lights.append((light, t, int(rng.integers(0, 16))))
    return at, lights


class PrevSensitive(Aggregator):
    """Map matching that shows, in metres to the lane's end, which segment it started from: in
    these cities the fast path (the car's previous segment) and a full match agree, so a probe
    matched from the wrong previous segment would otherwise go unseen."""

    def _match_from(self, x, y, h, prev):
        road, lane, to_end, seg = super()._match_from(x, y, h, prev)
        return road, lane, to_end + 1e-3 * (prev + 1), seg


def _aggregators(trace, matcher, max_cars: int, unlit_period: float, unlit: np.ndarray, kind=Aggregator):
    def one():
        agg = kind(trace.city, max_cars=max_cars, stale_after=3.0, matcher=matcher, unlit_period=unlit_period)
        if unlit is not None:
            agg.unlit = unlit
        return agg
    return one(), one()


def _same(run_by_run: Aggregator, one_pass: Aggregator) -> None:
    assert one_pass.stats == run_by_run.stats
    for name in STATE:
        assert np.array_equal(getattr(one_pass, name), getattr(run_by_run, name), equal_nan=True), name
    assert one_pass.turns == run_by_run.turns
    assert one_pass.slot_of == run_by_run.slot_of and one_pass.free == run_by_run.free
    assert one_pass.used == run_by_run.used and one_pass.next_tick == run_by_run.next_tick
    assert one_pass.light_mask == run_by_run.light_mask


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(city=st.sampled_from(["grid", "sumo"]), seed=st.integers(0, 2**32 - 1), steps=st.integers(2, 14),
       cars=st.sampled_from([5, 40, 200]), mess=st.sampled_from([0.0, 0.05, 0.3]),
       lights=st.integers(0, 30), batches=st.integers(1, 6), max_cars=st.sampled_from([12, 50, 1000]),
       unlit_period=st.sampled_from([0.0, 1.0, 3.0, 60.0]), unlit_share=st.sampled_from([0.0, 0.3, 1.0]),
       kind=st.sampled_from([Aggregator, PrevSensitive]))
def test_one_pass_equals_run_by_run(traces, city, seed, steps, cars, mess, lights, batches, max_cars,
                                    unlit_period, unlit_share, kind):
    trace, matcher = traces[city]
    rng = np.random.default_rng(seed)
    probes = _stream(trace, rng, steps, cars, mess)
    at, changes = _lights(trace, rng, probes, lights)
    unlit = None
    if unlit_share:      # roads reported every unlit_period (the SUMO net has some without a light anyway)
        unlit = np.flatnonzero(rng.random(trace.city.n_roads) < unlit_share)
    run_by_run, one_pass = _aggregators(trace, matcher, max_cars, unlit_period, unlit, kind)
    cuts = np.unique(np.r_[0, rng.integers(0, len(probes) + 1, size=batches - 1), len(probes)])
    expected, got = [], []
    for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        # light changes in this batch: those after probe lo (the first batch also takes those at 0)
        sel = [j for j, k in enumerate(at.tolist()) if (lo < k <= hi) or (lo == 0 and k == 0)]
        batch_at = np.array([at[j] - lo for j in sel], dtype=np.int64)
        batch_lights = [changes[j] for j in sel]
        expected += run_by_run.feed_per_run(probes[lo:hi], batch_at, batch_lights)
        got += one_pass.feed_with_lights(probes[lo:hi], batch_at, batch_lights)
        _same(run_by_run, one_pass)
    assert got == expected
    if max_cars == 1000:        # room for every car: never run by run
        assert one_pass.passes["per_run"] == 0


def test_a_received_stream_goes_in_one_pass_and_gives_the_reports_of_run_by_run(small_trace):
    """The whole grid trace as a server receives it (light changes every few hundred
    datagrams), in batches of 512: every batch in one pass, with the same reports."""
    city = small_trace.city
    kinds = np.r_[np.zeros(len(small_trace.probes), np.int8), np.ones(len(small_trace.lights), np.int8)]
    times = np.r_[small_trace.probes["t"], small_trace.lights["t"]]
    order = np.lexsort((kinds, times))
    is_light = kinds[order] == 1
    probes = np.empty(len(small_trace.probes), dtype=NATIVE_PROBE_DTYPE)
    for name in NATIVE_PROBE_DTYPE.names:
        probes[name] = small_trace.probes[name]
    probes = probes[np.sort(order[~is_light])]
    lights = small_trace.lights[order[is_light] - len(small_trace.probes)]
    at = np.cumsum(~is_light)[is_light]
    matcher = MapMatcher(city)
    run_by_run, one_pass = (Aggregator(city, max_cars=1000, matcher=matcher) for _ in range(2))
    expected, got = [], []
    for lo in range(0, len(probes), 512):
        sel = ((at > lo) | (lo == 0)) & (at <= lo + 512)
        args = (probes[lo:lo + 512], at[sel] - lo, [(int(l["light"]), float(l["t"]), int(l["green"])) for l in lights[sel]])
        expected += run_by_run.feed_per_run(*args)
        got += one_pass.feed_with_lights(*args)
    assert len(got) > 100 and got == expected
    assert one_pass.passes == {"one_pass": len(range(0, len(probes), 512)), "per_run": 0}
    _same(run_by_run, one_pass)


def test_light_positions_are_checked(small_city):
    agg = Aggregator(small_city, max_cars=10)
    probes = np.zeros(3, dtype=NATIVE_PROBE_DTYPE)
    for at in ([4], [2, 1], [-1]):
        with pytest.raises(ValueError, match="light changes"):
            agg.feed_with_lights(probes, at, [(0, 0.0, 1)] * len(at))
    with pytest.raises(ValueError, match="light changes"):
        agg.feed_with_lights(probes, [1, 2], [(0, 0.0, 1)])


def _datagrams(probes: np.ndarray, at: np.ndarray, lights: list, garbage: list[int]) -> list[bytes]:
    """Probes and light changes as wire datagrams in arrival order, garbage after the given probes."""
    encoded = wire.probes_from_trace(probes, 3, 0)
    size = wire.PROBE_SIZE
    out: list[bytes] = []
    marks = sorted([(int(k), 0, i) for i, k in enumerate(at.tolist())] + [(int(k), 1, i) for i, k in enumerate(garbage)])
    j = 0
    for i in range(len(probes) + 1):
        while j < len(marks) and marks[j][0] == i:
            _, kind, which = marks[j]
            if kind == 0:
                light, t, green = lights[which]
                out.append(wire.encode(wire.LightChange(9, which, light, t, 0, green)))
            else:
                out.append([b"FC\x01\x02junk", b"x" * 80, encoded[:size - 1] + b"\x00" * 20][which % 3])
            j += 1
        if i < len(probes):
            out.append(encoded[i * size:(i + 1) * size])
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), lights=st.integers(0, 12), garbage=st.integers(0, 6))
def test_ingest_of_datagrams_and_of_receive_rows_equals_run_by_run(traces, seed, lights, garbage):
    """Ingest's two doors (datagrams, receive-buffer rows) give the reports run-by-run gives for
    the valid probes and light changes; malformed datagrams are counted and cut nothing."""
    trace, matcher = traces["sumo"]
    rng = np.random.default_rng(seed)
    probes = _stream(trace, rng, 6, 30, 0.05)
    at, changes = _lights(trace, rng, probes, lights)
    bad = np.sort(rng.integers(0, len(probes) + 1, size=garbage)).tolist()
    data = _datagrams(probes, at, changes, bad)
    reference = Ingest(trace.city).aggregator          # the same settings, fed run by run
    expected = reference.feed_per_run(probes, at, changes)
    by_bytes, by_rows = Ingest(trace.city), Ingest(trace.city)
    got_bytes = by_bytes.ingest(data)
    rows = np.zeros((len(data), 64), dtype=np.uint8)
    for i, d in enumerate(data):
        rows[i, :min(len(d), 64)] = np.frombuffer(d[:64], dtype=np.uint8)
    got_rows = by_rows.ingest_slots(rows, np.array([len(d) for d in data]))
    assert got_bytes == expected and got_rows == expected
    for ingest in (by_bytes, by_rows):
        assert ingest.stats == {"datagrams": len(data), "probes": len(probes), "lights": len(changes),
                                "malformed": garbage, "time_ahead": 0}
        assert ingest.aggregator.stats == reference.stats
        assert ingest.seq.snapshot()["received"] == len(probes) + len(changes)
