"""``booster-loadgen report``: the experiments' JSON side by side with the paper, as one page.

Reads the files the README's experiment commands write (``out/fcd.json``, ``out/fcd-validate.json``,
``out/fcd-scale.json``, ``out/np.json``, ``out/datapath-user.json``, ``out/datapath-linux.json``,
``out/datapath-xdp.json``, ``out/gnutella.json``, ``out/mmpog.json``, ``out/mmpog-compare.json``)
and writes one self-contained HTML file: every figure
is an inline SVG data URI, nothing is fetched.  Each card puts our figure (drawn from the JSON)
next to the paper's numbers, typed in from the paper's text with the section or figure they
come from, and says in one line what differs.  A missing file is shown as "not run" with the
command that produces it; a file that cannot be read says why.

The paper's 15 µs ± 3 µs NP latency is a measurement of the real card (section II-C).  Our card
emulator takes it as its model's *input* (``--model-latency-us``/``--model-jitter-us``): the NP card
shows it as such, beside what we measured (the emulator's wall clock, kernel forwarding, and the
xdp engine's one-way latency through the box from ``datapath-xdp.json``), never as a result of ours.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import json
import math
from pathlib import Path
from typing import Callable

from cliruntime import ConfigError

PAPER = "Rooney, Bauer, Scotton: Efficient Programmable Middleboxes for Scaling Large Distributed Applications (IBM RZ 3519, 2003)"

# The paper's numbers, typed in from its text (the figures themselves are not in the text).
PAPER_FIG7 = {
    "source": "section III-A, text with Fig. 7 (server packets received vs sent; loss)",
    "without": [(2000, 0.0, "losses start below 2,000 p/s"), (5000, 0.5, "more than 50% at 5,000 p/s"),
                (11000, 0.9, "nearly 90% at 11,000 p/s")],
    "with": [(6000, 0.0, "no significant loss until above 6,000 p/s"), (11000, 0.25, "about 25% at 11,000 p/s")],
    "setting": "two generators, each behind a box (Pentium II 233 MHz, 64 MB); server 1.5 GHz; 100 Mbit/s LAN; "
               "the boxes eight times slower than the server",
}
PAPER_REDUCTION = {"source": "section III-A", "factor": 10,
                   "text": "the use of the booster boxes reduces the amount of packets the server has to handle "
                           "by a factor of 10"}
PAPER_NP = {"source": "section II-C", "latency_us": 15.0, "jitter_us": 3.0,
            "text": "the NP forwards packets in 15 µs ± 3 µs virtually independent of the offered load, the packet "
                    "size and the number of classifier rules",
            "linux": "Linux kernel forwarding (Pentium IV 1.6 GHz): one to several hundreds of µs, depending on "
                     "packet size and offered load"}
PAPER_RATE = {"source": "section II-C",
              "text": "the NP is able to forward packets at the line rate of 1 Gbit/s, whereas software based "
                      "forwarding in Linux is able to sustain only an order of magnitude less"}
# 1 Gbit/s in packets per second for a UDP payload: Ethernet header and FCS (18 bytes), preamble and
# inter-frame gap (20), IPv4 and UDP headers (28); a frame is at least 64 bytes.  Our arithmetic, not the paper's.
def line_rate_pps(payload_bytes: int, bits_per_second: float = 1e9) -> float:
    frame = max(64, 14 + 20 + 8 + payload_bytes + 4)
    return bits_per_second / ((frame + 20) * 8)


PAPER_FCD_MODEL = {"source": "section III-A",
                   "text": "the model (after Peytchev et al.) keeps the queue length at each road's exit light and "
                           "the road's density; we extended it to the traverse time: the drive through the road at "
                           "the cars' average speed plus the time stuck in the queue. Predictions further ahead "
                           "have decreasing accuracy (no accuracy figures given)"}
PAPER_TUPLESPACE = {"source": "section III-A",
                    "text": "the server outputs its predictions to a tuplespace, which plays the role of a broadcast "
                            "medium (in a real deployment e.g. DAB); a routing application on the in-car computer "
                            "periodically reads from it to calculate shortest time paths across the city (no figures "
                            "given)"}
PAPER_GAME_RELIABILITY = {"source": "section III-C",
                          "text": "UDP is preferred over TCP in games and the application handles retransmission; "
                                  "slow-start is not appropriate when timeliness is essential; the booster box offers "
                                  "reliable delivery of packets within some time period (no figures given; related "
                                  "work: Levine et al.'s application-layer reliability, reference [16])"}
PAPER_FIG9 = {"source": "section III-B, Fig. 9",
              "text": "booster boxes inserted in the three clusters minimize the connections on the links between "
                      "clusters; a query is forwarded outside only after several local sightings; a dramatic "
                      "reduction of the traffic on the clusters' ingress/egress links (no numbers given)"}
PAPER_FIG12 = {"source": "section III-C, Fig. 12 (four data path scenarios, no numbers given)", "cases": [
    ("no loss", "the box numbers the packet (seq 1); every member, sender included, gets it; the echo is the ACK"),
    ("loss from sender", "no echo within the RTO: the sender resends the same packet identifier"),
    ("loss to sender", "the sender resends; the box gives it a new seq; receivers drop the duplicate by its identifier"),
    ("loss to receiver", "a later packet or heartbeat shows the gap; the receiver NACKs; the box retransmits "
                         "from its buffer"),
]}

EXPERIMENTS = {
    "datapath_user": ("datapath-user.json", "booster-loadgen datapath --engine user --json out/datapath-user.json"),
    "datapath_linux": ("datapath-linux.json",
                       "booster-loadgen datapath --engine linux --json out/datapath-linux.json   (root)"),
    "datapath_xdp": ("datapath-xdp.json",
                     "booster-loadgen datapath --engine xdp --json out/datapath-xdp.json --plot out/datapath-xdp.png   "
                     "(root); or show the committed run: booster-loadgen report --datapath-xdp docs/xdp-datapath.json"),
    "fcd": ("fcd.json", "booster-loadgen fcd --json out/fcd.json --plot out/fcd.png   (root: cgroup CPU budgets)"),
    "fcd_validate": ("fcd-validate.json", "booster-loadgen fcd-validate --json out/fcd-validate.json "
                                          "--plot out/fcd-validate.png   (the sumo extra)"),
    "fcd_scale": ("fcd-scale.json", "booster-loadgen fcd-scale --json out/fcd-scale.json --plot out/fcd-scale.png"
                                    "   (root: cgroup CPU budgets)"),
    "np": ("np.json", "booster-loadgen np-latency --json out/np.json --plot out/np.png   (root); or show the "
                      "committed run: booster-loadgen report --np docs/npdrv-latency.json"),
    "gnutella": ("gnutella.json",
                 "booster-loadgen gnutella --clusters 3 --servents 20 --json out/gnutella.json --plot out/gnutella.png"
                 "   (root)"),
    "mmpog": ("mmpog.json", "booster-loadgen mmpog --players 64 --locations 1 --duration 10 --loss 0.05 "
                            "--json out/mmpog.json --plot out/mmpog.png"),
    "mmpog_compare": ("mmpog-compare.json",
                      "booster-loadgen mmpog --compare kcp,enet --players 32 --locations 4 --loss 0.05 "
                      "--json out/mmpog-compare.json --plot out/mmpog-compare.png   (root; the compare extra); or show a "
                      "committed run: booster-loadgen report --mmpog-compare docs/mmpog-compare-p32-l4-loss0.05.json"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="one self-contained HTML page: every experiment's figure beside the paper's numbers",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  booster-loadgen report --out report.html\n"
               "  booster-loadgen report --dir out --np docs/npdrv-latency.json --out out/report.html\n"
               "  booster-loadgen report --np docs/npdrv-latency.json --datapath-xdp docs/xdp-datapath.json "
               "--mmpog-compare docs/mmpog-compare-p32-l4-loss0.05.json --out out/report.html")
    parser.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML file to write")
    parser.add_argument("--dir", type=Path, default=Path("out"), help="where the experiments wrote their JSON")
    for name, (filename, _) in EXPERIMENTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, default=None, metavar="JSON",
                            help=f"the {name} experiment's JSON (default: DIR/{filename})")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------- figures

def _svg_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(width: float = 6.0, height: float = 3.6, ncols: int = 1):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height))
    return fig, axes


def _paper_fig7() -> str:
    fig, ax = _figure()
    for key, colour, label in (("without", "tab:red", "without booster boxes"),
                               ("with", "tab:blue", "with booster boxes")):
        points = PAPER_FIG7[key]
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o--", color=colour, label=label)
    ax.set_xlabel("packets sent (p/s)")
    ax.set_ylabel("loss (%)")
    ax.set_xlim(0, 12000)
    ax.set_ylim(-3, 100)
    ax.set_title("paper: values stated in the text (III-A)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _svg_uri(fig)


def _ours_fig7(data: dict) -> str:
    fig, ax = _figure()
    rows = data["rows"]
    for boxes in sorted({r["boxes"] for r in rows}):
        sel = sorted((r for r in rows if r["boxes"] == boxes), key=lambda r: r["offered_pps"])
        label = "without booster boxes" if boxes == 0 else f"{boxes} box{'es' if boxes > 1 else ''}"
        ax.plot([r["offered_pps"] for r in sel], [100 * (r["loss"] or 0) for r in sel], "o-", label=label)
    ax.set_xlabel("packets sent (p/s)")
    ax.set_ylabel("loss (%)")
    ax.set_ylim(-3, 100)
    ax.set_title(f"ours: measured (budget {data.get('budget_cpu')} core per role)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _svg_uri(fig)


def _reduction_figure(data: dict) -> str:
    fig, ax = _figure(5.0, 3.2)
    factors = data.get("reduction_factor_by_boxes") or {}
    names = ["paper (III-A)"] + [f"ours, {b} box{'es' if int(b) > 1 else ''}" for b in factors]
    values = [PAPER_REDUCTION["factor"]] + list(factors.values())
    bars = ax.bar(names, values, color=["#999999"] + ["tab:blue"] * len(factors))
    ax.bar_label(bars, fmt="%.0fx")
    ax.set_yscale("log")
    ax.set_ylabel("packets at the server: without / with boxes")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _svg_uri(fig)


def _np_figure(data: dict, xdp: dict | None = None) -> str:
    fig, axes = _figure(12.0, 3.6, ncols=3)
    rows = data["rows"]
    base = data.get("base", {})
    model = data.get("model", {})
    axes_spec = [("load_pps", "offered load (p/s)", ("size", "rules")), ("size", "frame size (bytes)", ("load_pps", "rules")),
                 ("rules", "classifier rules", ("load_pps", "size"))]
    styles = {"np": ("tab:blue", "card emulator, wall clock"), "linux": ("tab:red", "Linux kernel forwarding")}
    for ax, (key, label, fixed) in zip(axes, axes_spec):
        for path, (colour, legend) in styles.items():
            sel = sorted((r for r in rows if r["path"] == path and r.get("latency_us")
                          and all(r[f] == base.get(f, r[f]) for f in fixed)), key=lambda r: r[key])
            if not sel:
                continue
            xs = [r[key] for r in sel]
            ax.plot(xs, [r["latency_us"]["p50"] for r in sel], "o-", color=colour, label=f"{legend} p50")
            ax.plot(xs, [r["latency_us"]["p99"] for r in sel], "o:", color=colour, alpha=0.6, label=f"{legend} p99")
        lo = PAPER_NP["latency_us"] - PAPER_NP["jitter_us"]
        hi = PAPER_NP["latency_us"] + PAPER_NP["jitter_us"]
        ax.axhspan(lo, hi, color="tab:green", alpha=0.2,
                   label=f"paper II-C: {PAPER_NP['latency_us']:g} ± {PAPER_NP['jitter_us']:g} µs "
                         f"(= emulator model input {model.get('latency_us', '?')} ± {model.get('jitter_us', '?')})")
        if key == "rules" and xdp is not None:
            passes = [c for c in _xdp_latency_passes(xdp) if c["latency_us"].get("p50") is not None]
            if passes:
                xs = [c["rules"] for c in passes]
                legend = (f"xdp engine, one-way through the box (paced {xdp.get('paced_rate')} p/s, "
                          f"{xdp.get('payload_bytes')} B)")
                ax.plot(xs, [c["latency_us"]["p50"] for c in passes], "s-", color="tab:purple", label=f"{legend} p50")
                ax.plot(xs, [c["latency_us"]["p99"] for c in passes], "s:", color="tab:purple", alpha=0.6,
                        label=f"{legend} p99")
                ax.legend(fontsize=6.5, loc="upper left")
        ax.set_xlabel(label)
        ax.set_yscale("log")
        if key != "size":
            ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("one-way latency (µs)")
    axes[0].legend(fontsize=6.5, loc="upper left")
    return _svg_uri(fig)


def _datapath_figure(data: dict) -> str:
    fig, ax = _figure(6.0, 3.2)
    cases = data["cases"]
    names = [c["case"] for c in cases]
    bars = ax.bar(names, [c["pps"] for c in cases], color="tab:blue")
    ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_ylabel("packets/s received")
    ax.tick_params(axis="x", labelsize=7, rotation=15)
    ax.set_title(f"ours: {data.get('engine')} engine, {data.get('payload_bytes')}-byte payloads", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _svg_uri(fig)


def _paper_fig9() -> str:
    """The principle of Fig. 9 drawn from its description: peers of three clusters, overlay links."""
    import math
    import random

    from matplotlib.patches import Circle

    fig, axes = _figure(7.0, 3.2, ncols=2)
    rng = random.Random(9)
    centres = [(0.25, 0.7), (0.75, 0.7), (0.5, 0.22)]
    peers = [(c, (cx + 0.12 * math.cos(a), cy + 0.12 * math.sin(a)))
             for c, (cx, cy) in enumerate(centres) for a in [k * 2 * math.pi / 5 for k in range(5)]]
    for ax, clustered in zip(axes, (False, True)):
        for cx, cy in centres:
            ax.add_patch(Circle((cx, cy), 0.19, fill=False, ls="--", color="#999999"))
        if clustered:
            for c, (cx, cy) in enumerate(centres):
                for cc, (x, y) in peers:
                    if cc == c:
                        ax.plot([cx, x], [cy, y], color="#bbbbbb", lw=1)
            for i in range(3):
                a, b = centres[i], centres[(i + 1) % 3]
                ax.plot([a[0], b[0]], [a[1], b[1]], color="black", lw=2)
            ax.scatter([c[0] for c in centres], [c[1] for c in centres], s=80, marker="s", color="black", zorder=3)
            ax.set_title("with booster boxes", fontsize=9)
        else:
            for i, (c, (x, y)) in enumerate(peers):
                for _ in range(2):
                    _, (x2, y2) = peers[rng.randrange(len(peers))]
                    ax.plot([x, x2], [y, y2], color="#bbbbbb", lw=1)
            ax.set_title("without: overlay ignores clusters", fontsize=9)
        ax.scatter([p[1][0] for p in peers], [p[1][1] for p in peers], s=25, c=[f"C{p[0]}" for p in peers], zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.axis("off")
    return _svg_uri(fig)


def _ours_fig9(data: dict) -> str:
    fig, axes = _figure(7.0, 3.2, ncols=2)
    modes = [m for m in ("without", "with") if m in data]
    colours = ["#b0b0b0" if m == "without" else "tab:blue" for m in modes]
    bars = axes[0].bar(modes, [data[m]["inter_cluster_messages"] for m in modes], color=colours)
    axes[0].bar_label(bars)
    axes[0].set_title("inter-cluster messages", fontsize=9)
    bars = axes[1].bar(modes, [data[m].get("query_success") or 0 for m in modes], color=colours)
    axes[1].bar_label(bars, fmt="%.2f")
    axes[1].set_ylim(0, 1.15)
    axes[1].set_title("query success", fontsize=9)
    return _svg_uri(fig)


def _ours_fig12(data: dict) -> str:
    bots = data["bots"]
    fig, ax = _figure(6.0, 3.4)
    labels = ["p50", "p90", "p99", "max"]
    for offset, name in ((-0.2, "reliable"), (0.2, "unreliable")):
        values = [bots[name]["latency_ms"].get(k) or 0 for k in labels]
        ax.bar([i + offset for i in range(len(labels))], values, width=0.4, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("delivery latency (ms)")
    ax.set_title(f"ours: {bots.get('players')} players, {100 * bots.get('loss', 0):.0f}% loss each way", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _svg_uri(fig)


XDP_COLOURS = {"xdp": "tab:green", "linux": "tab:blue", "user": "tab:orange"}
XDP_SHORT = {"redirect_consume": "consume", "redirect_consume_batch": "consume (batches)"}


def _xdp_label(case: dict) -> str:
    name = XDP_SHORT.get(case["case"], case["case"])
    rules = f" {case['rules']}r" if case["case"] == "pass" else ""
    share = case.get("offered_share_of_knee")
    load = "" if share is None else (" @knee" if share == 1.0 else f" @{share:g} knee")
    return f"{name}\n{case['engine']}{rules}{load}"


def _xdp_passes(xdp: dict, share: float | None) -> list[dict]:
    """The xdp engine's pass cases offered ``share`` of the knee rate (runs from before the
    bench measured pass at two loads have no share: all of their pass cases)."""
    return sorted((c for c in xdp["cases"] if c["case"] == "pass" and c["engine"] == "xdp"
                   and c.get("offered_share_of_knee", share) == share), key=lambda c: c["rules"])


def _xdp_latency_passes(xdp: dict) -> list[dict]:
    """The pass cases the latency target is judged on (offered ``latency_load_share_of_knee``)."""
    return _xdp_passes(xdp, xdp.get("latency_load_share_of_knee"))


def _xdp_figure(data: dict) -> str:
    fig, (ax1, ax2) = _figure(12.0, 3.8, ncols=2)
    cases = data["cases"]
    xs = range(len(cases))
    ax1.bar(xs, [c["pps"] for c in cases], color=[XDP_COLOURS.get(c["engine"], "grey") for c in cases])
    offered = [(i, c["offered_pps"] * (c.get("members") or 1)) for i, c in enumerate(cases) if c.get("offered_pps")]
    ax1.scatter([i for i, _ in offered], [v for _, v in offered], marker="_", s=300, color="black",
                label="offered by the generator (x members for fan-out)")
    line = line_rate_pps(int(data.get("payload_bytes", 64)))
    ax1.axhline(line, color="tab:red", ls="--", lw=1,
                label=f"paper II-C: the NP forwards at 1 Gbit/s line rate (= {line:,.0f} p/s of these frames)")
    ax1.axhline(line / 10, color="tab:red", ls=":", lw=1, label="paper II-C: Linux, an order of magnitude less")
    ax1.set_yscale("log")
    ax1.set_ylabel("packets/s (fan-out: datagrams/s delivered)")
    ax1.set_xticks(list(xs), [_xdp_label(c) for c in cases], fontsize=6.5, rotation=45)
    top = max([line] + [c["pps"] for c in cases] + [v for _, v in offered])
    ax1.set_ylim(top=top * 60)                 # room for the legend above the bars
    ax1.legend(fontsize=6.5, loc="upper left")
    ax1.grid(alpha=0.3, axis="y")
    ax1.set_title(f"ours: throughput (kernel forwarding ceiling {data['ceiling_pps']:,.0f} p/s)", fontsize=9)
    timed = [c for c in cases if (c.get("latency_us") or {}).get("p50") is not None]
    xt = range(len(timed))
    ax2.bar([i - 0.2 for i in xt], [c["latency_us"]["p50"] for c in timed], width=0.4, label="p50",
            color=[XDP_COLOURS.get(c["engine"], "grey") for c in timed])
    ax2.bar([i + 0.2 for i in xt], [c["latency_us"]["p99"] or 0 for c in timed], width=0.4, label="p99",
            color="lightgray")
    lo, hi = PAPER_NP["latency_us"] - PAPER_NP["jitter_us"], PAPER_NP["latency_us"] + PAPER_NP["jitter_us"]
    ax2.axhspan(lo, hi, color="tab:red", alpha=0.2, label="paper II-C: the NP, 15 ± 3 µs")
    ax2.set_yscale("log")
    ax2.set_ylabel(f"one-way latency (µs), paced {data.get('paced_rate')} p/s")
    ax2.set_xticks(list(xt), [_xdp_label(c) for c in timed], fontsize=6.5, rotation=45)
    ax2.legend(fontsize=6.5)
    ax2.grid(alpha=0.3, axis="y")
    ax2.set_title("ours: latency through the box", fontsize=9)
    return _svg_uri(fig)


def _fcd_scale_figure(data: dict) -> str:
    fig, ax = _figure(6.0, 3.6)
    for kind, label in (("tcp", "tuplespace server (TCP)"), ("redis", "tuplespace on Redis")):
        points = (data.get("route_lookups") or {}).get(kind)
        if points:
            clients = sorted(points, key=int)
            ax.plot([int(c) for c in clients], [points[c] for c in clients], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent routers")
    ax.set_ylabel("route look-ups per second")
    budget = data.get("budget_cpu")
    ax.set_title(f"ours: the store at {budget} core" if budget else "ours: stores without a CPU budget", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _svg_uri(fig)


def _fcd_validate_figure(scenarios: list[dict]) -> str:
    fig, (ax1, ax2) = _figure(12.0, 3.6, ncols=2)
    names = [s["scenario"] for s in scenarios]
    xs = range(len(names))
    for offset, key, label, colour in ((-0.27, "model", "our model", "tab:green"),
                                       (0.0, "free_flow", "free flow", "tab:blue"),
                                       (0.27, "persistence", "persistence", "tab:orange")):
        values = [100 * ((s["traverse"].get("all") or {}).get(key, {}).get("mape") or 0) for s in scenarios]
        ax1.bar([i + offset for i in xs], values, width=0.27, label=label, color=colour)
    ax1.set_xticks(list(xs), names, fontsize=7, rotation=30)
    ax1.set_ylabel("traverse time MAPE (%)")
    ax1.set_title("ours: predicted traverse time vs SUMO's, against two baselines", fontsize=9)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3, axis="y")
    queues = [s["queue"].get("all") or {} for s in scenarios]
    bars = ax2.bar(list(xs), [q.get("mae") or 0 for q in queues], color="tab:green")
    ax2.bar_label(bars, labels=[f"r {_num(q.get('r'), '.3f')}" for q in queues], fontsize=7)
    ax2.set_xticks(list(xs), names, fontsize=7, rotation=30)
    ax2.set_ylabel("queue MAE (cars)")
    ax2.set_title("ours: queue at each light switch vs SUMO's", fontsize=9)
    ax2.grid(alpha=0.3, axis="y")
    return _svg_uri(fig)


def _mmpog_compare_figure(data: dict, stacks: list[str]) -> str:
    fig, ax = _figure(7.0, 3.6)
    labels = ["p50", "p90", "p99", "max"]
    width = 0.8 / len(stacks)
    for k, stack in enumerate(stacks):
        values = [data[stack]["reliable"]["latency_ms"].get(q) or 0 for q in labels]
        ax.bar([i + (k - (len(stacks) - 1) / 2) * width for i in range(len(labels))], values, width=width, label=stack)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("reliable update latency (ms)")
    w = data["workload"]
    ax.set_title(f"ours: {w['players']} players, {w['locations']} location(s), {w['loss']:.0%} loss each way",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _svg_uri(fig)


def _num(value, fmt: str = ",.1f", missing: str = "n/a") -> str:
    """A number for a table cell; None or NaN (a figure the run could not compute) as ``missing``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, fmt)


# ---------------------------------------------------------------- cards

class Card:
    def __init__(self, key: str, title: str) -> None:
        self.key, self.title = key, title
        self.images: list[tuple[str, str]] = []           # (caption, data URI)
        self.rows: list[tuple[str, str, str]] = []         # (quantity, paper, ours)
        self.tables: list[tuple[str, list[str], list[list[str]]]] = []   # (caption, header, rows): ours in detail
        self.differs = ""
        self.notes: list[str] = []
        self.status = "ok"
        self.wide = False          # a figure of several panels: let it take the card's width

    def html(self) -> str:
        e = html.escape
        out = [f'<section class="card" id="{e(self.key)}"><h2>{e(self.title)}</h2>']
        if self.status != "ok":
            out.append(f'<p class="status">{e(self.status)}</p>')
        for note in self.notes:
            out.append(f"<p>{note}</p>")
        if self.images:
            out.append('<div class="figs">')
            for caption, uri in self.images:
                wide = ' class="wide"' if len(self.images) == 1 and self.wide else ""
                out.append(f'<figure{wide}><img alt="{e(caption)}" src="{uri}"><figcaption>{e(caption)}</figcaption>'
                           f'</figure>')
            out.append("</div>")
        if self.rows:
            out.append("<table><tr><th>quantity</th><th>paper (typed in from the text)</th><th>ours</th></tr>")
            for quantity, paper, ours in self.rows:
                out.append(f"<tr><td>{e(quantity)}</td><td>{e(paper)}</td><td>{e(ours)}</td></tr>")
            out.append("</table>")
        for caption, header, rows in self.tables:
            out.append(f'<table class="detail"><caption>{e(caption)}</caption><tr>'
                       + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            for row in rows:
                out.append("<tr>" + "".join(f"<td>{e(str(cell))}</td>" for cell in row) + "</tr>")
            out.append("</table>")
        if self.differs:
            out.append(f'<p class="differs"><b>What differs:</b> {e(self.differs)}</p>')
        out.append("</section>")
        return "\n".join(out)


def _nearest(rows: list[dict], rate: float) -> dict | None:
    return min(rows, key=lambda r: abs(r["offered_pps"] - rate)) if rows else None


def fcd_cards(data: dict, loaded: dict[str, dict]) -> list[Card]:
    fig7 = Card("fig7", "Fig. 7 - FCD server load and loss, with and without booster boxes")
    fig7.notes.append(f"Paper: {html.escape(PAPER_FIG7['source'])}; setting: {html.escape(PAPER_FIG7['setting'])}.")
    fig7.images = [("paper: the values its text states (the figure itself is not in the text)", _paper_fig7()),
                   ("ours: loss at the server (no box) or at the boxes, as the paper measured", _ours_fig7(data))]
    knees = data.get("knee_pps") or {}
    rows = data["rows"]
    without = {rate: text for rate, _, text in PAPER_FIG7["without"]}
    withbox = {rate: text for rate, _, text in PAPER_FIG7["with"]}
    knee_text = "; ".join(f"{b} box{'es' if b != '1' else ''}: {v:,.0f} p/s" if v is not None
                          else f"{b} boxes: no knee in the range"
                          for b, v in sorted(knees.items(), key=lambda kv: int(kv[0])))
    fig7.rows.append(("load where loss starts (ours: the knee, loss > 1%)",
                      f"without boxes: {without[2000]}; with boxes: {withbox[6000]}", knee_text))
    for rate, paper_text in ((5000, f"without boxes: {without[5000]}"),
                             (11000, f"without boxes: {without[11000]}; with boxes: {withbox[11000]}")):
        measured = []
        for boxes in sorted({r["boxes"] for r in rows}):
            near = _nearest([r for r in rows if r["boxes"] == boxes], rate)
            if near is not None:
                measured.append(f"{boxes} box{'es' if boxes != 1 else ''}: {100 * (near['loss'] or 0):.0f}% "
                                f"at {near['offered_pps']:,.0f}")
        fig7.rows.append((f"loss near {rate:,} p/s (ours: nearest measured rate)", paper_text, "; ".join(measured)))
    k0, kmax = knees.get("0"), max((v for b, v in knees.items() if b != "0" and v), default=None)
    top = max((r["offered_pps"] for r in rows if r["boxes"] != 0), default=None)
    if k0 and kmax:
        ratio = f"{kmax / k0:.1f}x"
    elif k0 and top and any(v is None for b, v in knees.items() if b != "0"):
        ratio = f"more than {top / k0:.1f}x (no knee with boxes up to {top:,.0f} p/s, the highest rate offered)"
    else:
        ratio = "n/a (no knee without boxes in the range)"
    fig7.differs = (f"absolute rates are not comparable (the paper's 2003 machines; here every role gets "
                    f"{data.get('budget_cpu')} of a core, boxes and server alike, where the paper's boxes were eight "
                    f"times slower than its server); compare how far boxes push the knee: paper more than 3x "
                    f"(6,000 / < 2,000 p/s), ours {ratio} (best box count / none).")
    reduction = Card("reduction", "The 10x reduction of packets at the server (III-A)")
    reduction.notes.append(f"Paper: {html.escape(PAPER_REDUCTION['source'])}: "
                           f"\u201c{html.escape(PAPER_REDUCTION['text'])}\u201d.")
    reduction.images = [("packets reaching the server without boxes divided by with boxes (log scale)",
                         _reduction_figure(data))]
    reduction.rows.append(("reduction factor", f"{PAPER_REDUCTION['factor']}x (\"{PAPER_REDUCTION['text']}\")",
                           f"{data.get('reduction_factor')}x worst case over box counts; by boxes: "
                           f"{data.get('reduction_factor_by_boxes')}"))
    reduction.differs = ("ours counts UDP datagrams plus XML-RPC requests reaching the server at the lowest offered "
                         "rate (the city in real time); the paper gives one factor for its two-box setup. Our booster "
                         "sends one report per road per light change in batched multicalls, so the factor depends on "
                         "the city's light cycle and the batch size, not only on the aggregation.")
    return [fig7, reduction]


def np_cards(data: dict, loaded: dict[str, dict]) -> list[Card]:
    card = Card("np", "NP forwarding latency vs load, packet size and rules (II-C)")
    card.wide = True
    xdp = loaded.get("datapath_xdp")
    try:
        xdp_text = _xdp_latency_text(xdp)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:     # its own card says more
        xdp, xdp_text = None, f"cannot read the xdp run: {type(exc).__name__}: {exc}"
    card.images = [("latency per axis around the base point; green band: the paper's measurement, which is also "
                    "the emulator model's input" + ("; purple: the xdp engine, measured" if xdp else ""),
                    _np_figure(data, xdp))]
    model = data.get("model", {})
    card.notes.append(f"Paper: {html.escape(PAPER_NP['source'])}: \u201c{html.escape(PAPER_NP['text'])}\u201d; "
                      f"{html.escape(PAPER_NP['linux'])}.")
    card.notes.append(
        f"<b>Model input, not a result:</b> the card emulator is configured with the paper's figure "
        f"(<code>--model-latency-us {html.escape(str(model.get('latency_us')))} --model-jitter-us "
        f"{html.escape(str(model.get('jitter_us')))}</code>). Any \"modelled\" latency in the JSON only echoes "
        f"that input and is not shown as ours.")
    rows = data["rows"]

    def span(path: str, q: str) -> str:
        values = [r["latency_us"][q] for r in rows if r["path"] == path and r.get("latency_us")]
        return f"{min(values):,.1f}-{max(values):,.1f} µs" if values else "not measured"

    card.rows += [
        ("NP card latency", f"{PAPER_NP['latency_us']:g} µs ± {PAPER_NP['jitter_us']:g} µs, independent of load, "
                            "size and rules (measured on the NP4GS3)",
         f"not measured (no card); emulator model input {model.get('latency_us')} ± {model.get('jitter_us')} µs"),
        ("card emulator, wall clock (software on this host)", "-",
         f"p50 {span('np', 'p50')}, p99 {span('np', 'p99')} over the points"),
        ("Linux kernel forwarding", PAPER_NP["linux"], f"p50 {span('linux', 'p50')}, p99 {span('linux', 'p99')}"),
        ("xdp engine (the kernel fast path in place of the card), one-way through the box",
         f"the NP: {PAPER_NP['latency_us']:g} µs ± {PAPER_NP['jitter_us']:g} µs", xdp_text),
    ]
    card.differs = ("the paper measured a real NP4GS3; we have an emulator, whose wall clock measures a Python "
                    "process on a shared host and says nothing about the card. Kernel forwarding ran on a modern "
                    "CPU through veth pairs in namespaces, far faster than the paper's 1.6 GHz Pentium IV.")
    return [card]


def _xdp_latency_text(xdp: dict | None) -> str:
    """What the xdp engine's run measured of latency, for the NP card (or that it was not run)."""
    if xdp is None:
        return f"not run ({EXPERIMENTS['datapath_xdp'][1]})"
    passes = _xdp_latency_passes(xdp)
    if not passes:
        return "the xdp run has no pass case"
    share = xdp.get("latency_load_share_of_knee")
    load = f", offered {share:g} of the knee rate" if share is not None else ""
    p50 = " / ".join(_num(c["latency_us"].get("p50")) for c in passes)
    p99 = " / ".join(_num(c["latency_us"].get("p99")) for c in passes)
    rules = " / ".join(str(c["rules"]) for c in passes)
    text = (f"measured: p50 {p50} µs, p99 {p99} µs with {rules} rules (paced {xdp.get('paced_rate')} p/s of "
            f"{xdp.get('payload_bytes')}-byte payloads{load}, veth and namespaces)")
    program = xdp.get("program_ns") or {}
    if program:
        text += ("; the XDP program itself: " + ", ".join(f"{v:,.0f} ns ({k.replace('_', ' ')})"
                                                          for k, v in program.items()) + " per packet")
    return text


def datapath_cards(data: dict, loaded: dict[str, dict]) -> list[Card]:
    engine = data.get("engine", "?")
    card = Card(f"datapath-{engine}", f"Forwarding rate through the {engine} engine (II-C)")
    card.notes.append(f"Paper: {html.escape(PAPER_RATE['source'])}: \u201c{html.escape(PAPER_RATE['text'])}\u201d.")
    card.images.append(("ours: packets/s per case (the best of the repeated blasts)", _datapath_figure(data)))
    ceiling = data.get("ceiling_pps")
    for case in data["cases"]:
        share = f" = {case['pps'] / ceiling:.2f} of the ceiling" if ceiling and case["case"] != "ceiling" else ""
        lat = case.get("latency_us") or {}
        card.rows.append((case["case"], "-", f"{case['pps']:,.0f} p/s{share}, loss {100 * case.get('loss', 0):.1f}%, "
                                             f"latency p50 {lat.get('p50')} us"))
    card.rows.append(("NP line rate vs Linux software forwarding", "1 Gbit/s vs about a tenth of it",
                      "no NP here; ceiling of this host's path: " + (f"{ceiling:,.0f} p/s" if ceiling else "n/a")))
    card.differs = ("the paper compares the NP's line rate with kernel forwarding on a 1.6 GHz Pentium IV; ours "
                    "measures what each engine's path adds on this host, against a plain socket (user) or kernel "
                    "forwarding (linux) ceiling measured in the same run.")
    return [card]


def gnutella_cards(data: dict, loaded: dict[str, dict]) -> list[Card]:
    card = Card("fig9", "Fig. 9 - clustering the Gnutella overlay")
    card.notes.append(f"Paper: {html.escape(PAPER_FIG9['source'])}: {html.escape(PAPER_FIG9['text'])}.")
    card.images = [("paper: the principle Fig. 9 shows (drawn from its description)", _paper_fig9())]
    if "with" in data and "without" in data:
        card.images.append(("ours: measured in the three-clusters lab", _ours_fig9(data)))
        red = data.get("reduction", {})
        card.rows += [
            ("inter-cluster messages", "\"a dramatic reduction\" (no number)",
             f"{data['without']['inter_cluster_messages']:,} -> {data['with']['inter_cluster_messages']:,} "
             f"({100 * red.get('messages', 0):.1f}% fewer)"),
            ("inter-cluster bytes", "-", f"{100 * red.get('bytes', 0):.1f}% fewer"),
            ("query success", "a first attempt is made locally (no number)",
             f"{data['without'].get('query_success')} -> {data['with'].get('query_success')}"),
            ("time to first hit p50", "-",
             f"{data['without']['first_hit_ms'].get('p50')} -> {data['with']['first_hit_ms'].get('p50')} ms"),
        ]
    else:
        card.status = "only one mode was run: both 'without' and 'with' are needed to compare"
    card.differs = ("the paper gives Fig. 9 as a picture of the principle, without figures; ours counts every "
                    "message crossing a cluster edge (servent links and booster-to-booster frames) with the same "
                    "servents, files and queries in both modes.")
    return [card]


def mmpog_cards(data: dict, loaded: dict[str, dict]) -> list[Card]:
    card = Card("fig12", "Fig. 12 - the game data path under loss")
    cases = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(text)}</li>" for name, text in PAPER_FIG12["cases"])
    card.notes.append(f"Paper ({html.escape(PAPER_FIG12['source'])}):<ul>{cases}</ul>"
                      "Each case is checked exactly in <code>tests/mmpog/test_mmpog_reliability.py</code>; below, "
                      "a bots session where all four happen at random.")
    bots = data.get("bots")
    if bots:
        card.images.append(("ours: delivery latency of reliable and unreliable updates", _ours_fig12(data)))
        detail = bots.get("retransmissions_detail", {})
        reflector = bots.get("reflector", {})
        card.rows += [
            ("reliable updates delivered", "reliable within the application's bound (no number)",
             f"{bots['reliable'].get('delivered_ratio')} (within the deadline: "
             f"{bots['reliable'].get('delivered_within_deadline_ratio')})"),
            ("case 2 and 3: resends by senders", "-", f"{detail.get('by_senders')}"),
            ("case 3: duplicates delivered to the game", "0 (dropped by identifier)", f"{bots.get('duplicates_delivered')}"),
            ("case 4: NACKs sent / retransmitted by the box", "-",
             f"{bots.get('nacks_sent')} / {detail.get('by_reflector')}"),
            ("heartbeats", "sent when a location is idle", f"{reflector.get('heartbeats')}"),
        ]
    fanout = data.get("fanout")
    if fanout:
        card.rows.append(("reflector fan-out", "the NP's multicast (no number)",
                          f"{fanout.get('reflector_fanout_pps'):,} datagrams/s to {fanout.get('members')} members"))
    if not bots and not fanout:
        card.status = "the JSON has neither a bots nor a fanout section"
    card.differs = ("the paper describes the protocol; it reports no measurement of it. Loss here is injected "
                    "each way at random (iptables statistic or a user-space relay), so the four cases mix.")
    return [card]


def xdp_cards(data: dict, loaded: dict[str, dict]) -> list[Card]:
    card = Card("datapath-xdp", "The xdp engine's data path: line rate vs software forwarding (II-C)")
    card.wide = True
    card.notes.append(f"Paper: {html.escape(PAPER_RATE['source'])}: \u201c{html.escape(PAPER_RATE['text'])}\u201d; "
                      f"{html.escape(PAPER_NP['source'])}: \u201c{html.escape(PAPER_NP['text'])}\u201d.")
    card.images.append(("ours: every case of one run (green xdp, blue linux, orange user space); red: the paper's "
                        "NP claims", _xdp_figure(data)))
    cases = data["cases"]
    ceiling = data["ceiling_pps"]
    payload = int(data.get("payload_bytes", 64))
    line = line_rate_pps(payload)

    def find(name: str, engine: str) -> list[dict]:
        return sorted((c for c in cases if c["case"] == name and c["engine"] == engine), key=lambda c: c["rules"])

    passes = _xdp_passes(data, 1.0) or _xdp_passes(data, None)
    # pass is compared with plain forwarding offered the same (knee) rate when the run has it
    at_knee = next((c for c in find("ceiling", "linux") if c.get("offered", "unlimited") != "unlimited"
                    and "xdp" not in c and c.get("offered_share_of_knee", 1.0) == 1.0), None)
    reference = at_knee["pps"] if at_knee else ceiling
    same_rate = f" offered the same {at_knee['offered']:,.0f} p/s" if at_knee else ""
    ratios = data.get("ratios") or {}
    card.rows += [
        ("forwarding with rules installed that the traffic does not match (pass)",
         f"the NP: line rate of 1 Gbit/s (= {line:,.0f} p/s of {payload}-byte payloads, our arithmetic), "
         "independent of the number of rules",
         "; ".join(f"{c['rules']} rules: {c['pps']:,.0f} p/s = {c['pps'] / reference:.2f} of kernel forwarding"
                   for c in passes) + f"{same_rate} (the ceiling, {ceiling:,.0f} p/s, is what this host's veth "
                                      "path and generator reach; no 1 Gbit/s wire here)"),
        ("the fast path against software in the box", "Linux software forwarding: an order of magnitude less than "
                                                      "the NP",
         f"xdp drop / linux engine redirect+consume: {_num(ratios.get('drop_over_linux_consume'), '.1f')}x; "
         f"xdp / linux redirect+consume by the same Python booster: "
         f"{_num(ratios.get('xdp_consume_over_linux_consume'), '.2f')}x; "
         f"xdp fan-out (tc clones) / user-space sendmmsg fan-out: {_num(ratios.get('xdp_fanout_over_user_fanout'), '.1f')}x"),
        ("latency", f"the NP: {PAPER_NP['latency_us']:g} µs ± {PAPER_NP['jitter_us']:g} µs, independent of load, "
                    "size and rules", _xdp_latency_text(data)),
    ]
    card.tables.append(("every case (pps: packets/s forwarded, dropped or consumed; fan-out: datagrams/s "
                        "delivered to the members)",
                        ["case", "engine", "rules", "p/s", "of the ceiling", "offered p/s", "loss", "p50 µs", "p99 µs"],
                        [[XDP_SHORT.get(c["case"], c["case"]), c["engine"], c["rules"], _num(c["pps"], ",.0f"),
                          _num(c["pps"] / ceiling if ceiling else None, ".2f"), _num(c.get("offered_pps"), ",.0f"),
                          f"{100 * c.get('loss', 0):.1f}%", _num(c["latency_us"].get("p50"), missing="-"),
                          _num(c["latency_us"].get("p99"), missing="-")] for c in cases]))
    met = data.get("target_met") or {}
    if met:
        card.rows.append(("our targets for this engine (not the paper's)", "-",
                          ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in met.items())))
    card.differs = ("the paper measured the NP4GS3 on 1 Gbit/s ports; we have no card and no wire: the xdp engine's "
                    "fast path runs in the kernel of a shared 2-core host, between veth pairs in namespaces, fed by "
                    "one trafgen CPU. So ours are ratios within one run (to kernel forwarding, to the linux engine, "
                    "to user space), not line rate.")
    return [card]


def fcd_validate_cards(data: dict, loaded: dict[str, dict]) -> list[Card]:
    card = Card("fcd-validate", "The FCD prediction model against SUMO (III-A)")
    card.wide = True
    card.notes.append(f"Paper: {html.escape(PAPER_FCD_MODEL['source'])}: {html.escape(PAPER_FCD_MODEL['text'])}.")
    scenarios = data["scenarios"]
    if not scenarios:
        card.status = "the run holds no scenario"
        return [card]
    card.images.append(("ours: per scenario, traverse-time MAPE of our model and of two baselines; queue MAE and "
                        "Pearson r", _fcd_validate_figure(scenarios)))
    targets = data.get("targets") or {}
    rows = []
    for sc in scenarios:
        q = sc["queue"].get("all") or {}
        t = sc["traverse"].get("all") or {}
        met = sc.get("targets") or {}
        rows.append([sc["scenario"], _num(q.get("mae"), ".3f"), _num(q.get("r"), ".3f"), q.get("n", 0),
                     _num(100 * t["model"]["mape"] if t else None, ".1f"),
                     _num(100 * t["free_flow"]["mape"] if t else None, ".1f"),
                     _num(100 * t["persistence"]["mape"] if t else None, ".1f"),
                     _num(t.get("model_vs_free_flow"), ".2f"), _num(t.get("model_vs_persistence"), ".2f"),
                     f"{sum(v is True for v in met.values())} / {sum(v is not None for v in met.values())}"])
    card.tables.append((f"every scenario (targets: queue MAE <= {targets.get('queue_mae')} cars, r >= "
                        f"{targets.get('queue_r')}, model / free flow <= {targets.get('traverse_vs_free_flow')}, "
                        f"model / persistence <= {targets.get('traverse_vs_persistence')})",
                        ["scenario", "queue MAE", "queue r", "switch reports", "traverse MAPE %", "free flow %",
                         "persistence %", "model / free flow", "model / persistence", "targets met"], rows))
    # a target that does not apply (None: a network without lights has no queue at a switch) is not a miss
    all_met = sum(all(v is not False for v in (sc.get("targets") or {"": False}).values()) for sc in scenarios)
    card.rows += [
        ("queue length at the exit light", "the model's state, from the cars' reports (no accuracy given)",
         "MAE " + ", ".join(f"{sc['scenario']} {_num((sc['queue'].get('all') or {}).get('mae'), '.3f')}"
                            for sc in scenarios) + " cars"),
        ("predicted traverse time", "drive time plus time in the queue (no accuracy given)",
         "our MAPE / free-flow MAPE: " + ", ".join(
             f"{sc['scenario']} {_num((sc['traverse'].get('all') or {}).get('model_vs_free_flow'), '.2f')}"
             for sc in scenarios)),
        ("scenarios meeting every target", "-", f"{all_met} of {len(scenarios)}"),
    ]
    card.differs = ("the paper gives no accuracy; ours replays SUMO's vehicles through the generators' encoding, a "
                    "box's aggregation and the model, and compares with SUMO's own queues and edge travel times, "
                    f"{data.get('duration')} s per scenario, {data.get('interval')} s prediction intervals, against "
                    "free-flow and persistence baselines.")
    return [card]


def fcd_scale_cards(data: dict, loaded: dict[str, dict]) -> list[Card]:
    card = Card("fcd-scale", "Route look-ups from the prediction store (III-A)")
    card.notes.append(f"Paper: {html.escape(PAPER_TUPLESPACE['source'])}: {html.escape(PAPER_TUPLESPACE['text'])}.")
    lookups = data["route_lookups"]
    if not lookups:
        card.status = "the run measured no store"
        return [card]
    card.images.append(("ours: look-ups per second each store serves as routers are added", _fcd_scale_figure(data)))
    clients = sorted({c for points in lookups.values() for c in points}, key=int)
    card.tables.append(("look-ups per second by concurrent routers", ["store"] + clients,
                        [[store] + [_num(points.get(c), ",.0f", "-") for c in clients]
                         for store, points in lookups.items()]))
    top = clients[-1]
    card.rows.append((f"look-ups per second at {top} routers", "periodic reads by every car's router (no figures)",
                      ", ".join(f"{store} {_num(points.get(top), ',.0f', '-')}" for store, points in lookups.items())
                      + (f"; Redis / TCP {_num(data['ratio_at_max_clients'], '.2f')}"
                         if data.get("ratio_at_max_clients") is not None else "")))
    knee = data.get("knee_pps")
    if knee is not None:
        shown = (", ".join(f"{k}: {_num(v, ',.0f', 'no knee in the range')}" for k, v in knee.items())
                 if isinstance(knee, dict) else _num(knee, ",.0f"))
        card.rows.append(("knee (where the store stops keeping up)", "-", shown))
    grid = "x".join(str(n) for n in data.get("grid") or ()) or "?"
    card.differs = (f"the paper does not measure its tuplespace; ours is a {grid} grid "
                    f"({data.get('roads')} roads, {data.get('runs')} prediction runs held), each store in "
                    f"{data.get('budget_cpu') or 'no'} core of CPU budget, the routers outside it.")
    return [card]


def mmpog_compare_cards(data: dict, loaded: dict[str, dict]) -> list[Card]:
    card = Card("mmpog-compare", "The game protocol beside KCP and ENet (III-C)")
    card.notes.append(f"Paper: {html.escape(PAPER_GAME_RELIABILITY['source'])}: "
                      f"{html.escape(PAPER_GAME_RELIABILITY['text'])}.")
    stacks = [name for name in ("mmpog", "kcp", "enet") if name in data]
    if "mmpog" not in stacks:
        raise KeyError("mmpog")
    card.images.append(("ours: reliable update latency per stack, same workload, same loss",
                        _mmpog_compare_figure(data, stacks)))
    rows = []
    for stack in stacks:
        section = data[stack]
        reliable = section["reliable"]
        lat = reliable["latency_ms"]
        retransmissions = section.get("retransmissions") or {}
        rows.append([section.get("stack", stack),
                     f"{reliable['delivered_ratio']} ({reliable['delivered_within_deadline_ratio']})",
                     " / ".join(_num(lat.get(q), ".1f") for q in ("p50", "p90", "p99", "max")),
                     _num(reliable["first_second_latency_ms"].get("p99"), ".1f"),
                     _num(section["unreliable"].get("delivered_ratio"), ".3f"), section["duplicates_delivered"],
                     _num(section["updates_relayed_per_s"], ",.0f"), _num(section["datagrams_sent_per_s"], ",.0f"),
                     ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in retransmissions.items()) or "-"])
    card.tables.append(("every stack (reliable updates unless said)",
                        ["stack", "delivered (within the deadline)", "p50 / p90 / p99 / max ms", "first second p99 ms",
                         "unreliable delivered", "duplicates", "updates relayed/s", "datagrams/s", "retransmissions"],
                        rows))
    w = data["workload"]
    ours = data["mmpog"]["reliable"]
    card.rows += [
        ("reliable delivery within a bound", "\"within some time period\", if sender and receiver think it worthwhile "
                                             "(no figures)",
         f"mmpog: {ours['delivered_within_deadline_ratio']} within {w['deadline']:g} s; " + "; ".join(
             f"{stack}: {data[stack]['reliable']['delivered_within_deadline_ratio']}" for stack in stacks[1:])),
        ("the workload", "-", f"{w['players']} players in {w['locations']} location(s), {w['rate']:g} updates/s "
                              f"each, {100 * w['reliable_fraction']:.0f}% reliable, {w['payload']}-byte payloads, "
                              f"{100 * w['loss']:.0f}% loss each way, {w['duration']:g} s"),
    ]
    card.differs = ("the paper compares with no other protocol; KCP and ENet are today's application-layer reliable "
                    "UDP (the family of Levine et al. it cites), run as relays with the same bots, audience and "
                    "loss (" + data.get("loss_mode", "?") + ").")
    return [card]


BUILDERS: dict[str, tuple[str, Callable[[dict, dict[str, dict]], list[Card]]]] = {
    "fcd": ("Fig. 7 and the 10x reduction (III-A)", fcd_cards),
    "fcd_validate": ("The FCD prediction model against SUMO (III-A)", fcd_validate_cards),
    "fcd_scale": ("Route look-ups from the prediction store (III-A)", fcd_scale_cards),
    "np": ("NP latency (II-C)", np_cards),
    "datapath_user": ("Forwarding rate through the user engine (II-C)", datapath_cards),
    "datapath_linux": ("Forwarding rate through the linux engine (II-C)", datapath_cards),
    "datapath_xdp": ("The xdp engine's data path (II-C)", xdp_cards),
    "gnutella": ("Fig. 9 (III-B)", gnutella_cards),
    "mmpog": ("Fig. 12 (III-C)", mmpog_cards),
    "mmpog_compare": ("The game protocol beside KCP and ENet (III-C)", mmpog_compare_cards),
}


def missing_card(name: str, title: str, path: Path, command: str, why: str) -> Card:
    card = Card(name, title)
    card.status = why
    card.notes.append(f"Produce it with: <code>{html.escape(command)}</code>")
    return card


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 20px}header h1{margin:0;font-size:20px}header p{margin:4px 0 0;color:#b9c0cc;font-size:13px}
main{padding:16px 20px;display:flex;flex-direction:column;gap:16px;max-width:1400px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px}
h2{font-size:16px;margin:0 0 8px}.figs{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;flex:1 1 420px;min-width:0;max-width:760px}figure.wide{max-width:none}figure img{width:100%;height:auto}figcaption{font-size:12px;color:#6a7282}
table{border-collapse:collapse;width:100%;font-size:13px;margin-top:8px}th,td{text-align:left;border-bottom:1px solid #eef0f3;padding:4px 6px;vertical-align:top}
th{color:#6a7282;font-weight:500}caption{text-align:left;font-size:12px;color:#6a7282;padding:6px 0 2px}.status{color:#b7791f;font-weight:600}.differs{font-size:13px}code{font-size:12px;background:#f0f2f5;padding:1px 4px;border-radius:3px}
"""


def load(paths: dict[str, Path]) -> dict[str, dict | str]:
    """Each experiment's JSON object, or why there is none ("not run: ...", "cannot read ...")."""
    loaded: dict[str, dict | str] = {}
    for name, path in paths.items():
        if not path.exists():
            loaded[name] = f"not run: {path} does not exist"
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            loaded[name] = f"cannot read {path}: {type(exc).__name__}: {exc}"
            continue
        loaded[name] = data if isinstance(data, dict) else f"cannot read {path}: not a JSON object"
    return loaded


def build_report(paths: dict[str, Path]) -> str:
    loaded = load(paths)
    found = {name: data for name, data in loaded.items() if isinstance(data, dict)}
    cards: list[Card] = []
    for name, (title, builder) in BUILDERS.items():
        path, data = paths[name], loaded[name]
        command = EXPERIMENTS[name][1]
        if isinstance(data, str):
            cards.append(missing_card(name, title, path, command, data))
            continue
        try:
            built = builder(data, found)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            cards.append(missing_card(name, title, path, command, f"cannot read {path}: {type(exc).__name__}: {exc}"))
            continue
        for card in built:
            card.notes.insert(0, f"From <code>{html.escape(str(path))}</code>.")
        cards.extend(built)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(card.html() for card in cards)
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>booster boxes: our figures beside the paper's</title><style>{CSS}</style></head><body>"
            f"<header><h1>Booster boxes: our experiments beside the paper</h1>"
            f"<p>{html.escape(PAPER)}. Paper numbers are typed in from its text, with the section they come from; "
            f"ours are read from the experiments' JSON. Generated {now}.</p></header><main>\n{body}\n</main></body></html>\n")


def run(args: argparse.Namespace) -> int:
    paths = {name: getattr(args, name) or args.dir / filename for name, (filename, _) in EXPERIMENTS.items()}
    page = build_report(paths)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(page)
    except OSError as exc:
        raise ConfigError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    found = [name for name, path in paths.items() if path.exists()]
    print(json.dumps({"out": str(args.out), "experiments_found": found,
                      "not_run": [n for n in paths if n not in found]}))
    return 0
