"""The xdp data-path benchmark's method, without a lab: the knee ladder, medians of repeats,
and how roles are put on their CPU and into their cgroup."""

import argparse
import os

import pytest

from tools.bench_datapath_xdp import (GENERATOR_FLOOD_PPS, KNEE_FRACTIONS, LATENCY_LOAD, Bench, Isolation, figures,
                                      generator_bound)


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


def test_receive_modes_and_the_generator_flood(monkeypatch):
    with pytest.raises(ValueError):
        Isolation(enabled=False, budget=1.0, receive="rps")
    iso = Isolation(enabled=False, budget=1.0, receive="fifo")
    assert iso.receive == "softirq" and iso.generator_flood_rate() is None   # not isolated: no NAPI thread
    iso.receive = "fifo"
    # trafgen's ring path exits on EAGAIN behind a NAPI ring: its paced path, asked far above its reach
    assert iso.generator_flood_rate() == GENERATOR_FLOOD_PPS


def test_rt_throttling_is_read_from_the_kernel():
    values = Isolation.rt_throttling()
    runtime = int(open("/proc/sys/kernel/sched_rt_runtime_us").read())
    period = int(open("/proc/sys/kernel/sched_rt_period_us").read())
    assert values["sched_rt_runtime_us"] == runtime and values["sched_rt_period_us"] == period
    assert values["share_left_to_tasks"] == (0.0 if runtime < 0 else round(1 - runtime / period, 4))


def test_drop_is_generator_bound_only_when_it_dropped_all_that_was_sent():
    assert generator_bound({"sent": 1000, "counted": 1000, "seconds": 2.0, "dropped_at_veth": 0}) == {
        "generator_bound": True, "generator_sent_pps": 500.0}
    # lost at the veth's NAPI ring: the box did not keep up
    assert not generator_bound({"sent": 1000, "counted": 990, "seconds": 2.0, "dropped_at_veth": 10})["generator_bound"]
    assert not generator_bound({"sent": 1000, "counted": 900, "seconds": 2.0})["generator_bound"]


def _case(name, engine, rules, pps, p50=None, **extra):
    return {"case": name, "engine": engine, "rules": rules, "pps": pps, "loss": 0.0,
            "latency_us": {"p50": p50, "p99": None if p50 is None else p50 * 2}, **extra}


def test_the_latency_target_uses_the_load_below_the_knee_and_keeps_the_knee_figure():
    knee = {"offered": 1000, "offered_share_of_knee": 1.0}
    below = {"offered": 500, "offered_share_of_knee": LATENCY_LOAD}
    cases = [
        _case("ceiling", "linux", 0, 2000, 30, offered="unlimited"),
        _case("ceiling", "linux", 0, 1000, 40, **knee),
        _case("ceiling", "linux", 0, 500, 30, **below),
        _case("pass", "xdp", 1, 1000, 900, **knee),
        _case("pass", "xdp", 1, 500, 50, **below),
        _case("pass", "xdp", 1000, 990, 2700, **knee),
        _case("pass", "xdp", 1000, 500, 52, **below),
        _case("drop", "xdp", 1, 5000, offered="unlimited", generator_bound=True, generator_sent_pps=5000),
        _case("redirect_consume", "xdp", 1, 300, 60, offered="unlimited"),
        _case("redirect_consume_batch", "xdp", 1, 400, 60, offered="unlimited"),
        _case("redirect_consume", "linux", 1, 200, 90, offered="unlimited"),
        _case("redirect_consume_batch", "linux", 1, 200, 90, offered="unlimited"),
        _case("fanout", "xdp", 1, 6000, 100, offered="unlimited"),
        _case("fanout", "user", 0, 1000, 100, offered="unlimited"),
    ]
    args = argparse.Namespace(size=64, duration=2.0, repeat=3, paced_rate=2000)
    result = figures(cases, args)
    ratios = result["ratios"]
    assert ratios["pass1000_p50_over_pass1_p50"] == 1.04              # below the knee: the target's
    assert ratios["pass1000_p50_over_pass1_p50_at_knee"] == 3.0       # at the knee: kept, not judged
    assert result["target_met"]["pass1000_p50_within_10pct"]
    assert ratios["pass1000_over_ceiling"] == 0.99                    # throughput: both at the knee
    assert result["drop"] == {"generator_bound": True, "generator_sent_pps": 5000, "dropped_pps": 5000,
                              "needed_for_10x_linux_consume_pps": 2000.0}
    assert result["latency_load_share_of_knee"] == LATENCY_LOAD


def _runs_fifo(pid: int) -> bool:
    try:
        return os.sched_getscheduler(pid) == os.SCHED_FIFO
    except ProcessLookupError:
        return False


def _cpu_cgroup(pid: int) -> str:
    for line in open(f"/proc/{pid}/cgroup"):
        _, controllers, path = line.rstrip("\n").split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return ""


@pytest.mark.root
def test_the_napi_thread_runs_sched_fifo_on_the_box_cpu_and_is_restored():
    from boxcore.lab import Lab

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    iso = Isolation(enabled=True, budget=1.0, receive="fifo", priority=7)
    try:
        with Lab.up("transparent") as lab:
            iso.threaded_receive(lab)
            assert iso.napi_pinned, "no NAPI thread on the box's ingress veth"
            pids = list(iso.napi_pinned)
            for pid in pids:
                assert os.sched_getscheduler(pid) == os.SCHED_FIFO
                assert os.sched_getparam(pid).sched_priority == 7
                assert os.sched_getaffinity(pid) == {iso.cpus["boxd"]}
                # left in the root cgroup (RT_GROUP_SCHED gives child groups no RT time)
                assert _cpu_cgroup(pid) == "/"
            assert iso.describe()["rt_throttling"]["sched_rt_period_us"] > 0
            iso.release_threads()
            for pid in pids:
                assert os.sched_getscheduler(pid) == os.SCHED_OTHER
                assert os.sched_getaffinity(pid) == iso.all_cpus
            iso.restore_receive(lab)
            assert lab.run("box", ["cat", "/sys/class/net/cli/threaded"], capture_output=True).stdout.strip() == "0"
            assert not any(_runs_fifo(pid) for pid in pids)
    finally:
        iso.cleanup()
