"""The xdp data-path benchmark's method, without a lab: the knee ladder, medians of repeats,
and how roles are put on their CPU and into their cgroup."""

import pytest

from tools.bench_datapath_xdp import KNEE_FRACTIONS, Bench, Isolation


class FakeBench(Bench):
    """Bench with the generator replaced: ``box_limit`` packets/s forwarded, the generator
    reaching at most ``sender_limit``."""

    def __init__(self, box_limit: float, sender_limit: float, runs=()) -> None:
        self.box_limit, self.sender_limit = box_limit, sender_limit
        self.asked: list = []
        self.runs = list(runs)
        self.repeat = 3

    def blast(self, dst="", *, rate=None, count=None, probe=False) -> dict:
        self.asked.append(rate)
        offered = min(rate or self.sender_limit, self.sender_limit)
        if self.runs:
            offered = self.runs.pop(0)
        return {"sent": offered, "arrived": min(offered, self.box_limit), "seconds": 1.0, "latencies": [1.0]}


def test_the_knee_is_where_plain_forwarding_starts_to_lose():
    bench = FakeBench(box_limit=80_000, sender_limit=1e9)
    knee, steps, limit = bench.find_knee(100_000)
    assert knee == 80_000 and limit == "the ceiling lost packets above it"
    assert [s["rate"] for s in steps] == [50_000, 60_000, 70_000, 80_000, 90_000]   # stops at the first loss
    assert steps[-1]["loss"] > 0.01


def test_the_knee_stops_where_the_generator_falls_short():
    bench = FakeBench(box_limit=1e9, sender_limit=62_000)
    knee, steps, limit = bench.find_knee(100_000)
    assert knee == 70_000 and limit == "the generator fell short of the next rate"
    assert len(steps) == 3


def test_no_loss_up_to_the_top_of_the_ladder():
    knee, steps, limit = FakeBench(box_limit=1e9, sender_limit=1e9).find_knee(100_000)
    assert knee == 100_000 and len(steps) == len(KNEE_FRACTIONS) and limit == "ladder top (no loss)"


def test_a_case_reports_the_median_run_and_every_run():
    bench = FakeBench(box_limit=1e9, sender_limit=1e9, runs=[300, 100, 200])
    chosen = bench.repeated(bench.blast, key=lambda r: r["arrived"] / r["seconds"])
    assert chosen["median"] == 200 and chosen["arrived"] == 200
    assert chosen["runs"] == [300, 100, 200] and chosen["latencies"] == [1.0] * 3


def test_roles_start_in_their_cgroup_pinned_to_their_cpu(monkeypatch):
    iso = Isolation(enabled=False, budget=1.0)
    assert iso.wrap("generator", ["trafgen"]) == ["trafgen"]
    assert iso.describe() == {"isolated": False, "reason": "--no-isolation", "box_receive": "softirq"}

    class Budgets:
        def group(self, name):
            return f"/sys/fs/cgroup/cpu/bbtest/{name}"

    iso.budgets, iso.cpus = Budgets(), {"generator": 0, "boxd": 1, "booster": 1}
    argv = iso.wrap("booster", ["ip", "netns", "exec", "ns", "python3"])
    assert argv[:2] == ["sh", "-c"] and argv[3] == "/sys/fs/cgroup/cpu/bbtest/booster"
    assert argv[4:] == ["taskset", "-c", "1", "ip", "netns", "exec", "ns", "python3"]
    with pytest.raises(ValueError):
        iso.wrap("nobody", ["x"])
