"""A box is told when the server with workers refuses its reports at a bound: at the front's
queue bound (while answering the call) and at a partition's backlog bound in the store (after
answering: told at the box's next call).  Real redis-server, the server's real HTTP front, the
box's real uplink; the refusal is counted at both ends.  The uplink sends a refused call again
after a backoff (bounded, counted, logged once per burst of refusals)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import xmlrpc.client

from boxcore.redisconn import open_redis
from fcd.aggregate import RoadReport
from fcd.rpc import KeepAliveClient, ReliableUplink
from fcd.server import FAULT_BACKLOG, FcdServer
from fcd.stream import Keys, StreamFront
from tests.redis_support import redis_node  # noqa: F401  (fixture)


def _reports(road: int, n: int, t0: float) -> list[dict]:
    return [RoadReport(road=road, t=t0 + k, green=True, queue=0, cars=1, density=1.0, mean_speed=5.0,
                       departures=0, interval=1.0, was_green=True).to_xmlrpc() for k in range(n)]


@contextlib.asynccontextmanager
async def box_and_server(redis_url: str, city, front_bounds: dict, **uplink_options):
    """A server with a stream front on a real Redis, and a box's uplink running toward it:
    (front, server, client, uplink)."""
    redis = open_redis(redis_url)
    front = StreamFront(redis, city, 1, Keys(f"r{secrets.token_hex(3)}"), **front_bounds)
    await front.start()
    server = FcdServer(city)
    server.use_front(front)
    _, port = await server.start_http("127.0.0.1", 0)
    client = KeepAliveClient("127.0.0.1", port)
    uplink = ReliableUplink(client, batch=1, interval=0.01, **uplink_options)
    stop = asyncio.Event()
    task = asyncio.create_task(uplink.run(stop))
    try:
        yield front, server, client, uplink
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        await server.http.close()
        await redis.aclose()


async def test_reports_refused_at_a_bound_are_a_fault_the_uplink_counts(redis_node, small_city):
    async with box_and_server(redis_node.url, small_city, {"max_backlog": 4, "max_queued": 3},
                              max_resends=0) as (front, server, client, uplink):    # each refusal told once

        async def send(reports: list[dict]) -> None:
            acked = uplink.stats["acked"]
            uplink.put("fcd.report", "box1", reports)
            await asyncio.wait_for(uplink.idle.wait(), 10)
            assert uplink.stats["acked"] == acked + 1

        # 5 reports for one partition: more than the front's queue holds, refused while answering
        await send(_reports(0, 5, 100.0))
        assert uplink.stats["faults"] == 1 and "5 reports refused" in uplink.last_fault
        assert front.stats["queue_refused"] == 5 and server.stats["reports_refused"] == 5
        assert server.boxes["box1"]["refused"] == 5 and server.boxes["box1"]["reports"] == 0
        # 2 fit and reach the store; then 3 fit the queue but not the partition's backlog (2 + 3 > 4)
        await send(_reports(0, 2, 200.0))
        await front.flush()
        await send(_reports(0, 3, 300.0))
        assert uplink.stats["faults"] == 1                   # answered before the store refused them
        await front.flush()
        assert front.stats["refused_entries"] == 1 and front.stats["appended_entries"] == 1
        # the box's next call tells it
        await send([])
        assert uplink.stats["faults"] == 2 and "3 reports refused" in uplink.last_fault
        assert server.stats["reports_refused"] == 8 and server.boxes["box1"]["refused"] == 8
        assert server.boxes["box1"]["reports"] == 5          # taken by the front (2 + 3)
        await send([])                                      # told once
        assert uplink.stats["faults"] == 2
        direct = await client.multicall([("fcd.report", ("box2", _reports(0, 4, 400.0)))])
        assert isinstance(direct[0], xmlrpc.client.Fault) and direct[0].faultCode == FAULT_BACKLOG


async def test_a_refused_call_is_sent_again_after_a_backoff_and_given_up_after_max_resends(
        redis_node, small_city, caplog):
    caplog.set_level(logging.INFO, logger="fcd.rpc")
    async with box_and_server(redis_node.url, small_city, {"max_queued": 3},
                              backoff=(0.05, 0.2), max_resends=2) as (front, server, _, uplink):
        # the front's queue is full (another box's 3 reports, not yet appended): box1's 2 reports
        # are refused; answering flushes the queue to the store, so the resend is taken
        assert front.reports("box0", [RoadReport.from_xmlrpc(r, small_city.n_roads) for r in _reports(1, 3, 50.0)]) == 3
        uplink.put("fcd.report", "box1", _reports(0, 2, 100.0))
        await asyncio.wait_for(uplink.idle.wait(), 10)
        assert uplink.stats["refused"] == 1 and uplink.stats["resent"] == 1 and uplink.stats["faults"] == 1
        assert uplink.stats["refused_given_up"] == 0 and uplink.stats["acked"] == 2
        assert server.boxes["box1"] == {"reports": 2, "refused": 2}
        assert front.stats["queue_refused"] == 2 and front.stats["appended_entries"] == 2
        # 5 reports never fit a queue of 3: refused, sent again twice, then given up
        uplink.put("fcd.report", "box1", _reports(0, 5, 200.0))
        await asyncio.wait_for(uplink.idle.wait(), 10)
        assert uplink.stats["refused"] == 4 and uplink.stats["resent"] == 3
        assert uplink.stats["refused_given_up"] == 1 and server.boxes["box1"]["refused"] == 2 + 15
        # a burst of refusals is logged once when it starts, once when it ends
        uplink.put("fcd.report", "box1", _reports(0, 1, 300.0))
        await asyncio.wait_for(uplink.idle.wait(), 10)
        started = [r for r in caplog.records if "refuses reports" in r.getMessage()]
        ended = [r for r in caplog.records if "takes reports again" in r.getMessage()]
        assert len(started) == 2 and len(ended) == 2          # two bursts: 1 refusal, then 3
        assert "(3 calls refused meanwhile)" in ended[-1].getMessage()
