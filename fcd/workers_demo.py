"""``booster-demo --scale``: the fcd server side on several machines, in a lab of namespaces.

The lab is ``boxcore/topologies/fcd-scale.toml``: cars, two booster boxes, the fcd-server front,
one Redis and two fcd-server workers, each on its own host of one LAN.  A simulated city in three
districts is replayed (sped up): district 0 through box0, district 1 through box1, district 2 raw
to the front.  The front appends the boxes' road reports and the raw probes to the partitions'
Redis streams; the workers share the partitions, aggregate the raw probes and apply everything
once.  Half way through, worker1 is killed (SIGKILL): worker0 takes its partitions and what it
left pending.  The figures printed are read from the system: the front's and the store's
counters, reports and datagrams applied per worker, none lost.

Needs root (namespaces) and ``redis-server``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from boxcore.lab import TOPOLOGY_DIR, Lab
from boxcore.procs import python_module
from boxcore.redisproc import redis_server_binary
from fcd.city import grid_city
from fcd.sim import Simulator
from fcd.stack import Stack

TOPOLOGY = TOPOLOGY_DIR / "fcd-scale.toml"
FRONT_UDP, FRONT_HTTP, BOX_PORT, REDIS_PORT = 7000, 8080, 7100, 6379


class ScaleDemo:
    def __init__(self, lab: Lab, workdir: Path, trace: Path) -> None:
        self.lab, self.workdir, self.trace = lab, workdir, trace
        self.stack = Stack(workdir)
        self.group = self.stack.group
        self.front_addr = lab.addr("front")
        self.store = f"redis://{lab.addr('store')}:{REDIS_PORT}/0"

    def start(self, node: str, name: str, argv: list[str], ready: bool = False, stats: bool = False):
        return self.group.start(name, self.lab.command(node, argv), ready=ready, stats=stats)

    def status(self) -> dict:
        with self.lab.inside("front"):      # this thread's sockets are made in the front's namespace
            with urllib.request.urlopen(f"http://{self.front_addr}:{FRONT_HTTP}/status", timeout=10) as resp:
                return json.loads(resp.read())

    async def up(self) -> dict:
        lab, trace = self.lab, str(self.trace)
        redis = self.start("store", "redis", [redis_server_binary(), "--bind", lab.addr("store"), "--port",
                                              str(REDIS_PORT), "--save", "", "--appendonly", "no",
                                              "--protected-mode", "no", "--dir", str(self.workdir)])
        await self.group.wait_for_log(redis, "Ready to accept connections")
        front = self.start("front", "front", [*python_module("fcd.server"), "--city", trace, "--store", self.store,
                                              "--udp", f"{self.front_addr}:{FRONT_UDP}",
                                              "--http", f"{self.front_addr}:{FRONT_HTTP}", "--partitions", "4",
                                              "--model-interval", "1", "--lease", "2", "--log-level", "warning"],
                           ready=True)
        await self.group.wait_ready(front, timeout=60)
        self.workers = {}
        for name in ("worker0", "worker1"):
            self.workers[name] = self.start(name, name, [*python_module("fcd.server"), "--worker", "--city", trace,
                                                         "--store", self.store, "--worker-name", name, "--lease", "2",
                                                         "--log-level", "warning"], ready=True)
            await self.group.wait_ready(self.workers[name], timeout=60)
        for box in ("box0", "box1"):
            await self.stack.box(box, self.trace, BOX_PORT, FRONT_UDP, FRONT_HTTP, host=lab.addr(box),
                                 server_host=self.front_addr, wrap=lab.command(box, []), ready_timeout=60)
        return await self.wait("both workers own partitions",
                               lambda s: {p["owner"] for p in s["stream"]["partitions"]} == {"worker0", "worker1"})

    async def wait(self, what: str, done: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        """Poll the front's status (the roles are other hosts: no event reaches here) until ``done``."""
        deadline = time.monotonic() + timeout
        while True:
            status = await asyncio.to_thread(self.status)
            if done(status):
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"demo: {what} not seen within {timeout}s")
            await asyncio.sleep(0.3)

    async def replay(self, speed: float) -> dict:
        lab = self.lab
        targets = f"{lab.addr('box0')}:{BOX_PORT},{lab.addr('box1')}:{BOX_PORT},{self.front_addr}:{FRONT_UDP}"
        role = await self.group.run("cars", lab.command("cars", [
            *python_module("fcd.gen"), "--trace", str(self.trace), "--targets", targets, "--processes", "3",
            "--speed", str(speed), "--log-level", "warning"]), timeout=300)
        return json.loads([line for line in role.output().splitlines() if line.startswith("{")][-1])


async def run_demo(workdir: Path, say: Callable[[str], None]) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if redis_server_binary() is None:
        raise RuntimeError("booster-demo --scale needs redis-server (tools/bootstrap.sh installs it as root)")
    started = time.monotonic()
    city = grid_city(6, 6, block=200.0, cycle=40.0, seed=4, districts=3)
    trace_path = workdir / "city.npz"
    Simulator(city, cars=400, seed=4).run(240.0).save(trace_path)
    lab = await Lab.up_async(TOPOLOGY)
    demo = ScaleDemo(lab, workdir / "roles", trace_path)
    try:
        await demo.up()
        say(f"lab {lab.name}: Redis on {lab.addr('store')}, front {demo.front_addr}, workers "
            f"{lab.addr('worker0')} and {lab.addr('worker1')}, boxes {lab.addr('box0')} and {lab.addr('box1')}; "
            f"4 partitions shared by 2 workers")
        replay = asyncio.create_task(demo.replay(speed=10))
        status = await demo.wait("worker1 applying data",
                                 lambda s: s["stream"]["totals"]["applied_by"].get("worker1", 0) >= 2000, 120)
        demo.workers["worker1"].proc.send_signal(signal.SIGKILL)
        killed_at = status["stream"]["totals"]["applied_by"]["worker1"]
        say(f"worker1 SIGKILLed after applying {killed_at} datagrams and reports; worker0 takes its partitions")
        gen = await replay

        def settled(s: dict) -> bool:
            t = s["stream"]["totals"]
            boxes = [s["boxes"].get(b, {}) for b in ("box0", "box1")]
            return (all(b.get("idle") for b in boxes) and t.get("backlog") == 0
                    and t.get("appended_entries") == t.get("applied_entries")
                    and s["stream"]["front"]["appended_entries"] == t.get("appended_entries")
                    and {p["owner"] for p in s["stream"]["partitions"]} == {"worker0"})

        status = await demo.wait("every appended entry applied", settled, 120)
        t, front = status["stream"]["totals"], status["stream"]["front"]
        box_received = sum(status["boxes"].get(b, {}).get("received", 0) for b in ("box0", "box1"))
        raw = status["udp"]["received"]
        say(f"{gen['sent']} packets sent: {box_received} through the boxes, {raw} raw to the front "
            f"({status['udp']['lost']} lost on the way)")
        say(f"applied by worker: {t['applied_by']}; probes {t.get('probes', 0)} of {front['probes']} raw probes, "
            f"lights {t.get('lights', 0)} of {front['lights']}; road reports from boxes {t.get('reports_box', 0)}, "
            f"from raw data {t.get('reports_raw', 0)}, duplicates {t.get('duplicate_reports', 0)}; "
            f"redelivered after the kill {t.get('redelivered', 0)}; refused {t.get('refused_items', 0)}")
        say(f"model on the front: {status['model']['runs']} runs on {status['model']['observed']} reports")
        return {"packets_sent": gen["sent"], "box_datagrams": box_received, "raw_datagrams": raw,
                "lost_on_the_way": status["udp"]["lost"], "applied_by": t["applied_by"],
                "probes_applied": t.get("probes", 0), "raw_probes": front["probes"],
                "lights_applied": t.get("lights", 0), "raw_lights": front["lights"],
                "reports_box": t.get("reports_box", 0), "reports_raw": t.get("reports_raw", 0),
                "duplicate_reports": t.get("duplicate_reports", 0), "redelivered": t.get("redelivered", 0),
                "refused": t.get("refused_items", 0), "worker1_killed_after": killed_at,
                "model_runs": status["model"]["runs"], "elapsed_s": round(time.monotonic() - started, 1)}
    finally:
        await demo.group.stop_all()
        await asyncio.to_thread(lab.down)


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(run_demo(Path(tmp), lambda line: print(line, file=sys.stderr))), indent=2))
