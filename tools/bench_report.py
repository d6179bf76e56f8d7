"""``booster-loadgen report``: the experiments' JSON side by side with the paper, as one page.

Reads the files the README's experiment commands write (``out/fcd.json``, ``out/np.json``,
``out/datapath-user.json``, ``out/datapath-linux.json``, ``out/gnutella.json``, ``out/mmpog.json``)
and writes one self-contained HTML file: every figure
is an inline SVG data URI, nothing is fetched.  Each card puts our figure (drawn from the JSON)
next to the paper's numbers, typed in from the paper's text with the section or figure they
come from, and says in one line what differs.  A missing file is shown as "not run" with the
command that produces it; a file that cannot be read says why.

The paper's 15 µs ± 3 µs NP latency is a measurement of the real card (section II-C).  Our card
emulator takes it as its model's *input* (``--model-latency-us``/``--model-jitter-us``): the NP card
shows it as such, beside what we measured (the emulator's wall clock, kernel forwarding), never
as a result of ours.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import json
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
    "fcd": ("fcd.json", "booster-loadgen fcd --json out/fcd.json --plot out/fcd.png   (root: cgroup CPU budgets)"),
    "np": ("np.json", "booster-loadgen np-latency --json out/np.json --plot out/np.png   (root); or show the "
                      "committed run: booster-loadgen report --np docs/npdrv-latency.json"),
    "gnutella": ("gnutella.json",
                 "booster-loadgen gnutella --clusters 3 --servents 20 --json out/gnutella.json --plot out/gnutella.png"
                 "   (root)"),
    "mmpog": ("mmpog.json", "booster-loadgen mmpog --players 64 --locations 1 --duration 10 --loss 0.05 "
                            "--json out/mmpog.json --plot out/mmpog.png"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="one self-contained HTML page: every experiment's figure beside the paper's numbers",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  booster-loadgen report --out report.html\n"
               "  booster-loadgen report --dir out --np docs/npdrv-latency.json --out out/report.html")
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


def _np_figure(data: dict) -> str:
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


# ---------------------------------------------------------------- cards

class Card:
    def __init__(self, key: str, title: str) -> None:
        self.key, self.title = key, title
        self.images: list[tuple[str, str]] = []           # (caption, data URI)
        self.rows: list[tuple[str, str, str]] = []         # (quantity, paper, ours)
        self.differs = ""
        self.notes: list[str] = []
        self.status = "ok"

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
                wide = ' class="wide"' if len(self.images) == 1 and self.key == "np" else ""
                out.append(f'<figure{wide}><img alt="{e(caption)}" src="{uri}"><figcaption>{e(caption)}</figcaption>'
                           f'</figure>')
            out.append("</div>")
        if self.rows:
            out.append("<table><tr><th>quantity</th><th>paper (typed in from the text)</th><th>ours</th></tr>")
            for quantity, paper, ours in self.rows:
                out.append(f"<tr><td>{e(quantity)}</td><td>{e(paper)}</td><td>{e(ours)}</td></tr>")
            out.append("</table>")
        if self.differs:
            out.append(f'<p class="differs"><b>What differs:</b> {e(self.differs)}</p>')
        out.append("</section>")
        return "\n".join(out)


def _nearest(rows: list[dict], rate: float) -> dict | None:
    return min(rows, key=lambda r: abs(r["offered_pps"] - rate)) if rows else None


def fcd_cards(data: dict) -> list[Card]:
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


def np_cards(data: dict) -> list[Card]:
    card = Card("np", "NP forwarding latency vs load, packet size and rules (II-C)")
    card.images = [("latency per axis around the base point; green band: the paper's measurement, which is also "
                    "the emulator model's input", _np_figure(data))]
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
    ]
    card.differs = ("the paper measured a real NP4GS3; we have an emulator, whose wall clock measures a Python "
                    "process on a shared host and says nothing about the card. Kernel forwarding ran on a modern "
                    "CPU through veth pairs in namespaces, far faster than the paper's 1.6 GHz Pentium IV.")
    return [card]


def datapath_cards(data: dict) -> list[Card]:
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


def gnutella_cards(data: dict) -> list[Card]:
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


def mmpog_cards(data: dict) -> list[Card]:
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


BUILDERS: dict[str, tuple[str, Callable[[dict], list[Card]]]] = {
    "fcd": ("Fig. 7 and the 10x reduction (III-A)", fcd_cards),
    "np": ("NP latency (II-C)", np_cards),
    "datapath_user": ("Forwarding rate through the user engine (II-C)", datapath_cards),
    "datapath_linux": ("Forwarding rate through the linux engine (II-C)", datapath_cards),
    "gnutella": ("Fig. 9 (III-B)", gnutella_cards),
    "mmpog": ("Fig. 12 (III-C)", mmpog_cards),
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
th{color:#6a7282;font-weight:500}.status{color:#b7791f;font-weight:600}.differs{font-size:13px}code{font-size:12px;background:#f0f2f5;padding:1px 4px;border-radius:3px}
"""


def build_report(paths: dict[str, Path]) -> str:
    cards: list[Card] = []
    for name, (title, builder) in BUILDERS.items():
        path = paths[name]
        command = EXPERIMENTS[name][1]
        if not path.exists():
            cards.append(missing_card(name, title, path, command, f"not run: {path} does not exist"))
            continue
        try:
            data = json.loads(path.read_text())
            built = builder(data)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
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
