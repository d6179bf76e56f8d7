"""A prediction run's cost without a change in its results: ``Model`` keeps each road's calibrated
level, mean traffic and turn probabilities, recomputed only when that road's history or turn counts
change, and ``Model.light_delay`` computes every second's light state at once.  Replayed side by
side with the code as it was before (``ReferenceModel``: a loop over every road per run, a loop over
every second for every quantity), every prediction and every piece of state they leave behind is
the same bit for bit."""

import numpy as np

from fcd.aggregate import Aggregator
from fcd.model import Model


class ReferenceModel(Model):
    """The model as it computed a run before the caches: the same results, the old cost."""

    @property
    def _mean_rate(self):
        return np.array([np.mean([h[1] for h in hist]) if hist else 0.0 for hist in self.history])

    @_mean_rate.setter
    def _mean_rate(self, value):
        pass

    def _turn_edges(self):
        src, dst, prob = [], [], []
        for road in range(self.city.n_roads):
            for out, p in self.turn_probabilities(road).items():
                src.append(road)
                dst.append(out)
                prob.append(p)
        return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64), np.array(prob)

    def calibrated(self):
        out = self.city.length / self.city.speed
        for r, hist in enumerate(self.history):
            if hist:
                values = np.array(hist, dtype=np.float64)
                travel, rate = values[:, 0], values[:, 1]
                gap = np.log((rate + 0.05) / (self.last_rate[r] + 0.05)) / self.RATE_BANDWIDTH
                w = np.exp(-0.5 * gap * gap)
                inv = (w / np.maximum(travel, 1e-3)).sum() + self.PRIOR_WEIGHT / max(out[r], 1e-3)
                out[r] = (w.sum() + self.PRIOR_WEIGHT) / inv
        return out

    def light_delay(self, now, window):
        R = self.city.n_roads
        ahead = np.full(R, np.nan)
        mean = np.full(R, np.nan)
        ok = (self.lit & ~np.isnan(self.green_start) & ~np.isnan(self.report_t) & ~np.isnan(self.arrival_rate)
              & (self.cycle_r > 0))
        roads = np.flatnonzero(ok)
        if not len(roads):
            return ahead, mean
        lam = np.maximum(self.arrival_rate[roads], 1e-3)
        mu = np.maximum(self.mu[roads], 1e-3)
        C = self.cycle_r[roads]
        g = np.clip(self.green_r[roads], 1.0, C)
        drive = self.city.length[roads] / np.maximum(self.v[roads], 0.5)
        start = np.clip(self.report_t[roads], now - self.DELAY_LOOKBACK, now)
        steps = int(np.ceil(now + window - start.min()))
        gs, rs = self.green_start[roads], self.red_start[roads]
        green_now = np.isnan(rs) | (gs > rs)
        anchored = now - np.where(green_now, gs, rs) < C
        red_at = np.maximum(gs + g, now)
        green_at = np.maximum(np.nan_to_num(rs) + (C - g), now)

        def ahead_green(t):
            return np.where(green_now, (t < red_at) | (((t - red_at) % C) >= C - g),
                            (t >= green_at) & (((t - green_at) % C) < g))

        q = self.report_queue[roads].astype(float)
        total = np.zeros(len(roads))
        counted = np.zeros(len(roads))
        red_seconds = np.zeros(len(roads))
        for k in range(steps):
            t = start.min() + k + 0.5
            active = t >= start
            green = np.where(anchored & (t >= now), ahead_green(t), ((t - gs) % C) < g)
            before = q
            q = np.where(active, np.maximum(q + lam - np.where(green, mu, 0.0), 0.0), q)
            inside = active & (t >= now) & (t < now + window)
            total += np.where(inside, (before + q) / 2, 0.0)
            counted += inside
            red_seconds += inside & ~green
        ahead[roads] = drive + total / np.maximum(counted, 1.0) / lam
        self.red_ahead[:] = 0.0
        self.queue_ahead[:] = 0.0
        self.red_ahead[roads] = red_seconds / np.maximum(counted, 1.0)
        self.queue_ahead[roads] = total / np.maximum(counted, 1.0)
        red = 1.0 - g / C
        x = np.minimum(lam * C / (mu * g), 0.95)
        mean[roads] = drive + C * red * red / (2.0 * (1.0 - x * g / C))
        return ahead, mean


def _same(a, b, what):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what, strict=True)


def _replay_side_by_side(trace, present: bool, window: float | None):
    models = [Model(trace.city), ReferenceModel(trace.city)]
    for model in models:
        model.window = window
    agg = Aggregator(trace.city)
    runs = 0
    next_t = 0.0
    for t, probes, lights in trace.steps():
        agg.feed(probes)
        for ch in lights:
            for rep in agg.light_change(int(ch["light"]), t, int(ch["green"])):
                for model in models:
                    model.observe(rep)
        if models[0].observed and t >= next_t:
            next_t = t + 10.0        # several runs per cycle: runs on unchanged and changed roads
            if present:
                cars, queue, speed = agg.road_states(t)
                for model in models:
                    model.present(t, queue, cars=cars, speed=speed)
            fast, slow = (model.predict(5) for model in models)
            runs += 1
            for name in ("n", "q", "traverse"):
                _same(getattr(fast, name), getattr(slow, name), f"run {runs}: {name}")
            assert (fast.run, fast.t, fast.cycle) == (slow.run, slow.t, slow.cycle)
    fast, slow = models
    for name in ("red_ahead", "queue_ahead", "delay_skill", "corr_A", "corr_b", "corr_beta", "corr_skill",
                 "corr_shrink", "mu", "v", "cycle_r", "green_r"):
        _same(getattr(fast, name), getattr(slow, name), name)
    assert fast.delay_weight == slow.delay_weight and fast.delay_scored == slow.delay_scored
    assert [list(d) for d in fast.to_score] == [list(d) for d in slow.to_score]
    for a, b in zip(fast.corr_pending, slow.corr_pending):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x[:3] == y[:3] and x[4] == y[4]
            _same(x[3], y[3], "features")
    return runs, fast


def test_a_run_predicts_bit_for_bit_as_before_with_the_present_state(small_trace):
    runs, model = _replay_side_by_side(small_trace, present=True, window=None)
    # the replay exercised what the caches keep: histories, turn counts, scored light delays
    assert runs >= 20
    assert sum(len(h) for h in model.history) > 0 and any(model.turn_counts)
    assert model.delay_scored > 0 and model.corr_scored.sum() > 0


def test_a_run_predicts_bit_for_bit_as_before_from_reports_alone(small_trace):
    runs, model = _replay_side_by_side(small_trace, present=False, window=30.0)
    assert runs >= 20 and model.delay_scored > 0


def test_a_road_whose_turn_counts_change_gets_its_new_probabilities(small_city):
    """The kept turn probabilities follow the counts: after a report of road r's turns, the
    edges of r carry Model.turn_probabilities(r), those of every other road are unchanged."""
    from fcd.aggregate import RoadReport
    model = Model(small_city)
    before = model._turn_edges()[2]
    road = next(r for r in range(small_city.n_roads) if len(small_city.turn_probs[r]) > 1)
    out = next(iter(small_city.turn_probs[road]))
    model.observe(RoadReport(road, 10.0, True, queue=0, cars=1, density=0.0, mean_speed=5.0, departures=3,
                             interval=10.0, was_green=True, turns={out: 3}))
    src, dst, prob = model._turn_edges()
    mine = src == road
    assert dict(zip(dst[mine].tolist(), prob[mine].tolist())) == model.turn_probabilities(road)
    assert not np.array_equal(prob[mine], before[mine])
    np.testing.assert_array_equal(prob[~mine], before[~mine])


def _features_before(model, now, level, factor):
    """Model._features as it read the roads each one leads to before: a Python max per road."""
    X = Model._features(model, now, level, factor)
    fill = np.clip(model.state[1] / np.maximum(model.n_max, 1.0), 0.0, 1.5)
    X[:, 8] = [max((fill[o] for o in outs), default=0.0) for outs in model.city.successors]
    return X


ReferenceModel._features = _features_before
