"""``python -m tools.bench_ingest``: the raw ingest's CPU per datagram, one pass against run by run.

The experiments' city and trace (``tools.bench_fcd.default_trace``) as the server receives them in
``booster-loadgen fcd``'s load mode: the four district generators' datagrams interleaved in
proportion, optionally with the overload's bursts (``--kept``: the share of every 10,000
datagrams kept, in one burst, as a full socket buffer keeps them).  The same receive-buffer rows
go through two ``Ingest``s side by side, batch by batch (``--batch`` datagrams, alternating which
goes first): one pass per batch (``Aggregator.feed_with_lights``, the server's path) and run by run
(``feed_per_run``, the reference).  Process CPU time per datagram of each, their ratio, and whether
the reports are equal (they must be).  No sockets and no budget: what the ingest code costs on
this machine now, both measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cliruntime import ConfigError
from tools.output import write_result

DISTRICTS = 4


def received_stream(trace_path: Path, kept: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, lengths) of the trace's datagrams as the server receives them (see the module doc)."""
    from fcd.gen import Stream
    from fcd.server import RAW_KEEP
    from fcd.trace import Trace
    trace = Trace.load(trace_path)
    messages, when = [], []
    for district in range(DISTRICTS):
        stream = Stream(trace, district, DISTRICTS)
        out = stream.encode(0, len(stream), 1 + district, 0, 0)
        messages += out
        when.append(np.arange(len(out)) / max(len(out), 1))     # each district at its share of the rate
    order = np.argsort(np.concatenate(when), kind="stable")
    if kept < 1.0:
        position = np.arange(len(order))
        order = order[position % 10_000 < int(round(kept * 10_000))]
    rows = np.zeros((len(order), RAW_KEEP), dtype=np.uint8)
    lengths = np.zeros(len(order), dtype=np.int64)
    for k, i in enumerate(order.tolist()):
        data = messages[i]
        rows[k, :len(data)] = np.frombuffer(data, dtype=np.uint8)
        lengths[k] = len(data)
    return rows, lengths


def measure(trace_path: Path, rows: np.ndarray, lengths: np.ndarray, batch: int, warmup: int) -> dict:
    from fcd.aggregate import Ingest, MapMatcher
    from fcd.trace import Trace
    city = Trace.load(trace_path).city
    matcher = MapMatcher(city)
    ingests = {"one_pass": Ingest(city, matcher=matcher), "per_run": Ingest(city, matcher=matcher, one_pass=False)}
    cpu = dict.fromkeys(ingests, 0.0)
    reports: dict[str, list] = {name: [] for name in ingests}
    counted = 0
    for k, start in enumerate(range(0, len(lengths), batch)):
        chunk = (rows[start:start + batch], lengths[start:start + batch])
        for name in (("one_pass", "per_run") if k % 2 == 0 else ("per_run", "one_pass")):
            t0 = time.process_time()
            reports[name] += ingests[name].ingest_slots(*chunk)
            if start >= warmup:
                cpu[name] += time.process_time() - t0
        if start >= warmup:
            counted += len(chunk[1])
    per = {name: round(cpu[name] / counted * 1e6, 3) for name in cpu}
    return {"datagrams": int(len(lengths)), "measured_datagrams": counted,
            "light_changes": int(ingests["one_pass"].stats["lights"]), "batch": batch,
            "us_per_datagram": per, "ratio_one_pass_over_per_run": round(per["one_pass"] / per["per_run"], 3),
            "reports": len(reports["one_pass"]), "same_reports": reports["one_pass"] == reports["per_run"],
            "passes": dict(ingests["one_pass"].aggregator.passes)}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = list(result["us_per_datagram"])
    ax.bar(names, [result["us_per_datagram"][n] for n in names], color=["tab:green", "tab:gray"])
    ax.set_ylabel("CPU us per datagram")
    ax.set_title(f"raw ingest, batches of {result['batch']} (kept {result['kept']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from tools.bench_fcd import default_trace
    p = argparse.ArgumentParser(prog="python -m tools.bench_ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cars", type=int, default=1000, help="cars in the generated city")
    p.add_argument("--trace", type=Path, default=None, help="use this trace instead of generating one")
    p.add_argument("--kept", type=float, default=1.0, help="share of every 10,000 datagrams kept (overload bursts)")
    p.add_argument("--batch", type=int, default=4096, help="datagrams per ingest call (the server's inline batch)")
    p.add_argument("--warmup", type=int, default=20_000, help="datagrams not measured at the start")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="write a bar plot here (PNG)")
    args = p.parse_args(argv)
    if not 0 < args.kept <= 1 or args.batch < 1 or args.warmup < 0:
        raise ConfigError("--kept in (0, 1], --batch >= 1, --warmup >= 0")
    with tempfile.TemporaryDirectory(prefix="bbingest-") as tmp:
        trace = args.trace or default_trace(Path(tmp), args.cars)
        rows, lengths = received_stream(trace, args.kept)
        result = {"kept": args.kept, **measure(trace, rows, lengths, args.batch, args.warmup)}
    write_result(result, args.json, args.plot, plot)
    return 0 if result["same_reports"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as exc:
        print(f"bench_ingest: error: {exc}", file=sys.stderr)
        sys.exit(2)
