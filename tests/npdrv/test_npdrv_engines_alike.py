"""The same booster, unchanged, on the user, linux, np and xdp engines: same packets seen, same
verdicts, same traffic at the destination.  Only where the work happens differs.

* user:  boxd on loopback relays udp 127.0.0.1:BOX -> 127.0.0.1:DST (opaque mode);
* linux: boxd --engine linux on the box of the ``transparent`` lab (kernel forwarding);
* np:    boxd --engine np on the host of an emulated card, the ``np-transparent`` lab with
         np4gs3-emu attached to its card namespace;
* xdp:   boxd --engine xdp on the box of the ``transparent`` lab (XDP and tc BPF programs).
"""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boxcore.lab import Lab
from boxcore.testing import free_port
from npdrv import netns

PY = sys.executable
PAYLOADS = [b"SPAM %d" % i if i % 4 == 1 else b"data %d" % i for i in range(40)]


def _wait_log(proc: subprocess.Popen, log: Path, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {log.read_text()[-3000:]}")
        if text in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def user_box(tmp_path: Path):
    box, dst = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    log = tmp_path / "boxd.log"
    boxd = subprocess.Popen([PY, "-m", "boxcore.boxd", "--engine", "user", "--control", str(tmp_path / "c.sock"),
                             "--state", str(tmp_path / "state"), "--listen", f"udp:127.0.0.1:{box}=127.0.0.1:{dst}"],
                            stderr=open(log, "w"))
    try:
        _wait_log(boxd, log, "boxd ready")
        yield {"prefix": [], "control": tmp_path / "c.sock", "watch_port": dst,
               "send": lambda: (None, ("127.0.0.1", box)), "recv": lambda: (None, ("127.0.0.1", dst))}
    finally:
        _stop(boxd)


@contextlib.contextmanager
def lab_box(tmp_path: Path, engine: str):
    topology = netns.LAB_TOPOLOGY if engine == "np" else "transparent"
    with Lab.up(topology) as lab:
        emu = None
        if engine == "np":
            emu = subprocess.Popen([PY, "-m", "npdrv.emulator", "--name", lab.ns("card"), "--log-level", "warning"],
                                   stdout=subprocess.PIPE, text=True)
            assert json.loads(emu.stdout.readline())["ready"]
        log = tmp_path / "boxd.log"
        boxd = lab.popen("box", [PY, "-m", "boxcore.boxd", "--engine", engine, "--control",
                                 str(tmp_path / "c.sock"), "--state", str(tmp_path / "state")],
                         stderr=open(log, "w"))
        try:
            _wait_log(boxd, log, "boxd ready")
            yield {"prefix": ["ip", "netns", "exec", lab.ns("box")], "control": tmp_path / "c.sock",
                   "watch_port": 9001, "send": lambda: (lab.ns("client"), ("10.2.0.2", 9001)),
                   "recv": lambda: (lab.ns("server"), ("10.2.0.2", 9001))}
        finally:
            _stop(boxd)
            _stop(emu)


def _socket(ns: str | None, bind: tuple[str, int]):
    import socket
    with netns.inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(bind)
    sock.settimeout(1.0)
    return sock


@pytest.mark.root
@pytest.mark.parametrize("engine", ["user", "linux", "np", "xdp"])
def test_the_same_booster_behaves_the_same_on_every_engine(engine, tmp_path):
    box = user_box(tmp_path) if engine == "user" else lab_box(tmp_path, engine)
    with box as env:
        stats = tmp_path / "booster.json"
        booster = subprocess.Popen(env["prefix"] + [PY, "-m", "boxcore.examples.udp_counter", "--control",
                                                    str(env["control"]), "--port", str(env["watch_port"]),
                                                    "--drop-prefix", "SPAM", "--report-every", "0",
                                                    "--stats-json", str(stats)],
                                   stderr=open(tmp_path / "booster.log", "w"))
        try:
            _wait_log(booster, tmp_path / "booster.log", "counting udp port")
            recv_ns, recv_addr = env["recv"]()
            send_ns, send_addr = env["send"]()
            rx = _socket(recv_ns, ("0.0.0.0", recv_addr[1]))
            tx = _socket(send_ns, ("0.0.0.0", 0))
            for payload in PAYLOADS:
                tx.sendto(payload, send_addr)
                time.sleep(0.002)
            got = []
            with contextlib.suppress(TimeoutError):
                while True:
                    got.append(rx.recv(2048))
            rx.close()
            tx.close()
        finally:
            _stop(booster)
        totals = json.loads(stats.read_text())["totals"]
    assert got == [p for p in PAYLOADS if not p.startswith(b"SPAM")]
    assert (totals["packets"], totals["dropped"], totals["passed"], totals["sources"]) == (40, 10, 30, 1)
