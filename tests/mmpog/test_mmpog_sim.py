"""The workload in simulated time: deterministic, and each second of play measured on its own."""

from tools import sim_mmpog


def test_sim_is_deterministic_and_reports_every_second_of_play():
    workload = sim_mmpog.Workload(players=8, locations=2, duration=3.0, loss=0.05, seed=3)
    first, again = sim_mmpog.run(workload), sim_mmpog.run(sim_mmpog.Workload(**vars(workload)))
    assert first == again
    reliable = first["reliable"]
    assert reliable["delivered_within_deadline_ratio"] == 1.0
    per_second = reliable["per_second_p99_ms"]
    assert len(per_second) == 3
    assert per_second[0] == reliable["first_second_latency_ms"]["p99"]      # the first second is the cold start
    # (the whole run's p99 lies within the seconds' up to interpolation: type 7 between the two order
    # statistics around it, which in a union of few small samples can sit a little past every second's)
    assert min(per_second) * 0.99 <= reliable["latency_ms"]["p99"] <= max(per_second) * 1.01
