"""A vertical's booster, unchanged, on the xdp engine in transparent placement: fcd-booster
redirects the cars' probes (socket delivery through bpf_sk_assign), aggregates, reports by
XML-RPC; with the booster gone, packets pass again (fail-open)."""

import asyncio

import pytest

from fcd.stack import Stack
from tests.fcd.conftest import small_city, small_trace  # noqa: F401 (fixtures)
from tests.fcd.test_fcd_transparent import gen, server_status


@pytest.mark.root
@pytest.mark.slow
async def test_fcd_booster_on_the_xdp_engine(tmp_path, small_trace):  # noqa: F811
    from boxcore.lab import TOPOLOGY_DIR, Lab
    from tests.xdp.conftest import bpf_problem

    problem = bpf_problem()
    if problem:
        pytest.fail(problem)
    trace = tmp_path / "t.npz"
    small_trace.save(trace)
    lab = Lab.up(TOPOLOGY_DIR / "transparent.toml")
    stack = Stack(tmp_path / "roles")
    try:
        server_ip = lab.addr("server")
        udp, http = f"{server_ip}:7000", f"{server_ip}:8080"
        server = stack.start("server", "fcd.server", ["--city", str(trace), "--udp", udp, "--http", http],
                             wrap=lab.command("server", []))
        await stack.wait_ready(server)
        control = tmp_path / "boxd.sock"
        boxd = stack.start("boxd", "boxcore.boxd", ["--engine", "xdp", "--control", str(control),
                                                     "--state", str(tmp_path / "state")],
                           ready=False, wrap=lab.command("box", []))
        await stack.wait_socket(boxd, control)
        booster = stack.start("booster", "fcd.booster", [
            "--control", str(control), "--city", str(trace), "--server-udp", udp, "--server-http", http,
            "--box-id", "edge", "--stats-interval", "0.2"], wrap=lab.command("box", []))
        ready = await stack.wait_ready(booster)
        assert ready["engine"] == "xdp" and ready["delivery"] == "socket"

        sent = (await asyncio.to_thread(gen, lab, trace, udp, 3))["sent"]
        await asyncio.sleep(1.5)
        status = await asyncio.to_thread(server_status, lab, f"{server_ip}:8080")
        assert status["udp"]["received"] == 0                 # nothing reached the server raw
        assert status["boxes"]["edge"]["received"] == sent    # the box saw every packet
        assert status["counters"]["reports_box"] > 10

        await stack.stop(booster)
        await asyncio.sleep(0.5)
        sent_after = (await asyncio.to_thread(gen, lab, trace, udp, 1))["sent"]
        await asyncio.sleep(0.5)
        status = await asyncio.to_thread(server_status, lab, f"{server_ip}:8080")
        assert status["udp"]["received"] == sent_after
    finally:
        await stack.stop_all()
        lab.down()
