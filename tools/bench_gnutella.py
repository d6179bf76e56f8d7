"""``booster-loadgen gnutella``: clustering the Gnutella overlay (paper section III-B, Fig. 9).

Builds the ``three-clusters`` lab (network namespaces: needs root), runs ``--servents``
real servents spread over the three clusters with a Zipf-popular file set and random
bootstrap peers, and issues scripted queries (each followed by a SHA-1 verified download)
twice: without boosters, then with boxd (linux engine, TPROXY) and gnutella-booster on
every cluster edge.  Prints one JSON document with ``without`` and ``with`` objects:
``inter_cluster_messages``, ``inter_cluster_bytes``, ``query_success``, ``first_hit_ms``
{``p50``, ``p99``}, ``download_success`` (and more), plus ``reduction`` (messages, bytes) and
``first_hit_ratio`` (with / without boosters, p50 and p99: the latency cost of clustering).  ``--plot``
draws both modes side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from cliruntime import ConfigError, non_negative_float, positive_int
from tools.output import write_result


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "gnutella", help="Gnutella overlay clustering: inter-cluster traffic and search success with/without boosters",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  booster-loadgen gnutella --clusters 3 --servents 20 --json out/g.json --plot out/g.png\n"
               "  booster-loadgen gnutella --servents 9 --queries 2 --only with\n"
               "  booster-loadgen gnutella --local-wait 1.0 --sightings 3 --json out/g-wait1.json",
    )
    parser.add_argument("--clusters", type=positive_int, default=3, help="clusters (the three-clusters lab has 3)")
    parser.add_argument("--servents", type=positive_int, default=20, help="servents in all (up to 27)")
    parser.add_argument("--files", type=positive_int, default=40, help="distinct files")
    parser.add_argument("--zipf", type=non_negative_float, default=1.0, help="Zipf exponent of file popularity")
    parser.add_argument("--max-replicas", type=positive_int, default=6, help="copies of the most popular file")
    parser.add_argument("--queries", type=positive_int, default=4, help="queries per servent")
    parser.add_argument("--query-gap", type=non_negative_float, default=1.5, help="seconds between a servent's queries")
    parser.add_argument("--warmup", type=non_negative_float, default=8.0, help="seconds before the first query")
    parser.add_argument("--wait-hits", type=non_negative_float, default=3.0, help="seconds a query collects hits")
    parser.add_argument("--ttl", type=positive_int, default=4, help="TTL of the servents' queries")
    parser.add_argument("--sightings", type=int, default=6, help="booster: forward outside after N local copies")
    parser.add_argument("--local-wait", type=non_negative_float, default=0.3,
                        help="booster: ... or after this long without a local hit")
    parser.add_argument("--forward", choices=["adaptive", "wait"], default="adaptive",
                        help="booster: adaptive (a query no local table may answer goes out at once, the others "
                             "after the learned local wait) or wait (the paper's rule: --local-wait or --sightings)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", choices=["with", "without"], default=None, help="run one mode only")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and files here")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON figures here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG comparing both modes")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tools.gnutella_experiment import ExperimentConfig, run_experiment

    if os.geteuid() != 0:
        raise ConfigError("the gnutella experiment builds network namespaces: run it as root")
    if args.clusters != 3:
        raise ConfigError("the three-clusters lab has exactly 3 clusters")
    if args.servents > 27 or args.servents < 3:
        raise ConfigError("--servents must be between 3 and 27 (9 host addresses per cluster)")
    if args.sightings < 0:
        raise ConfigError("--sightings must be >= 0")
    cfg = ExperimentConfig(clusters=args.clusters, servents=args.servents, files=args.files, zipf=args.zipf,
                           max_replicas=args.max_replicas, queries_per_servent=args.queries,
                           query_gap=args.query_gap, warmup=args.warmup, wait_hits=args.wait_hits,
                           query_ttl=args.ttl, seed=args.seed, sightings=args.sightings, local_wait=args.local_wait,
                           forward=args.forward)
    modes = (args.only,) if args.only else ("without", "with")

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bb-gnutella-") as tmp:
        workdir = args.workdir or Path(tmp)
        out = asyncio.run(run_experiment(cfg, workdir, say, modes))
    write_result(out, args.json, args.plot, plot, sort_keys=True)
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("without", "with") if m in out]
    colors = {"without": "#b0b0b0", "with": "#2b7bb9"}
    fig, axes = plt.subplots(1, 4, figsize=(15, 4))
    panels = [
        ("inter-cluster messages", lambda m: out[m]["inter_cluster_messages"]),
        ("inter-cluster bytes (KB)", lambda m: out[m]["inter_cluster_bytes"] / 1024),
        ("query / download success", None),
        ("time to first hit (ms)", None),
    ]
    for ax, (title, value) in zip(axes, panels):
        ax.set_title(title)
        if value is not None:
            bars = ax.bar(modes, [value(m) for m in modes], color=[colors[m] for m in modes])
            ax.bar_label(bars, fmt="%.0f")
    ax = axes[2]
    width = 0.35
    for i, m in enumerate(modes):
        vals = [out[m]["query_success"] or 0, out[m]["download_success"] or 0]
        bars = ax.bar([x + i * width for x in range(2)], vals, width, label=m, color=colors[m])
        ax.bar_label(bars, fmt="%.2f")
    ax.set_xticks([x + width / 2 for x in range(2)], ["queries", "downloads"])
    ax.set_ylim(0, 1.15)
    ax.legend(loc="lower right")
    ax = axes[3]
    top = 1.0
    for i, m in enumerate(modes):
        fh = out[m]["first_hit_ms"]
        vals = [fh["p50"] or 0, fh["p99"] or 0]
        top = max(top, *vals)
        bars = ax.bar([x + i * width for x in range(2)], vals, width, label=m, color=colors[m])
        ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks([x + width / 2 for x in range(2)], ["p50", "p99"])
    ax.set_ylim(0, top * 1.35)                 # room for the legend above the bars
    ax.legend(loc="upper left", ncols=2)
    cfg = out.get("config", {})
    red = out.get("reduction", {})
    ratio = (out.get("first_hit_ratio") or {}).get("p99")
    fig.suptitle(f"Gnutella overlay clustering: {cfg.get('servents')} servents in {cfg.get('clusters')} clusters"
                 + (f" - {red['messages'] * 100:.1f}% fewer inter-cluster messages" if red else "")
                 + (f", first hit p99 x{ratio:.2f}" if ratio is not None else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
