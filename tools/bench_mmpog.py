"""``booster-loadgen mmpog``: the game experiments (paper section III-C).

Two measurements, both on loopback:

* **fan-out throughput** - one location with ``--fanout-members`` members (64);
  one member blasts updates at ``--fanout-in-rate`` datagrams/s into the
  reflector, the others (in a separate process) count what arrives.  Figures:
  datagrams/s the reflector sent (its own counters) and the sinks received.
* **bots** - the ``mmpog-bots`` session (``--players``, ``--locations``,
  ``--duration``, ``--loss`` ...): delivery ratio and latency percentiles of
  reliable and unreliable updates, duplicates, retransmissions, reflector pps.

``--reflector-mode booster`` (the default) runs the reflector as a booster on
a boxd with the user engine (started here); ``standalone`` binds its own socket.
Prints one JSON document; ``--json`` writes it; ``--plot`` writes a PNG of
the latency distributions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import secrets
import select
import shutil
import socket
import struct
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from boxcore.procs import ProcessGroup, free_port, python_module
from cliruntime import non_negative_float, positive_int, probability
from tools.output import write_result

LOCATION = 1


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "mmpog", help="game reflector: fan-out throughput and bots delivery/latency under loss",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  booster-loadgen mmpog --players 64 --locations 1 --duration 10 --loss 0.05 --json out/m.json\n"
               "  booster-loadgen mmpog --only fanout --fanout-members 64 --fanout-in-rate 3000 --duration 5\n"
               "  booster-loadgen mmpog --only bots --players 16 --loss 0.05 --duration 10 --plot out/m.png",
    )
    parser.add_argument("--only", choices=["fanout", "bots"], default=None, help="run one of the two measurements")
    parser.add_argument("--reflector-mode", choices=["booster", "standalone"], default="booster")
    parser.add_argument("--players", type=positive_int, default=64)
    parser.add_argument("--locations", type=positive_int, default=1)
    parser.add_argument("--duration", type=non_negative_float, default=10.0)
    parser.add_argument("--loss", type=probability, default=0.05)
    parser.add_argument("--loss-mode", choices=["auto", "relay", "iptables"], default="auto",
                        help="auto: iptables statistic in a namespace when root, else the user-space relay")
    parser.add_argument("--rate", type=non_negative_float, default=10.0, help="bot updates/s")
    parser.add_argument("--reliable-fraction", type=probability, default=0.25)
    parser.add_argument("--deadline", type=non_negative_float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=positive_int, default=2, help="bot processes")
    parser.add_argument("--fanout-members", type=positive_int, default=64)
    parser.add_argument("--fanout-in-rate", type=positive_int, default=2500, help="datagrams/s into the reflector")
    parser.add_argument("--no-sendmmsg", action="store_true", help="fan-out with one sendto per member")
    parser.add_argument("--no-pack", action="store_true", help="reflector: one datagram per update and member")
    parser.add_argument("--fanout-duration", type=non_negative_float, default=5.0)
    parser.add_argument("--compare", default=None, metavar="STACKS",
                        help="run the bots workload (nobody moves) over mmpog and these stacks too, e.g. kcp,enet "
                             "(needs root for the namespaces, and the 'compare' extra); prints a table, --plot draws it")
    parser.add_argument("--scenarios", type=_scenarios, default=None, metavar="PxL,...",
                        help="--compare: players x locations of each scenario, e.g. 32x4,64x1 (default: --players "
                             "x --locations)")
    parser.add_argument("--losses", type=_losses, default=None, metavar="P,...",
                        help="--compare: the loss each way of each run, e.g. 0.01,0.05,0.10 (default: --loss)")
    parser.add_argument("--budget", type=non_negative_float, default=None,
                        help="CPU cores per role (reflector or relay, each bots worker), each in its own cgroup v1 "
                             "CPU group as booster-loadgen fcd does (root); 0: none (default: 0.5 with --compare, "
                             "else 0)")
    parser.add_argument("--budget-period-us", type=positive_int, default=10_000,
                        help="the budgets' CFS period (a throttled role stalls for up to one period)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.set_defaults(func=run)


def _scenarios(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        players, _, locations = item.strip().partition("x")
        if not (players.isdigit() and locations.isdigit() and int(players) >= 2 and int(locations) >= 1):
            raise argparse.ArgumentTypeError(f"{item!r} is not PLAYERSxLOCATIONS (e.g. 64x1)")
        out.append((int(players), int(locations)))
    return out


def _losses(text: str) -> list[float]:
    return [probability(item.strip()) for item in text.split(",")]


# ====================================================================== fan-out throughput


def _http(method: str, url: str, key: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())


def _join(sock: socket.socket, player: int, token: bytes, reflector: tuple[str, int]) -> None:
    from mmpog import wire

    sock.settimeout(2)
    hello = wire.encode(wire.Header(wire.Kind.HELLO, rto_ms=40, location=LOCATION, sender=player, packet_id=1), token)
    for _ in range(5):
        sock.sendto(hello, reflector)
        with contextlib.suppress(socket.timeout):
            while True:
                header, _ = wire.decode(sock.recv(2048))
                if header.kind is wire.Kind.WELCOME:
                    sock.setblocking(False)
                    return
    raise RuntimeError(f"player {player} was not welcomed")


def _updates_in(buf: bytearray, size: int) -> int:
    """How many updates one received datagram holds (a BUNDLE holds several)."""
    from mmpog import wire

    if size < wire.HEADER_SIZE or buf[1] != wire.Kind.BUNDLE:
        return 1
    count, offset = 0, wire.HEADER_SIZE
    while offset + 2 <= size:
        offset += 2 + ((buf[offset] << 8) | buf[offset + 1])
        count += 1
    return count


def _sink(players: list[int], tokens: dict, reflector, ready, start, stop, result, datagrams) -> None:
    """Join as ``players`` and count every update (and datagram) that arrives until ``stop``."""
    socks = []
    for player in players:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind(("127.0.0.1", 0))
        _join(sock, player, tokens[player], reflector)
        socks.append(sock)
    poller = select.epoll()
    by_fd = {sock.fileno(): sock for sock in socks}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    buf = bytearray(2048)
    ready.set()
    start.wait()
    count = packets = 0
    while not stop.is_set():
        for fd, _ in poller.poll(0.05):
            recv_into = by_fd[fd].recv_into
            try:
                while True:
                    count += _updates_in(buf, recv_into(buf))
                    packets += 1
            except BlockingIOError:
                pass
    result.value = count
    datagrams.value = packets


def _blaster(player: int, token: bytes, reflector, rate: int, reliable_every: int, ready, start, stop, result) -> None:
    from mmpog import wire

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    _join(sock, player, token, reflector)
    ready.set()
    start.wait()
    # every update its own packet id: the reflector recognises a repeated (sender, id) as a resend
    templates = [bytearray(wire.encode(wire.Header(wire.Kind.DATA, int(wire.Flag.RELIABLE) if n % reliable_every == 0
                                                   else 0, 40, LOCATION, player, 1), bytes(48)))
                 for n in range(reliable_every)]
    packet_id = struct.Struct("!I")
    sent = 0
    began = time.monotonic()
    buf = bytearray(2048)
    batch = max(1, rate // 200)
    while not stop.is_set():
        due = int((time.monotonic() - began) * rate)
        if sent >= due:
            time.sleep(batch / rate)
        for _ in range(min(batch, max(0, due - sent))):
            datagram = templates[sent % reliable_every]
            packet_id.pack_into(datagram, 16, 1000 + sent)
            with contextlib.suppress(BlockingIOError):
                sock.sendto(datagram, reflector)
            sent += 1
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.recv_into(buf)          # our own echoes: drain them
    result.value = sent


async def _start_reflector(mode: str, workdir: Path, key: str, extra: list[str] = ()):
    """Start a reflector (booster on a fresh boxd, or standalone); returns (udp, http_url, stop)."""
    http_port = free_port(socket.SOCK_STREAM)
    env = dict(os.environ, MMPOG_API_KEY=key)
    boxd = None
    if mode == "booster":
        from boxcore.testing import BoxdProcess
        listen, relay = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
        boxd = BoxdProcess(workdir / "boxd", listens=[f"udp:127.0.0.1:{listen}=127.0.0.1:{relay}"], http=False,
                           log_level="warning")
        await boxd.start()
        argv = ["--mode", "booster", "--control", str(boxd.control), "--port", str(relay), "--src-port", str(listen)]
        udp = ("127.0.0.1", listen)
    else:
        udp = ("127.0.0.1", free_port(socket.SOCK_DGRAM))
        argv = ["--mode", "standalone", "--listen", f"127.0.0.1:{udp[1]}"]
    group = ProcessGroup(workdir, env=env)
    reflector = group.start("reflector", [*python_module("mmpog.reflector"), *argv, *extra,
                                          "--http", f"127.0.0.1:{http_port}", "--log-level", "warning"],
                            stats=False)
    url = f"http://127.0.0.1:{http_port}"

    def healthy() -> bool:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return True
        except OSError:
            return False

    await group.wait_until(reflector, healthy, 15, "the reflector did not answer /health")

    async def stop() -> None:
        await group.stop(reflector, grace=10)
        if boxd is not None:
            await boxd.stop()

    return udp, url, stop


async def measure_fanout(members: int, in_rate: int, duration: float, mode: str, workdir: Path,
                         sendmmsg: bool = True, pack: bool = True) -> dict:
    key = secrets.token_hex(8)
    extra = ([] if sendmmsg else ["--no-sendmmsg"]) + ([] if pack else ["--no-pack"])
    udp, url, stop_reflector = await _start_reflector(mode, workdir, key, extra)
    try:
        tokens = {player: secrets.token_bytes(16) for player in range(1, members + 1)}
        for player, token in tokens.items():
            _http("PUT", f"{url}/locations/{LOCATION}/members/{player}", key, {"token": token.hex()})
        ctx = multiprocessing.get_context("fork")
        start, stop = ctx.Event(), ctx.Event()
        sink_ready, blaster_ready = ctx.Event(), ctx.Event()
        received, sent, received_datagrams = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Value("q", 0)
        sink = ctx.Process(target=_sink, args=(list(range(2, members + 1)), tokens, udp, sink_ready, start, stop,
                                               received, received_datagrams))
        blaster = ctx.Process(target=_blaster, args=(1, tokens[1], udp, in_rate, 4, blaster_ready, start, stop, sent))
        sink.start()
        blaster.start()
        if not (await asyncio.to_thread(sink_ready.wait, 30) and await asyncio.to_thread(blaster_ready.wait, 30)):
            raise RuntimeError("fan-out members did not join")
        before = _http("GET", url + "/stats", key)
        began = time.monotonic()
        start.set()
        await asyncio.sleep(duration)
        after = _http("GET", url + "/stats", key)
        elapsed = time.monotonic() - began
        stop.set()
        await asyncio.to_thread(sink.join, 10)
        await asyncio.to_thread(blaster.join, 10)
        out = after["io"]["datagrams_out"] - before["io"]["datagrams_out"]
        updates = after["io"].get("updates_out", 0) - before["io"].get("updates_out", 0)
        inbound = after["io"]["datagrams_in"] - before["io"]["datagrams_in"]
        return {
            "members": members, "mode": mode, "transport": after.get("transport", {}), "pack": pack,
            "offered_in_pps": round(sent.value / elapsed, 1),
            "reflector_in_pps": round(inbound / elapsed, 1),
            "reflector_fanout_pps": round(out / elapsed, 1),
            "updates_relayed_per_s": round(updates / elapsed, 1),
            "sinks_received_updates_per_s": round(received.value / elapsed, 1),
            "sinks_received_pps": round(received_datagrams.value / elapsed, 1),
            "send_dropped": after["io"]["send_dropped"] - before["io"]["send_dropped"],
            "duration": round(elapsed, 3),
        }
    finally:
        await stop_reflector()


# ====================================================================== driver

def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bots = result.get("bots")
    if not bots:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["p50", "p90", "p99", "max"]
    for offset, name in ((-0.2, "reliable"), (0.2, "unreliable")):
        values = [bots[name]["latency_ms"][k] or 0 for k in labels]
        ax.bar([i + offset for i in range(len(labels))], values, width=0.4, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"mmpog: {bots['players']} players, {bots['loss']:.0%} loss each way; "
                 f"reliable delivered {bots['reliable']['delivered_ratio']}")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)


def run_compare(args: argparse.Namespace) -> int:
    from cliruntime import ConfigError
    from tools.compare_mmpog import STACKS, Workload, compare_matrix, plot, table

    others = [name.strip() for name in args.compare.split(",") if name.strip()]
    unknown = [name for name in others if name not in STACKS]
    if unknown:
        raise ConfigError(f"--compare: unknown stack(s) {', '.join(unknown)} (known: kcp, enet)")
    stacks = ["mmpog"] + [name for name in others if name != "mmpog"]
    for name, module in (("kcp", "kcp"), ("enet", "enet")):
        if name in stacks:
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(f"--compare {name} needs the '{module}' package: pip install "
                                  f"'booster-boxes[compare]'") from None
    if os.geteuid() != 0:
        raise ConfigError("--compare needs root (a network namespace with iptables loss per stack)")
    budget = 0.5 if args.budget is None else args.budget
    workload = Workload(players=args.players, locations=args.locations, duration=args.duration, rate=args.rate,
                        reliable_fraction=args.reliable_fraction, deadline=args.deadline, loss=args.loss,
                        seed=args.seed, workers=args.workers, reflector_mode=args.reflector_mode, budget=budget,
                        budget_period_us=args.budget_period_us)
    if budget and budget * args.budget_period_us < 1000:
        raise ConfigError("--budget x --budget-period-us must be at least 1000 us (the kernel's minimum quota)")
    result = compare_matrix(workload, args.scenarios or [(args.players, args.locations)], args.losses or [args.loss],
                            stacks, say=lambda line: print(line, file=sys.stderr))
    print(table(result), file=sys.stderr)
    write_result(result, args.json, args.plot, plot)
    return 0


def run(args: argparse.Namespace) -> int:
    from mmpog.bots import Params
    from tools.mmpog_experiment import run_experiment

    if args.compare:
        return run_compare(args)

    async def main() -> dict:
        result: dict = {}
        with tempfile.TemporaryDirectory(prefix="bench-mmpog-") as tmp:
            if args.only in (None, "fanout"):
                result["fanout"] = await measure_fanout(args.fanout_members, args.fanout_in_rate,
                                                        args.fanout_duration, args.reflector_mode, Path(tmp),
                                                        sendmmsg=not args.no_sendmmsg, pack=not args.no_pack)
            if args.only in (None, "bots"):
                loss_mode = args.loss_mode
                if loss_mode == "auto":
                    loss_mode = "iptables" if os.geteuid() == 0 and shutil.which("iptables") else "relay"
                if loss_mode == "iptables":
                    # the whole session in a fresh namespace whose iptables drop --loss each way
                    out = Path(tmp) / "bots.json"
                    argv = [sys.executable, "-m", "tools.mmpog_experiment", "--players", str(args.players),
                            "--locations", str(args.locations), "--duration", str(args.duration),
                            "--loss", str(args.loss), "--loss-mode", "iptables", "--rate", str(args.rate),
                            "--reliable-fraction", str(args.reliable_fraction), "--deadline", str(args.deadline),
                            "--seed", str(args.seed), "--reflector-mode", args.reflector_mode,
                            "--workers", str(args.workers), "--budget", str(args.budget or 0),
                            "--budget-period-us", str(args.budget_period_us),
                            "--json", str(out), "--log-level", "warning"]
                    await ProcessGroup(Path(tmp)).run("mmpog-bots-iptables", argv)
                    result["bots"] = json.loads(out.read_text())
                else:
                    params = Params(players=args.players, locations=args.locations, duration=args.duration,
                                    loss=args.loss, loss_mode=loss_mode, rate=args.rate,
                                    reliable_fraction=args.reliable_fraction, deadline=args.deadline, seed=args.seed,
                                    reflector_mode=args.reflector_mode, workers=args.workers,
                                    budget=args.budget or 0.0, budget_period_us=args.budget_period_us,
                                    workdir=str(Path(tmp) / "bots-boxd"))
                    result["bots"] = await run_experiment(params)
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        return result

    import uvloop
    result = uvloop.run(main())
    write_result(result, args.json, args.plot, _plot)
    return 0
