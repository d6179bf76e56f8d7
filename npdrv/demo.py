"""The NP4GS3 part of the tour: a booster on the (emulated) network processor card.

``run_demo(workdir, say)``: as root, the real thing - namespaces for a client, the box and a
server, ``np4gs3-emu`` as the card between them, ``boxd --engine np`` on the box and the
example booster redirecting one UDP port through the card to the host (paper Fig. 5), while
the card forwards the rest itself.  Without root, the same card runs in memory: the control
protocol and the data path, no sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable

from cliruntime.procs import ProcessGroup, python_module, script
from npdrv import netns, wire
from npdrv.card import Card, CardConfig, host, ones_sum
from npdrv.channel import ControlChannel
from npdrv.controlpoint import ControlPoint
from npdrv.wire import NpAction, NpRule

# the card model's latency: the paper's 15 us ± 3 us of II-C, an input (never a result of ours)
MODEL = CardConfig()


async def run_demo(workdir: Path, say: Callable[[str], None]) -> dict:
    if os.geteuid() == 0 and shutil.which("ip") and shutil.which("iptables"):
        return await _in_namespaces(workdir, say)
    say("not root: running the card in memory (the namespace version needs root)")
    return _in_memory(say)


def _in_memory(say: Callable[[str], None]) -> dict:
    card = Card(CardConfig(port_macs=(bytes.fromhex("0200000000a0"), bytes.fromhex("0200000000a1"))))
    point = ControlPoint(card, bytes.fromhex("0200000000ff"))
    channel = ControlChannel(bytes.fromhex("020000000011"), seed=1)
    commands = [wire.request(wire.CodeLoad("booster")),
                wire.request(wire.FwdAdd("10.2.0.0/24", 1, "02:00:00:00:00:b1")),
                wire.request(NpRule(1, 100, NpAction.REDIRECT, proto=17, proto_mask=0xFF, dport=(9001, 9001)))]
    commands += [wire.request(NpRule(i, 50, NpAction.REDIRECT, proto=17, proto_mask=0xFF,
                                     dport=(20000 + i, 20000 + i))) for i in range(2, 1001)]
    frames = 0
    for group in wire.split_commands(commands):
        channel.submit(group, now=0.0)
    for request in channel.frames_to_send():
        frames += 1
        for reply in point.handle_frame(request):
            channel.receive(reply, now=0.001)
    results = [r for e in iter(channel.next_event, None) for r in e.results]
    say(f"{len(commands)} commands in {frames} guided frames, {sum(r.ok for r in results)} OK")

    def udp(dport: int) -> bytes:
        payload = b"hello"
        ip = bytearray(b"\x45\x00" + (28 + len(payload)).to_bytes(2, "big") + b"\x00\x00\x40\x00\x40\x11\x00\x00"
                       + bytes([10, 1, 0, 2, 10, 2, 0, 2]))
        csum = ~ones_sum(bytes(ip)) & 0xFFFF
        ip[10:12] = csum.to_bytes(2, "big")
        return (bytes.fromhex("0200000000a0") + bytes.fromhex("0200000000c0") + b"\x08\x00" + bytes(ip)
                + (5555).to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big")
                + b"\x00\x00" + payload)

    to_host = sum(iface == host(0) for iface, _ in card.process(0, udp(9001)))
    forwarded = sum(iface == 1 for iface, _ in card.process(0, udp(7000)))
    say(f"udp to port 9001 goes up to the host ({to_host}); to port 7000 the card forwards it ({forwarded}), "
        f"1000 rules installed; no latency is measured in memory (the card model's latency is an input, the "
        f"paper's {card.config.model_latency_us:g} us ± {card.config.model_jitter_us:g} us of II-C, not a result)")
    # the card model's configured input (the paper's figure of II-C), never a measurement of ours
    return {"mode": "memory", "guided_frames": frames, "commands_ok": sum(r.ok for r in results),
            "redirected": card.stats["redirected"], "forwarded": card.stats["forwarded"],
            "model_input_latency_us": card.config.model_latency_us}


def _udp(ns: str, bind: tuple[str, int], timeout: float = 1.0) -> socket.socket:
    with netns.inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(bind)
    sock.settimeout(timeout)
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    with contextlib.suppress(socket.timeout):
        while True:
            got.append(sock.recv(2048))
    return got


async def _in_namespaces(workdir: Path, say: Callable[[str], None]) -> dict:
    prefix = f"bbnpd{secrets.token_hex(2)}"
    client, box, server, card = (f"{prefix}{r}" for r in ("cli", "box", "srv", "card"))
    group = ProcessGroup(workdir)
    made: list[str] = []
    try:
        for ns in (client, box, server):
            netns.ip("netns", "add", ns)
            made.append(ns)
        emu = group.start("card", [script("np4gs3-emu"), "--name", card, "--create", "--box-netns", box,
                                   "--port0", f"{client}:eth0", "--port1", f"{server}:eth0",
                                   "--log-level", "warning",
                                   "--model-latency-us", str(MODEL.model_latency_us),
                                   "--model-jitter-us", str(MODEL.model_jitter_us)])
        await group.wait_for_log(emu, '"ready": true')
        for ns, iface, addr, gw in ((client, "eth0", "10.1.0.2/24", "10.1.0.1"),
                                    (server, "eth0", "10.2.0.2/24", "10.2.0.1")):
            netns.ip("link", "set", "lo", "up", netns=ns)
            netns.ip("addr", "add", addr, "dev", iface, netns=ns)
            netns.ip("route", "add", "default", "via", gw, netns=ns)
        netns.ip("addr", "add", "10.1.0.1/24", "dev", "np0", netns=box)
        netns.ip("addr", "add", "10.2.0.1/24", "dev", "np1", netns=box)
        with netns.inside(box):
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        say("client 10.1.0.2 -- card (np4gs3-emu) -- server 10.2.0.2; the box hosts the card (np0, np1, npc)")
        control = workdir / "boxd.sock"
        in_box = ["ip", "netns", "exec", box]
        boxd = group.start("boxd", [*in_box, *python_module("boxcore.boxd"), "--engine", "np",
                                    "--control", str(control), "--state", str(workdir / "state"),
                                    "--np-sync", "0.2"], stats=False)
        await group.wait_for_log(boxd, "boxd ready")
        example = group.start("booster", [*in_box, script("booster-example"), "--control", str(control),
                                          "--port", "9001", "--drop-prefix", "SPAM", "--report-every", "0"])
        await group.wait_for_log(example, "counting udp port")
        say("boxd --engine np started; booster-example redirects udp/9001 (card rule + host NFQUEUE)")
        rx = {port: _udp(server, ("10.2.0.2", port)) for port in (9001, 9002)}
        tx = _udp(client, ("10.1.0.2", 0))
        # One warm-up packet makes the box resolve the server's MAC; the next forwarding-table
        # sync (--np-sync 0.2) pushes that neighbour to the card, which then forwards by itself.
        tx.sendto(b"warm-up", ("10.2.0.2", 9002))
        await asyncio.sleep(0.6)
        await asyncio.to_thread(_drain, rx[9002])
        payloads = [b"SPAM %d" % i if i % 4 == 0 else b"data %d" % i for i in range(100)]
        for i, payload in enumerate(payloads):
            tx.sendto(payload, ("10.2.0.2", 9001))
            tx.sendto(b"plain %d" % i, ("10.2.0.2", 9002))
            await asyncio.sleep(0.002)
        got = {port: await asyncio.to_thread(_drain, sock) for port, sock in rx.items()}
        for sock in [tx, *rx.values()]:
            sock.close()
        say(f"udp/9001: {len(payloads)} sent, {len(got[9001])} delivered (the booster dropped the SPAM); "
            f"udp/9002: {len(got[9002])} of 100 delivered")
        # each role writes its --stats-json when it stops: booster first, then boxd, then the card
        await group.stop(example)
        totals = example.read_stats()["totals"]
        await group.stop(boxd)
        await group.stop(emu)
        stats = emu.read_stats()["emulator"]
        latency = stats["latency_us"]
        say(f"card: {stats['card'].get('redirected', 0)} redirected to the host, "
            f"{stats['card'].get('forwarded', 0)} forwarded by itself; measured: the emulator's wall-clock "
            f"p50 {latency['wall_port_to_port']['p50_us']:.0f} us port to port (Python)")
        say(f"not measured: the NP4GS3's own latency; the emulator's model takes the paper's "
            f"{MODEL.model_latency_us:g} us ± {MODEL.model_jitter_us:g} us (II-C) as its input "
            f"(its samples' p50 {latency['modelled']['p50_us']:.1f} us echo that input)")
        return {"mode": "namespaces", "sent_9001": len(payloads), "delivered_9001": len(got[9001]),
                "delivered_9002": len(got[9002]), "booster_seen": totals["packets"],
                "booster_dropped": totals["dropped"], "card_redirected": stats["card"].get("redirected", 0),
                "card_forwarded": stats["card"].get("forwarded", 0),
                "wall_p50_us": latency["wall_port_to_port"]["p50_us"],
                # the paper's figure the card model was given, not a measurement of ours
                "model_input_latency_us": MODEL.model_latency_us}
    finally:
        await group.stop_all()
        for ns in made:
            with contextlib.suppress(netns.NetnsError):
                netns.ip("netns", "delete", ns)
        netns.destroy_card(card)
