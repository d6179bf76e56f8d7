"""The mmpog part of booster-demo runs end to end and reports its figures."""

from mmpog.demo import run_demo


async def test_demo_runs_a_session_through_the_reflector_booster(tmp_path):
    lines = []
    summary = await run_demo(tmp_path, lines.append)
    assert any("delivery socket" in line for line in lines)          # the booster on boxd, fast path
    assert summary["duplicates_delivered"] == 0
    assert summary["reliable_unaccounted"] == 0
    assert summary["reliable_delivered_ratio"] >= 0.95
    assert 0 < summary["unreliable_delivered_ratio"] < 1              # 5% loss each way, not repaired
    assert summary["reflector_pps"] > 0
