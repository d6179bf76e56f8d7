"""The same booster, unchanged, on the user, linux, np and xdp engines: same packets seen, same
verdicts, same traffic at the destination.  Only where the work happens differs.

* user:  boxd on loopback relays udp 127.0.0.1:BOX -> 127.0.0.1:DST (opaque mode);
* linux: boxd --engine linux on the box of the ``transparent`` lab (kernel forwarding);
* np:    boxd --engine np on the host of an emulated card, the ``np-transparent`` lab with
         np4gs3-emu attached to its card namespace;
* xdp:   boxd --engine xdp on the box of the ``transparent`` lab (XDP and tc BPF programs).
"""

import contextlib
import socket
import sys
import time
from pathlib import Path

import pytest

from boxcore.lab import Lab
from cliruntime.procs import ProcessGroup, free_port, python_module
from npdrv import netns

from npdrv_netlab import MARKER, receive_until_marker

PY = sys.executable
PAYLOADS = [b"SPAM %d" % i if i % 4 == 1 else b"data %d" % i for i in range(40)]


@contextlib.contextmanager
def user_box(group: ProcessGroup, tmp_path: Path):
    box, dst = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    boxd = group.start("boxd", [*python_module("boxcore.boxd"), "--engine", "user", "--control",
                                str(tmp_path / "c.sock"), "--state", str(tmp_path / "state"),
                                "--listen", f"udp:127.0.0.1:{box}=127.0.0.1:{dst}"], stats=False)
    group.wait_for_log_sync(boxd, "boxd ready")
    yield {"in_box": [], "control": tmp_path / "c.sock", "watch_port": dst,
           "send": (None, ("127.0.0.1", box)), "recv": (None, ("127.0.0.1", dst))}


@contextlib.contextmanager
def lab_box(group: ProcessGroup, tmp_path: Path, engine: str):
    topology = netns.LAB_TOPOLOGY if engine == "np" else "transparent"
    with Lab.up(topology) as lab:
        try:
            if engine == "np":
                emu = group.start("card", [*python_module("npdrv.emulator"), "--name", lab.ns("card"),
                                           "--log-level", "warning"], stats=False)
                group.wait_for_log_sync(emu, '"ready": true')
            boxd = group.start("boxd", lab.command("box", [*python_module("boxcore.boxd"), "--engine", engine,
                                                           "--control", str(tmp_path / "c.sock"),
                                                           "--state", str(tmp_path / "state")]), stats=False)
            group.wait_for_log_sync(boxd, "boxd ready")
            yield {"in_box": lab.command("box", []), "control": tmp_path / "c.sock", "watch_port": 9001,
                   "send": (lab.ns("client"), ("10.2.0.2", 9001)), "recv": (lab.ns("server"), ("10.2.0.2", 9001))}
        finally:
            group.stop_all_sync()       # boxd and the card before their namespaces go


def _socket(ns: str | None, bind: tuple[str, int]):
    with netns.inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(bind)
    sock.settimeout(5.0)
    return sock


@pytest.mark.root
@pytest.mark.parametrize("engine", ["user", "linux", "np", "xdp"])
def test_the_same_booster_behaves_the_same_on_every_engine(engine, tmp_path):
    group = ProcessGroup(tmp_path / "roles")
    box = user_box(group, tmp_path) if engine == "user" else lab_box(group, tmp_path, engine)
    try:
        with box as env:
            booster = group.start("booster", [*env["in_box"], *python_module("boxcore.examples.udp_counter"),
                                              "--control", str(env["control"]), "--port", str(env["watch_port"]),
                                              "--drop-prefix", "SPAM", "--report-every", "0"])
            group.wait_for_log_sync(booster, "counting udp port")
            recv_ns, recv_addr = env["recv"]
            send_ns, send_addr = env["send"]
            rx = _socket(recv_ns, ("0.0.0.0", recv_addr[1]))
            tx = _socket(send_ns, ("0.0.0.0", 0))
            with rx, tx:
                for payload in PAYLOADS:
                    tx.sendto(payload, send_addr)
                    time.sleep(0.002)       # pacing, not synchronisation
                tx.sendto(MARKER, send_addr)
                got = receive_until_marker(rx)
            group.stop_sync(booster)
            totals = booster.read_stats()["totals"]
    finally:
        group.stop_all_sync()
    assert got == [p for p in PAYLOADS if not p.startswith(b"SPAM")]
    assert (totals["packets"], totals["dropped"], totals["passed"], totals["sources"]) == (41, 10, 31, 1)
