"""The npdrv demo part: in memory (no privileges) and in namespaces (root)."""

import pytest

from npdrv import demo


def test_demo_in_memory():
    lines = []
    out = demo._in_memory(lines.append)
    assert out["commands_ok"] == 1002 and out["guided_frames"] > 1
    assert (out["redirected"], out["forwarded"]) == (1, 1)
    # the paper's 15 us is the card model's input, named as such (never a latency we measured)
    assert out["model_input_latency_us"] == 15.0
    assert not any(key.startswith("modelled") for key in out)
    assert len(lines) == 2


@pytest.mark.root
async def test_demo_in_namespaces(tmp_path):
    lines = []
    out = await demo.run_demo(tmp_path, lines.append)
    assert out["mode"] == "namespaces"
    assert (out["booster_seen"], out["booster_dropped"], out["delivered_9001"]) == (100, 25, 75)
    assert out["delivered_9002"] == 100 and out["card_redirected"] == 100
    assert out["model_input_latency_us"] == 15.0 and out["wall_p50_us"] > 0
    assert not any(key.startswith("modelled") for key in out)
