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

Parameters are estimated from the reports: mu_r from departures during green intervals that
started with a queue at least as long as the departures (saturated flow), as an exponentially
weighted mean; P[p->r] from observed turn counts with the city's prior as one pseudo-observation;
v_r as an exponentially weighted mean of the reported moving speeds.
"""

from __future__ import annotations

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
    def __init__(self, city: City, turn_prior: float = 1.0) -> None:
        self.city = city
        R = city.n_roads
        self.cycle = float(np.median([l.cycle for l in city.lights])) if city.lights else 60.0
        self.green = np.full(R, self.cycle)
        for light in city.lights:
            scale = self.cycle / light.cycle
            for road in light.roads:
                self.green[road] = light.green_time(road) * scale
        self.n = np.zeros(R)
        self.q = np.zeros(R)
        self.v = city.speed * 0.8
        self.mu = DEFAULT_DISCHARGE * city.lanes.astype(float)
        self.n_max = city.length * city.lanes / CAR_SPACING
        self.updated = np.full(R, -np.inf)
        self.queue_at_green = np.zeros(R)
        self.turn_prior = turn_prior
        self.turn_counts: list[dict[int, float]] = [dict() for _ in range(R)]
        self.latest_t = 0.0
        self.runs = 0
        self.observed = 0

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
        if rep.green:
            self.queue_at_green[r] = rep.queue
        counts = self.turn_counts[r]
        for out, k in rep.turns.items():
            counts[out] = counts.get(out, 0.0) + k

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

    def predict(self, horizon: int = 5) -> Prediction:
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
        traverse = c.length / self.v + wait
        self.runs += 1
        return Prediction(self.runs, self.latest_t, C, n_arr, q_arr, traverse)
