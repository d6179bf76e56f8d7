"""``booster-loadgen np-latency``: forwarding latency through the emulated NP4GS3 card and
through Linux kernel forwarding, in the same run (paper section II-C).

The paper's claim: the card forwards in 15 µs ± 3 µs "virtually independent of the offered
load, the packet size and the number of classifier rules", while Linux kernel forwarding
takes one to several hundred µs depending on size and load.  This experiment varies the
three axes, one at a time around a base point (or as a full grid with ``--grid``):

* path ``np``: client -> card (np4gs3-emu, attach mode on the ``np-transparent`` lab) ->
  server; the card holds N booster rules (REDIRECT on other UDP ports, filed in the
  multi-field table's port buckets) and forwards the measured flow by its LPM table.
  Rows also carry the modelled latency of the real card for the same packets.
* path ``linux``: client -> box (kernel forwarding, the ``transparent`` lab) -> server; the
  box's FORWARD chain holds N iptables rules on other UDP ports (what the linux engine
  would install), which every forwarded packet walks.

Sender and receiver are separate processes in the client and server namespaces; each
packet carries its send time (CLOCK_REALTIME, ns) and the receiver takes the kernel's
receive timestamp (SO_TIMESTAMPNS), so the figure is one-way latency through the path.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import multiprocessing
import os
import socket
import struct
import time
from pathlib import Path

from boxcore.procs import ProcessGroup, python_module
from boxcore.udpbatch import STAMP_CONTROL, enable_timestamps, timestamp_ns_of
from cliruntime import ConfigError, int_list, non_negative_float, positive_int, progress
from tools.output import write_result
from tools.stats import summary

log = logging.getLogger("booster-loadgen.np-latency")

STAMP = struct.Struct("!QI")          # send time (ns, realtime), sequence number
FRAME_OVERHEAD = 14 + 20 + 8          # Ethernet + IPv4 + UDP headers
FLOW_PORT = 9000
RULE_PORT_BASE = 20000
CLIENT, SERVER = "10.1.0.2", "10.2.0.2"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "np-latency", help="forwarding latency: emulated NP card vs Linux kernel forwarding",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  booster-loadgen np-latency --json out/np.json --plot out/np.png\n"
               "  booster-loadgen np-latency --loads 1000,8000 --sizes 64,1400 --rules 1,1000 --grid "
               "--duration 2 --json out/np-grid.json")
    parser.add_argument("--json", type=Path, help="write the results here (also printed on stdout)")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here")
    parser.add_argument("--loads", type=int_list, default=[1000, 4000, 12000], help="offered loads, packets/s")
    parser.add_argument("--sizes", type=int_list, default=[64, 512, 1400], help="frame sizes, bytes (64-1514)")
    parser.add_argument("--rules", type=int_list, default=[1, 100, 1000], help="classifier rules installed")
    parser.add_argument("--base-load", type=positive_int, default=2000, help="load while another axis varies")
    parser.add_argument("--base-size", type=positive_int, default=512, help="size while another axis varies")
    parser.add_argument("--base-rules", type=positive_int, default=1, help="rules while another axis varies")
    parser.add_argument("--grid", action="store_true", help="every combination instead of one axis at a time")
    parser.add_argument("--duration", type=non_negative_float, default=1.0, help="seconds of traffic per point")
    parser.add_argument("--paths", default="np,linux", help="which paths to measure (np, linux)")
    parser.add_argument("--model-latency-us", type=non_negative_float, default=15.0,
                        help="the card model's mean latency")
    parser.add_argument("--model-jitter-us", type=non_negative_float, default=3.0,
                        help="the card model's spread (± bound)")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------- traffic processes

def _enter(ns: str) -> None:
    from npdrv import netns
    netns.enter(ns)


def _receiver(ns: str, port: int, ready, conn) -> None:
    """Collect one-way latencies (µs) until the sender says it is done and the line is quiet."""
    import numpy as np

    _enter(ns)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    enable_timestamps(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((SERVER, port))
    sock.settimeout(0.2)
    ready.set()
    latencies: list[float] = []
    seqs = set()
    done_at = None
    while True:
        try:
            data, anc, _flags, _addr = sock.recvmsg(2048, STAMP_CONTROL)
        except socket.timeout:
            if conn.poll():
                done_at = done_at or time.monotonic()
            if done_at is not None and time.monotonic() - done_at > 0.3:
                break
            continue
        rx_ns = timestamp_ns_of(anc)
        if rx_ns is None or len(data) < STAMP.size:
            continue
        sent_ns, seq = STAMP.unpack_from(data)
        if seq == 0xFFFFFFFF:          # warm-up packet
            continue
        seqs.add(seq)
        latencies.append((rx_ns - sent_ns) / 1000)
    conn.send((np.asarray(latencies, dtype=np.float64).tobytes(), len(seqs)))


def _sender(ns: str, port: int, pps: int, size: int, duration: float, conn) -> None:
    _enter(ns)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind((CLIENT, 0))
    pad = b"\x00" * (size - FRAME_OVERHEAD - STAMP.size)
    for _ in range(20):                # warm up ARP and the card's tables
        sock.sendto(STAMP.pack(time.time_ns(), 0xFFFFFFFF) + pad, (SERVER, port))
        time.sleep(0.005)
    time.sleep(0.2)
    total = int(pps * duration)
    start = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * pps) + 1)
        while sent < due:
            try:
                sock.sendto(STAMP.pack(time.time_ns(), sent) + pad, (SERVER, port))
            except BlockingIOError:
                pass
            sent += 1
        pause = (sent / pps) - (time.perf_counter() - start)
        if pause > 0.0002:
            time.sleep(pause)
    conn.send(sent)


def measure(client_ns: str, server_ns: str, pps: int, size: int, duration: float) -> dict:
    import numpy as np

    ctx = multiprocessing.get_context("fork")
    rx_parent, rx_child = ctx.Pipe()
    tx_parent, tx_child = ctx.Pipe()
    ready = ctx.Event()
    receiver = ctx.Process(target=_receiver, args=(server_ns, FLOW_PORT, ready, rx_child), daemon=True)
    receiver.start()
    if not ready.wait(10):
        receiver.kill()
        raise RuntimeError("receiver did not start")
    sender = ctx.Process(target=_sender, args=(client_ns, FLOW_PORT, pps, size, duration, tx_child), daemon=True)
    sender.start()
    sent = tx_parent.recv() if tx_parent.poll(duration * 5 + 30) else 0
    sender.join(10)
    rx_parent.send("done")
    if not rx_parent.poll(30):
        receiver.kill()
        raise RuntimeError("receiver did not report")
    raw, received = rx_parent.recv()
    receiver.join(10)
    lat = np.frombuffer(raw, dtype=np.float64)
    return {"sent": sent, "received": received, "latencies": lat}


# ---------------------------------------------------------------- the two paths

class NpPath:
    """The np-transparent lab with np4gs3-emu attached to its card namespace."""

    name = "np"

    def __init__(self, workdir: Path, model_us: float, jitter_us: float) -> None:
        from boxcore.lab import Lab
        from npdrv import netns

        self.lab = Lab.up(netns.LAB_TOPOLOGY)
        macs = [netns.link_mac(iface, self.lab.ns("box")) for iface in ("np0", "np1")]
        self.group = ProcessGroup(workdir)
        self.emu = self.group.start("np4gs3-emu", [
            *python_module("npdrv.emulator"), "--name", self.lab.ns("card"), "--port-macs", ",".join(macs),
            "--code", "booster", "--model-latency-us", str(model_us), "--model-jitter-us", str(jitter_us),
            "--log-level", "warning"])
        self.group.wait_for_log_sync(self.emu, '"ready": true', 60)   # its ready line on stdout
        self.rules = 0
        self.control_log: list[dict] = []      # how fast rules reach the card over guided frames
        server_mac = netns.link_mac("eth0", self.lab.ns("server"))
        client_mac = netns.link_mac("eth0", self.lab.ns("client"))
        self._control([("fwd", f"{SERVER}/32", 1, server_mac), ("fwd", f"{CLIENT}/32", 0, client_mac)])
        from npdrv.card import Card, CardConfig
        self.model = Card(CardConfig(model_latency_us=model_us, model_jitter_us=jitter_us, seed=1))

    def _control(self, ops: list[tuple]) -> None:
        from npdrv import netns, wire
        from npdrv.driver import NpDriver

        async def go() -> None:
            with netns.inside(self.lab.ns("box")):
                driver = await NpDriver("npc").open()
            try:
                commands = []
                for op in ops:
                    if op[0] == "fwd":
                        commands.append(wire.request(wire.FwdAdd(op[1], op[2], op[3])))
                    elif op[0] == "rule":
                        commands.append(wire.request(wire.NpRule(
                            op[1], 100, wire.NpAction.REDIRECT, proto=17, proto_mask=0xFF,
                            dport=(RULE_PORT_BASE + op[1], RULE_PORT_BASE + op[1]))))
                    elif op[0] == "unrule":
                        commands.append(wire.request(wire.RuleRef(op[1]), wire.Cmd.RULE_DELETE))
                if commands:
                    await driver.execute(commands)
            finally:
                await driver.close()

        asyncio.run(go())

    def set_rules(self, count: int) -> None:
        started = time.perf_counter()
        if count > self.rules:
            ops = [("rule", i) for i in range(self.rules + 1, count + 1)]
        else:
            ops = [("unrule", i) for i in range(count + 1, self.rules + 1)]
        if ops:
            self._control(ops)
            seconds = time.perf_counter() - started
            self.control_log.append({"op": ops[0][0], "commands": len(ops), "seconds": round(seconds, 4),
                                     "commands_per_s": round(len(ops) / seconds)})
        self.rules = count

    def modelled(self, count: int) -> dict:
        return summary([self.model.model_latency_ns() / 1000 for _ in range(max(count, 1))], (50, 99))

    def close(self) -> dict:
        summary = {}
        self.group.stop_sync(self.emu, grace=15)
        try:
            data = self.emu.read_stats()
            summary = {"latency_us": data["emulator"]["latency_us"], "card": data["emulator"]["card"],
                       "control": data["emulator"]["control"], "kernel_drops": data.get("kernel_drops", {})}
        except (OSError, ValueError, KeyError):
            pass
        summary["rule_updates"] = self.control_log
        self.lab.down()
        return summary


class LinuxPath:
    """The transparent lab: the box forwards in its kernel, N iptables rules in FORWARD."""

    name = "linux"
    CHAIN = "NPBENCH"

    def __init__(self) -> None:
        from boxcore.lab import Lab

        self.lab = Lab.up("transparent")
        self.lab.run("box", ["iptables-restore", "--noflush"],
                     input=f"*filter\n:{self.CHAIN} - [0:0]\n-I FORWARD 1 -j {self.CHAIN}\nCOMMIT\n")

    def set_rules(self, count: int) -> None:
        lines = ["*filter", f":{self.CHAIN} - [0:0]"]
        lines += [f"-A {self.CHAIN} -p udp --dport {RULE_PORT_BASE + i} -j NFQUEUE --queue-num 100 --queue-bypass"
                  for i in range(1, count + 1)]
        lines.append("COMMIT")
        self.lab.run("box", ["iptables-restore", "--noflush"], input="\n".join(lines) + "\n")

    def modelled(self, count: int) -> None:
        return None

    def close(self) -> dict:
        self.lab.down()
        return {}


# ---------------------------------------------------------------- the experiment

def points(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    if args.grid:
        return list(itertools.product(args.loads, args.sizes, args.rules))
    out = [(load, args.base_size, args.base_rules) for load in args.loads]
    out += [(args.base_load, size, args.base_rules) for size in args.sizes]
    out += [(args.base_load, args.base_size, rules) for rules in args.rules]
    return list(dict.fromkeys(out))


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise ConfigError("np-latency builds network namespaces: run it as root")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or any(p not in ("np", "linux") for p in paths):
        raise ConfigError(f"--paths: choose from np, linux; got {args.paths!r}")
    if any(not FRAME_OVERHEAD + STAMP.size <= s <= 1514 for s in args.sizes + [args.base_size]):
        raise ConfigError(f"frame sizes must be within {FRAME_OVERHEAD + STAMP.size}-1514 bytes")
    if any(r < 0 or r > 4000 for r in args.rules) or any(load <= 0 for load in args.loads):
        raise ConfigError("rules must be within 0-4000 and loads positive")
    if args.duration <= 0:
        raise ConfigError("--duration must be positive")
    grid = points(args)
    workdir = (args.json.parent if args.json else Path.cwd())
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    extras: dict[str, dict] = {}
    opened = []
    try:
        for name in paths:
            opened.append(NpPath(workdir, args.model_latency_us, args.model_jitter_us) if name == "np" else LinuxPath())
        order = sorted(grid, key=lambda p: p[2])       # rules change least often
        with progress("np-latency", len(order) * len(opened)) as advance:
            for load, size, nrules in order:
                for path in opened:
                    path.set_rules(nrules)
                    result = measure(path.lab.ns("client"), path.lab.ns("server"), load, size, args.duration)
                    lat = result["latencies"]
                    row = {
                        "path": path.name, "load_pps": load, "size": size, "rules": nrules,
                        "latency_us": summary(lat, (50, 99)) if len(lat) else None,
                        "modelled_latency_us": path.modelled(result["received"]) if path.name == "np" else None,
                        "sent": result["sent"], "received": result["received"],
                        "lost": result["sent"] - result["received"],
                    }
                    rows.append(row)
                    log.info("%-5s load %6d pps size %4d rules %4d: p50 %s p99 %s us (lost %d)", path.name, load,
                             size, nrules, row["latency_us"] and row["latency_us"]["p50"],
                             row["latency_us"] and row["latency_us"]["p99"], row["lost"])
                    advance()
    finally:
        for path in opened:
            try:
                extras[path.name] = path.close()
            except Exception as exc:  # teardown must not hide the results
                log.warning("closing %s path: %s", path.name, exc)
    out = {
        "experiment": "np-latency",
        "model": {"latency_us": args.model_latency_us, "jitter_us": args.model_jitter_us},
        "duration_s": args.duration, "base": {"load_pps": args.base_load, "size": args.base_size,
                                              "rules": args.base_rules},
        "rows": rows,
        "emulator": extras.get("np", {}),
    }
    write_result(out, args.json, args.plot, lambda result, path: plot(result, args, path))
    return 0


def plot(out: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    axes_spec = [("load_pps", "offered load (packets/s)", args.loads, ("size", args.base_size), ("rules", args.base_rules)),
                 ("size", "frame size (bytes)", args.sizes, ("load_pps", args.base_load), ("rules", args.base_rules)),
                 ("rules", "classifier rules", args.rules, ("load_pps", args.base_load), ("size", args.base_size))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    styles = {"np": ("tab:blue", "np4gs3-emu (wall clock)"), "linux": ("tab:red", "Linux kernel forwarding")}
    for ax, (key, label, values, fixed_a, fixed_b) in zip(axes, axes_spec):
        for name, (color, legend) in styles.items():
            sel = sorted((r for r in rows if r["path"] == name and r[fixed_a[0]] == fixed_a[1]
                          and r[fixed_b[0]] == fixed_b[1] and r["latency_us"]), key=lambda r: r[key])
            if not sel:
                continue
            xs = [r[key] for r in sel]
            ax.plot(xs, [r["latency_us"]["p50"] for r in sel], "o-", color=color, label=f"{legend} p50")
            ax.plot(xs, [r["latency_us"]["p99"] for r in sel], "o--", color=color, alpha=0.6, label=f"{legend} p99")
            if name == "np":
                ax.plot(xs, [r["modelled_latency_us"]["p50"] for r in sel], "s-", color="tab:green",
                        label="NP4GS3 model p50")
                ax.fill_between(xs, [args.model_latency_us - args.model_jitter_us] * len(xs),
                                [args.model_latency_us + args.model_jitter_us] * len(xs), color="tab:green",
                                alpha=0.15, label="paper: 15 µs ± 3 µs")
        ax.set_xlabel(label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if key in ("load_pps", "rules"):
            ax.set_xscale("log")
    axes[0].set_ylabel("one-way forwarding latency (µs)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Forwarding latency: emulated NP4GS3 card vs Linux kernel forwarding")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
