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
  light: every report), each with its traffic (car-seconds per second).  A road's level is the
  harmonic mean of its last HISTORY observations, each weighted by how close its traffic was to
  the newest window's (a Gaussian kernel in log traffic, RATE_BANDWIDTH wide: a busy road is
  predicted from its busy windows), and its free-flow time (PRIOR_WEIGHT pseudo-observations;
  alone before any observation).  The harmonic mean, not the arithmetic one, because a travel
  time's error is judged relative to the time itself (MAPE): the predictor minimising it sits
  below the mean of a skewed distribution, and a road's travel times are skewed (a car through
  on green, a car that waited a whole red).
- the light delay of the coming window (``window`` seconds, one cycle by default), per
  light-controlled road (:meth:`Model.light_delay`): a point queue at the light from the newest
  report's queue, fed at the learned arrival rate (departures per second over whole cycles) and
  served during the learned green at the learned saturation flow (ahead of now the light runs
  from its last observed switch: a green lasts its learned length from its start, or ends now if
  it ran longer, a red its learned length; with no switch for a whole cycle the cycle is
  extrapolated from the last start of green); by Little's law the window's
  travel time is L / v + mean queue / arrival rate.  The level is scaled by that relative to the
  road's mean over a whole cycle (Webster's uniform delay), bounded to 1/DELAY_RANGE..DELAY_RANGE,
  to the power w.  w is chosen by the factor's own record (:meth:`Model._score_delay`): every
  prediction of a lit road is scored once the reports cover its window, for each w in
  DELAY_WEIGHTS (0 = no factor .. 1 = the whole factor), against the travel time the probes
  took; the w with the least fading sum of APE over the city's lit roads wins (before
  DELAY_SKILL_MIN windows were scored: the offline prior's starting exponent, chosen by
  ``python -m fcd.train_prior`` with the correction's power against SUMO's times; 1 without
  one).  Where lights keep no schedule (actuated) the extrapolated cycle is wrong and the data
  turn the factor down.  Where the queue on every road
  right now is known (:meth:`Model.present`: the aggregator's state at the moment of the
  prediction), the point queue starts from it instead of from the queue at the last switch.
- an online correction on top (:meth:`Model._score_correction`): every prediction is scored
  once the reports cover its window; per class of road (without / with a light) a ridge
  regression of log(travel taken / prediction), each window weighted by prediction / taken
  (MAPE's 1/y) and faded over CORRECTION_MEMORY seconds of data time, on what was known at the
  prediction's moment (:meth:`Model._features`: level, light-delay factor, the road's cars,
  queue and moving speed now, its traffic against its past, the queue on the roads it leads
  to, the light's state and the point queue's red share and queue over the window).  The
  correction is applied to a power chosen by its own record (as the delay factor's exponent)
  once CORRECTION_MIN windows of the class were scored, unless the class's prior holds its power
  (the lit class's: chosen offline against SUMO's edge times, see CorrectionPrior).  For lit roads it starts from an
  offline prior (:class:`CorrectionPrior`, fitted by ``python -m fcd.train_prior`` on generated
  SUMO scenarios that are not fcd-validate's, shipped as fcd/data/correction_prior.json): its
  coefficients at its trained power until then, and what the ridge shrinks toward (weighing as
  CORRECTION_PRIOR_WINDOWS scored windows); a class without a prior starts from no correction.

- the newest window (the time the probes took over the window before the prediction): on a road
  whose free-flow time T exceeds half the window W, cars already on it drive 1 - W / (2 T) of the
  window's car-seconds, so the newest window's time carries over with that weight (geometric;
  :meth:`Model.carry_over`); and on any road a record of the newest window (and its blend) against
  the prediction, scored like the others, switches the road to it where its gain is significant
  (:meth:`Model._score_regime`): a road that holds steady or trends far from its level.

T_r(0) is that calibrated prediction; later steps follow the structural model's relative change
T_r(k) / T_r(0) (the structural T above, with the learned parameters and the newest state).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from fcd.aggregate import RoadReport
from fcd.city import CAR_SPACING, City

DEFAULT_DISCHARGE = 0.5     # cars per second of green, per lane, before any estimate
EWMA = 0.3


CLASSES = ("unlit", "lit")     # the correction's classes of road, indexed by Model.lit


@dataclass(frozen=True)
class CorrectionPrior:
    """The online correction's starting point, fitted offline by ``python -m fcd.train_prior`` on
    SUMO scenarios that are not the validation's: per class of road (CLASSES) whether it has a
    prior (``known``; a class without one starts from no correction), the coefficients ``beta``,
    the training windows' weighted mean of x x^T (``gram``: how the features vary together, so
    the prior weighs like CORRECTION_PRIOR_WINDOWS real windows) and the power of the correction
    (used until the online record has CORRECTION_MIN windows; where ``hold``, for the whole run:
    fcd.train_prior then chose it against SUMO's own edge travel times on held-out training
    scenarios, which the online record, scored on the probes' travel times, cannot see)."""
    known: np.ndarray       # (2,) bool
    beta: np.ndarray        # (2, CORRECTION_FEATURES)
    gram: np.ndarray        # (2, CORRECTION_FEATURES, CORRECTION_FEATURES)
    power: np.ndarray       # (2,)
    hold: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=bool))   # (2,) the power is kept, the record never changes it
    # the light-delay factor's exponent until its own record has DELAY_SKILL_MIN windows (None:
    # 1, as before), or for the whole run where delay_hold: fcd.train_prior chose it against
    # SUMO's edge times on its scenarios
    delay_power: float | None = None
    delay_hold: bool = False

    @classmethod
    def from_json(cls, data: dict) -> "CorrectionPrior":
        k = Model.CORRECTION_FEATURES
        if data.get("features") != k:
            raise ValueError(f"correction prior has {data.get('features')} features, the model {k}: "
                             "regenerate it with python -m fcd.train_prior")
        known = np.zeros(2, dtype=bool)
        beta, gram, power = np.zeros((2, k)), np.zeros((2, k, k)), np.zeros(2)
        hold = np.zeros(2, dtype=bool)
        for c, name in enumerate(CLASSES):
            entry = data["classes"].get(name)
            if entry is None:
                continue
            known[c] = True
            beta[c], gram[c] = np.asarray(entry["beta"], dtype=float), np.asarray(entry["gram"], dtype=float)
            power[c] = float(entry["power"])
            hold[c] = bool(entry.get("hold", False))
        delay = data.get("light_delay")
        delay_power = float(delay["power"]) if delay else None
        return cls(known, beta, gram, power, hold, delay_power, bool(delay and delay.get("hold", False)))


PRIOR_FILE = "correction_prior.json"


def packaged_prior() -> CorrectionPrior | None:
    """The prior shipped with the package (fcd/data/correction_prior.json), None if absent."""
    path = resources.files("fcd") / "data" / PRIOR_FILE
    if not path.is_file():
        return None
    return CorrectionPrior.from_json(json.loads(path.read_text()))


_PACKAGED = object()


@dataclass
class Prediction:
    run: int
    t: float                   # time of the newest data used
    cycle: float
    n: np.ndarray              # (H+1, R) cars per road, step 0 = now
    q: np.ndarray              # (H+1, R) queue per road
    traverse: np.ndarray       # (H+1, R) seconds


def report_pieces(rep) -> list[tuple[float, float, float, float]]:
    """(start, end, car-seconds, metres) of a report's window: one piece, or where the report
    carries them (``RoadReport.pieces``: a light phase cut on the aggregator's periodic clock) each
    piece over its part of the window, so what the probes took is read over intervals on that
    clock without sharing a red and a green out by overlap."""
    t0 = rep.t - rep.interval
    if not rep.pieces:
        return [(t0, rep.t, rep.samples, rep.distance)]
    starts = [max(t0, start) for start, _, _ in rep.pieces]
    ends = starts[1:] + [rep.t]
    return [(a, max(a, b), s, d) for a, b, (_, s, d) in zip(starts, ends, rep.pieces)]


class Model:
    HISTORY = 16           # observed travel-time windows kept per road
    MIN_WINDOW = 30.0      # seconds of data per observation window
    MAX_TRAVERSE = 3600.0  # an observation above this (cars standing still) is capped
    DELAY_RANGE = 4.0      # the light-delay model changes a prediction by at most this factor
    DELAY_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)   # exponents of the light-delay factor scored
    DELAY_SKILL_MEMORY = 200.0   # scored windows: older scores fade with this count
    DELAY_SKILL_MIN = 20         # scored windows before the best exponent replaces the prior 1
    PRIOR_WEIGHT = 1.0     # pseudo-observations of the free-flow time in a road's level
    DELAY_LOOKBACK = 300.0 # seconds: an older report's queue starts the point queue no earlier
    RATE_BANDWIDTH = 1.0   # log-rate kernel width: windows with traffic like now's count most
    # the online correction (Model._score_correction): per class of road (without / with a light)
    # a ridge fit of log(travel taken / predicted), weighted by predicted / taken and faded in
    # data time, on what is known at the prediction's moment (Model._features), applied to a
    # power chosen by its own record like the delay factor's
    CORRECTION_FEATURES = 17
    CORRECTION_MEMORY = 600.0    # seconds of data time: older scored windows fade with this
    CORRECTION_RIDGE = 0.1       # prior precision of every coefficient (toward no correction)
    CORRECTION_SHRINKS = (0.0, 0.25, 0.5, 0.75, 1.0)
    CORRECTION_MIN = 100         # scored windows of a class before its correction may be used
    CORRECTION_RANGE = 4.0       # the correction changes a prediction by at most this factor
    CORRECTION_PRIOR_WINDOWS = 300.0   # weight of the offline prior (CorrectionPrior), in scored windows
    # the newest window (the time the probes took over the window before the prediction): a road
    # that takes longer to cross than the coming window is driven in it mostly by the cars already
    # on it, so that time carries over (Model.carry_over); on any road, a record of the newest
    # window against the prediction decides whether it weighs in (Model._score_regime)
    CARRY_MIN_TRAVERSED = 1.0    # the newest window carries over only if its cars drove this many road lengths
    REGIME_BLENDS = (0.0, 0.5, 1.0)    # weight of the newest window in the regime record's candidates
    REGIME_MIN_TRAVERSED = 3.0   # a road's newest window is a regime candidate only if its cars drove this many road lengths
    REGIME_MEMORY = 50.0         # scored windows of a road: older scores fade with this count
    REGIME_MIN = 8.0             # scored windows of a road before it may leave the prediction
    REGIME_Z = 2.0               # standard errors a candidate's mean gain in APE must exceed

    def __init__(self, city: City, turn_prior: float = 1.0, correction_prior=_PACKAGED,
                 delay_power: float | None = None, delay_hold: bool = False) -> None:
        """``correction_prior``: the online correction's starting point (a CorrectionPrior; by
        default the packaged one, None: start from no correction), and the light-delay factor's
        starting exponent, if it has one.  ``delay_power``: that exponent instead of the prior's,
        used until the factor's record has DELAY_SKILL_MIN windows (for the whole run with
        ``delay_hold``); fcd.train_prior chooses it so.  Without either: 1."""
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
        self.red_start = np.full(R, np.nan)
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
        # changed through observe only: it marks the road's kept turn probabilities stale
        self.turn_counts: list[dict[int, float]] = [dict() for _ in range(R)]
        # travel-time observations
        self.acc_samples = np.zeros(R)
        self.acc_distance = np.zeros(R)
        self.acc_span = np.zeros(R)
        self.history: list[deque] = [deque(maxlen=self.HISTORY) for _ in range(R)]   # (travel s, car-s per s)
        self.last_rate = np.zeros(R)       # car-seconds per second in the newest completed window
        # what a prediction run reads of the history and the turn counts, recomputed per road only
        # when that road's history or turn counts changed (a run no longer loops over every road):
        # the calibrated level, the mean traffic of the history, the turn probabilities
        self._level = city.length / city.speed
        self._mean_rate = np.zeros(R)
        # what the kept level and mean traffic were computed from: per road the history's length
        # and newest entry (entries are appended, never edited in place) and the newest traffic
        self._level_seen: list[tuple[int, object]] = [(0, None)] * R
        self._level_rate = np.full(R, np.nan)
        self._turn_src, self._turn_dst, self._turn_slices = self._turn_layout()
        self._turn_prob = np.zeros(len(self._turn_src))
        self._turn_stale: set[int] = set(range(R))
        # each road's successors, padded with the index R (a 0.0 appended to the values read)
        widest = max((len(outs) for outs in city.successors), default=0)
        self._successors = np.full((R, max(widest, 1)), R, dtype=np.int64)
        for road, outs in enumerate(city.successors):
            self._successors[road, :len(outs)] = list(outs)
        # the light-delay model's state: the newest report of each road and its arrival rate
        self.report_t = np.full(R, np.nan)
        self.report_queue = np.zeros(R)
        # each road's newest state (cars, queue, moving speed or -1, when): from its newest report
        # or from Model.present
        self.state_t = np.full(R, np.nan)
        self.state = np.zeros((3, R))
        self.state[2] = -1.0
        self.acc_departures = np.zeros(R)
        self.arrival_rate = np.full(R, np.nan)   # cars per second (departures over whole cycles)
        # the light-delay factor scored against what the probes then took: per lit road its
        # recent reports' (start, end, car-seconds, metres) and the predictions still to score
        self.report_log: list[deque] = [deque(maxlen=64) for _ in range(R)]
        self.to_score: list[deque] = [deque(maxlen=16) for _ in range(R)]
        self.delay_skill = np.zeros(len(self.DELAY_WEIGHTS))     # fading sum of APE per exponent
        self.delay_scored = 0
        self.delay_weight = 1.0
        self.delay_hold = False       # the exponent is held: the record scores but does not choose
        k = self.CORRECTION_FEATURES
        # the fit's normal equations, faded in data time: sum w x x^T and sum w x y per class
        self.corr_A = np.zeros((2, k, k))
        self.corr_b = np.zeros((2, k))
        self.corr_t = np.full(2, -np.inf)       # data time of the newest window in the sums
        self.corr_beta = np.zeros((2, k))
        self.corr_prior = packaged_prior() if correction_prior is _PACKAGED else correction_prior
        # the fit shrinks toward the prior (toward 0 without one): precision ridge + PRIOR_WINDOWS
        # pseudo-windows of the training data's gram
        self.corr_center = np.zeros((2, k))
        self.corr_precision = np.broadcast_to(self.CORRECTION_RIDGE * np.eye(k), (2, k, k)).copy()
        # every scored window (class, x, log(taken / predicted), weight), if a list: what
        # fcd.train_prior fits the prior on
        self.correction_log: list | None = None
        self.corr_fresh = np.zeros(2, dtype=bool)     # sums changed since beta was solved
        self.corr_skill = np.zeros((2, len(self.CORRECTION_SHRINKS)))   # fading sum of APE per shrink
        self.corr_scored = np.zeros(2, dtype=np.int64)
        self.corr_shrink = np.zeros(2)
        self.corr_hold = np.zeros(2, dtype=bool)     # classes whose power the prior fixes (CorrectionPrior.hold)
        if self.corr_prior is not None:
            # a class without a prior keeps zeros: no correction until its record says otherwise
            known = self.corr_prior.known
            self.corr_center[known] = self.corr_prior.beta[known]
            self.corr_precision[known] += self.CORRECTION_PRIOR_WINDOWS * self.corr_prior.gram[known]
            self.corr_beta[known] = self.corr_prior.beta[known]
            self.corr_shrink[known] = self.corr_prior.power[known]
            self.corr_hold[known] = self.corr_prior.hold[known]
        if delay_power is None and self.corr_prior is not None and self.corr_prior.delay_power is not None:
            delay_power, delay_hold = self.corr_prior.delay_power, self.corr_prior.delay_hold
        if delay_power is not None:
            self.delay_weight, self.delay_hold = float(delay_power), bool(delay_hold)
        self.corr_pending: list[deque] = [deque(maxlen=16) for _ in range(R)]
        # the regime record (Model._score_regime): per road its predictions still to score (start,
        # end, prediction, newest window or NaN), fading sums per candidate of REGIME_BLENDS of the
        # gain in APE over the prediction and of its square, the fading weights' sum and sum of
        # squares, and the newest window's weight the road uses now
        self.regime_pending: list[deque] = [deque(maxlen=16) for _ in range(R)]
        self.regime_gain = np.zeros((R, len(self.REGIME_BLENDS)))
        self.regime_gain2 = np.zeros((R, len(self.REGIME_BLENDS)))
        self.regime_w = np.zeros(R)
        self.regime_w2 = np.zeros(R)
        self.regime_blend = np.zeros(R)
        # what the light delay's point queue expects over the coming window, per lit road
        self.red_ahead = np.zeros(R)        # share of the window the light is red
        self.queue_ahead = np.zeros(R)      # mean queue over the window
        self.window: float | None = None      # seconds ahead a prediction covers (None: one cycle)
        self.latest_t = 0.0
        self.runs = 0
        self.observed = 0
        # what each stage of the newest prediction gave per road (level, with the light delay,
        # corrected): fcd-validate's decomposition reads it
        self.stages: dict[str, np.ndarray] = {}

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
        newest = self.report_t[r]
        # a scalar test, not np.nan_to_num (~10 us a call): report times are finite or NaN (none yet)
        if newest != newest or rep.t >= newest:
            self.report_t[r], self.report_queue[r] = rep.t, rep.queue
        self._observe_state(r, rep)
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
        if rep.turns:
            self._turn_stale.add(r)
        for out, k in rep.turns.items():
            counts[out] = counts.get(out, 0.0) + k
        if self.lit[r]:
            self._observe_timing(r, rep, starts_green)
            self._score_delay(r, rep)
        self._observe_travel(r, rep, starts_green)

    def _observe_timing(self, r: int, rep: RoadReport, starts_green: bool) -> None:
        started = self.green_start[r]
        if starts_green:
            if not np.isnan(started) and rep.t > started:
                self.cycle_r[r] = (1 - EWMA) * self.cycle_r[r] + EWMA * (rep.t - started)
                self.timing_observed[r] += 1
            self.green_start[r] = rep.t
        elif rep.was_green and not rep.green and not np.isnan(started) and rep.t > started:
            self.green_r[r] = (1 - EWMA) * self.green_r[r] + EWMA * (rep.t - started)
        if rep.was_green and not rep.green:
            self.red_start[r] = rep.t

    def _score_delay(self, r: int, rep: RoadReport) -> None:
        """Score the predictions of road r whose window the reports now cover: their level
        times the light-delay factor to each exponent in DELAY_WEIGHTS vs the travel time the
        probes took over the window (reports' car-seconds and metres, shared out in proportion
        to how much of each report's interval lies in the window)."""
        pending = self.to_score[r]
        while pending and pending[0][1] <= rep.t:
            start, end, level, factor = pending.popleft()
            travel = self._travel_over(r, start, end)
            if travel is None:
                continue
            guesses = level * factor ** np.asarray(self.DELAY_WEIGHTS)
            fade = np.exp(-1.0 / self.DELAY_SKILL_MEMORY)
            self.delay_skill = fade * self.delay_skill + np.abs(guesses - travel) / travel
            self.delay_scored += 1
            if self.delay_scored >= self.DELAY_SKILL_MIN and not self.delay_hold:
                self.delay_weight = self.DELAY_WEIGHTS[int(np.argmin(self.delay_skill))]

    def _travel_over(self, r: int, start: float, end: float) -> float | None:
        """The travel time the probes took on road r over [start, end): its reports' car-seconds
        and metres shared out in proportion to how much of each report's interval lies in it (a
        piece of no length, the probes at a report's own time on its clock's tick, where it lies)."""
        samples, distance = self._taken_over(r, start, end)
        if samples <= 0 or distance <= 0:
            return None
        return min(self.city.length[r] * samples / distance, self.MAX_TRAVERSE)

    def _taken_over(self, r: int, start: float, end: float) -> tuple[float, float]:
        """(car-seconds, metres) the probes drove on road r over [start, end), from its report log
        as :meth:`_travel_over` reads it."""
        samples = distance = 0.0
        for t0, t1, s, d in self.report_log[r]:
            if t1 <= t0:
                if start <= t0 < end:
                    samples += s
                    distance += d
                continue
            overlap = min(t1, end) - max(t0, start)
            if overlap > 0:
                samples += s * overlap / (t1 - t0)
                distance += d * overlap / (t1 - t0)
        return samples, distance

    def newest_window(self, now: float, window: float) -> tuple[np.ndarray, np.ndarray]:
        """(time, traversals) per road: the travel time the probes took over [now - window, now)
        and the road lengths their cars drove in it (NaN and 0 where nothing was driven, NaN
        where the time reaches MAX_TRAVERSE: a few stopped cars)."""
        length = self.city.length
        travel = np.full(self.city.n_roads, np.nan)
        traversals = np.zeros(self.city.n_roads)
        for r, log in enumerate(self.report_log):
            if not log:
                continue
            samples, distance = self._taken_over(r, now - window, now)
            if samples > 0 and distance > 0:
                traversals[r] = distance / length[r]
                taken = length[r] * samples / distance
                if taken < self.MAX_TRAVERSE:
                    travel[r] = taken
        return travel, traversals

    def carry_over(self, window: float, newest: np.ndarray, traversals: np.ndarray) -> np.ndarray:
        """Per road how much of the coming window the newest one's time (``newest``, driven
        over ``traversals`` road lengths: :meth:`newest_window`) carries over.

        Cars on a road when a window starts leave it, in steady traffic, at times spread evenly
        over its traverse time T; for T >= window W they drive 1 - W / (2 T) of the window's
        car-seconds on it, so the window's time is mostly theirs, whose time so far the newest
        window measured.  T is the road's free-flow time (what makes a road long, not a jam,
        which may clear within the window), and the weight 0 where T < W / 2 (a short road's
        newest window is a few cars' timing against a light: its level already holds that).
        The newest window counts only where its cars drove at least CARRY_MIN_TRAVERSED road
        lengths (whole traversals, not a few stopped cars); weight 0 elsewhere."""
        weight = np.clip(1.0 - window / (2.0 * self.city.length / self.city.speed), 0.0, 1.0)
        usable = ~np.isnan(newest) & (traversals >= self.CARRY_MIN_TRAVERSED)
        return np.where(usable, weight, 0.0)

    def _observe_state(self, r: int, rep: RoadReport) -> None:
        """Road r's newest state (the correction's features), its report log (what the probes
        took over any window) and the scoring of its predictions that the log now covers."""
        if rep.t >= np.nan_to_num(self.state_t[r], nan=-np.inf):
            self.state_t[r] = rep.t
            self.state[:, r] = (rep.cars, rep.queue, rep.mean_speed)
        if rep.interval > 0:
            self.report_log[r].extend(report_pieces(rep))
        self._score_correction(r, rep)
        self._score_regime(r, rep)

    def _score_regime(self, r: int, rep: RoadReport) -> None:
        """Score road r's predictions whose window the reports now cover: each candidate of
        REGIME_BLENDS (the prediction, the newest window before it, their geometric mean) by its
        APE against the travel time the probes took, as a gain over the prediction's; then the
        road's choice (:meth:`_regime_choice`)."""
        pending = self.regime_pending[r]
        scored = False
        while pending and pending[0][1] <= rep.t:
            start, end, predicted, newest = pending.popleft()
            travel = self._travel_over(r, start, end)
            if travel is None or newest != newest:     # nothing taken, or no newest window then
                continue
            weights = np.asarray(self.REGIME_BLENDS)
            ape = np.abs(predicted ** (1.0 - weights) * newest ** weights - travel) / travel
            gain = ape[0] - ape
            fade = np.exp(-1.0 / self.REGIME_MEMORY)
            self.regime_gain[r] = fade * self.regime_gain[r] + gain
            self.regime_gain2[r] = fade * self.regime_gain2[r] + gain * gain
            self.regime_w[r] = fade * self.regime_w[r] + 1.0
            self.regime_w2[r] = fade * fade * self.regime_w2[r] + 1.0
            scored = True
        if scored:
            self.regime_blend[r] = self.REGIME_BLENDS[self._regime_choice(r)]

    def _regime_choice(self, r: int) -> int:
        """The candidate road r uses: of those whose mean gain over the prediction exceeds
        REGIME_Z standard errors (effective windows of the fading weights) after REGIME_MIN
        scored windows, the one of the largest mean gain; else the prediction (index 0).  A test,
        not the least sum: on a dozen windows the least of three noisy sums is often not the
        prediction by chance alone."""
        w = self.regime_w[r]
        if w < self.REGIME_MIN:
            return 0
        mean = self.regime_gain[r] / w
        var = np.maximum(self.regime_gain2[r] / w - mean * mean, 0.0)
        n_eff = w * w / self.regime_w2[r]
        significant = mean > self.REGIME_Z * np.sqrt(var / n_eff)
        significant[0] = True
        return int(np.argmax(np.where(significant, mean, -np.inf)))

    def _score_correction(self, r: int, rep: RoadReport) -> None:
        """Score road r's predictions whose window the reports now cover: the ridge fit of its
        class learns log(travel taken / uncorrected prediction) from the features the
        prediction saw, and each shrink of the correction then applied is scored by its APE."""
        pending = self.corr_pending[r]
        while pending and pending[0][1] <= rep.t:
            start, end, base, x, correction = pending.popleft()
            travel = self._travel_over(r, start, end)
            if travel is None:
                continue
            c = int(self.lit[r])
            guesses = base * np.exp(correction * np.asarray(self.CORRECTION_SHRINKS))
            fade = np.exp(-1.0 / self.DELAY_SKILL_MEMORY)
            self.corr_skill[c] = fade * self.corr_skill[c] + np.abs(guesses - travel) / travel
            self.corr_scored[c] += 1
            if self.corr_scored[c] >= self.CORRECTION_MIN and not self.corr_hold[c]:
                self.corr_shrink[c] = self.CORRECTION_SHRINKS[int(np.argmin(self.corr_skill[c]))]
            # weighted least squares faded in data time, each window weighted by predicted /
            # taken: MAPE counts an error relative to the time taken (its 1/y weight)
            if end > self.corr_t[c]:
                if np.isfinite(self.corr_t[c]):
                    fade = np.exp(-(end - self.corr_t[c]) / self.CORRECTION_MEMORY)
                    self.corr_A[c] *= fade
                    self.corr_b[c] *= fade
                self.corr_t[c] = end
            weight = float(np.clip(base / travel, 0.05, 20.0))
            self.corr_A[c] += weight * np.outer(x, x)
            self.corr_b[c] += weight * x * np.log(travel / base)
            if self.correction_log is not None:
                self.correction_log.append((c, x, float(np.log(travel / base)), weight))
            self.corr_fresh[c] = True

    def _features(self, now: float, level: np.ndarray, factor: np.ndarray) -> np.ndarray:
        """(R, CORRECTION_FEATURES) what is known of every road at ``now``: the newest state of
        each road (its newest report, or Model.present), the level and the light-delay factor
        applied to it, and what the point queue of Model.light_delay expects over the window."""
        c = self.city
        R = c.n_roads
        free = c.length / c.speed
        cars, queue, speed = self.state
        room = np.maximum(self.n_max, 1.0)
        X = np.zeros((R, self.CORRECTION_FEATURES))
        X[:, 0] = 1.0
        X[:, 1] = np.log(np.maximum(level, 1e-3) / np.maximum(free, 1e-3))
        X[:, 2] = np.log(factor)
        X[:, 3] = np.clip(queue / room, 0.0, 1.5)
        X[:, 4] = np.clip(cars / room, 0.0, 1.5)
        X[:, 5] = np.where(speed > 0, np.clip(speed / c.speed, 0.0, 1.5), 0.0)
        X[:, 6] = (cars > 0) & (speed <= 0)
        self._refresh_levels()
        X[:, 7] = np.clip(np.log((self.last_rate + 0.05) / (self._mean_rate + 0.05)), -3.0, 3.0)
        fill = np.clip(queue / room, 0.0, 1.5)
        # the fullest road each leads to (0 where none): fill >= 0, so the padding changes no max
        X[:, 8] = np.append(fill, 0.0)[self._successors].max(axis=1)
        gs, rs = self.green_start, self.red_start
        last_switch = np.fmax(gs, rs)
        since = np.where(np.isnan(last_switch), 0.0, (now - last_switch) / np.maximum(self.cycle_r, 1.0))
        X[:, 9] = np.where(self.lit, np.clip(since, 0.0, 2.0), 0.0)
        green_now = ~np.isnan(gs) & (np.isnan(rs) | (gs > rs))
        X[:, 10] = self.lit & green_now
        X[:, 11] = cars <= 0
        X[:, 12] = np.log1p(np.maximum(cars, 0.0))
        X[:, 13] = np.log1p(np.maximum(queue, 0.0))
        X[:, 14] = self.red_ahead
        X[:, 15] = np.log1p(self.queue_ahead)
        X[:, 16] = self.lit & ~green_now & (queue > 0)
        return X

    def _observe_travel(self, r: int, rep: RoadReport, starts_green: bool) -> None:
        self.acc_samples[r] += rep.samples
        self.acc_departures[r] += rep.departures
        self.acc_distance[r] += rep.distance
        self.acc_span[r] += rep.interval
        span = self.acc_span[r]
        whole_cycles = starts_green or not self.lit[r]
        if span < self.MIN_WINDOW or not (whole_cycles or span >= 4 * self.MIN_WINDOW):
            return
        if self.acc_samples[r] > 0:
            length = self.city.length[r]
            travel = min(length * self.acc_samples[r] / max(self.acc_distance[r], 1e-9), self.MAX_TRAVERSE)
            rate = self.acc_samples[r] / span
            self.history[r].append((travel, rate))
            self.last_rate[r] = rate
        else:
            self.last_rate[r] = 0.0
        rate = self.acc_departures[r] / span
        old = self.arrival_rate[r]
        self.arrival_rate[r] = rate if np.isnan(old) else (1 - EWMA) * old + EWMA * rate
        self.acc_samples[r] = self.acc_distance[r] = self.acc_span[r] = self.acc_departures[r] = 0.0

    def present(self, now: float, queue: np.ndarray, cars: np.ndarray | None = None,
                speed: np.ndarray | None = None) -> None:
        """The queue measured on every road at ``now`` (what the aggregator holds from the probes
        before ``now``: ``Aggregator.road_states``): the light delay's point queue starts from it
        instead of from the queue at the light's last switch, so a queue that grew or drained
        since then counts as it is.  With ``cars`` and ``speed`` (moving speed, -1 where none
        moved) too, every road's state now replaces its newest report's in the correction's
        features.  Only what was measured: call it with every road's queue from one complete
        view of the city, or not at all."""
        lit = np.flatnonzero(self.lit)
        self.report_t[lit] = now
        self.report_queue[lit] = np.asarray(queue, dtype=float)[lit]
        if cars is not None and speed is not None:
            self.state_t[:] = now
            self.state[:] = (cars, queue, speed)
        self.latest_t = max(self.latest_t, now)

    def turn_probabilities(self, road: int) -> dict[int, float]:
        prior = self.city.turn_probs[road]
        counts = self.turn_counts[road]
        total = sum(counts.values()) + self.turn_prior
        return {out: (counts.get(out, 0.0) + self.turn_prior * p) / total for out, p in prior.items()}

    # ------------------------------------------------------------ prediction
    def _turn_layout(self) -> tuple[np.ndarray, np.ndarray, list[slice]]:
        """The turn edges (road -> out, in the city prior's order) and each road's slice of them:
        fixed by the city, only their probabilities follow the counts."""
        src, dst, slices = [], [], []
        for road in range(self.city.n_roads):
            outs = list(self.city.turn_probs[road])
            slices.append(slice(len(src), len(src) + len(outs)))
            src += [road] * len(outs)
            dst += outs
        return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64), slices

    def _turn_edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(src, dst, probability) of every turn; the probabilities of roads whose turn counts
        changed since the previous call recomputed (Model.turn_probabilities), the rest kept."""
        for road in self._turn_stale:
            self._turn_prob[self._turn_slices[road]] = list(self.turn_probabilities(road).values())
        self._turn_stale.clear()
        return self._turn_src, self._turn_dst, self._turn_prob.copy()

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
        """Per road: harmonic mean of its observed travel times, weighted by how close each
        window's traffic (car-seconds per second) was to the newest window's, and its
        free-flow time (PRIOR_WEIGHT pseudo-observations; alone where nothing was observed yet).
        Kept per road, recomputed where the history or the newest traffic changed."""
        self._refresh_levels()
        return self._level.copy()

    def _refresh_levels(self) -> None:
        """Recompute the kept level and mean traffic of the roads whose history or newest traffic
        changed since they were computed (a few per run; checking all costs a pass over lists)."""
        changed = set(np.flatnonzero(self.last_rate != self._level_rate).tolist())
        for r, (hist, (length, newest)) in enumerate(zip(self.history, self._level_seen)):
            if len(hist) != length or (hist and hist[-1] is not newest):
                changed.add(r)
        for r in changed:
            hist = self.history[r]
            self._level_seen[r] = (len(hist), hist[-1] if hist else None)
            self._level_rate[r] = self.last_rate[r]
            free = self.city.length[r] / self.city.speed[r]
            if not hist:
                self._level[r], self._mean_rate[r] = free, 0.0
                continue
            values = np.array(hist, dtype=np.float64)
            travel, rate = values[:, 0], values[:, 1]
            gap = np.log((rate + 0.05) / (self.last_rate[r] + 0.05)) / self.RATE_BANDWIDTH
            w = np.exp(-0.5 * gap * gap)
            inv = (w / np.maximum(travel, 1e-3)).sum() + self.PRIOR_WEIGHT / max(free, 1e-3)
            self._level[r] = (w.sum() + self.PRIOR_WEIGHT) / inv
            self._mean_rate[r] = np.mean([h[1] for h in hist])

    def light_delay(self, now: float, window: float) -> tuple[np.ndarray, np.ndarray]:
        """Per lit road with a learned timing and arrival rate: (travel time over [now, now +
        window), its mean over a whole cycle); NaN elsewhere.

        A point queue at the light, from the newest report's queue on: cars reach the light at the
        learned arrival rate lam, leave during the learned green at the learned saturation flow
        mu.  By Little's law the travel time over the window is the driving time L / v plus the
        mean queue over the window / lam.  The whole-cycle mean is Webster's uniform delay
        C (1 - g/C)^2 / (2 (1 - x g/C)), x = lam C / (mu g) the degree of saturation (< 0.95)."""
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
        # from the newest report on (a road silent for long: from DELAY_LOOKBACK before now)
        start = np.clip(self.report_t[roads], now - self.DELAY_LOOKBACK, now)
        steps = int(np.ceil(now + window - start.min()))
        # from now on the light runs from its last observed switch (its state now is known): a
        # green lasts its learned length from its start (or ends now if it already ran longer,
        # as actuated greens do), a red its learned length (cycle - green); before now, and
        # where no switch was seen for a whole cycle, the cycle is extrapolated from the last
        # start of green
        gs, rs = self.green_start[roads], self.red_start[roads]
        green_now = np.isnan(rs) | (gs > rs)
        anchored = now - np.where(green_now, gs, rs) < C
        red_at = np.maximum(gs + g, now)
        green_at = np.maximum(np.nan_to_num(rs) + (C - g), now)

        # every second's light state and activity at once (steps x roads); only the queue's
        # recursion runs second by second
        t = (start.min() + np.arange(steps, dtype=np.float64) + 0.5)[:, None]
        ahead_green = np.where(green_now, (t < red_at) | (((t - red_at) % C) >= C - g),
                               (t >= green_at) & (((t - green_at) % C) < g))
        green = np.where(anchored & (t >= now), ahead_green, ((t - gs) % C) < g)
        active = t >= start
        inside = active & (t >= now) & (t < now + window)
        served = np.where(green, mu, 0.0)
        q = self.report_queue[roads].astype(float)
        queues = np.empty((steps + 1, len(roads)))
        queues[0] = q
        for k in range(steps):
            q = queues[k + 1] = np.where(active[k], np.maximum(q + lam - served[k], 0.0), q)
        # each second's mean queue, summed in time order (accumulate adds sequentially, as a loop)
        total = np.add.accumulate(np.where(inside, (queues[:-1] + queues[1:]) / 2, 0.0), axis=0)[-1] \
            if steps else np.zeros(len(roads))
        counted = inside.sum(axis=0).astype(float)
        red_seconds = (inside & ~green).sum(axis=0).astype(float)
        ahead[roads] = drive + total / np.maximum(counted, 1.0) / lam
        self.red_ahead[:] = 0.0
        self.queue_ahead[:] = 0.0
        self.red_ahead[roads] = red_seconds / np.maximum(counted, 1.0)
        self.queue_ahead[roads] = total / np.maximum(counted, 1.0)
        red = 1.0 - g / C
        x = np.minimum(lam * C / (mu * g), 0.95)
        mean[roads] = drive + C * red * red / (2.0 * (1.0 - x * g / C))
        return ahead, mean

    def predict(self, horizon: int = 5, now: float | None = None) -> Prediction:
        self._timing()
        n_arr, q_arr, structural = self.structural(horizon)
        level = self.calibrated()
        # the coming window's light delay (queue now, where in the cycle it falls) relative to
        # the road's mean delay over a whole cycle
        now = self.latest_t if now is None else now
        delay_ahead, delay_mean = self.light_delay(now, self.window or self.cycle)
        window = self.window or self.cycle
        known = np.flatnonzero(~np.isnan(delay_ahead))
        factor = np.clip(delay_ahead[known] / delay_mean[known], 1 / self.DELAY_RANGE, self.DELAY_RANGE)
        for r, lev, f in zip(known.tolist(), level[known].tolist(), factor.tolist()):
            if not self.to_score[r] or self.to_score[r][-1][0] < now:
                self.to_score[r].append((now, now + window, lev, f))
        applied = np.ones(len(level))
        applied[known] = factor ** self.delay_weight
        base = level * applied
        # the online correction learned from the scored record, per class of road
        X = self._features(now, level, applied)
        cls = self.lit.astype(np.int64)
        bound = np.log(self.CORRECTION_RANGE)
        for c in np.flatnonzero(self.corr_fresh):
            prior = self.corr_precision[c]
            self.corr_beta[c] = np.linalg.solve(self.corr_A[c] + prior,
                                                self.corr_b[c] + prior @ self.corr_center[c])
            self.corr_fresh[c] = False
        correction = np.clip(np.einsum("rk,rk->r", X, self.corr_beta[cls]), -bound, bound)
        for r in range(len(base)):
            if not self.corr_pending[r] or self.corr_pending[r][-1][0] < now:
                self.corr_pending[r].append((now, now + window, base[r], X[r], correction[r]))
        corrected = base * np.exp(correction * self.corr_shrink[cls])
        # on roads longer than half the window, the newest window's time carries over (geometric)
        newest, traversals = self.newest_window(now, window)
        carry = self.carry_over(window, newest, traversals)
        carried = corrected ** (1.0 - carry) * np.where(carry > 0, newest, 1.0) ** carry
        # on any road whose own record says so, the newest window weighs in (a road that holds
        # steady or trends, far from its level), where it rests on REGIME_MIN_TRAVERSED traversals
        candidate = np.where(traversals >= self.REGIME_MIN_TRAVERSED, newest, np.nan)
        for r in range(len(base)):
            if not self.regime_pending[r] or self.regime_pending[r][-1][0] < now:
                self.regime_pending[r].append((now, now + window, carried[r], candidate[r]))
        blend = np.where(np.isnan(candidate), 0.0, self.regime_blend)
        chosen = carried ** (1.0 - blend) * np.where(np.isnan(candidate), 1.0, candidate) ** blend
        self.stages = {"level": level, "with_light_delay": base, "corrected": corrected, "carried_over": carried,
                       "regime": chosen}
        traverse = chosen * structural / np.maximum(structural[0], 1e-6)
        self.runs += 1
        return Prediction(self.runs, self.latest_t, self.cycle, n_arr, q_arr, traverse)
