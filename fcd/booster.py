"""``fcd-booster``: the FCD booster that runs on a booster box.

It asks boxd to REDIRECT the car and light datagrams headed for the server's UDP address, so
they stop at the box.  Datagrams are queued by the packet handler (nothing else per packet) and
processed in batches every ``--flush-interval`` seconds by :class:`fcd.aggregate.Ingest`: strict
decoding, loss accounting per generator, heading-aware map matching, per-road state.  At every
light change the box computes queue length, density and mean speed of the roads whose light
changed and queues an ``fcd.report`` call; :class:`fcd.rpc.ReliableUplink` sends the calls in
``system.multicall`` batches over one keep-alive HTTP/1.1 connection and resends whatever the
server has not acknowledged after a reconnect.  Its own counters go to the server as
``fcd.box_stats`` once a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path
from typing import Any

from cliruntime import host_port, make_parser, non_negative_float, positive_int, run_async
from fcd import wire
from fcd.aggregate import Ingest
from fcd.city import City, CityError, load_city
from fcd.rpc import KeepAliveClient, ReliableUplink

log = logging.getLogger("fcd.booster")

# Reports per fcd.report call: about 1 KB of XML each, so one call stays far below the uplink's
# request limit (fcd.rpc.MAX_BODY, 1 MiB) and a batch of calls can always be cut to fit it.
REPORTS_PER_CALL = 250


class BoxAggregator:
    """The booster's logic without the box: datagrams in, XML-RPC calls queued on the uplink.

    Batching runs on the data's time (the newest probe or light-change time seen), never the wall
    clock: every ``rpc_interval`` seconds of data time the calls queued so far become one uplink
    request (:meth:`fcd.rpc.ReliableUplink.mark_due`), and every ``stats_interval`` seconds of
    data time an ``fcd.box_stats`` call joins them.  A replay at any speed therefore gives the
    same requests with the same road reports, and the reduction factor does not depend on it.
    Only when the data stops (:meth:`idle`) does a wall-clock period matter: the counters are
    then reported once more (once per pause) and whatever is queued is sent.
    """

    # a jump in data time over more intervals than this closes them as one
    MAX_INTERVALS_PER_STEP = 1000
    # data time this far behind the newest seen starts a new clock (a replay from its start)
    RESTART_AFTER = 60.0

    def __init__(self, city: City, box_id: str, uplink: ReliableUplink, max_pending: int = 2048,
                 max_cars: int = 100_000, rpc_interval: float | None = None, stats_interval: float = 1.0) -> None:
        self.city, self.box_id, self.uplink = city, box_id, uplink
        self.ingest = Ingest(city, max_cars=max_cars)
        self.max_pending = max_pending
        self.pending: list[Any] = []
        # the box decides when an uplink batch is due (data time); the uplink's wall-clock
        # interval, if it was given one, becomes the data-time interval
        self.rpc_interval = rpc_interval or uplink.interval or 0.5
        uplink.interval = None
        self.stats_interval = stats_interval
        self.data_t = -math.inf            # newest time in the data
        self.interval_end = math.inf       # end of the current data-time interval
        self.next_stats = math.inf
        self.stats = {"reports_queued": 0, "flushes": 0, "stats_seq": 0, "intervals": 0, "idle_reports": 0,
                      "clock_restarts": 0}
        self._idle = False

    def on_packet(self, pkt) -> None:
        """Packet handler: keep the payload for the next batch; None = consume the packet."""
        pending = self.pending
        pending.append(pkt.payload)
        if len(pending) >= self.max_pending:
            # keep up inside the read path: under overload the kernel drops, memory stays bounded
            self.flush()

    def on_batch(self, payloads: list[bytes]) -> None:
        """Batch handler (delegated socket): the payloads of one wakeup, all consumed."""
        pending = self.pending
        pending.extend(payloads)
        if len(pending) >= self.max_pending:
            self.flush()

    def flush(self) -> int:
        if not self.pending:
            return 0
        batch, self.pending = self.pending, []
        newest = self._newest_time(batch)
        if newest < self.data_t - self.RESTART_AFTER:
            # time went far back: a new stream (a replay from its start); what is queued goes
            self.uplink.mark_due()
            self.data_t = -math.inf
            self.stats["clock_restarts"] += 1
        if not math.isfinite(self.data_t):
            self._start_clock(batch)
        reports = self.ingest.ingest(batch)
        # reports in data-time order, each after the intervals that ended before it
        reports.sort(key=lambda r: r.t)
        start = 0
        for i, rep in enumerate(reports):
            if rep.t >= self.interval_end:
                self._queue_reports(reports[start:i])
                start = i
                self._advance(rep.t)
        self._queue_reports(reports[start:])
        self._advance(max(newest, reports[-1].t if reports else -math.inf))
        self.stats["flushes"] += 1
        return len(batch)

    @staticmethod
    def _newest_time(batch: list[bytes], look: int = 16) -> float:
        """The data time a batch reaches: the newest valid time among its last messages
        (datagrams arrive about in time order; a few suffice and cost nothing per datagram)."""
        newest = -math.inf
        for payload in batch[-look:]:
            try:
                newest = max(newest, wire.decode(payload).t)
            except wire.WireDecodeError:
                continue
        return newest

    def _start_clock(self, batch: list[bytes]) -> None:
        """Data time starts at the first valid message, whatever the batch spans."""
        for payload in batch[:64]:
            try:
                self._advance(wire.decode(payload).t)
                return
            except wire.WireDecodeError:
                continue

    def _queue_reports(self, reports: list) -> None:
        for i in range(0, len(reports), REPORTS_PER_CALL):
            self.uplink.put("fcd.report", self.box_id, [r.to_xmlrpc() for r in reports[i:i + REPORTS_PER_CALL]])
        self.stats["reports_queued"] += len(reports)

    def _advance(self, t: float) -> None:
        """Data time moved on to ``t``: close every interval that ended at or before it."""
        if not math.isfinite(t) or t <= self.data_t:
            return
        if not math.isfinite(self.data_t):       # the first data: intervals aligned on its clock
            self.interval_end = (math.floor(t / self.rpc_interval) + 1) * self.rpc_interval
            self.next_stats = (math.floor(t / self.stats_interval) + 1) * self.stats_interval
        self.data_t = t
        steps = 0
        while t >= self.interval_end:
            if self.interval_end >= self.next_stats:
                self.report_counters()
                self.next_stats += self.stats_interval * max(
                    1, math.floor((self.interval_end - self.next_stats) / self.stats_interval) + 1)
            self.uplink.mark_due()
            self.stats["intervals"] += 1
            self.interval_end += self.rpc_interval
            steps += 1
            if steps >= self.MAX_INTERVALS_PER_STEP:   # a jump: realign instead of walking it
                self.interval_end = (math.floor(t / self.rpc_interval) + 1) * self.rpc_interval
                self.next_stats = max(self.next_stats, (math.floor(t / self.stats_interval) + 1) * self.stats_interval)

    def report_counters(self, idle: bool = False) -> None:
        self.stats["stats_seq"] += 1          # lets readers tell a fresh report from a repeated one
        self._idle = idle
        self.uplink.put("fcd.box_stats", self.box_id, self.counters())
        self._idle = False

    def idle(self) -> None:
        """The data stopped: report the counters once more, marked final (``idle: 1``: readers
        know the box has drained), and send everything queued."""
        self.flush()
        self.report_counters(idle=True)
        self.stats["idle_reports"] += 1
        self.uplink.mark_due()

    def counters(self) -> dict[str, int | float]:
        seq = self.ingest.seq.snapshot()
        values = {"stats_seq": self.stats["stats_seq"], "idle": int(self._idle), "data_t": self.data_t
                  if math.isfinite(self.data_t) else -1.0,
                  "received": seq["received"], "lost": seq["lost"], "malformed": self.ingest.stats["malformed"],
                  "reports": self.stats["reports_queued"], "unacked": len(self.uplink.queue),
                  "uplink_dropped": self.uplink.stats["dropped"]}
        # XML-RPC ints are 32-bit: long-running counters travel as doubles
        return {k: (v if v < 2**31 else float(v)) for k, v in values.items()}

    def snapshot(self) -> dict[str, Any]:
        return {**self.counters(), "ingest": dict(self.ingest.stats), "aggregator": dict(self.ingest.aggregator.stats),
                "uplink": dict(self.uplink.stats), "connections": self.uplink.client.connections,
                "http_requests": self.uplink.client.requests}


def read_delegated_socket(sub, box: BoxAggregator, max_reads: int = 1024) -> bool:
    """Batch fast path where the booster reads the box's socket itself (``socket`` delivery).

    Every FCD datagram the box gets is consumed (never passed on), so instead of one handler
    call and one Packet object per datagram, ask the booster library for the payloads of each
    wakeup's reads at once (:meth:`boxcore.booster.Subscription.receive_batches`; it still counts
    them for boxd).  Returns False for any other delivery kind: ``box.on_packet`` keeps receiving.
    """
    return sub.receive_batches(box.on_batch, max_batch=max_reads)


async def run_box(box: BoxAggregator, stop: asyncio.Event, flush_interval: float, stats_interval: float) -> None:
    """Process datagram batches every ``flush_interval`` wall seconds until ``stop``.

    Uplink batches and counter reports follow the data's time (:class:`BoxAggregator`);
    ``stats_interval`` is that data-time period, and also how long (wall) the data may pause
    before the box reports its counters once and sends what it holds (:meth:`BoxAggregator.idle`).
    A plain sleep loop: at a few percent of a core the idle cost of timers matters.
    """
    loop = asyncio.get_running_loop()
    box.stats_interval = stats_interval
    last_count, quiet_since = -1, loop.time()
    idle_reported = False
    while not stop.is_set():
        box.flush()
        count = box.ingest.stats["datagrams"]
        now = loop.time()
        if count != last_count:
            last_count, quiet_since, idle_reported = count, now, False
        elif not idle_reported and now - quiet_since >= stats_interval:
            box.idle()
            idle_reported = True
        await asyncio.sleep(flush_interval)
    box.idle()


def _panel_seconds(text: str) -> float:
    import argparse

    from boxcore.panels import MIN_INTERVAL

    value = non_negative_float(text)
    if 0 < value < MIN_INTERVAL:
        raise argparse.ArgumentTypeError(f"must be 0 (no panel) or at least {MIN_INTERVAL} s, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = non_negative_float(text)
    if value <= 0:
        import argparse
        raise argparse.ArgumentTypeError("expected a positive number of seconds")
    return value


def build_parser():
    from boxcore.booster import add_booster_options
    p = make_parser("fcd-booster", "Aggregate car probes on a booster box; report to the FCD server by XML-RPC.",
                    examples=[
                        "fcd-booster --control /tmp/box1.sock --city city.json --server-udp 127.0.0.1:7000 "
                        "--server-http 127.0.0.1:8080 --box-id box1",
                    ])
    add_booster_options(p)
    p.add_argument("--city", type=Path, required=True, help="city JSON, trace (.npz) or SUMO .net.xml")
    p.add_argument("--server-udp", type=host_port, required=True, help="the server address cars send to")
    p.add_argument("--server-http", type=host_port, required=True, help="the server's XML-RPC address")
    p.add_argument("--box-id", default="box", help="name of this box in the server's statistics")
    p.add_argument("--panel-interval", type=_panel_seconds, default=1.0,
                   help="seconds between updates of the box's dashboard panel (the city map); 0: no panel")
    p.add_argument("--flush-interval", type=non_negative_float, default=0.1,
                   help="seconds between batches when fewer than --max-pending datagrams wait")
    p.add_argument("--stats-interval", type=_positive_seconds, default=1.0,
                   help="seconds of data time between fcd.box_stats calls (and wall seconds of silence "
                        "before the final one)")
    p.add_argument("--rpc-interval", type=_positive_seconds, default=0.5,
                   help="seconds of data time per uplink request")
    p.add_argument("--rpc-batch", type=positive_int, default=500, help="calls per system.multicall")
    p.add_argument("--max-queue", type=positive_int, default=100_000, help="unacknowledged calls kept")
    p.add_argument("--max-pending", type=positive_int, default=2048,
                   help="datagrams collected before a batch is processed at once")
    p.add_argument("--drain-timeout", type=non_negative_float, default=5.0,
                   help="seconds to deliver queued calls on shutdown")
    p.add_argument("--no-fast-path", action="store_true",
                   help="always take packets through the per-packet handler, even on a delegated socket")
    p.add_argument("--ready-file", type=Path, help="write JSON here once the redirect is installed")
    return p


async def amain(args, ctx) -> int:
    import contextlib

    from boxcore.booster import run_booster
    from boxcore.rules import Match
    from cliruntime.supervisor import Supervisor

    city = load_city(args.city)
    client = KeepAliveClient(*args.server_http)
    # batches are cut on the data's time by the aggregator, never on the wall clock
    uplink = ReliableUplink(client, max_queue=args.max_queue, batch=args.rpc_batch, interval=None)
    box = BoxAggregator(city, args.box_id, uplink, max_pending=args.max_pending, rpc_interval=args.rpc_interval,
                        stats_interval=args.stats_interval)
    ctx.stats.providers["box"] = box.snapshot

    @contextlib.asynccontextmanager
    async def serve(booster):
        host, port = args.server_udp
        sub = await booster.redirect(Match(proto="udp", dst=host, dst_port=port), box.on_packet)
        fast = not args.no_fast_path and read_delegated_socket(sub, box)
        log.info("redirecting udp to %s:%d on engine %s via %s%s", host, port, booster.engine,
                 sub.delivery.kind, " (batch reads)" if fast else "")
        if args.panel_interval:
            from boxcore.panels import publish_panel_every
            from fcd.panel import BoxPanel
            publish_panel_every(booster, BoxPanel(box).build, args.panel_interval)
        if args.ready_file:
            args.ready_file.write_text(json.dumps({"engine": booster.engine, "delivery": sub.delivery.kind,
                                                   "batch_reads": fast}))
        box_stop = asyncio.Event()
        aggregating = booster.spawn(run_box(box, box_stop, args.flush_interval, args.stats_interval),
                                    name="aggregate")
        try:
            yield
        finally:
            box_stop.set()
            await asyncio.wait([aggregating])      # its last flush and fcd.box_stats

    # The uplink outlives the booster: once the booster has left (its rule removed, datagrams go
    # straight to the server), what was aggregated is still delivered, for --drain-timeout.
    async with Supervisor("fcd-booster uplink", logger=log, on_failure=lambda name, exc: ctx.stop.set()) as tasks:
        uplink_stop = asyncio.Event()
        delivering = tasks.spawn(uplink.run(uplink_stop), name="uplink")
        try:
            status = await run_booster("fcd-booster", serve, control=args.control, stop=ctx.stop)
        finally:
            uplink_stop.set()
            _, late = await asyncio.wait([delivering], timeout=args.drain_timeout)
            if late:
                log.warning("%d calls not delivered at exit", len(uplink.queue))
            await client.aclose()
    return 1 if tasks.failed is not None else status


def main(argv=None) -> int:
    return run_async(build_parser(), amain, argv, config_errors=(CityError,))


if __name__ == "__main__":
    raise SystemExit(main())
