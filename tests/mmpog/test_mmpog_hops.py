"""tools.mmpog_hops: finding updates in captured datagrams and splitting their latency per hop;
(root) a real KCP session captured on a namespace's loopback."""

import json
import struct
import subprocess
import sys

import pytest

from mmpog.bots import UPDATE as MMPOG_UPDATE
from tools.compare_mmpog import UPDATE as RELAY_UPDATE
from tools.mmpog_hops import LAYOUTS, analyse, find_updates

PORT = 7400
T0 = 1000.0          # monotonic send times; the capture's stamps are realtime: offset below
OFFSET = 5_000.0


def _stamp(monotonic: float) -> int:
    return round((monotonic + OFFSET) * 1e9)


def test_finds_every_update_of_a_datagram_by_its_exact_send_time_in_either_layout():
    sent = {(3, 7): (T0 + 0.25, False), (4, 9): (T0 + 0.5, True)}
    relay = RELAY_UPDATE.pack(3, 1, 7, 0, T0 + 0.25) + b"pad" + RELAY_UPDATE.pack(4, 1, 9, 1, T0 + 0.5)
    prefix = struct.pack("!d", T0)[:2]
    assert find_updates(b"\x01hdr" + relay, prefix, LAYOUTS["kcp"], sent) == [(3, 7), (4, 9)]
    mmpog = b"header" + MMPOG_UPDATE.pack(3, 7, T0 + 0.25) + bytes(50)
    assert find_updates(mmpog, prefix, LAYOUTS["mmpog"], sent) == [(3, 7)]
    # the same bytes where the number or the time does not match what was sent are not an update
    assert find_updates(b"x" + MMPOG_UPDATE.pack(3, 8, T0 + 0.25), prefix, LAYOUTS["mmpog"], sent) == []
    assert find_updates(b"x" + MMPOG_UPDATE.pack(3, 7, T0 + 0.26), prefix, LAYOUTS["mmpog"], sent) == []


def test_hops_of_one_update_fanned_out_to_two_receivers():
    # bot 0 (port 5000) sends update 0 at T0; the relay gets it 30 us later and sends it to bot 1
    # (port 5001) 200 us after that and to bot 2 (port 5002) 50 us later still; the games have it
    # 100 us after their sockets.  Bots 1 and 2 are known by what they sent to the relay.
    sent = {(0, 0): (T0, False), (1, 0): (T0 + 1, False), (2, 0): (T0 + 1, False)}
    update = RELAY_UPDATE.pack(0, 0, 0, 0, T0)
    records = [
        (_stamp(T0 + 30e-6), 5000, PORT, b"\x00" + update),
        (_stamp(T0 + 230e-6), PORT, 5001, b"\x00" + update),
        (_stamp(T0 + 280e-6), PORT, 5002, b"\x00" + update),
        (_stamp(T0 + 290e-6), PORT, 5002, b"\x00" + update),          # a second copy: the first counts
        (_stamp(T0 + 1 + 30e-6), 5001, PORT, b"\x00" + RELAY_UPDATE.pack(1, 0, 0, 0, T0 + 1)),
        (_stamp(T0 + 1 + 30e-6), 5002, PORT, b"\x00" + RELAY_UPDATE.pack(2, 0, 0, 0, T0 + 1)),
    ]
    captured = {"records": records, "offset": OFFSET, "kernel_drops": 0, "cpu_seconds": 0.1, "offset_drift_us": 0}
    got = {(1, 0, 0): 330e-6, (2, 0, 0): 380e-6}
    arrived = {(1, 0, 0): 230e-6, (2, 0, 0): 281e-6}
    result = analyse("kcp", captured, PORT, sent, got, arrived)
    hops = result["unreliable"]
    assert hops["deliveries"] == 2
    assert hops["sender"]["p50"] == pytest.approx(0.030, abs=1e-3)
    assert hops["relay"]["p50"] == pytest.approx(0.225, abs=1e-3)        # 200 and 250 us
    assert hops["relay_first"]["p50"] == pytest.approx(0.200, abs=1e-3)
    assert hops["relay_fanout"]["p90"] == pytest.approx(0.045, abs=1e-3)  # 0 and 50 us
    assert hops["receiver"]["p50"] == pytest.approx(0.100, abs=1e-3)
    assert hops["to_game"]["p50"] == pytest.approx(0.355, abs=1e-3)
    assert hops["bot_stamp_vs_capture_us_p50"] == pytest.approx(0.5, abs=0.1)
    assert result["reliable"]["deliveries"] == 0


@pytest.mark.root
def test_a_kcp_session_captured_in_a_namespace_has_every_unreliable_delivery_split_into_hops(tmp_path):
    pytest.importorskip("kcp")
    out = tmp_path / "hops.json"
    proc = subprocess.run([sys.executable, "-m", "tools.mmpog_hops", "--stacks", "kcp", "--players", "4",
                           "--locations", "1", "--duration", "2", "--workers", "1", "--budget", "0",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    section = json.loads(out.read_text())["runs"][0]["kcp"]
    hops = section["hops"]["unreliable"]
    delivered = section["unreliable"]["delivered_ratio"] * section["unreliable"]["expected"]
    assert hops["deliveries"] == round(delivered) > 0          # every delivery found in the capture
    assert section["hops"]["capture_kernel_drops"] == 0
    for hop in ("sender", "relay", "receiver"):
        assert 0 < hops[hop]["p50"] < 100                      # ms: stamps and send times on one clock


def test_the_comparison_runs_mmpogs_bots_in_a_worker_process_even_alone_and_unbudgeted():
    # mmpog-bots runs one unbudgeted worker's bots inside its own process, beside the game server;
    # the comparison gives them a process of their own, as KCP's and ENet's bots have
    import socket

    from boxcore.procs import free_port
    from tools.compare_mmpog import Workload, run_mmpog_stack

    w = Workload(players=3, locations=1, duration=1.0, loss=0.0, workers=1, budget=0.0, drain=0.5)
    updates: dict = {}
    section = run_mmpog_stack(w, free_port(socket.SOCK_DGRAM), updates)
    assert set(section["cpu_share"]) == {"reflector", "worker0"}
    assert set(section["wakeups_per_s"]) == {"reflector", "worker0"} and section["wakeups_per_s"]["worker0"] > 0
    assert updates["sent"] and len(updates["got"]) == 2 * len(updates["sent"])    # per-update data handed over



def test_cold_cost_times_the_reflector_core_after_each_sleep():
    from tools.mmpog_hops import cold_cost

    result = cold_cost([0.0, 0.001], updates=200)
    assert set(result) == {"0.0", "0.001"}
    for figures in result.values():
        assert figures["core_us"]["p50"] > 0 and figures["core_us"]["p90"] >= figures["core_us"]["p50"]
        assert figures["floor_us"]["p50"] >= 0
