"""The mmpog-bots workload in simulated time: loss recovery measured without a busy host's noise.

``mmpog.testing.SimNetwork`` joins a :class:`~mmpog.reliability.ReflectorCore` and N
:class:`~mmpog.reliability.ClientEndpoint` through seeded lossy links.  Every player sends
``rate`` updates/s (``reliable_fraction`` of them reliable, deadline ``deadline``) into its
location; every other member of the location is expected to receive each one.  The figures are
those of ``mmpog-bots`` (reliable/unreliable delivered ratio, latency p50/p90/p99/max, computed
with :func:`tools.stats.percentile`), plus the first second of play on its own (cold start), the
p99 of each second of play (``per_second_p99_ms``: a cold start out of line stands out from the
other seconds' spread, which one second's few repaired updates make wide), and
the protocol's counters (NACKs, retransmissions, duplicates dropped, sender timeouts), so a
scenario says *why* a tail is what it is.

Run: ``python -m tools.sim_mmpog --players 64 --locations 1 --loss 0.05 --duration 10``
(``--scenario NAME`` runs one of the measured scenarios in docs/mmpog.md; ``--json`` writes
the result).  Deterministic: the same arguments give the same figures.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from mmpog.reliability import ClientConfig, ClientEndpoint, Received, ReflectorConfig, ReflectorCore
from mmpog.testing import LinkProfile, SimNetwork
from tools.output import write_result
from tools.stats import percentile

UPDATE = struct.Struct("!Id")   # player, send time


@dataclass
class Workload:
    players: int = 64
    locations: int = 1
    duration: float = 10.0
    rate: float = 10.0
    reliable_fraction: float = 0.25
    deadline: float = 1.0
    payload: int = 64
    loss: float = 0.05               # each way
    latency: float = 0.00025         # one way: the loopback SRTT of ~0.5 ms measured by mmpog-bots
    jitter: float = 0.0002
    reflector_tick: float = 0.0      # the reflector adapter's timer resolution (0: exact)
    probe_stream: bool = False       # heartbeats' losses drawn apart (comparing probe policies)
    seed: int = 1
    client: dict = field(default_factory=dict)      # ClientConfig overrides
    reflector: dict = field(default_factory=dict)   # ReflectorConfig overrides


def _latencies(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    out = {f"p{q}": (None if not ms else round(percentile(ms, q / 100), 3)) for q in (50, 90, 99)}
    out["max"] = round(max(ms), 3) if ms else None
    return out


def run(w: Workload) -> dict:
    reflector = ReflectorCore(ReflectorConfig(**w.reflector))
    profile = LinkProfile(loss_up=w.loss, loss_down=w.loss, latency=w.latency, jitter=w.jitter)
    net = SimNetwork(reflector, profile, seed=w.seed, reflector_tick=w.reflector_tick, probe_stream=w.probe_stream)
    config = ClientConfig(default_deadline=w.deadline, **w.client)
    rng = random.Random(w.seed)
    endpoints: list[tuple[ClientEndpoint, tuple[str, int], int]] = []
    for index in range(w.players):
        player = index + 1
        location = index % w.locations
        token = player.to_bytes(4, "big") * 4
        reflector.add_member(location, player, token, now=net.now)
        ep = ClientEndpoint(player, location, token, replace(config), rng=random.Random(w.seed * 7919 + player))
        addr = (f"10.{player >> 8}.{player & 255}.1", 5000)
        net.add_client(ep, addr)
        ep.connect(net.now)
        endpoints.append((ep, addr, location))
    while not all(ep.joined for ep, _, _ in endpoints):
        if not net.step(net.now + 5.0):
            break
    start = net.now
    interval = 1.0 / w.rate
    pad = bytes(max(0, w.payload - UPDATE.size))
    sends: list[tuple[float, int, bool]] = []
    for index in range(w.players):
        t = start + rng.random() * interval
        while t < start + w.duration:
            sends.append((t, index, rng.random() < w.reliable_fraction))
            t += interval
    sends.sort()
    sent: dict[tuple[int, int], tuple[float, bool, int]] = {}   # (player, packet id) -> (time, reliable, location)
    rto_at_send: list[float] = []   # the sender's RTO when it sent each reliable update

    def copies_so_far() -> tuple[int, int]:
        return sum(ep.stats["redundant_copies_sent"] for ep, _, _ in endpoints), reflector.copies_queued

    def rate_counters() -> dict[str, int]:
        totals = reflector.totals()
        return {"heartbeats": totals["heartbeats"], "heartbeat_datagrams": totals["heartbeat_datagrams"],
                "heartbeats_skipped": totals["heartbeats_skipped"],
                "reflector_datagrams": net.transmitted["down"],
                "gaps_from_heartbeat": sum(ep.stats["gaps_from_heartbeat"] for ep, _, _ in endpoints),
                "heartbeats_received": sum(ep.stats["heartbeats"] for ep, _, _ in endpoints)}

    play_start = rate_counters()
    copy_marks = [copies_so_far()]  # at the start of each second of play: when does a clean path stop copying?
    for t, index, reliable in sends:
        while t >= start + len(copy_marks):
            net.run_for(start + len(copy_marks) - net.now)
            copy_marks.append(copies_so_far())
        net.run_for(t - net.now)
        ep, _, location = endpoints[index]
        if reliable:
            rto_at_send.append(ep.rtt.rto)
        pid = ep.send(UPDATE.pack(ep.player, t) + pad, net.now, reliable=reliable)
        sent[(ep.player, pid)] = (t, reliable, location)
    copy_marks.append(copies_so_far())
    net.run_for(start + w.duration - net.now)
    play = {name: value - play_start[name] for name, value in rate_counters().items()}
    net.run_for(w.deadline + 1.0)
    members: dict[int, int] = {}
    for _, _, location in endpoints:
        members[location] = members.get(location, 0) + 1
    lat: dict[bool, list[float]] = {True: [], False: []}
    first: dict[bool, list[float]] = {True: [], False: []}
    per_second: dict[bool, dict[int, list[float]]] = {True: {}, False: {}}     # second of play -> latencies
    got: dict[bool, int] = {True: 0, False: 0}
    for ep, addr, _ in endpoints:
        for event in net.events[addr]:
            if type(event) is Received:
                t, reliable, _ = sent[(event.sender, event.packet_id)]
                latency = event.now - t
                lat[reliable].append(latency)
                got[reliable] += 1
                if t < start + 1.0:
                    first[reliable].append(latency)
                per_second[reliable].setdefault(int(t - start), []).append(latency)
    out: dict = {"players": w.players, "locations": w.locations, "loss": w.loss, "duration": w.duration,
                 "seed": w.seed, "client": w.client, "reflector": w.reflector}
    if w.probe_stream:
        out["probe_stream"] = True
    for reliable, name in ((True, "reliable"), (False, "unreliable")):
        expected = sum(members[loc] - 1 for _, r, loc in sent.values() if r == reliable)
        values = lat[reliable]
        out[name] = {"sent": sum(1 for _, r, _ in sent.values() if r == reliable), "expected": expected,
                     "delivered_ratio": round(got[reliable] / expected, 6) if expected else None,
                     "delivered_within_deadline_ratio": (round(sum(v <= w.deadline for v in values) / expected, 6)
                                                         if expected else None),
                     "latency_ms": _latencies(values), "first_second_latency_ms": _latencies(first[reliable]),
                     # the p99 of every second of play on its own: is the first one (the cold start) out of line?
                     "per_second_p99_ms": [_latencies(per_second[reliable][second])["p99"]
                                           for second in sorted(per_second[reliable])]}
    totals: dict[str, int] = {}
    for ep, _, _ in endpoints:
        for name, value in ep.stats.items():
            totals[name] = totals.get(name, 0) + value
    out["clients"] = {name: totals.get(name, 0) for name in (
        "retransmitted", "timeouts", "nacks_sent", "nack_seqs", "duplicates", "expired", "unrecoverable",
        "retransmissions_received", "heartbeats", "nack_retries", "nack_retries_unbacked", "gaps_from_unreliable",
        "gaps_from_heartbeat", "redundant_copies_sent")}
    out["rto_at_send_ms"] = _latencies(rto_at_send)
    out["reflector_totals"] = {name: value for name, value in reflector.totals().items()
                               if name in ("retransmitted", "nacks", "heartbeats", "fanout_datagrams", "reliable",
                                           "nack_rate_limited", "nack_unavailable", "resends_recognised",
                                           "redundant_copies_sent", "redundant_copies_received")}
    out["datagrams"] = net.delivered_datagrams
    # during play: the reflector's datagrams and tail-loss probes per second, and how many probes told
    # a member of a seq it had lost (each such heartbeat's gap is NACKed unless the seq comes first)
    out["play_rates"] = {
        "reflector_datagrams_per_s": round(play["reflector_datagrams"] / w.duration, 1),
        "heartbeats_per_s": round(play["heartbeats"] / w.duration, 1),
        "heartbeat_datagrams_per_s": round(play["heartbeat_datagrams"] / w.duration, 1),
        "heartbeats_skipped_per_s": round(play["heartbeats_skipped"] / w.duration, 1),
        "heartbeats_revealing_a_gap": play["gaps_from_heartbeat"],
        # per heartbeat received, and (an upper bound) per heartbeat sent: "did it tell anyone anything"
        "revealing_ratio_received": (round(play["gaps_from_heartbeat"] / play["heartbeats_received"], 6)
                                     if play["heartbeats_received"] else None),
        "revealing_ratio_sent_at_most": (round(play["gaps_from_heartbeat"] / play["heartbeats"], 6)
                                         if play["heartbeats"] else None)}
    # redundant copies sent in each second of play (the last entry: the rest of the last second)
    out["copies_per_second"] = {side: [b[i] - a[i] for a, b in zip(copy_marks, copy_marks[1:])]
                                for i, side in enumerate(("clients", "reflector"))}
    return out


SCENARIOS = {
    "64x1": dict(players=64, locations=1),
    "32x4": dict(players=32, locations=4),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--players", type=int, default=None)
    parser.add_argument("--locations", type=int, default=None)
    parser.add_argument("--loss", type=float, default=0.05)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--latency", type=float, default=0.00025, help="one-way latency (s)")
    parser.add_argument("--jitter", type=float, default=0.0002)
    parser.add_argument("--reflector-tick", type=float, default=0.0)
    parser.add_argument("--client", action="append", default=[], metavar="NAME=VALUE",
                        help="ClientConfig override, e.g. min_rto=0.04 (repeatable)")
    parser.add_argument("--reflector", action="append", default=[], metavar="NAME=VALUE",
                        help="ReflectorConfig override (repeatable)")
    parser.add_argument("--probe-stream", action="store_true",
                        help="draw the heartbeats' losses from a random stream of their own, so runs with "
                             "different probe policies lose the same other datagrams")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    base = dict(SCENARIOS.get(args.scenario, {}))
    if args.players is not None:
        base["players"] = args.players
    if args.locations is not None:
        base["locations"] = args.locations

    def overrides(items: list[str]) -> dict:
        return {k: float(v) for k, v in (item.split("=", 1) for item in items)}

    w = Workload(loss=args.loss, duration=args.duration, seed=args.seed, latency=args.latency, jitter=args.jitter,
                 reflector_tick=args.reflector_tick, probe_stream=args.probe_stream, client=overrides(args.client),
                 reflector=overrides(args.reflector), **base)
    result = run(w)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
