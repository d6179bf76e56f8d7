"""The FCD vertical end to end on the user engine, over loopback, in well under a minute.

city + simulator -> trace; fcd-server (XML-RPC + raw UDP + model + tuplespace); one booster box
(boxd --engine user + fcd-booster) in front of the server for district 0; district 1 sends raw
to the server; two generator processes replay the trace 20x sped up; then the router asks the
tuplespace and prints the shortest-time route with its predicted time.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Callable

from fcd.city import grid_city
from fcd.sim import Simulator
from boxcore.procs import free_port
from fcd.stack import Stack, run_gen_async


def _status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
        return json.loads(resp.read())


async def settled(port: int, sent: int, timeout: float = 30.0) -> dict:
    """The server's status once every datagram sent was counted (by the box or raw), the box
    has sent its final counters (``idle``) and the model has run on what arrived.  Polled: the
    roles are other processes, there is no event to wait on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    runs = -1
    while True:
        st = await asyncio.to_thread(_status, port)
        box = st["boxes"].get("box1", {})
        # the box's final counters travel with its last reports, in the same request
        if (box.get("idle") and box.get("received", 0) + st["udp"]["received"] >= sent
                and st["model"]["runs"] == runs > 0):       # and no model run due any more
            return st
        if loop.time() > deadline:
            return st                 # report what there is; the summary shows what is missing
        runs = st["model"]["runs"]
        await asyncio.sleep(0.3)      # longer than the model loop's 0.25 s poll


async def run_demo(workdir: Path, say: Callable[[str], None]) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    city = grid_city(5, 5, block=200.0, cycle=40.0, seed=2, districts=2)
    trace = Simulator(city, cars=300, seed=2).run(240.0)
    trace_path = workdir / "city.npz"
    trace.save(trace_path)
    say(f"simulated {city.name}: {city.n_roads} roads, {len(city.lights)} lights, 300 cars, 240 s "
        f"-> {len(trace.probes)} probes, {len(trace.lights)} light changes")
    udp, http, ts, box_port = free_port(2), free_port(), free_port(), free_port(2)
    stack = Stack(workdir / "roles")
    try:
        server = stack.server(trace_path, udp, http, ts)
        await stack.wait_ready(server)
        await stack.box("box1", trace_path, box_port, udp, http)
        say(f"fcd-server on udp {udp} / http {http}, tuplespace {ts}; box1 (boxd user engine + fcd-booster) "
            f"on udp {box_port}")
        gen = await run_gen_async(trace_path, [("127.0.0.1", box_port), ("127.0.0.1", udp)],
                                  ["--processes", "2", "--speed", "20"])
        say(f"2 generators replayed the trace at 20x: {gen['sent']} packets "
            f"(district 0 through box1, district 1 raw to the server)")
        st = await settled(http, gen["sent"])
        box = st["boxes"].get("box1", {})
        raw_pkts = st["udp"]["received"]
        requests = st["counters"].get("http_requests", 0)
        say(f"server: {raw_pkts} raw datagrams + {requests} XML-RPC requests on {st['http_connections']} "
            f"connection(s); box1 took {box.get('received', 0)} datagrams and sent "
            f"{st['counters'].get('reports_box', 0)} road reports; raw data gave "
            f"{st['counters'].get('reports_raw', 0)}; model runs {st['model']['runs']}")
        from fcd.route import plan
        from fcd.tuplespace import TupleSpaceClient
        space = await TupleSpaceClient.connect("127.0.0.1", ts)
        try:
            route = await plan(space, city, "0_0", "4_4")
        finally:
            await space.close()
        say(route.describe())
        box_pkts = box.get("received", 0)
        return {
            "packets_sent": gen["sent"],
            "box_datagrams": box_pkts,
            "server_raw_datagrams": raw_pkts,
            "server_rpc_requests": requests,
            "box_reduction_factor": round(box_pkts / max(1, requests), 1),
            "reports_box": st["counters"].get("reports_box", 0),
            "reports_raw": st["counters"].get("reports_raw", 0),
            "route": " -> ".join(route.junctions),
            "route_predicted_s": round(route.seconds, 1),
            "prediction_run": route.run,
            "predicted_roads_on_route": f"{route.predicted_roads}/{len(route.roads)}",
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    finally:
        await stack.stop_all()


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(run_demo(Path(tmp), print)), indent=2))
