"""A booster for the linux engine tests (run as a script inside the box's namespace).

Modes:
  redirect  UDP to --port: payload "DROP..." consumed, "MOD..." modified (upper-cased), "REPLY..."
            answered with an injected packet and consumed, anything else passed.
  copy      UDP to --port: copies only (the originals go on).
  tproxy    TCP to --port intercepted: answers "booster original_dst=IP:PORT client=IP:PORT\\n", then,
            if --onward, relays the client's line to the original destination (spoofing the client
            with --spoof) and returns the server's answer.
  multicast UDP to --port fanned out by the kernel path to group 7 (--members), plus one
            send_multicast of b"hello group".
Each packet or connection the booster sees is printed as one JSON line on stdout.
"""

import argparse
import json
import sys

from boxcore.booster import Booster, Verdict
from boxcore.packet import Packet
from boxcore.rules import Match
from cliruntime import RunContext, make_parser, run_async


def say(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    async with Booster(args.name, control=args.control) as booster:
        if args.mode == "redirect":
            def on_packet(pkt: Packet):
                say(kind="packet", payload=pkt.payload.decode(errors="replace"), src=pkt.src, dst=pkt.dst,
                    dport=pkt.dport)
                if pkt.payload.startswith(b"DROP"):
                    return Verdict.CONSUME
                if pkt.payload.startswith(b"MOD"):
                    return Verdict.modify(pkt.payload.upper() + b"!")
                if pkt.payload.startswith(b"REPLY"):
                    booster.send(pkt.reply(b"pong " + pkt.payload))
                    return Verdict.CONSUME
                return Verdict.PASS
            sub = await booster.redirect(Match(proto="udp", dst_port=args.port), on_packet)
        elif args.mode == "copy":
            def on_copy(pkt: Packet):
                say(kind="copy", payload=pkt.payload.decode(errors="replace"))
            sub = await booster.copy(Match(proto="udp", dst_port=args.port), on_copy)
        elif args.mode == "tproxy":
            async def on_connection(reader, writer, conn):
                say(kind="connection", client=list(conn.client), original_dst=list(conn.original_dst))
                writer.write(f"booster original_dst={conn.original_dst[0]}:{conn.original_dst[1]} "
                             f"client={conn.client[0]}:{conn.client[1]}\n".encode())
                if args.onward:
                    line = await reader.readline()
                    r2, w2 = await sub.connect_onward(conn, spoof_client=args.spoof)
                    w2.write(line)
                    await w2.drain()
                    writer.write(await r2.readline())
                    w2.close()
                await writer.drain()
            sub = await booster.intercept_tcp(Match(proto="tcp", dst_port=args.port), on_connection)
        elif args.mode == "multicast":
            members = [(h, int(p)) for h, p in (m.rsplit(":", 1) for m in args.members.split(","))]
            await booster.set_multicast_group(7, members)
            sub = await booster.multicast(Match(proto="udp", dst_port=args.port), 7)
            booster.send_multicast(7, b"hello group", src_port=args.port)
        say(kind="ready", delivery=sub.delivery.kind, params=sub.delivery.params)
        await booster.run_until_stopped(ctx.stop)
    return 0


def main(argv=None) -> int:
    parser = make_parser("linux-test-booster", "booster for the linux engine tests")
    parser.add_argument("--control", required=True)
    parser.add_argument("--name", default="linux-test")
    parser.add_argument("--mode", choices=["redirect", "copy", "tproxy", "multicast"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--onward", action="store_true")
    parser.add_argument("--spoof", action="store_true")
    parser.add_argument("--members", default="")
    return run_async(parser, amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
