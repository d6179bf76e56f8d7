"""The traffic prediction model (after Peytchev et al.), extended with traverse times.

Per road r two state variables, sampled where the road's light cycle starts (the start of its
green): the queue at its exit light q_r and the cars on the road n_r (density
rho_r = n_r / (L_r lanes_r)).  One step k is one light cycle C.  With green time g_r per cycle
(gamma_r = g_r / C), discharge rate mu_r (cars per second of green), mean moving speed v_r,
length L_r and turning probabilities P[p->r] (only roads p that end where r starts):

    m_r(k-1)  = n_r(k-1) - q_r(k-1)                                   moving cars
    delta_r   = min(1, g_r v_r / L_r)          share of moving cars reaching the light during green
    alpha_r   = min(1, C v_r / L_r)            share reaching it within the cycle
    s_r(k)    = min(q_r(k-1) + delta_r m_r(k-1), mu_r g_r)             served during green
    in_r(k)   = sum_p P[p->r] s_p(k)                                   cars turning in
    q_r(k)    = q_r(k-1) + delta_r m_r(k-1) - s_r(k)                   left over after green
                + (alpha_r - delta_r) m_r(k-1) + (1 - gamma_r) in_r(k) + arrivals during red
    n_r(k)    = min(n_r(k-1) + in_r(k) - s_r(k), n_max_r)

Linear in (n, q) between the saturation bounds (the min terms).  Iterating gives predictions any
number of cycles ahead.  Traverse time = driving time + queueing time:

    T_r(k) = L_r / v_r + C q_r(k) / (mu_r g_r) + (C - g_r)^2 / (2 C)

(the last term is the mean wait at a red light for a car that arrives at a random moment).

Everything is learned from the reports, per road:

- light timing from the observed switches (not the static program, which actuated and delay-based
  lights do not follow): cycle = time between two starts of green, green = time from the start
  of green to the start of red (yellow counts as green), exponentially weighted; the program is
  only the prior.  C is the median learned cycle, g_r = C x (learned green share of r);
- mu_r (saturation flow) from departures during green intervals that started with a queue at
  least as long as the departures, as an exponentially weighted mean (otherwise the largest
  rate seen); P[p->r] from observed turn counts with the city's prior as one pseudo-observation;
  v_r as an exponentially weighted mean of the reported moving speeds;
- traverse time calibrated against what the probes took: the reports' car-seconds and metres on
  each road give its observed travel time (length x car-seconds / metres, SUMO's edgeData
  definition) over windows of whole light cycles (at least MIN_WINDOW seconds; roads without a
  light: every report).  A road's level is the harmonic mean of its last HISTORY observations
  and its free-flow time (one pseudo-observation; alone before any observation).  The harmonic
  mean, not the arithmetic one, because a travel time's error is judged relative to the time
  itself (MAPE): the predictor minimising it sits below the mean of a skewed distribution, and
  a road's travel times are skewed (a car through on green, a car that waited a whole red).
- where in its light cycle the coming window falls (``window`` seconds, one cycle by default):
  per light-controlled road, car-seconds and metres are kept by position in the learned cycle
  (BINS bins, fading with PROFILE_MEMORY); the level is scaled by the window's travel time
  relative to a whole cycle's (bounded to 1/PROFILE_RANGE..PROFILE_RANGE).

T_r(0) is that calibrated prediction; later steps follow the structural model's relative change
T_r(k) / T_r(0) (the structural T above, with the learned parameters and the newest state).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from fcd.aggregate import RoadReport
from fcd.city import CAR_SPACING, City

DEFAULT_DISCHARGE = 0.5     # cars per second of green, per lane, before any estimate
EWMA = 0.3


@dataclass
class Prediction:
    run: int
    t: float                   # time of the newest data used
    cycle: float
    n: np.ndarray              # (H+1, R) cars per road, step 0 = now
    q: np.ndarray              # (H+1, R) queue per road
    traverse: np.ndarray       # (H+1, R) seconds


class Model:
    HISTORY = 16           # observed travel-time windows kept per road
    MIN_WINDOW = 30.0      # seconds of data per observation window
    MAX_TRAVERSE = 3600.0  # an observation above this (cars standing still) is capped
    BINS = 8               # positions in the light cycle the travel-time profile tells apart
    PROFILE_MEMORY = 600.0 # seconds: older observations fade with this time constant
    PROFILE_RANGE = 4.0    # the cycle position changes a prediction by at most this factor

    def __init__(self, city: City, turn_prior: float = 1.0) -> None:
        self.city = city
        R = city.n_roads
        self.lit = city.exit_light >= 0
        # light timing: the program is the prior, observed switches take over
        self.cycle_r = np.full(R, np.nan)
        self.green_r = np.full(R, np.nan)
        for light in city.lights:
            for road in light.roads:
                self.cycle_r[road] = light.cycle
                self.green_r[road] = light.green_time(road)
        self.green_start = np.full(R, np.nan)
        self.timing_observed = np.zeros(R, dtype=np.int64)
        self.cycle = 60.0
        self.green = np.full(R, self.cycle)
        self._timing()
        self.n = np.zeros(R)
        self.q = np.zeros(R)
        self.v = city.speed * 0.8
        self.mu = DEFAULT_DISCHARGE * city.lanes.astype(float)
        self.n_max = city.length * city.lanes / CAR_SPACING
        self.updated = np.full(R, -np.inf)
        self.queue_at_green = np.zeros(R)
        self.turn_prior = turn_prior
        self.turn_counts: list[dict[int, float]] = [dict() for _ in range(R)]
        # travel-time observations
        self.acc_samples = np.zeros(R)
        self.acc_distance = np.zeros(R)
        self.acc_span = np.zeros(R)
        self.history: list[deque] = [deque(maxlen=self.HISTORY) for _ in range(R)]
        # per lit road: car-seconds, metres and observed seconds by position in the light cycle
        self.profile = np.zeros((R, 3, self.BINS))
        self.window: float | None = None      # seconds ahead a prediction covers (None: one cycle)
        self.latest_t = 0.0
        self.runs = 0
        self.observed = 0

    def _timing(self) -> None:
        """Global step C and green seconds per step g_r from the (learned) timing."""
        if self.lit.any():
            self.cycle = float(np.median(self.cycle_r[self.lit]))
        share = np.where(self.lit, self.green_r / np.where(self.lit, self.cycle_r, 1.0), 1.0)
        self.green = np.clip(share, 0.0, 1.0) * self.cycle

    # ------------------------------------------------------------ estimation
    def observe(self, rep: RoadReport) -> None:
        r = rep.road
        self.observed += 1
        if rep.green and rep.t >= self.updated[r]:
            # the state is sampled where the cycle starts for this road: at the start of its green
            self.n[r], self.q[r], self.updated[r] = rep.cars, rep.queue, rep.t
        self.latest_t = max(self.latest_t, rep.t)
        if rep.mean_speed > 0:
            self.v[r] = (1 - EWMA) * self.v[r] + EWMA * max(rep.mean_speed, 0.5)
        if rep.was_green and rep.interval > 0 and rep.departures > 0:
            rate = rep.departures / rep.interval
            if self.queue_at_green[r] >= rep.departures:
                self.mu[r] = (1 - EWMA) * self.mu[r] + EWMA * rate
            else:
                self.mu[r] = max(self.mu[r], rate)
        starts_green = rep.green and not rep.was_green
        if rep.green:
            self.queue_at_green[r] = rep.queue
        counts = self.turn_counts[r]
        for out, k in rep.turns.items():
            counts[out] = counts.get(out, 0.0) + k
        if self.lit[r]:
            self._observe_profile(r, rep)
            self._observe_timing(r, rep, starts_green)
        self._observe_travel(r, rep, starts_green)

    def _phase_bins(self, r: int, start: float, stop: float) -> np.ndarray:
        """Cycle-position bin of every second in [start, stop) for road r."""
        seconds = np.arange(start, stop, 1.0) + 0.5
        pos = ((seconds - self.green_start[r]) % self.cycle_r[r]) / self.cycle_r[r]
        return np.minimum((pos * self.BINS).astype(np.int64), self.BINS - 1)

    def _observe_profile(self, r: int, rep: RoadReport) -> None:
        if np.isnan(self.green_start[r]) or rep.interval <= 0 or rep.t - rep.interval < self.green_start[r]:
            return
        self.profile[r] *= np.exp(-rep.interval / self.PROFILE_MEMORY)
        bins = self._phase_bins(r, rep.t - rep.interval, rep.t)
        if not len(bins):
            return
        share = 1.0 / len(bins)
        np.add.at(self.profile[r, 0], bins, rep.samples * share)
        np.add.at(self.profile[r, 1], bins, rep.distance * share)
        np.add.at(self.profile[r, 2], bins, rep.interval * share)

    def _profiled(self, r: int, now: float, window: float) -> float | None:
        """Travel time over [now, now + window) from the cycle profile of road r."""
        prof = self.profile[r]
        if np.isnan(self.green_start[r]) or (prof[2] < self.MIN_WINDOW / self.BINS).any():
            return None
        bins = self._phase_bins(r, now, now + window)
        samples = (prof[0] / prof[2])[bins].sum()
        distance = (prof[1] / prof[2])[bins].sum()
        if samples <= 0:
            return None
        return min(self.city.length[r] * samples / max(distance, 1e-9), self.MAX_TRAVERSE)

    def _observe_timing(self, r: int, rep: RoadReport, starts_green: bool) -> None:
        started = self.green_start[r]
        if starts_green:
            if not np.isnan(started) and rep.t > started:
                self.cycle_r[r] = (1 - EWMA) * self.cycle_r[r] + EWMA * (rep.t - started)
                self.timing_observed[r] += 1
            self.green_start[r] = rep.t
        elif rep.was_green and not rep.green and not np.isnan(started) and rep.t > started:
            self.green_r[r] = (1 - EWMA) * self.green_r[r] + EWMA * (rep.t - started)

    def _observe_travel(self, r: int, rep: RoadReport, starts_green: bool) -> None:
        self.acc_samples[r] += rep.samples
        self.acc_distance[r] += rep.distance
        self.acc_span[r] += rep.interval
        span = self.acc_span[r]
        whole_cycles = starts_green or not self.lit[r]
        if span < self.MIN_WINDOW or not (whole_cycles or span >= 4 * self.MIN_WINDOW):
            return
        if self.acc_samples[r] > 0:
            length = self.city.length[r]
            travel = length * self.acc_samples[r] / max(self.acc_distance[r], 1e-9)
            self.history[r].append(min(travel, self.MAX_TRAVERSE))
        self.acc_samples[r] = self.acc_distance[r] = self.acc_span[r] = 0.0

    def turn_probabilities(self, road: int) -> dict[int, float]:
        prior = self.city.turn_probs[road]
        counts = self.turn_counts[road]
        total = sum(counts.values()) + self.turn_prior
        return {out: (counts.get(out, 0.0) + self.turn_prior * p) / total for out, p in prior.items()}

    # ------------------------------------------------------------ prediction
    def _turn_edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src, dst, prob = [], [], []
        for road in range(self.city.n_roads):
            for out, p in self.turn_probabilities(road).items():
                src.append(road)
                dst.append(out)
                prob.append(p)
        return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64), np.array(prob)

    def structural(self, horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, q, traverse) for steps 0..horizon from the equations of the module docstring."""
        c = self.city
        C = self.cycle
        src, dst, prob = self._turn_edges()
        alpha = np.minimum(1.0, C * self.v / c.length)
        capacity = self.mu * self.green
        green_share = self.green / C
        n, q = self.n.copy(), np.minimum(self.q, self.n)
        ns, qs = [n.copy()], [q.copy()]
        reach_green = np.minimum(1.0, self.green * self.v / c.length)   # moving cars at the light during green
        for _ in range(horizon):
            moving = n - q
            served = np.minimum(q + reach_green * moving, capacity)
            inflow = np.zeros_like(n)
            np.add.at(inflow, dst, prob * served[src])
            residual = q + reach_green * moving - served
            q = residual + (alpha - reach_green) * moving + (1.0 - green_share) * inflow
            n = np.clip(n + inflow - served, 0.0, self.n_max)
            q = np.clip(q, 0.0, n)
            ns.append(n.copy())
            qs.append(q.copy())
        n_arr, q_arr = np.array(ns), np.array(qs)
        wait = C * q_arr / np.maximum(capacity, 1e-6) + (C - self.green) ** 2 / (2 * C)
        return n_arr, q_arr, c.length / self.v + wait

    def calibrated(self) -> np.ndarray:
        """Per road: harmonic mean of its observed travel times and the free-flow time (one
        pseudo-observation; alone where nothing was observed yet)."""
        out = self.city.length / self.city.speed
        for r, hist in enumerate(self.history):
            if hist:
                values = np.fromiter(hist, dtype=np.float64, count=len(hist))
                inv = (1.0 / np.maximum(values, 1e-3)).sum() + 1.0 / max(out[r], 1e-3)
                out[r] = (len(values) + 1) / inv
        return out

    def predict(self, horizon: int = 5, now: float | None = None) -> Prediction:
        self._timing()
        n_arr, q_arr, structural = self.structural(horizon)
        level = self.calibrated()
        # where in its light cycle the coming window falls: its profile relative to a whole cycle
        now = self.latest_t if now is None else now
        window = self.window or self.cycle
        for r in np.flatnonzero(self.lit).tolist():
            ahead = self._profiled(r, now, window)
            if ahead is not None:
                whole = self._profiled(r, now, self.cycle_r[r])
                level[r] *= float(np.clip(ahead / whole, 1 / self.PROFILE_RANGE, self.PROFILE_RANGE))
        traverse = level * structural / np.maximum(structural[0], 1e-6)
        self.runs += 1
        return Prediction(self.runs, self.latest_t, self.cycle, n_arr, q_arr, traverse)
