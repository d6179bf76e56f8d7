"""Transparent placement (paper Fig. 1 / Fig. 6): the linux engine on a router between the cars
and the server, in network namespaces.  Cars send to the server's address; the box intercepts
with NFQUEUE, aggregates, and reports by XML-RPC; with the booster gone, packets pass (fail-open)."""

import asyncio
import json
import sys

import pytest

from fcd.stack import Stack
from tests.polling import until

STATUS = ("import json, sys, urllib.request; "
          "print(urllib.request.urlopen(f'http://{sys.argv[1]}/status', timeout=10).read().decode())")


def server_status(lab, addr):
    out = lab.run("server", [sys.executable, "-c", STATUS, addr], timeout=30)
    return json.loads(out.stdout)


async def until_in_thread(condition, what: str, timeout: float = 30.0, step: float = 0.1):
    """:func:`tests.polling.until` of ``condition()`` run in a thread (it runs commands in the lab's
    namespaces): across namespaces and processes there is no event to wait on."""
    return await until(lambda: asyncio.to_thread(condition), what, timeout, step=step)


def gen(lab, trace, target, seconds):
    out = lab.run("client", [sys.executable, "-m", "fcd.gen", "--trace", str(trace), "--targets", target,
                             "--speed", "20", "--duration", str(seconds), "--log-level", "warning"],
                  timeout=60)
    return json.loads(out.stdout.splitlines()[-1])


async def fcd_through_a_transparent_box(tmp_path, small_trace, engine: str, delivery: str, rules_gone,
                                        boxd_extra=()) -> None:
    """fcd-booster, unchanged, on ``engine`` in the transparent lab: the cars send to the server's
    address, the box takes every probe (``delivery``), aggregates and reports by XML-RPC; once the
    booster is gone (``rules_gone(lab)``), the cars' datagrams reach the server again (fail-open)."""
    from boxcore.lab import TOPOLOGY_DIR, Lab

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
        _, booster = await stack.box("edge", trace, 0, 7000, 8080, ["--engine", engine, *boxd_extra],
                                     ["--stats-interval", "0.2"], control=tmp_path / "boxd.sock",
                                     server_host=server_ip, wrap=lab.command("box", []))
        ready = await stack.wait_ready(booster)
        assert ready["engine"] == engine and ready["delivery"] == delivery

        sent = (await asyncio.to_thread(gen, lab, trace, udp, 3))["sent"]

        def final_box_report():             # the box reports once more when its data stops
            status = server_status(lab, f"{server_ip}:8080")
            return status if status["boxes"].get("edge", {}).get("idle") else None

        status = await until_in_thread(final_box_report, "the box's final counters")
        assert status["udp"]["received"] == 0                 # nothing reached the server raw
        assert status["boxes"]["edge"]["received"] == sent    # the box saw every packet
        assert status["counters"]["reports_box"] > 10
        assert status["http_connections"] == 1

        # the booster goes away: its rules are removed and the traffic passes again (fail-open)
        await stack.stop(booster)
        await until_in_thread(lambda: rules_gone(lab), "the booster's rules to go")
        sent_after = (await asyncio.to_thread(gen, lab, trace, udp, 1))["sent"]
        await until_in_thread(lambda: server_status(lab, f"{server_ip}:8080")["udp"]["received"] >= sent_after,
                              "the raw datagrams at the server")
        status = await asyncio.to_thread(server_status, lab, f"{server_ip}:8080")
        assert status["udp"]["received"] == sent_after
    finally:
        await stack.stop_all()
        lab.down()


@pytest.mark.root
@pytest.mark.slow
async def test_transparent_placement_with_the_linux_engine(tmp_path, small_trace):
    await fcd_through_a_transparent_box(
        tmp_path, small_trace, "linux", "nfqueue",
        rules_gone=lambda lab: "NFQUEUE" not in lab.run("box", ["iptables-save"], timeout=30).stdout)
