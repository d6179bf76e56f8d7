"""The clustering experiment (paper Fig. 9): three clusters, with and without boosters.

Builds the ``three-clusters`` lab (root), spreads servents over the cluster hosts (one per
address), shares a Zipf-popular file set, gives every servent a random bootstrap list (so
the plain overlay ignores the clusters), issues scripted queries with downloads, and
measures what crosses the cluster boundaries:

- ``inter_cluster_messages`` / ``inter_cluster_bytes``: Gnutella messages (and their bytes)
  a servent sent on a connection that really left its cluster (a connection the edge's
  booster intercepted does not), plus the boosters' own booster-to-booster messages.
- ``edge_link_bytes``: every byte on the edge-core links (interface counters, both ways),
  downloads and TCP overhead included: a check on the above from the kernel.
- ``query_success``, ``first_hit_ms`` {p50, p99}, ``download_success`` (SHA-1 verified).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import logging
import random
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from boxcore.procs import ProcessGroup, script
from tools.stats import summary

log = logging.getLogger("tools.gnutella_experiment")

GNUTELLA_PORT = 6346
B2B_PORT = 6350
WORDS = ("amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
         "kestrel", "lagoon", "meadow", "nebula", "onyx", "prairie", "quartz", "raven", "sierra", "tundra",
         "umber", "violet", "willow", "xenon", "yarrow", "zephyr")


@dataclass
class ExperimentConfig:
    clusters: int = 3
    servents: int = 20
    files: int = 40
    zipf: float = 1.0
    max_replicas: int = 6
    queries_per_servent: int = 4
    query_gap: float = 1.5          # seconds between one servent's queries
    warmup: float = 8.0
    wait_hits: float = 3.0
    bootstrap: int = 3              # random peers (anywhere) each servent is told of
    connections: int = 3
    query_ttl: int = 4
    seed: int = 7
    sightings: int = 6
    local_wait: float = 0.3
    file_kb: tuple[int, int] = (16, 64)
    forward: str = "adaptive"       # the boosters' forwarding rule ("wait": the paper's local attempt first)
    stall_bound: float = 10.0       # boxd --linux-stall: how long a booster may leave connections unaccepted
    tail: float = 8.0               # seconds servents stay up after the last query (downloads, stragglers)


@dataclass
class Servent:
    name: str
    node: str
    cluster: int
    ip: str
    files: dict[str, bytes] = field(default_factory=dict)
    queries: list[dict] = field(default_factory=list)


def file_name(i: int, rng: random.Random) -> str:
    a, b = rng.sample(WORDS, 2)
    return f"track{i:03d} {a} {b}.ogg"


def plan(cfg: ExperimentConfig, hosts: dict[int, list[tuple[str, list[str]]]]) -> tuple[list[Servent], dict]:
    """Place servents on cluster host addresses, files by Zipf popularity, and their queries."""
    rng = random.Random(cfg.seed)
    slots: list[tuple[int, str, str]] = []
    per_cluster = [[(c, node, ip) for node, ips in hosts[c] for ip in ips] for c in sorted(hosts)]
    depth = max(len(x) for x in per_cluster)
    for k in range(depth):                      # round-robin over clusters, then hosts
        for cluster_slots in per_cluster:
            if k < len(cluster_slots):
                slots.append(cluster_slots[k])
    if cfg.servents > len(slots):
        raise ValueError(f"{cfg.servents} servents do not fit on {len(slots)} host addresses")
    servents = [Servent(f"s{i:02d}", node, c, ip) for i, (c, node, ip) in enumerate(slots[:cfg.servents])]
    weights = [1.0 / (i + 1) ** cfg.zipf for i in range(cfg.files)]
    names = [file_name(i, rng) for i in range(cfg.files)]
    catalogue = {}
    for i, name in enumerate(names):
        size = rng.randint(*cfg.file_kb) * 1024
        data = rng.randbytes(size)
        replicas = max(1, round(cfg.max_replicas * weights[i] / weights[0]))
        for s in rng.sample(servents, min(replicas, len(servents))):
            s.files[name] = data
        catalogue[name] = base64.b32encode(hashlib.sha1(data).digest()).decode()
    for n, s in enumerate(servents):
        for j in range(cfg.queries_per_servent):
            while True:
                i = rng.choices(range(cfg.files), weights)[0]
                if names[i] not in s.files:
                    break
            words = names[i].split()
            s.queries.append({"at": round(cfg.warmup + j * cfg.query_gap + n * cfg.query_gap / len(servents), 3),
                              "query": f"{words[0]} {words[1]}", "download": True, "sha1": catalogue[names[i]]})
    return servents, catalogue


def _cluster_of(ip: str, prefixes: dict[int, ipaddress.IPv4Network]) -> int | None:
    addr = ipaddress.ip_address(ip)
    for c, net in prefixes.items():
        if addr in net:
            return c
    return None


async def run_mode(lab, cfg: ExperimentConfig, servents: list[Servent], boosters: bool, workdir: Path,
                   say: Callable[[str], None]) -> dict:
    """One run on a fresh set of processes; returns the mode's figures."""
    workdir.mkdir(parents=True, exist_ok=True)
    procs = ProcessGroup(workdir / "roles")
    clusters = sorted({s.cluster for s in servents} | set(range(1, cfg.clusters + 1)))
    prefixes = {c: ipaddress.ip_network(f"10.1{c}.0.0/24") for c in clusters}
    edge_roles = {}
    rng = random.Random(cfg.seed + 1)
    try:
        if boosters:
            # the boosters authenticate each other with a secret only they hold (mode 600)
            peer_secret = workdir / "b2b.secret"
            peer_secret.touch(mode=0o600)
            peer_secret.chmod(0o600)
            peer_secret.write_text(secrets.token_hex(32))
            for c in clusters:
                edge = f"edge{c}"
                control = workdir / f"{edge}.sock"
                # --linux-stall: when every servent starts at once on a loaded machine, a booster may
                # take seconds to accept the burst of intercepted connections; boxd's watchdog must
                # not take its rules away for that (links would then go past the box)
                boxd = procs.start(f"{edge}-boxd", lab.command(edge, [
                    script("boxd"), "--engine", "linux", "--control", str(control),
                    "--state", str(workdir / f"{edge}-state"), "--log-level", "info",
                    "--linux-stall", str(cfg.stall_bound)]))
                await procs.wait_for_log(boxd, "boxd ready", 30)
                peers = []
                for other in clusters:
                    if other > c:
                        peers += ["--booster", f"{lab.addr(f'edge{other}', 'core')}:{B2B_PORT}"]
                booster = procs.start(f"{edge}-booster", lab.command(edge, [
                    script("gnutella-booster"), "--control", str(control), "--name", edge,
                    "--cluster", str(prefixes[c]), "--port", str(GNUTELLA_PORT),
                    "--peer-listen", f"{lab.addr(edge, 'core')}:{B2B_PORT}",
                    "--sightings", str(cfg.sightings), "--local-wait", str(cfg.local_wait),
                    "--secret", f"{edge}-{cfg.seed}", "--peer-secret-file", str(peer_secret),
                    *peers, "--log-level", "info",
                    *(["--forward", cfg.forward] if cfg.forward != "adaptive" else [])]))
                edge_roles[c] = booster
            for role in edge_roles.values():
                await procs.wait_for_log(role, "ready on engine", 30)
        edge_before = _edge_bytes(lab, clusters)
        roles = {}
        duration = cfg.warmup + cfg.queries_per_servent * cfg.query_gap + cfg.query_gap + cfg.wait_hits + cfg.tail
        for s in servents:
            share = workdir / "shares" / s.name
            share.mkdir(parents=True, exist_ok=True)
            for name, data in s.files.items():
                (share / name).write_bytes(data)
            queries = workdir / f"{s.name}.queries.jsonl"
            queries.write_text("".join(json.dumps(q) + "\n" for q in s.queries))
            others = [o for o in servents if o is not s]
            argv = [script("gnutella-servent"), "serve", "--listen", f"{s.ip}:{GNUTELLA_PORT}",
                    "--share", str(share), "--connections", str(cfg.connections), "--ttl", str(cfg.query_ttl),
                    "--seed", str(cfg.seed * 1000 + int(s.name[1:])), "--duration", str(duration),
                    "--queries", str(queries), "--results", str(workdir / f"{s.name}.results.jsonl"),
                    "--wait-hits", str(cfg.wait_hits), "--downloads", str(workdir / "downloads" / s.name),
                    "--log-level", "warning"]
            (workdir / "downloads" / s.name).mkdir(parents=True, exist_ok=True)
            for peer in rng.sample(others, min(cfg.bootstrap, len(others))):
                argv += ["--peer", f"{peer.ip}:{GNUTELLA_PORT}"]
            roles[s.name] = procs.start(s.name, lab.command(s.node, argv))
        say(f"{'with' if boosters else 'without'} boosters: {len(servents)} servents started, "
            f"queries from t={cfg.warmup:.0f}s, run {duration:.0f}s")
        deadline = time.monotonic() + duration + 30
        while any(r.proc.poll() is None for r in roles.values()):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        await procs.stop_many(list(roles.values()))
        # a booster (or its boxd) that ended during the run stopped intercepting: say so
        lost = sorted(r.name for r in procs.roles if r.name.startswith("edge") and r.proc.poll() is not None)
        if lost:
            say(f"edge processes that ended during the run: {', '.join(lost)}")
        edge_after = _edge_bytes(lab, clusters)
        await procs.stop_many(list(edge_roles.values()))
        booster_stats = {c: r.read_stats() for c, r in edge_roles.items()}
        await procs.stop_all()
        out = summarize(cfg, servents, workdir, {n: r.read_stats() for n, r in roles.items()}, booster_stats,
                        prefixes, edge_after - edge_before)
        out["edge_processes_lost"] = lost
        return out
    finally:
        await procs.stop_all()


def _edge_bytes(lab, clusters) -> int:
    total = 0
    for c in clusters:
        out = lab.run(f"edge{c}", ["cat", "/sys/class/net/core/statistics/rx_bytes",
                                   "/sys/class/net/core/statistics/tx_bytes"], check=False).stdout.split()
        total += sum(int(x) for x in out if x.isdigit())
    return total


def summarize(cfg: ExperimentConfig, servents: list[Servent], workdir: Path, stats: dict[str, dict],
              booster_stats: dict[int, dict], prefixes: dict, edge_bytes: int) -> dict:
    by_name = {s.name: s for s in servents}
    intercepted: set[tuple[str, str]] = set()
    seen_by_box: Counter = Counter()          # (servent ip, remote ip) -> connections its edge handled
    b2b_msgs = b2b_bytes = 0
    booster_summary = {}
    for c, st in booster_stats.items():
        for key, count in (st.get("booster") or {}).get("intercepted", {}).items():
            client, _, dst = key.partition(">")
            intercepted.add((client, dst.rpartition(":")[0]))
            seen_by_box[(client, dst.rpartition(":")[0])] += count
        for key, count in (st.get("booster") or {}).get("spliced", {}).items():
            client, _, dst = key.partition(">")
            seen_by_box[(client, dst.rpartition(":")[0])] += count
        boundary = st.get("boundary") or {}
        b2b_msgs += boundary.get("messages_out", 0)
        b2b_bytes += boundary.get("bytes_out", 0)
        booster_summary[f"edge{c}"] = {k: st.get(k, 0) for k in (
            "intercepted", "steered_away", "pings_answered", "local_queries", "probes_sent", "local_hits",
            "forwarded_by_count", "forwarded_by_timeout", "forwarded_by_tables", "queries_kept_inside",
            "remote_queries_injected",
            "remote_hits", "spliced", "decompression_refused", "local_links_compressed")}
        booster_summary[f"edge{c}"]["b2b_messages_out"] = boundary.get("messages_out", 0)
    servent_msgs = servent_bytes = 0
    past_box = 0
    for name, st in stats.items():
        s = by_name[name]
        for remote_ip, count in (st.get("servent") or {}).get("dialed", {}).items():
            remote_cluster = _cluster_of(remote_ip, prefixes) if remote_ip != "other" else None
            if remote_cluster is not None and remote_cluster != s.cluster:
                # a connection to another cluster that its own box did not handle went past it
                past_box += max(0, count - seen_by_box[(s.ip, remote_ip)]) if booster_stats else count
        traffic = (st.get("servent") or {}).get("traffic", {})
        for remote_ip, counters in traffic.items():
            remote_cluster = _cluster_of(remote_ip, prefixes)
            if remote_cluster is None or remote_cluster == s.cluster:
                continue
            if (s.ip, remote_ip) in intercepted:
                continue          # ended at our own edge's booster: never crossed
            servent_msgs += counters.get("msgs_out", 0)
            servent_bytes += counters.get("bytes_out", 0)
    records = []
    for s in servents:
        path = workdir / f"{s.name}.results.jsonl"
        if path.exists():
            records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    issued = sum(len(s.queries) for s in servents)
    answered = [r for r in records if r["hits"] > 0]
    first = [r["first_hit_ms"] for r in answered if r["first_hit_ms"] is not None]
    downloads = [r["download"] for r in records if r.get("download")]
    verified = [d for d in downloads if d.get("ok")]
    return {
        "inter_cluster_messages": servent_msgs + b2b_msgs,
        "inter_cluster_bytes": servent_bytes + b2b_bytes,
        "servent_messages_crossing": servent_msgs,
        "connections_past_box": past_box,
        "booster_messages_crossing": b2b_msgs,
        "edge_link_bytes": edge_bytes,
        "queries": issued,
        "queries_completed": len(records),
        "query_success": round(len(answered) / issued, 4) if issued else None,
        "first_hit_ms": summary(first, (50, 99)),
        "download_success": round(len(verified) / issued, 4) if issued else None,
        "downloads_attempted": len(downloads),
        "boosters": booster_summary,
    }


async def run_experiment(cfg: ExperimentConfig, workdir: Path, say: Callable[[str], None],
                         modes: tuple[str, ...] = ("without", "with")) -> dict:
    from boxcore.lab import Lab

    lab = await Lab.up_async("three-clusters", name=f"gnut-{secrets.token_hex(3)}")
    try:
        hosts: dict[int, list[tuple[str, list[str]]]] = {}
        for c in range(1, cfg.clusters + 1):
            hosts[c] = [(node, lab.addrs(node)) for node in sorted(lab.nodes) if node.startswith(f"c{c}")]
        servents, catalogue = plan(cfg, hosts)
        say(f"lab {lab.name}: {cfg.clusters} clusters, {len(servents)} servents, {len(catalogue)} files "
            f"(Zipf {cfg.zipf}), {sum(len(s.queries) for s in servents)} queries per mode")
        out: dict = {"config": asdict(cfg)}
        for mode in modes:
            out[mode] = await run_mode(lab, cfg, servents, mode == "with", workdir / mode, say)
            m = out[mode]
            say(f"{mode}: {m['inter_cluster_messages']} inter-cluster messages, {m['inter_cluster_bytes']} bytes, "
                f"success {m['query_success']}, first hit p50 {m['first_hit_ms']['p50']} ms "
                f"p99 {m['first_hit_ms']['p99']} ms, "
                f"downloads {m['download_success']}")
        if "with" in out and "without" in out and out["without"]["inter_cluster_messages"]:
            w, wo = out["with"], out["without"]
            out["reduction"] = {
                "messages": round(1 - w["inter_cluster_messages"] / wo["inter_cluster_messages"], 4),
                "bytes": round(1 - w["inter_cluster_bytes"] / max(1, wo["inter_cluster_bytes"]), 4),
                "edge_link_bytes": round(1 - w["edge_link_bytes"] / max(1, wo["edge_link_bytes"]), 4),
            }
            # the cost of clustering in latency, next to what it saves: first hit with / without boosters
            out["first_hit_ratio"] = {
                q: (round(w["first_hit_ms"][q] / wo["first_hit_ms"][q], 3)
                    if w["first_hit_ms"][q] is not None and wo["first_hit_ms"][q] else None)
                for q in ("p50", "p99")}
        return out
    finally:
        await asyncio.to_thread(lab.down)
