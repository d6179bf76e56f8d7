"""mmpog.cpu_account.CpuAccount: every call counted, every every-th timed with the thread's CPU clock,
a part's CPU its mean sampled cost times its calls; results and exceptions pass through."""

import time

import pytest

from mmpog.cpu_account import CpuAccount


def _spin(seconds: float) -> int:
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        n += 1
    return n


def test_counts_every_call_times_every_nth_and_estimates_the_whole():
    account = CpuAccount(every=4)
    heavy = account.wrap("heavy", lambda: _spin(0.002))
    light = account.wrap("light", lambda value: value + 1)
    account.start()
    for _ in range(40):
        heavy()
    assert [light(i) for i in range(10)] == list(range(1, 11))
    account.stop()
    report = account.report()
    parts = report["parts"]
    assert (parts["heavy"]["calls"], parts["heavy"]["sampled"]) == (40, 10)
    assert (parts["light"]["calls"], parts["light"]["sampled"]) == (10, 2)
    assert 2000 <= parts["heavy"]["us_per_call_timed"] < 6000    # each spins 2 ms of CPU
    assert 0 < report["clock_us"] < 100 and parts["heavy"]["us_per_call"] == pytest.approx(
        parts["heavy"]["us_per_call_timed"] - report["clock_us"], abs=0.02)
    assert parts["heavy"]["cpu_s"] == pytest.approx(40 * parts["heavy"]["us_per_call"] / 1e6, rel=1e-3)
    assert parts["light"]["us_per_call"] < parts["heavy"]["us_per_call"] / 10
    assert report["process_cpu_s"] >= 0.9 * parts["heavy"]["cpu_s"]   # the process did at least that


def test_start_forgets_what_came_before_and_exceptions_pass_through():
    account = CpuAccount(every=1)
    failing = account.wrap("failing", lambda: 1 / 0)
    for _ in range(3):
        with pytest.raises(ZeroDivisionError):
            failing()
    account.start()
    with pytest.raises(ZeroDivisionError):
        failing()
    account.stop()
    assert account.report()["parts"]["failing"]["calls"] == 1
    assert account.report()["parts"]["failing"]["sampled"] == 1
    with pytest.raises(ValueError):
        CpuAccount(every=0)
