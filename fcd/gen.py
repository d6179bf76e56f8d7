"""``fcd-gen``: replay a trace as FCD UDP packets (cars and traffic lights).

- Replay: packets leave at their trace time divided by ``--speed`` (1 = real time).
- Load mode (``--rate PPS``): the same packets in trace order at a fixed rate, for scaling
  experiments; the trace loops (times shifted by one trace length per loop) until ``--duration``.
- Districts: ``--processes K`` starts K generator processes, process i sending the cars on
  roads of district i and the lights of district i (each its own generator id and sequence
  numbers); ``--targets`` lists one address per district (round robin) or one for all.

Pacing sends the packets that are due every ``--tick`` seconds (bursts of a millisecond by default).
Prints one JSON line with what was sent.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from boxcore.procs import ProcessGroup
from cliruntime import ConfigError, host_port, make_parser, non_negative_float, positive_int, run_sync
from fcd import wire
from fcd.trace import Trace, TraceError


class Stream:
    """The trace's messages for one district, in send order, encoded chunk by chunk."""

    def __init__(self, trace: Trace, district: int | None, districts: int) -> None:
        city = trace.city.with_districts(districts)
        probes, lights = trace.probes, trace.lights
        if district is not None:
            road_d = city.road_district()
            pos_d = city.district_of_xy(probes["x"], probes["y"])
            d = np.where(probes["road"] >= 0, road_d[np.maximum(probes["road"], 0)], pos_d)
            probes = probes[d == district]
            lights = lights[city.light_district()[lights["light"]] == district] if len(lights) else lights
        self.probes, self.lights = probes, lights
        kinds = np.concatenate([np.zeros(len(probes), np.int8), np.ones(len(lights), np.int8)])
        times = np.concatenate([probes["t"], lights["t"]])
        index = np.concatenate([np.arange(len(probes)), np.arange(len(lights))])
        order = np.lexsort((kinds, times))           # probes before lights at equal times
        self.kind, self.index, self.t = kinds[order], index[order], times[order]
        self.period = (trace.duration + float(trace.meta.get("dt", 1.0))) if len(times) else 1.0

    def __len__(self) -> int:
        return len(self.t)

    def encode(self, start: int, stop: int, generator: int, first_seq: int, loop: int) -> list[bytes]:
        """Messages [start, stop) of loop ``loop`` with sequence numbers from ``first_seq``."""
        kind, index = self.kind[start:stop], self.index[start:stop]
        shift = loop * self.period
        out: list[bytes] = [b""] * len(kind)
        is_probe = kind == 0
        pos = np.flatnonzero(is_probe)
        if len(pos):
            rows = self.probes[index[pos]].copy()
            rows["t"] += shift
            data = wire.probes_from_trace(rows, generator, 0)
            seqs = (first_seq + pos).tolist()
            size = wire.PROBE_SIZE
            # sequence numbers follow stream positions (lights interleave)
            arr = np.frombuffer(data, dtype=wire.PROBE_WIRE_DTYPE).copy()
            arr["seq"] = np.array(seqs, dtype=np.uint64) & 0xFFFFFFFF
            data = arr.tobytes()
            for k, p in enumerate(pos.tolist()):
                out[p] = data[k * size:(k + 1) * size]
        for p in np.flatnonzero(~is_probe).tolist():
            row = self.lights[index[p]]
            out[p] = wire.encode(wire.LightChange(generator, (first_seq + p) & 0xFFFFFFFF, int(row["light"]),
                                                  float(row["t"]) + shift, int(row["phase"]), int(row["green"])))
        return out


def send_stream(stream: Stream, targets: list[tuple[str, int]], generator: int, *, rate: float | None,
                speed: float, duration: float | None, loop: bool, tick: float = 0.001,
                chunk: int = 4096, stop_flag: list[bool] | None = None) -> dict:
    """Send until the stream ends (replay) or ``duration`` passes (load mode / loop)."""
    socks = []
    for host, port in targets:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        s.connect((host, port))
        socks.append(s)
    sock = socks[generator % len(socks)]
    send = sock.send
    total = len(stream)
    if total == 0:
        return {"generator": generator, "sent": 0, "send_errors": 0, "elapsed": 0.0, "pps": 0.0}
    sent = errors = 0
    lights_sent = 0
    t0_trace = float(stream.t[0])
    started = time.perf_counter()
    pos, loop_no = 0, 0
    buffer: list[bytes] = []
    buffer_start = 0
    while not (stop_flag and stop_flag[0]):
        elapsed = time.perf_counter() - started
        if duration is not None and elapsed >= duration:
            break
        if rate is not None:
            due = int(rate * elapsed) - (loop_no * total + pos)
        else:
            trace_now = t0_trace + elapsed * speed
            offset = loop_no * stream.period
            due = int(np.searchsorted(stream.t, trace_now - offset, side="right")) - pos
        while due > 0:
            if pos >= total:
                if not (loop or rate is not None):
                    break
                pos, loop_no = 0, loop_no + 1
                buffer, buffer_start = [], 0
                if rate is None:
                    break
            if pos - buffer_start >= len(buffer):
                n = min(chunk, total - pos)
                buffer = stream.encode(pos, pos + n, generator, loop_no * total + pos, loop_no)
                buffer_start = pos
            msg = buffer[pos - buffer_start]
            try:
                send(msg)
                sent += 1
                if len(msg) != wire.PROBE_SIZE:
                    lights_sent += 1
            except OSError:
                errors += 1
            pos += 1
            due -= 1
        if rate is None and pos >= total and not loop:
            break
        time.sleep(tick)
    elapsed = time.perf_counter() - started
    for s in socks:
        s.close()
    return {"generator": generator, "sent": sent, "lights_sent": lights_sent, "send_errors": errors,
            "elapsed": round(elapsed, 3), "pps": round(sent / elapsed, 1) if elapsed else 0.0}


def _targets(text: str) -> list[tuple[str, int]]:
    import argparse
    targets = [host_port(part) for part in text.split(",") if part]   # raises ArgumentTypeError
    if not targets:
        raise argparse.ArgumentTypeError("expected HOST:PORT[,HOST:PORT...]")
    return targets


def build_parser():
    p = make_parser("fcd-gen", "Replay an FCD trace as UDP car probes and light changes.", examples=[
        "fcd-gen --trace city.npz --targets 127.0.0.1:7000 --speed 10",
        "fcd-gen --trace city.npz --targets 127.0.0.1:7000 --processes 4 --speed 1",
        "fcd-gen --trace city.npz --targets 127.0.0.1:7101,127.0.0.1:7102 --processes 2 --rate 8000 --duration 10",
    ])
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--targets", type=_targets, required=True, help="HOST:PORT[,HOST:PORT...]; district i uses target i mod n")
    p.add_argument("--speed", type=non_negative_float, default=1.0, help="replay speed-up (1 = real time)")
    p.add_argument("--rate", type=non_negative_float, default=None, help="load mode: packets per second (all processes)")
    p.add_argument("--duration", type=non_negative_float, default=None, help="stop after N seconds")
    p.add_argument("--loop", action="store_true", help="replay: start over at the end")
    p.add_argument("--processes", type=positive_int, default=1, help="generator processes (one per district)")
    p.add_argument("--district", type=int, default=None, help="(internal) the district this process sends")
    p.add_argument("--generator-base", type=int, default=1, help="generator id of district 0")
    p.add_argument("--tick", type=non_negative_float, default=0.001, help="pacing interval (s)")
    return p


def run(args, stats) -> int:
    if args.speed <= 0:
        raise ConfigError("--speed must be positive")
    if args.rate is not None and args.rate <= 0:
        raise ConfigError("--rate must be positive")
    if args.district is not None or args.processes == 1:
        trace = Trace.load(args.trace)
        district = args.district
        stream = Stream(trace, district if args.processes > 1 else None, args.processes)
        gen_id = args.generator_base + (district or 0)
        targets = args.targets
        target = [targets[(district or 0) % len(targets)]]
        rate = args.rate / args.processes if args.rate else None
        stop = [False]
        signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
        result = send_stream(stream, target, gen_id, rate=rate, speed=args.speed, duration=args.duration,
                             loop=args.loop, tick=args.tick, stop_flag=stop)
        stats.update({k: v for k, v in result.items() if isinstance(v, int)})
        print(json.dumps(result), flush=True)
        return 0
    # parent: one child per district
    base = [sys.executable, "-m", "fcd.gen", "--trace", str(args.trace),
            "--targets", ",".join(f"{h}:{p}" for h, p in args.targets), "--speed", str(args.speed),
            "--processes", str(args.processes), "--generator-base", str(args.generator_base),
            "--tick", str(args.tick), "--log-level", args.log_level]
    if args.rate:
        base += ["--rate", str(args.rate)]
    if args.duration is not None:
        base += ["--duration", str(args.duration)]
    if args.loop:
        base.append("--loop")
    with tempfile.TemporaryDirectory(prefix="fcd-gen-") as tmp:
        group = ProcessGroup(Path(tmp))
        children = [group.start(f"district-{i}", base + ["--district", str(i)], stats=False)
                    for i in range(args.processes)]
        # each child stops sending on SIGTERM and prints what it sent
        signal.signal(signal.SIGTERM, lambda *_: group.terminate(children))
        results = []
        try:
            for child in children:
                group.wait_exit_sync(child)
                for line in child.output().splitlines():
                    if line.startswith("{"):
                        results.append(json.loads(line))
                    else:
                        print(line, file=sys.stderr)   # the child's log lines, as when it shared our stderr
        except KeyboardInterrupt:
            group.stop_many_sync(children)
            raise
    summary = {"processes": args.processes, "sent": sum(r["sent"] for r in results),
               "lights_sent": sum(r.get("lights_sent", 0) for r in results),
               "send_errors": sum(r["send_errors"] for r in results),
               "elapsed": max((r["elapsed"] for r in results), default=0.0), "generators": results}
    summary["pps"] = round(summary["sent"] / summary["elapsed"], 1) if summary["elapsed"] else 0.0
    stats.update({"sent": summary["sent"], "send_errors": summary["send_errors"]})
    print(json.dumps(summary), flush=True)
    return 0 if all(c.returncode == 0 for c in children) else 1


def main(argv=None) -> int:
    return run_sync(build_parser(), run, argv, config_errors=(TraceError,))


if __name__ == "__main__":
    sys.exit(main())
