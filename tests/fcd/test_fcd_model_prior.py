"""The online correction's offline prior (``fcd.train_prior`` -> ``Model(correction_prior=)``):
fitted on scenarios disjoint from fcd-validate's, the correction before any window is scored,
and what the online fit shrinks toward until the data overrule it."""

import dataclasses

import numpy as np
import pytest

from fcd import train_prior
from fcd.aggregate import RoadReport
from fcd.city import City, grid_city
from fcd.model import CLASSES, CorrectionPrior, Model, packaged_prior
from fcd.validate import ALL_SCENARIOS, GENERATED_SHAPES, RESCO

K = Model.CORRECTION_FEATURES


@pytest.fixture(scope="module")
def half_lit():
    grid = grid_city(3, 3, block=200.0, cycle=60.0, offsets="zero")
    lights = [dataclasses.replace(light, id=i) for i, light in enumerate(grid.lights[::2])]
    return City(grid.graph, lights, junction_radius=grid.junction_radius)


def hand_prior(unlit_log_factor: float) -> CorrectionPrior:
    """A prior for the unlit class only: a constant log correction (the bias feature, x[0] = 1)."""
    beta = np.zeros((2, K))
    beta[0, 0] = unlit_log_factor
    gram = np.zeros((2, K, K))
    gram[0] = np.eye(K)
    return CorrectionPrior(np.array([True, False]), beta, gram, np.array([1.0, 0.0]))


def test_packaged_prior_matches_the_model():
    prior = packaged_prior()
    assert prior is not None, "fcd/data/correction_prior.json is package data: python -m fcd.train_prior"
    assert prior.beta.shape == (2, K) and prior.gram.shape == (2, K, K)
    # shipped for lit roads only (an unlit prior made the small city cuts worse: docs/fcd.md)
    assert list(prior.known) == [name in train_prior.PRIOR_CLASSES for name in CLASSES]
    lit = CLASSES.index("lit")
    assert np.allclose(prior.gram[lit], prior.gram[lit].T) and np.linalg.eigvalsh(prior.gram[lit]).min() > -1e-9
    assert prior.power[lit] in Model.CORRECTION_SHRINKS


def test_prior_with_other_feature_count_is_refused():
    with pytest.raises(ValueError, match="features"):
        CorrectionPrior.from_json({"features": K - 1, "classes": {}})


def test_training_scenarios_are_not_the_validation_scenarios():
    """Disjoint by construction: no RESCO cut, no validation name or seed, no validation size."""
    validation_seed = 1          # fcd-validate's default --seed
    names = [name for name, *_ in train_prior.TRAINING]
    assert not set(names) & set(ALL_SCENARIOS)
    assert not any(cut in name for name in names for cut in RESCO)
    seeds = [train_prior.TRAINING_SEED_BASE + i for i in range(len(names))]
    assert validation_seed not in seeds and len(set(seeds)) == len(seeds)
    for _, _, _, shape, _ in train_prior.TRAINING:
        assert shape not in GENERATED_SHAPES.values()


def test_fit_recovers_a_log_linear_correction_and_skips_other_classes():
    rng = np.random.default_rng(5)
    truth = rng.normal(0, 0.3, K)
    windows = []
    for _ in range(3000):
        x = np.concatenate([[1.0], rng.normal(0, 1, K - 1)])
        windows.append((1, x, float(x @ truth), 1.0))
    out = train_prior.fit(windows, classes=("lit",))
    assert out["unlit"] is None
    assert np.allclose(out["lit"]["beta"], truth, atol=1e-3)
    assert out["lit"]["power"] == 1.0 and out["lit"]["windows"] == 3000
    again = train_prior.fit(list(windows), classes=("lit",))
    assert again == out                       # deterministic


def test_prior_is_the_correction_before_any_window_is_scored(half_lit):
    city = half_lit
    unlit = city.exit_light < 0
    with_prior = Model(city, correction_prior=hand_prior(np.log(2.0))).predict(1, now=0.0).traverse[0]
    without = Model(city, correction_prior=None).predict(1, now=0.0).traverse[0]
    assert np.allclose(with_prior[unlit], 2.0 * without[unlit])
    assert np.allclose(with_prior[~unlit], without[~unlit])      # a class without a prior: unchanged


def test_online_fit_moves_from_the_prior_to_the_data(half_lit):
    """A prior saying x2 on a road whose cars take the free-flow time, minute after minute: the
    first prediction follows the prior; the fit moves toward the data but, with one road's
    windows faded over CORRECTION_MEMORY against the prior's CORRECTION_PRIOR_WINDOWS, stays
    near the prior; the correction's own record then turns it off (power 0)."""
    city = half_lit
    road = int(np.flatnonzero(city.exit_light < 0)[0])
    length, free = city.length[road], city.length[road] / city.speed[road]
    model = Model(city, correction_prior=hand_prior(np.log(2.0)))
    model.window = 60.0
    first = None
    fitted = []
    for k in range(1, Model.CORRECTION_MIN + 200):
        t = 60.0 * k
        model.observe(RoadReport(road, t, True, queue=0, cars=2, density=0.0, mean_speed=city.speed[road],
                                 departures=5, interval=60.0, was_green=True, samples=600.0,
                                 distance=600.0 * length / free))
        predicted = model.predict(1, now=t).traverse[0][road]
        first = predicted if first is None else first
        fitted.append(model.corr_beta[0] @ model._features(t, model.calibrated(), np.ones(city.n_roads))[road])
    assert first > 1.5 * free                      # the prior's x2 (the level is near free flow)
    assert fitted[5] > 0.6                          # a few windows barely move it
    assert 0.0 < fitted[-1] < fitted[5] - 0.03      # the data pull it toward 0, the prior holds it
    assert model.corr_scored[0] >= Model.CORRECTION_MIN and model.corr_shrink[0] == 0.0
    assert abs(predicted / free - 1.0) < 0.1


def test_validation_replay_with_and_without_the_prior(half_lit):
    """fcd-validate's --no-correction-prior: the in-process replay's model starts from no
    correction (what Model(city, correction_prior=None) predicts from the same reports); by
    default from the packaged prior, which changes the lit roads' predictions from the start."""
    from fcd.sim import Simulator
    from fcd.validate import predictions_from, replay
    trace = Simulator(half_lit, cars=120, seed=7).run(240.0)
    boundaries = [0.0, 60.0, 120.0, 180.0]
    with_prior = replay(trace, boundaries, window=60.0)
    without = replay(trace, boundaries, window=60.0, correction_prior=False)
    assert with_prior.stats["correction_prior"] == "packaged" and without.stats["correction_prior"] == "none"
    plain = predictions_from(half_lit, without.reports, boundaries, 60.0, without.present,
                             model=Model(half_lit, correction_prior=None))
    lit = half_lit.exit_light >= 0
    for b in boundaries:
        assert np.array_equal(without.predictions[b], plain[b])
        assert np.array_equal(with_prior.predictions[b][~lit], without.predictions[b][~lit])
    assert not np.allclose(with_prior.predictions[0.0][lit], without.predictions[0.0][lit])


def test_packaged_prior_holds_the_power_chosen_on_held_out_scenarios():
    """The lit class's power was chosen by fcd.train_prior against SUMO's edge times on training
    scenarios each predicted with a prior fitted on the others (the smallest power within
    POWER_TIE of the least mean ratio), and the online record keeps it."""
    import json
    from importlib import resources
    from fcd.train_prior import POWER_TIE
    data = json.loads((resources.files("fcd") / "data" / "correction_prior.json").read_text())
    lit = data["classes"]["lit"]
    held_out = {float(p): m for p, m in lit["held_out_ratio_by_power"].items()}
    tied = [p for p, m in held_out.items() if m <= min(held_out.values()) + POWER_TIE]
    assert lit["hold"] is True and lit["power"] == min(tied)
    prior = packaged_prior()
    assert prior.hold[CLASSES.index("lit")] and not prior.hold[CLASSES.index("unlit")]


def test_held_power_is_kept_where_the_record_disagrees(half_lit):
    """The same minutes as test_online_fit_moves_from_the_prior_to_the_data (the record turns an
    unheld prior's power to 0): a prior that holds its power keeps it past CORRECTION_MIN scored
    windows, while its coefficients move toward the data exactly as the unheld one's."""
    city = half_lit
    road = int(np.flatnonzero(city.exit_light < 0)[0])
    length, free = city.length[road], city.length[road] / city.speed[road]
    prior = hand_prior(np.log(2.0))
    held = Model(city, correction_prior=CorrectionPrior(prior.known, prior.beta, prior.gram, prior.power,
                                                       np.array([True, False])))
    unheld = Model(city, correction_prior=prior)
    for model in (held, unheld):
        model.window = 60.0
        for k in range(1, Model.CORRECTION_MIN + 200):
            t = 60.0 * k
            model.observe(RoadReport(road, t, True, queue=0, cars=2, density=0.0, mean_speed=city.speed[road],
                                     departures=5, interval=60.0, was_green=True, samples=600.0,
                                     distance=600.0 * length / free))
            model.predict(1, now=t)
    assert held.corr_scored[0] >= Model.CORRECTION_MIN
    assert held.corr_shrink[0] == 1.0 and unheld.corr_shrink[0] == 0.0
    # the fit itself is the same (it learns against the uncorrected prediction): only the power differs
    assert np.array_equal(held.corr_beta, unheld.corr_beta) and not np.array_equal(held.corr_beta, prior.beta)


def test_choose_power_scores_each_scenario_with_a_prior_fitted_on_the_others(half_lit, monkeypatch):
    """Leave one scenario out: scenario i's windows all say log(taken / predicted) = y_i (the
    bias feature), so the prior it is predicted with must carry the others' mean, never its own;
    the power returned is the one with the least mean ratio (here a bowl around 0.25)."""
    from fcd import validate
    from fcd.train_prior import TrainingRun, choose_power
    ys = [0.1, 0.4, 0.7]
    x = np.zeros(K)
    x[0] = 1.0
    windows = [[(1, x, y, 1.0)] * 400 for y in ys]
    runs = [TrainingRun(f"s{i}", half_lit, [], {}, [0.0], [], 0.0, 60.0) for i in range(len(ys))]
    seen = []

    def fake_predictions(city, reports, boundaries, window, present, model):
        return model

    def fake_compare(city, edges, model, warmup):
        seen.append((model.corr_prior.beta[1, 0], model.corr_shrink[1], model.corr_hold[1]))
        return {"all": {"model_vs_free_flow": (model.corr_shrink[1] - 0.25) ** 2 + len(seen) * 1e-9}}

    monkeypatch.setattr(validate, "predictions_from", fake_predictions)
    monkeypatch.setattr(validate, "compare_traverse", fake_compare)
    out = choose_power(runs, windows, classes=("lit",))
    assert out["lit"]["power"] == 0.25 and out["lit"]["held_out_scenarios"] == 3
    shrinks = len(Model.CORRECTION_SHRINKS)
    for i, y in enumerate(ys):
        others = np.mean([v for j, v in enumerate(ys) if j != i])
        for beta0, power, hold in seen[i * shrinks:(i + 1) * shrinks]:
            assert abs(beta0 - others) < 0.01 and hold


def _switching_road(model, city, road, cycles):
    """A lit road whose light switches every 30 s, its cars taking the free-flow time (so the
    light-delay factor's record prefers no factor), predicted at every switch."""
    length, free = city.length[road], city.length[road] / city.speed[road]
    model.window = 60.0
    for k in range(1, 2 * cycles):
        t = 30.0 * k
        green = k % 2 == 0
        model.observe(RoadReport(road, t, green, queue=0 if green else 4, cars=4, density=0.0,
                                 mean_speed=city.speed[road], departures=4 if not green else 0, interval=30.0,
                                 was_green=not green, samples=120.0, distance=120.0 * length / free))
        model.predict(1, now=t)


def test_light_delay_exponent_starts_from_the_given_one_then_its_record_chooses(half_lit):
    """Model(delay_power=): the light-delay factor's exponent until its record has DELAY_SKILL_MIN
    scored windows (fcd.train_prior chooses it against SUMO's times; 1 without it), then the
    record's choice, exactly as a model started from 1; with delay_hold the given one for good."""
    city = half_lit
    road = int(np.flatnonzero(city.exit_light >= 0)[0])
    early = Model(city, correction_prior=None, delay_power=0.75)
    _switching_road(early, city, road, 6)
    assert 0 < early.delay_scored < Model.DELAY_SKILL_MIN and early.delay_weight == 0.75
    started, plain = Model(city, correction_prior=None, delay_power=0.75), Model(city, correction_prior=None)
    held = Model(city, correction_prior=None, delay_power=0.75, delay_hold=True)
    for model in (started, plain, held):
        _switching_road(model, city, road, 60)
    assert held.delay_scored >= Model.DELAY_SKILL_MIN
    assert started.delay_weight == plain.delay_weight != 0.75 and not started.delay_hold
    assert held.delay_weight == 0.75 and held.delay_hold
    assert np.array_equal(held.delay_skill, started.delay_skill)     # the same record, only the choice differs


def test_prior_file_carries_the_light_delay_exponent():
    data = {"features": K, "classes": {"unlit": None, "lit": None}, "light_delay": {"power": 0.5, "hold": False}}
    prior = CorrectionPrior.from_json(data)
    assert prior.delay_power == 0.5 and not prior.delay_hold
    model = Model(grid_city(2, 2), correction_prior=prior)
    assert model.delay_weight == 0.5 and not model.delay_hold
    data["light_delay"]["hold"] = True
    assert Model(grid_city(2, 2), correction_prior=CorrectionPrior.from_json(data)).delay_hold
    # an older file without it: 1, then the record, as before
    del data["light_delay"]
    assert CorrectionPrior.from_json(data).delay_power is None
    model = Model(grid_city(2, 2), correction_prior=CorrectionPrior.from_json(data))
    assert model.delay_weight == 1.0 and not model.delay_hold


def test_packaged_prior_starts_the_light_delay_exponent_chosen_on_the_training_scenarios():
    import json
    from importlib import resources
    data = json.loads((resources.files("fcd") / "data" / "correction_prior.json").read_text())
    delay = data["light_delay"]
    ratios = {float(p): m for p, m in delay["held_out_ratio_by_power"].items()}
    assert delay["hold"] is False and delay["power"] == min(ratios, key=ratios.get)
    assert packaged_prior().delay_power == delay["power"]


def test_choose_exponents_picks_the_pair_with_the_least_held_out_ratio(half_lit, monkeypatch):
    """choose_exponents: for every light-delay exponent the windows are scored with it held and
    the correction's power chosen on held-out scenarios with it; the exponent whose best power
    has the least held-out ratio wins, with its windows and powers (here a bowl at 0.5 / 0.25)."""
    from fcd.train_prior import TrainingRun, choose_exponents
    runs = [TrainingRun("lit", half_lit, [], {}, [0.0], [], 0.0, 60.0)]
    table = {(d, c): 1.0 + (d - 0.5) ** 2 + (c - 0.25) ** 2 for d in Model.DELAY_WEIGHTS for c in Model.CORRECTION_SHRINKS}
    scored = []

    def fake_windows(run, delay_power):
        scored.append(delay_power)
        return [("windows at", delay_power)]

    def fake_power(runs, windows, classes, delay_power):
        assert windows == [[("windows at", delay_power)]]
        ratios = {str(c): table[(delay_power, c)] for c in Model.CORRECTION_SHRINKS}
        return {"lit": {"power": min(Model.CORRECTION_SHRINKS, key=lambda c: table[(delay_power, c)]),
                        "held_out_ratio_by_power": ratios}}

    monkeypatch.setattr(train_prior, "scored_windows", fake_windows)
    monkeypatch.setattr(train_prior, "choose_power", fake_power)
    delay, windows, chosen = choose_exponents(runs, ("lit",))
    assert scored == list(Model.DELAY_WEIGHTS)
    assert delay["power"] == 0.5 and not delay["hold"] and windows == [[("windows at", 0.5)]]
    assert chosen["lit"]["power"] == 0.25
    assert delay["held_out_ratio_by_power"]["0.5"] == pytest.approx(1.0)


def test_development_scenarios_are_neither_validation_nor_training():
    """The development set (fcd-validate --scenarios development: steady, long or saturated roads,
    chosen on beside the 18) shares no name, seed or network size with the 18 or the training set."""
    from fcd.validate import DEVELOPMENT, _scenarios
    training_names = {name for name, *_ in train_prior.TRAINING}
    training_seeds = {train_prior.TRAINING_SEED_BASE + i for i in range(len(train_prior.TRAINING))}
    training_shapes = [shape for _, _, _, shape, _ in train_prior.TRAINING]
    assert not set(DEVELOPMENT) & (set(ALL_SCENARIOS) | training_names)
    seeds = [seed for *_, seed in DEVELOPMENT.values()]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & (training_seeds | {1})
    for _, _, shape, _, _ in DEVELOPMENT.values():
        assert shape not in GENERATED_SHAPES.values() and shape not in training_shapes
    assert _scenarios("development") == list(DEVELOPMENT)
