"""What one received update costs a game client in CPU: the receive path of ``mmpog-bots``, stage by stage.

    python -m mmpog.recv_bench --updates 200000 --bundle 14 --json out/recv.json [--profile]

At 64 players in one location every bot receives 63 x 10 updates/s; KCP's and ENet's bots decode
in C, mmpog's in Python, so this path decides whether the bots keep up within their CPU budget.
One synthetic stream is built as the reflector sends it to one member (updates from 63 other
players, 25% reliable with consecutive seqs, unreliable ones carrying the last seq, ``--loss``
of the updates dropped so gap detection and NACKs run too, each lost reliable one arriving again
as the reflector's retransmission a few updates later, ``--bundle`` updates per BUNDLE)
and is timed (``time.process_time``, the best of ``--repeat`` passes) through these stages:

* ``wire``: ``wire.decode`` of every datagram and ``wire.decode_bundle`` of each BUNDLE;
* ``endpoint``: a joined :class:`~mmpog.reliability.ClientEndpoint`'s ``receive_datagram`` and its
  events drained (dedup, gap detection, NACKs, events);
* ``bot``: :meth:`mmpog.bots.BotClient.receive_datagrams` in batches of ``--batch`` datagrams with
  the bots' own bookkeeping (:meth:`mmpog.bots.Bot.on_event`), joined through a real
  :class:`~mmpog.reliability.ReflectorCore` over loopback sockets; the socket reads themselves are
  not in it;
* ``socket``: the whole receive path of a bot, the reads included: the stream is sent to the
  bot's own socket over loopback ``--wakeup`` datagrams at a time and each time the bot's reader
  (``BotClient._drain``) runs until it has read them, as a level-triggered event loop runs it: the
  first datagram with ``recvmsg`` and its kernel stamp, the rest with ``recvmmsg`` if that one
  came late (:class:`boxcore.udpbatch.BatchReceiver`), then the ``bot`` stage's work;
  ``socket_recvmmsg`` the same with ``recvmmsg`` from the first datagram (the bots' path before),
  ``socket_recvmsg`` with one ``recvmsg`` per datagram and one more that finds the socket empty
  (the path before the batch receiver).  Only the reader's CPU is counted, not the sender's;
  ``time.process_time`` around each wake-up adds about 1 us to each of them.
* ``loop`` (with ``--loop-bots N``): N joined bots on this process's event loop (uvloop, as a
  bots worker), the stream sent to each of them by another process at 630 datagrams/s, each
  datagram to all N back to back as a fan-out does; CPU of this process (``getrusage``) per
  datagram received, for each read path, the paths alternated ``--repeat`` rounds.  It counts
  what the socket stages leave out: the loop's pass per wake-up and cold caches between wake-ups.

Two more stages time the other two hops of an update's plain path, for comparing the whole path
(``--no-core-stages`` leaves them out):

* ``send``: a joined :class:`~mmpog.reliability.ClientEndpoint` sending at 10 updates/s, 25%
  reliable: ``send`` and ``datagrams_to_send`` per update, and each reliable update's echo
  received (the protocol part of ``GameClient.send``; the reflector's part not counted);
* ``reflector``: a :class:`~mmpog.reliability.ReflectorCore` with ``SENDERS + 1`` bound members
  in one location (64x1): each update received, its fan-out queued (``datagrams_to_send``) and its
  timer served.

``modules`` in the JSON says whether ``mmpog.wire``/``reliability``/``client`` ran as Python or as
compiled extension modules (docs/mmpog.md, "A compiled hot path").

Figures are microseconds of CPU per update; compare them within one run or between two runs on a
quiet machine, never against a fixed number.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import multiprocessing
import pstats
import random
import resource
import socket
import statistics
import time
from pathlib import Path

from cliruntime import RunContext, make_parser, positive_int, run_async

from . import wire
from .bots import UPDATE, Bot, BotClient
from .reliability import ClientConfig, ClientEndpoint, ReflectorCore
from .testing import join, joined_endpoint
from .wire import RELIABLE, RETRANSMIT, Header, Kind

LOCATION = 7
PLAYER = 1
TOKEN = b"recv-bench-token"
SENDERS = 63
RATE = SENDERS * 10.0             # updates per second one member receives at 64 players x 1 location


def build_stream(updates: int, bundle: int, loss: float, payload: int, seed: int) -> list[bytes]:
    """The datagrams the reflector sends one member: ``updates`` DATA updates packed ``bundle`` per datagram."""
    rng = random.Random(seed)
    pad = bytes(payload - UPDATE.size)
    numbers = [0] * (SENDERS + 2)
    last = 0
    items = []
    repairs: list[tuple[int, bytes]] = []
    for i in range(updates):
        sender = 2 + i % SENDERS
        number = numbers[sender]
        numbers[sender] += 1
        reliable = rng.random() < 0.25
        if reliable:
            last += 1
        data = wire.encode(Header(Kind.DATA, RELIABLE if reliable else 0, 5, LOCATION, sender, number + 1,
                                  last, max(1, last - 1023) if last else 0),
                           UPDATE.pack(sender, number, i / RATE) + pad)
        if rng.random() >= loss:
            items.append(data)
        elif reliable:
            # the reflector's answer to the NACK the next datagram lets the client send: two datagrams later
            repairs.append((i + 2 * bundle, wire.restamp(data, last, max(1, last - 1023), RELIABLE | RETRANSMIT)))
        while repairs and repairs[0][0] <= i:
            items.append(repairs.pop(0)[1])
    return [packed for start in range(0, len(items), bundle) for packed in wire.pack(items[start:start + bundle])]


def _times(count_updates: int, datagrams: list[bytes]) -> list[float]:
    """A receive time for each datagram: the stream's pace at 630 updates/s from t=1000 s."""
    step = count_updates / RATE / max(1, len(datagrams))
    return [1000.0 + i * step for i in range(len(datagrams))]


def stage_wire(datagrams: list[bytes]) -> None:
    decode, decode_bundle, bundle = wire.decode, wire.decode_bundle, Kind.BUNDLE
    for data in datagrams:
        header, payload = decode(data)
        if header.kind is bundle:
            decode_bundle(header, payload)


def _joined_endpoint(welcome_at: float) -> ClientEndpoint:
    endpoint = joined_endpoint(LOCATION, PLAYER, TOKEN, welcome_at)
    while endpoint.next_event() is not None:
        pass
    return endpoint


def stage_endpoint(datagrams: list[bytes], times: list[float]) -> ClientEndpoint:
    endpoint = _joined_endpoint(times[0] - 1)
    receive, next_event = endpoint.receive_datagram, endpoint.next_event
    for data, now in zip(datagrams, times):
        receive(data, now)
        while next_event() is not None:
            pass
        endpoint.datagrams_to_send(now)
    return endpoint


# the bots' read paths the socket stages compare: BotClient's (recvmmsg, read_one_first)
READ_PATHS = {"socket": (True, True), "socket_recvmmsg": (True, False), "socket_recvmsg": (False, False)}


async def _joined_bot(recvmmsg: bool = True, read_one_first: bool = True) -> tuple[Bot, socket.socket]:
    """A BotClient joined through a ReflectorCore behind a loopback socket (the bench plays the reflector)."""
    reflector_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    reflector_sock.bind(("127.0.0.1", 0))
    reflector_sock.setblocking(False)
    reflector_addr = reflector_sock.getsockname()
    core = ReflectorCore()
    core.add_member(LOCATION, PLAYER, TOKEN)
    client = BotClient("http://127.0.0.1:9", "bench", "unused", rng=random.Random(1), recvmmsg=recvmmsg,
                       read_one_first=read_one_first)
    client.player = PLAYER                     # what /login would have said
    bot = Bot(0, client, random.Random(1))
    client.on_event = bot.on_event
    await client.start()
    join = asyncio.ensure_future(client.join(LOCATION, TOKEN, reflector_addr))
    while not join.done():
        try:
            data, addr = reflector_sock.recvfrom(2048)
        except BlockingIOError:
            await asyncio.sleep(0.001)
            continue
        core.receive_datagram(data, addr, time.monotonic())
        for out, dest in core.datagrams_to_send(time.monotonic()):
            reflector_sock.sendto(out, dest if isinstance(dest, tuple) else addr)
    await join
    return bot, reflector_sock


def stage_bot(bot: Bot, datagrams: list[bytes], times: list[float], batch: int) -> None:
    receive = bot.client.receive_datagrams
    pairs = list(zip(datagrams, times))
    for start in range(0, len(pairs), batch):
        receive(pairs[start:start + batch])


def stage_socket(bot: Bot, datagrams: list[bytes], wakeup: int) -> float:
    """CPU seconds the bot's reader spends on ``datagrams`` sent to its socket ``wakeup`` at a time.

    The reader runs until it has read what was sent, as a level-triggered event loop calls it while
    its socket stays readable (a reader that leaves datagrams for the next pass is called again; the
    loop's own cost of that pass is not counted here: the ``loop`` stage counts it)."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = bot.client
    address = client.local_address
    drain = client._drain
    spent = 0.0
    try:
        for start in range(0, len(datagrams), wakeup):
            for data in datagrams[start:start + wakeup]:
                sender.sendto(data, address)           # loopback: queued on the bot's socket on return
            target = client.datagrams + len(datagrams[start:start + wakeup])
            started = time.process_time()
            while client.datagrams < target:
                before = client.datagrams
                drain()
                if client.datagrams == before:         # nothing read: lost on the loopback (the caller checks)
                    break
            spent += time.process_time() - started
    finally:
        sender.close()
    return spent


def _send_fanned_out(addresses: list, datagrams: list[bytes], rate: float) -> None:
    """The loop stage's reflector (a process of its own, so its CPU is not counted): each datagram to
    every address back to back, as a fan-out does, ``rate`` datagrams per second."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sendto, monotonic, sleep = sender.sendto, time.monotonic, time.sleep
    start = monotonic() + 0.05
    for index, data in enumerate(datagrams):
        delay = start + index / rate - monotonic()
        if delay > 0:
            sleep(delay)
        for address in addresses:
            sendto(data, address)
    sender.close()


async def stage_loop(bots: list[Bot], datagrams: list[bytes], rate: float) -> float:
    """CPU seconds this process spends while ``bots`` (one bots worker's players, on this event loop)
    receive ``datagrams`` from another process at ``rate`` per second each: the real wake-ups, with the
    event loop's own cost per wake-up and the cold caches of a process that sleeps between them."""
    context = multiprocessing.get_context("spawn")
    sender = context.Process(target=_send_fanned_out,
                             args=([bot.client.local_address for bot in bots], datagrams, rate), daemon=True)
    target = sum(bot.client.datagrams for bot in bots) + len(bots) * len(datagrams)
    before = resource.getrusage(resource.RUSAGE_SELF)
    sender.start()
    deadline = time.monotonic() + 30 + len(datagrams) / rate
    # no event tells that the last datagram was read: poll the count (the CPU of polling is noise)
    while sum(bot.client.datagrams for bot in bots) < target and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    after = resource.getrusage(resource.RUSAGE_SELF)
    sender.join(5)
    received = sum(bot.client.datagrams for bot in bots)
    if received < target:
        raise RuntimeError(f"loop stage: {target - received} datagrams never reached the bots")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _joined_pair(members: int, at: float, config: ClientConfig | None = None) -> tuple[ReflectorCore, list[ClientEndpoint]]:
    """A ReflectorCore and ``members`` ClientEndpoints joined to it in LOCATION (players 1..members,
    each at its own loopback port), their join events drained."""
    core = ReflectorCore()
    endpoints = [join(core, LOCATION, player, TOKEN, at, ("127.0.0.1", 1000 + player), config,
                      random.Random(player)) for player in range(1, members + 1)]
    for endpoint in endpoints:
        while endpoint.next_event() is not None:
            pass
    core.datagrams_to_send(at)
    return core, endpoints


def stage_send(updates: int, seed: int, chunk: int = 100) -> tuple[float, ClientEndpoint]:
    """CPU seconds a sender's endpoint spends on ``updates`` (10/s, 25% reliable, 64-byte payloads):
    ``send`` + ``datagrams_to_send`` each, and the echoes' receipt; the reflector's part between the
    two, ``chunk`` updates at a time, is not counted."""
    core, (endpoint,) = _joined_pair(1, 1000.0)
    rng = random.Random(seed)
    payload = bytes(64)
    send, to_send, receive, next_event = (endpoint.send, endpoint.datagrams_to_send, endpoint.receive_datagram,
                                          endpoint.next_event)
    address = ("127.0.0.1", 1001)
    now = 1000.0
    spent = 0.0
    for start in range(0, updates, chunk):
        started = time.process_time()
        out = []
        for _ in range(min(chunk, updates - start)):
            now += 0.1
            send(payload, now, reliable=rng.random() < 0.25)
            out += to_send(now)
        spent += time.process_time() - started
        for data in out:
            core.receive_datagram(data, address, now + 0.0002)
        echoes = [data for data, _ in core.datagrams_to_send(now + 0.0002)]
        started = time.process_time()
        for data in echoes:
            receive(data, now + 0.0004)
        while next_event() is not None:
            pass
        to_send(now + 0.0004)
        spent += time.process_time() - started
    return spent, endpoint


def stage_reflector(updates: int, seed: int) -> tuple[float, ReflectorCore]:
    """CPU seconds a ReflectorCore with SENDERS + 1 members in one location spends on ``updates``
    (the members' own datagrams, built beforehand, in turn, at the location's 640 updates/s):
    receipt, fan-out queued, timer served."""
    # (the datagrams are built before the reflector sees them: no echo comes back to the senders meanwhile)
    core, endpoints = _joined_pair(SENDERS + 1, 1000.0, ClientConfig(max_pending=updates))
    rng = random.Random(seed)
    payload = bytes(64)
    arrivals = []               # per update, what its sender sent (the update, and any copies of it)
    for index in range(updates):
        endpoint = endpoints[index % len(endpoints)]
        endpoint.send(payload, 1000.0, reliable=rng.random() < 0.25)
        arrivals.append((endpoint.datagrams_to_send(1000.0), ("127.0.0.1", 1000 + endpoint.player)))
    receive, to_send, get_timer, handle_timer = (core.receive_datagram, core.datagrams_to_send, core.get_timer,
                                                 core.handle_timer)
    step = 1 / (10.0 * len(endpoints))
    now = 1000.0
    started = time.process_time()
    for datagrams, address in arrivals:
        now += step
        timer = get_timer()
        if timer is not None and timer <= now:
            handle_timer(now)
        for data in datagrams:
            receive(data, address, now)
        to_send(now)
    return time.process_time() - started, core


def compiled_modules() -> dict[str, str]:
    """Which of the hot modules run as Python and which as compiled extension modules."""
    from . import client, reliability
    return {module.__name__: "compiled" if module.__file__.endswith((".so", ".pyd")) else "python"
            for module in (wire, reliability, client)}


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


async def amain(args: argparse.Namespace, ctx: RunContext) -> int:
    datagrams = build_stream(args.updates, args.bundle, args.loss, args.payload, args.seed)
    times = _times(args.updates, datagrams)
    endpoint = stage_endpoint(datagrams, times)                # warm-up, and the count of what arrived
    received = endpoint.stats["received"] + endpoint.stats["duplicates"]
    result: dict = {"updates_offered": args.updates, "updates_received": received, "datagrams": len(datagrams),
                    "bundle": args.bundle, "loss": args.loss, "batch": args.batch, "wakeup": args.wakeup, "repeat": args.repeat,
                    "us_per_update": {}, "endpoint_stats": {k: v for k, v in endpoint.stats.items() if v}}
    result["modules"] = compiled_modules()
    if args.core_stages:
        result["us_per_update"]["send"] = min(stage_send(args.updates, args.seed)[0]
                                              for _ in range(args.repeat)) / args.updates * 1e6
        result["us_per_update"]["reflector"] = min(stage_reflector(args.updates, args.seed)[0]
                                                   for _ in range(args.repeat)) / args.updates * 1e6
    result["us_per_update"]["wire"] = _best(lambda: stage_wire(datagrams), args.repeat) / received * 1e6
    result["us_per_update"]["endpoint"] = _best(lambda: stage_endpoint(datagrams, times), args.repeat) / received * 1e6
    bots = []

    async def fresh_bot() -> Bot:
        bot, sock = await _joined_bot()
        bots.append((bot, sock))
        return bot

    best = float("inf")
    for _ in range(args.repeat):
        bot = await fresh_bot()
        started = time.process_time()
        stage_bot(bot, datagrams, times, args.batch)
        best = min(best, time.process_time() - started)
        assert len(bot.got) == endpoint.stats["received"], (len(bot.got), endpoint.stats["received"])
    profile = None
    if args.profile:
        bot = await fresh_bot()                                # one more pass, profiled (not timed)
        profile = cProfile.Profile()
        profile.runcall(stage_bot, bot, datagrams, times, args.batch)
    result["us_per_update"]["bot"] = best / received * 1e6
    for stage, (recvmmsg, read_one_first) in READ_PATHS.items():
        best = float("inf")
        for _ in range(args.repeat):
            bot, sock = await _joined_bot(recvmmsg, read_one_first)
            bots.append((bot, sock))
            best = min(best, stage_socket(bot, datagrams, args.wakeup))
            # every update reached the game: none lost on the loopback, none cut
            assert len(bot.got) == endpoint.stats["received"], (stage, len(bot.got), endpoint.stats["received"])
            assert bot.client.batch_receiver.truncated == 0
            result.setdefault("recv_syscalls", {})[stage] = bot.client.batch_receiver.syscalls
        result["us_per_update"][stage] = best / received * 1e6
    if args.loop_bots:
        # the loop stage: the read paths alternated round by round (the host's load drifts)
        stream = build_stream(args.loop_updates, args.bundle, args.loss, args.payload, args.seed + 1)
        rounds: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for stage, (recvmmsg, read_one_first) in READ_PATHS.items():
                group = [await _joined_bot(recvmmsg, read_one_first) for _ in range(args.loop_bots)]
                bots.extend(group)
                spent = await stage_loop([bot for bot, _ in group], stream, RATE / args.bundle)
                rounds.setdefault(stage, []).append(spent / (len(group) * len(stream)) * 1e6)
                for bot, _ in group:
                    assert bot.client.batch_receiver.truncated == 0
        result["loop"] = {"bots": args.loop_bots, "datagrams_per_bot": len(stream),
                          "us_per_datagram_rounds": {k: [round(v, 3) for v in vs] for k, vs in rounds.items()},
                          "us_per_datagram_median": {k: round(statistics.median(vs), 3) for k, vs in rounds.items()}}
    result["us_per_update"] = {k: round(v, 3) for k, v in result["us_per_update"].items()}
    for bot, sock in bots:
        await bot.client.close()
        sock.close()
    text = json.dumps(result, indent=2)
    print(text)
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.profile)
        print(out.getvalue())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("python -m mmpog.recv_bench", __doc__.split("\n\n")[0],
                         examples=["python -m mmpog.recv_bench --updates 200000 --bundle 14 --json out/recv.json",
                                   "python -m mmpog.recv_bench --bundle 1 --profile 20"])
    parser.add_argument("--updates", type=positive_int, default=200_000, help="updates in the stream")
    parser.add_argument("--bundle", type=positive_int, default=14, help="updates per datagram (1: no BUNDLE)")
    parser.add_argument("--loss", type=float, default=0.05, help="fraction of updates dropped before packing")
    parser.add_argument("--payload", type=positive_int, default=64)
    parser.add_argument("--batch", type=positive_int, default=8, help="datagrams per receive_datagrams call")
    parser.add_argument("--wakeup", type=positive_int, default=4,
                        help="datagrams waiting on the bot's socket per wake-up of its reader (socket stages)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="passes per stage; the fastest counts")
    parser.add_argument("--loop-bots", type=int, default=0, metavar="N",
                        help="loop stage: N bots on this process's event loop (a bots worker), the stream sent to "
                             "each by another process at 630 updates/s; CPU per datagram of each read path (0: off)")
    parser.add_argument("--loop-updates", type=positive_int, default=3000, help="updates per bot in the loop stage")
    parser.add_argument("--no-core-stages", dest="core_stages", action="store_false",
                        help="leave out the send and reflector stages (the other hops of the plain path)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="cProfile the bot stage and print its N most expensive functions")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_async(build_parser(), amain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
