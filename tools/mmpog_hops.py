"""Where the plain path's time goes, hop by hop, the same way for mmpog, KCP and ENet (issue 17).

One packet capture on the namespace's loopback (``AF_PACKET``, incoming copies only, each with
the kernel's ``SO_TIMESTAMPNS`` stamp: the same stamp a receiving UDP socket gets) sees every
datagram of the session without touching any stack.  Every update carries its sender's
``time.monotonic()`` at send (mmpog's ``!HId``, the relays' ``!HIIBd``); the capture finds it in
each datagram (by the exact double and the sender and number before it, so several updates per
datagram and any framing are fine), which gives per delivery (receiver, sender, number):

* ``send``: the sender's ``time.monotonic()`` just before its send call (in the payload);
* ``in``: the kernel stamp of the first datagram carrying it to the relay or reflector port;
* ``out``: the kernel stamp of the first datagram carrying it from there to this receiver (the
  receiving socket's own stamp: mmpog's bots record it too, ``arrived``, a cross-check);
* ``game``: when the receiver's game had it (each stack's own latency figure: for mmpog the
  ``now`` of the read that brought it, for the relays' bots ``time.monotonic()`` in ``on_update``).

and the hops ``sender`` = in - send, ``relay`` = out - in (split into ``relay_first``, until the
relay's first datagram of the update left, and ``relay_fanout``, this receiver's place after it),
``receiver`` = game - out, with ``to_socket`` = out - send and ``to_game`` = game - send, as
p50 / p90 / p99 per stack and class.  Each section also has every role's ``cpu_share`` and
``wakeups_per_s`` (CPU per wake-up is their ratio).  ``--cold`` instead times the reflector's core
after the process slept (:func:`cold_cost`).  docs/mmpog.md has the figures.

``python -m tools.mmpog_hops --stacks mmpog,kcp,enet --players 32 --locations 4 --loss 0.01
--duration 10 --workers 4 --budget 0.5 --json F`` (root: each stack in its own namespace).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import struct
import sys
import time
from pathlib import Path

from boxcore.udpbatch import STAMP_CONTROL, enable_timestamps, timestamp_ns_of
from tools.stats import percentile

SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
PACKET_IGNORE_OUTGOING = 23          # loopback shows each datagram twice: keep the receive side's copy
ETH_P_IP = 0x0800
DOUBLE = struct.Struct("!d")
# how far before the send time the sender's index (!H) and the update number (!I) start:
# mmpog.bots.UPDATE is !HId, tools.compare_mmpog.UPDATE !HIIBd (index, location, number, reliable, time)
LAYOUTS = {"mmpog": (6, 4), "kcp": (11, 5), "enet": (11, 5)}
INDEX, NUMBER = struct.Struct("!H"), struct.Struct("!I")
POLL = 0.05
HOPS = ("sender", "relay", "receiver", "to_socket", "to_game")
# the relay hop in two: until its first datagram of the update left (woken, read, decided), and this
# receiver's place in the fan-out after that first one (the sends before it, and any preemption)
RELAY_PARTS = ("relay_first", "relay_fanout")


def realtime_offset(samples: int = 200) -> float:
    """CLOCK_REALTIME - CLOCK_MONOTONIC in seconds, from the tightest of ``samples`` bracketed reads."""
    best = None
    for _ in range(samples):
        m0 = time.monotonic_ns()
        r = time.time_ns()
        m1 = time.monotonic_ns()
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, r - (m0 + m1) / 2)
    return best[1] / 1e9


def capture(ready, stop, path: str) -> None:
    """Record (kernel stamp ns, source port, destination port, UDP payload) of every UDP datagram on
    ``lo`` until ``stop``; pickle them to ``path`` with the clock offset and the kernel's drop count."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    sock.bind(("lo", ETH_P_IP))
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    enable_timestamps(sock)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    sock.setblocking(False)
    offset_start = realtime_offset()
    cpu_start = time.process_time()
    records = []
    ready.set()
    while True:
        stopping = stop.is_set()          # one more drain after the stop: nothing stamped is left out
        # drained every POLL seconds, not woken per datagram: the kernel has stamped each one on
        # arrival, and a capture process woken 10k times a second would be one more process for
        # the stacks' processes to wait behind on two cores
        time.sleep(POLL)
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(2048, STAMP_CONTROL)
            except BlockingIOError:
                break
            if len(data) < 28 or data[9] != socket.IPPROTO_UDP:
                continue
            header = (data[0] & 15) * 4
            source, destination = struct.unpack_from("!HH", data, header)
            records.append((timestamp_ns_of(ancillary) or 0, source, destination, data[header + 8:]))
        if stopping:
            break
    packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    offset = (offset_start + realtime_offset()) / 2
    with open(path, "wb") as f:
        pickle.dump({"records": records, "offset": offset, "offset_drift_us": round(abs(offset - offset_start) * 2e6, 3),
                     "kernel_drops": drops, "cpu_seconds": time.process_time() - cpu_start}, f)


def find_updates(payload: bytes, prefix: bytes, layout: tuple[int, int], sent: dict):
    """(sender, number) of every update in ``payload``: its exact send time preceded by its sender and number."""
    index_back, number_back = layout
    found = []
    position = payload.find(prefix)
    while position >= 0:
        if position >= index_back and position + 8 <= len(payload):
            sender = INDEX.unpack_from(payload, position - index_back)[0]
            number = NUMBER.unpack_from(payload, position - number_back)[0]
            entry = sent.get((sender, number))
            if entry is not None and DOUBLE.pack(entry[0]) == payload[position:position + 8]:
                found.append((sender, number))
                position = payload.find(prefix, position + 8)
                continue
        position = payload.find(prefix, position + 1)
    return found


def analyse(stack: str, captured: dict, port: int, sent: dict, got: dict, arrived: dict | None = None) -> dict:
    """Per-hop percentiles of the unreliable and the reliable deliveries.

    ``sent``: (sender, number) -> (send time, reliable); ``got``: (receiver, sender, number) ->
    latency at the game (s); ``arrived`` (mmpog): the same at the receiving socket, from the bot's
    own kernel stamp."""
    if not sent:
        return {"error": "nothing sent"}
    prefix = DOUBLE.pack(next(iter(sent.values()))[0])[:2]
    offset_ns = captured["offset"] * 1e9
    layout = LAYOUTS[stack]
    first_in: dict = {}
    first_out: dict = {}
    bot_port: dict = {}
    to_relay = from_relay = 0
    for stamp, source, destination, payload in captured["records"]:
        if destination == port:
            to_relay += 1
            for key in find_updates(payload, prefix, layout, sent):
                bot_port.setdefault(source, key[0])
                first_in.setdefault(key, (stamp - offset_ns) / 1e9)
    for stamp, source, destination, payload in captured["records"]:
        receiver = bot_port.get(destination)
        if destination == port or receiver is None:
            continue
        from_relay += 1
        for sender, number in find_updates(payload, prefix, layout, sent):
            first_out.setdefault((receiver, sender, number), (stamp - offset_ns) / 1e9)
    out = {"datagrams_to_relay": to_relay, "datagrams_from_relay": from_relay,
           "capture_kernel_drops": captured["kernel_drops"], "capture_cpu_seconds": round(captured["cpu_seconds"], 2),
           "clock_offset_drift_us": captured["offset_drift_us"]}
    first_send: dict = {}
    for (receiver, sender, number), t_out in first_out.items():
        if t_out < first_send.get((sender, number), float("inf")):
            first_send[(sender, number)] = t_out
    for reliable, name in ((False, "unreliable"), (True, "reliable")):
        hops: dict[str, list[float]] = {hop: [] for hop in HOPS + RELAY_PARTS}
        stamp_error = []
        for (receiver, sender, number), latency in got.items():
            send_at, is_reliable = sent[(sender, number)]
            if is_reliable != reliable:
                continue
            t_in = first_in.get((sender, number))
            t_out = first_out.get((receiver, sender, number))
            if t_in is None or t_out is None:
                continue
            t_game = send_at + latency
            for hop, value in zip(HOPS, (t_in - send_at, t_out - t_in, t_game - t_out, t_out - send_at, latency)):
                hops[hop].append(value * 1e3)
            hops["relay_first"].append((first_send[(sender, number)] - t_in) * 1e3)
            hops["relay_fanout"].append((t_out - first_send[(sender, number)]) * 1e3)
            if arrived is not None and (receiver, sender, number) in arrived:
                stamp_error.append(abs(send_at + arrived[(receiver, sender, number)] - t_out) * 1e6)
        section = {"deliveries": len(hops["to_game"])}
        for hop, values in hops.items():
            section[hop] = {f"p{q}": round(percentile(values, q / 100), 3) for q in (50, 90, 99)} if values else None
        if stamp_error:
            section["bot_stamp_vs_capture_us_p50"] = round(percentile(stamp_error, 0.5), 2)
        out[name] = section
    return out


def table(result: dict) -> str:
    lines = ["| run | stack | sender p50/p90 | relay p50/p90 | receiver p50/p90 | to socket p50/p90 | to game p50/p90 | CPU relay / bots | wake-ups/s relay / bots |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        w = run["workload"]
        label = f"{w['players']}x{w['locations']} {w['loss']:.0%} w{w['workers']} b{w['budget']:g}"
        for stack in result["stacks"]:
            hops = run[stack].get("hops", {}).get("unreliable") or {}
            cells = [" / ".join(f"{hops[h][q]:.3f}" for q in ("p50", "p90")) if hops.get(h) else "-" for h in HOPS]
            cpu = run[stack].get("cpu_share") or {}
            server = cpu.get("relay", cpu.get("reflector"))
            bots = round(sum(v for k, v in cpu.items() if k.startswith("worker")), 3)
            wakeups = run[stack].get("wakeups_per_s") or {}
            relay_wakeups = wakeups.get("relay", wakeups.get("reflector"))
            bots_wakeups = sum(v for k, v in wakeups.items() if k.startswith("worker"))
            lines.append(f"| {label} | {stack} | " + " | ".join(cells) + f" | {server} / {bots} | "
                         f"{relay_wakeups} / {bots_wakeups} |")
            label = ""
    return "\n".join(lines)


def cold_cost(sleeps: list[float], updates: int = 3000) -> dict:
    """CPU (thread time) of the reflector's core for one unreliable update from one of 8 members
    (``receive_datagram`` + ``datagrams_to_send``), called back to back (a sleep of 0) or with the
    process asleep for each of ``sleeps`` seconds before each call, as a relay woken per datagram
    is; and the same interval with nothing in it (the floor).  Microseconds, p50 / p90."""
    from mmpog.recv_bench import _joined_pair

    core, endpoints = _joined_pair(8, 1000.0)
    payload = bytes(64)
    thread_ns = time.thread_time_ns
    out = {}
    for pause in sleeps:
        work, empty = [], []
        now = 1000.0
        for index in range(updates):
            now += 0.0003
            endpoint = endpoints[index % len(endpoints)]
            endpoint.send(payload, now, reliable=False)
            (data,) = endpoint.datagrams_to_send(now)
            address = ("127.0.0.1", 1000 + endpoint.player)
            if pause:
                time.sleep(pause)
            started = thread_ns()
            core.receive_datagram(data, address, now)
            core.datagrams_to_send(now)
            work.append((thread_ns() - started) / 1e3)
            if pause:
                time.sleep(pause)
            started = thread_ns()
            empty.append((thread_ns() - started) / 1e3)
        out[str(pause)] = {"core_us": {"p50": round(percentile(work, 0.5), 1), "p90": round(percentile(work, 0.9), 1)},
                           "floor_us": {"p50": round(percentile(empty, 0.5), 1), "p90": round(percentile(empty, 0.9), 1)}}
    return out


def main(argv: list[str] | None = None) -> int:
    from tools.compare_mmpog import STACKS, Workload, compare

    parser = argparse.ArgumentParser(description="mmpog, KCP and ENet: the plain path's time per hop")
    parser.add_argument("--stacks", default="mmpog,kcp,enet")
    parser.add_argument("--players", type=int, default=32)
    parser.add_argument("--locations", type=int, default=4)
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--workers", default="4", help="comma-separated: one run per value")
    parser.add_argument("--budget", default="0.5", help="cores per role, comma-separated: one run per value; 0: none")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cold", metavar="SECONDS", help="instead: the reflector core's CPU per update after "
                        "each of these sleeps, comma-separated (0: back to back; see cold_cost)")
    args = parser.parse_args(argv)
    if args.cold is not None:
        result = cold_cost([float(x) for x in args.cold.split(",")])
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0
    stacks = [s for s in args.stacks.split(",") if s]
    if any(s not in STACKS for s in stacks):
        parser.error(f"--stacks: one of {', '.join(STACKS)}")
    runs = []
    for budget in (float(b) for b in args.budget.split(",")):
        for workers in (int(n) for n in args.workers.split(",")):
            w = Workload(players=args.players, locations=args.locations, loss=args.loss, duration=args.duration,
                         workers=workers, budget=budget, reflector_mode="standalone", hops=True)
            load = [round(x, 2) for x in os.getloadavg()]
            run = compare(w, stacks, say=lambda line: print(line, file=sys.stderr, flush=True))
            run["loadavg_before"] = load
            runs.append(run)
            result = {"stacks": stacks, "runs": runs}
            if args.json:
                args.json.write_text(json.dumps(result, indent=2))
            print("\n".join(table({"stacks": stacks, "runs": [run]}).splitlines()[-len(stacks):]), file=sys.stderr,
                  flush=True)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
