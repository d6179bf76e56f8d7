"""A box is told when the server with workers refuses its reports at a bound: at the front's
queue bound (while answering the call) and at a partition's backlog bound in the store (after
answering: told at the box's next call).  Real redis-server, the server's real HTTP front, the
box's real uplink; the refusal is counted at both ends."""

from __future__ import annotations

import asyncio
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


async def test_reports_refused_at_a_bound_are_a_fault_the_uplink_counts(redis_node, small_city):
    redis = open_redis(redis_node.url)
    front = StreamFront(redis, small_city, 1, Keys(f"r{secrets.token_hex(3)}"), max_backlog=4, max_queued=3)
    await front.start()
    server = FcdServer(small_city)
    server.use_front(front)
    _, port = await server.start_http("127.0.0.1", 0)
    client = KeepAliveClient("127.0.0.1", port)
    uplink = ReliableUplink(client, batch=1, interval=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(uplink.run(stop))

    async def send(reports: list[dict]) -> None:
        acked = uplink.stats["acked"]
        uplink.put("fcd.report", "box1", reports)
        await asyncio.wait_for(uplink.idle.wait(), 10)
        assert uplink.stats["acked"] == acked + 1

    try:
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
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        await server.http.close()
        await redis.aclose()
