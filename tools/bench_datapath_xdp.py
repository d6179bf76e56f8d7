"""``booster-loadgen datapath --engine xdp``: the kernel fast path against the linux engine and user space.

In the ``transparent`` lab (client -> box -> server), one run, ratios within it:

* ``ceiling`` (engine ``linux``: plain kernel forwarding, no boxd), also at the knee rate, and at
  the knee rate with a no-op XDP program attached (``xdp`` field; boxcore/engines/bpf/noop.bpf.c):
  what attaching any XDP program costs, apart from boxd's classifier;
* ``pass`` with 1 / 100 / 1000 rules installed (DROP rules on other ports: the traffic passes
  the classifier and is forwarded), engine ``xdp``;
* ``drop``: a DROP rule on the stream, engine ``xdp`` (``pps`` = what the rule dropped per second);
* ``redirect_consume``: a Python booster redirecting the stream and consuming every packet, on
  ``xdp`` (socket delivery by bpf_sk_assign) and on ``linux`` (NFQUEUE), same booster code;
* ``copy``: a COPY rule, engine ``xdp`` (``pps`` forwarded originals; ``copies_pps`` what reached
  the booster through the ring buffer);
* ``fanout``: 64 members; ``xdp`` = a MULTICAST rule cloned in tc, ``user`` = a Python reflector
  on the box sending each datagram to the 64 members with one ``sendmmsg`` (mmpog.fastsend);
  ``pps`` = datagrams delivered to members per second.

The blast generator is ``trafgen`` (netsniff-ng) on the client: one static, checksummed 64-byte
UDP frame for ``--duration`` seconds, as fast as one CPU sends it (its ring path) or at a given
rate (``-b``, its paced path); the server drops it in its raw table (by the generator's source
port) and counts it on its interface.  ``loss`` is the share of sent packets (the client's tx
counter, plus the frames its veth refused on the ring path) that did not arrive (or, for drop /
consume, were not dropped / consumed).  ``generator_alone`` is trafgen's own top rate.

Method (:class:`Isolation`, :meth:`Bench.find_knee`):

* the generator is pinned to one CPU in a cgroup of its own, boxd and the boosters to the other
  CPU, each in its own cgroup (v1 ``cpu``, ``--cpu-budget`` cores each); ``--no-isolation``
  turns that off; ``--box-receive`` says where the box's receive path runs (softirq on the
  sending CPU, or a NAPI thread on the box's CPU, ordinary or SCHED_FIFO);
* every case runs ``--repeat`` times and reports the median run (every run in ``pps_runs``);
* plain forwarding is measured as fast as the generator sends, then on a ladder of offered
  rates (fractions of that): the knee is the highest rate it still forwards with loss <= 1 %
  (or where the generator no longer reaches the asked rate).  The ceiling and the pass cases
  are then measured offered exactly that rate, so their ratio is the box's, not the sender's;
* latency comes from a probe stream (``--paced-rate`` stamped datagrams/s from a Python sender,
  CLOCK_MONOTONIC shared by all namespaces) running through the box during a blast: the
  latency target's figure while the generator offers ``LATENCY_LOAD`` (half) of the knee rate,
  the same probe at the knee rate kept beside it; the other cases' latency from a paced run of
  the probe alone.  Percentiles from :mod:`tools.stats`.

Roles run as ``python -m tools.bench_datapath_xdp ROLE`` inside lab namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from boxcore.procs import ProcessGroup, Role, python_module
from tools.datapath_tally import Tally
from tools.stats import cpu_seconds, percentile, summary

CLIENT, SERVER, BOX_CLIENT_SIDE = "10.1.0.2", "10.2.0.2", "10.1.0.1"
PORT = 9500
GENERATOR_SPORT = 7777       # the server drops the generator's packets by this source port
FANOUT_MEMBERS = 64
FANOUT_GROUP = 7
OTHER_PORTS = 20000          # the pass cases' rules sit on ports 20000.. (never the stream's)
HTTP_PORT = 8711


# ---------------------------------------------------------------- roles (inside namespaces)

def _wait_stop(ready: str, wait: float) -> None:
    deadline = time.monotonic() + wait
    stop = Path(ready + ".stop")
    while time.monotonic() < deadline and not stop.exists():
        time.sleep(0.05)


def role_rules(args: argparse.Namespace) -> dict:
    """A booster holding ``--count`` DROP rules on ports the stream never uses (pass cases),
    or one DROP / COPY / MULTICAST rule on the stream (``--kind``)."""
    import asyncio

    import uvloop

    from boxcore.booster import Booster
    from boxcore.rules import Match

    async def main() -> dict:
        tally = Tally()
        async with Booster(f"bench-{args.kind}", control=args.control) as booster:
            if args.kind == "pass":
                for i in range(args.count):
                    await booster.drop(Match(proto="udp", dst_port=OTHER_PORTS + i))
            elif args.kind == "drop":
                await booster.drop(Match(proto="udp", dst_port=args.port))
            elif args.kind == "copy":
                await booster.copy(Match(proto="udp", dst_port=args.port), lambda pkt: tally.packet(pkt.payload))
            elif args.kind == "fanout":
                members = [(SERVER, args.port + 1 + i) for i in range(FANOUT_MEMBERS)]
                await booster.set_multicast_group(FANOUT_GROUP, members)
                await booster.multicast(Match(proto="udp", dst_port=args.port), FANOUT_GROUP)
            Path(args.ready).touch()
            while not Path(args.ready + ".stop").exists():
                await asyncio.sleep(0.05)
        return tally.result()

    return uvloop.run(main())


def role_reflector(args: argparse.Namespace) -> dict:
    """The user-space fan-out: receive on the box's address, send each datagram to 64 members
    with one sendmmsg (the mmpog reflector's direct fan-out)."""
    from mmpog.fastsend import FanoutSender

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind((BOX_CLIENT_SIDE, args.port))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sender = FanoutSender(tx)
    members = tuple((SERVER, args.port + 1 + i) for i in range(FANOUT_MEMBERS))
    Path(args.ready).touch()
    received = sent = dropped = 0
    rx.settimeout(0.2)
    stop = Path(args.ready + ".stop")
    while not stop.exists():
        try:
            data = rx.recv(2048)
        except socket.timeout:
            continue
        received += 1
        ok, lost = sender.send(data, members, key=0)
        sent += ok
        dropped += lost
    return {"received": received, "sent": sent, "dropped": dropped}


ROLES = {"rules": role_rules, "reflector": role_reflector}


def role_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_datapath_xdp role")
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--control", default="")
    parser.add_argument("--kind", choices=["pass", "drop", "copy", "fanout"], default="pass")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--ready", default="")
    args = parser.parse_args(argv)
    result = ROLES[args.role](args)
    Path(args.out).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------- orchestration

KNEE_FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)   # of the ceiling's unlimited rate
KNEE_LOSS = 0.01             # the ceiling "starts to lose" above this share of what was sent
NOOP_OBJECT = Path(__file__).resolve().parent.parent / "boxcore" / "engines" / "bpf" / "noop.bpf.o"
LATENCY_LOAD = 0.5           # the latency figures: offered this share of the knee rate (the path, not a full queue)
GENERATOR_REACHES = 0.9      # below this share of the asked rate the generator, not the box, is the limit
BOX_INGRESS = "cli"          # the box's interface facing the client
GENERATOR_DUMMY = "bbgen0"   # trafgen alone sends into this veth, its peer down (client namespace)


RECEIVE_MODES = ("softirq", "thread", "fifo")
# "as fast as it sends" while a NAPI thread receives: trafgen's paced path asked far above its reach
GENERATOR_FLOOD_PPS = 20_000_000


class Isolation:
    """Where each side of a measurement runs, so that the figure is the box's and not the sender's.

    The generator (trafgen) is pinned to one CPU in a cgroup of its own; boxd and the box's
    boosters (and the user-space reflector) are pinned to the other CPU, boxd in one cgroup,
    the boosters in another.  Each cgroup (v1 ``cpu``) has a CFS quota of ``budget`` cores.
    Without two CPUs or the cgroup v1 cpu controller (or with ``--no-isolation``) everything
    runs unpinned and the JSON says so.

    ``receive`` is where the box's receive path (XDP, forwarding, tc, socket delivery,
    NFQUEUE) runs, the same for every engine and case of a run:

    * ``softirq``: in softirq on the sending CPU - a veth pair has no receive queue of its
      own, so the box's per-packet cost shows as a slower generator (which is why the pass
      cases are compared at the knee rate, :meth:`Bench.find_knee`);
    * ``thread``: the box's ingress veth gets a NAPI instance (GRO on, which forwards UDP
      unchanged) run by a kernel thread of its own (``threaded``), pinned to the box's CPU in
      boxd's cgroup, an ordinary task (measured: it lost its CPU to boxd and the booster and
      every xdp case fell 2-10x);
    * ``fifo``: that NAPI thread pinned to the box's CPU but left in the root cgroup and made
      ``SCHED_FIFO`` ``priority``, the precedence softirq has over tasks: the generator's CPU
      only runs trafgen and veth_xmit.  While it is busy, the tasks on the box's CPU (boxd,
      the boosters, the reflector) get only what RT throttling leaves them
      (``kernel.sched_rt_runtime_us`` of every ``sched_rt_period_us``; ``describe``).

    (RPS to the box's CPU was rejected: a cross-CPU backlog and an IPI per packet cut plain
    forwarding from about 180k to about 20k packets/s.)
    """

    SIDES = ("generator", "boxd", "booster")

    def __init__(self, enabled: bool, budget: float, period_us: int = 100_000, receive: str = "softirq",
                 priority: int = 50) -> None:
        from tools.bench_fcd import CGROUP_CPU, CpuBudgets

        if receive not in RECEIVE_MODES:
            raise ValueError(f"receive must be one of {RECEIVE_MODES}, got {receive!r}")
        cpus = sorted(os.sched_getaffinity(0))
        self.all_cpus = set(cpus)
        self.reason = ""
        if not enabled:
            self.reason = "--no-isolation"
        elif len(cpus) < 2:
            self.reason = f"only {len(cpus)} CPU"
        elif not (CGROUP_CPU / "cgroup.procs").exists():
            self.reason = f"no cgroup v1 cpu controller at {CGROUP_CPU}"
        self.budgets = None if self.reason else CpuBudgets(budget, period_us, prefix="bbxdp")
        # trafgen -P 1 pins its one worker to the first CPU: that one is the generator's
        self.cpus = {"generator": cpus[0], "boxd": cpus[-1], "booster": cpus[-1]} if self.budgets else {}
        self.budget = budget if self.budgets else None
        self.receive = receive if self.budgets is not None else "softirq"
        self.priority = priority
        self.napi_before: dict[int, str] = {}
        self.napi_pinned: dict[int, str] = {}

    @property
    def napi_receive(self) -> bool:
        return self.receive != "softirq"

    def generator_flood_rate(self) -> int | None:
        """trafgen's ``-b`` for "as fast as it sends": none (its TX_RING path) unless a NAPI
        thread receives.  Then the frames wait in the veth's NAPI ring, trafgen's non-blocking
        ring flush fails with EAGAIN and it exits; its paced path (a blocking sendto per
        frame) asked a rate far above its reach sends as fast as it can instead."""
        return GENERATOR_FLOOD_PPS if self.napi_receive else None

    def wrap(self, side: str | None, argv: list[str]) -> list[str]:
        """``argv`` started inside ``side``'s cgroup, pinned to its CPU (the same pid all along:
        sh, taskset and ``ip netns exec`` all exec)."""
        if self.budgets is None or side is None:
            return argv
        if side not in self.SIDES:
            raise ValueError(f"unknown side {side!r}")
        cgroup = self.budgets.group(side)
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup),
                "taskset", "-c", str(self.cpus[side]), *argv]

    def threaded_receive(self, lab) -> None:
        """The box's ingress veth: NAPI (GRO on) in a kernel thread of its own (``threaded``)."""
        if not self.napi_receive:
            return
        self.napi_before = self._napi_threads()
        from pyroute2.ethtool import Ethtool

        with lab.inside("box"):
            ethtool = Ethtool()
            try:
                features = ethtool.get_features(BOX_INGRESS)
                features.features["rx-gro"].enable = True
                ethtool.set_features(BOX_INGRESS, features)
            finally:
                ethtool.close()
        lab.run("box", ["sh", "-c", f"echo 1 > /sys/class/net/{BOX_INGRESS}/threaded"])
        self.pin_receive()

    @staticmethod
    def _napi_threads() -> dict[int, str]:
        threads = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                name = _comm(int(pid))
                if name.startswith(f"napi/{BOX_INGRESS}-"):
                    threads[int(pid)] = name
        return threads

    def pin_receive(self) -> None:
        """Put the box's NAPI threads made since :meth:`threaded_receive` (attaching or
        detaching XDP rebuilds them) on the box's CPU: in boxd's cgroup (``thread``) or
        SCHED_FIFO in the root cgroup (``fifo``)."""
        if not self.napi_receive:
            return
        cpu = self.cpus["boxd"]
        for pid, name in self._napi_threads().items():
            if pid in self.napi_before or pid in self.napi_pinned:
                continue
            try:
                os.sched_setaffinity(pid, {cpu})
                where = f"CPU {cpu}"
            except OSError as exc:
                where = f"not pinned ({exc.strerror})"
            if self.receive == "thread":
                try:
                    (self.budgets.group("boxd") / "cgroup.procs").write_text(str(pid))
                    where += ", boxd cgroup, SCHED_OTHER"
                except OSError:
                    where += ", no cgroup (refused for a kernel thread), SCHED_OTHER"
            else:
                try:
                    os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(self.priority))
                    where += f", root cgroup, SCHED_FIFO {self.priority}"
                except OSError as exc:
                    where += f", root cgroup, not SCHED_FIFO ({exc.strerror})"
            self.napi_pinned[pid] = f"{name}: {where}"

    def restore_receive(self, lab) -> None:
        """The NAPI threads back to SCHED_OTHER on every CPU, the veth back to softirq receive
        (which ends its threads)."""
        if not self.napi_receive:
            return
        self.release_threads()
        lab.run("box", ["sh", "-c", f"echo 0 > /sys/class/net/{BOX_INGRESS}/threaded"], check=False)

    def release_threads(self) -> None:
        """The NAPI threads this run pinned, still alive, back to SCHED_OTHER on every CPU."""
        for pid in self.napi_pinned:
            if not _comm(pid).startswith(f"napi/{BOX_INGRESS}-"):
                continue            # gone with a rebuilt NAPI (its pid may be someone else's now)
            try:
                os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
                os.sched_setaffinity(pid, self.all_cpus)
            except OSError:
                pass

    @staticmethod
    def rt_throttling() -> dict:
        """What RT tasks may take of each CPU per period; the rest is left to ordinary tasks."""
        values = {}
        for name in ("sched_rt_runtime_us", "sched_rt_period_us"):
            try:
                values[name] = int(Path(f"/proc/sys/kernel/{name}").read_text())
            except (OSError, ValueError):
                values[name] = None
        runtime, period = values["sched_rt_runtime_us"], values["sched_rt_period_us"]
        if runtime is not None and period:
            values["share_left_to_tasks"] = 0.0 if runtime < 0 else round(1 - runtime / period, 4)
        return values

    def describe(self) -> dict:
        if self.budgets is None:
            return {"isolated": False, "reason": self.reason, "box_receive": "softirq"}
        where = {"softirq": "softirq on the sending CPU (veth)",
                 "thread": f"threaded NAPI on the box's {BOX_INGRESS}, in boxd's cgroup (SCHED_OTHER)",
                 "fifo": f"threaded NAPI on the box's {BOX_INGRESS}, root cgroup, SCHED_FIFO {self.priority}"}
        described = {"isolated": True, "cpus": self.cpus, "cpu_budget_cores": self.budget,
                     "cgroups": list(self.SIDES), "box_receive": self.receive,
                     "box_receive_path": where[self.receive],
                     "napi_threads": sorted(set(self.napi_pinned.values()))}
        if self.receive == "fifo":
            described["rt_throttling"] = self.rt_throttling()
        if self.napi_receive:
            described["generator_flood"] = f"trafgen -b {GENERATOR_FLOOD_PPS}pps (paced path, blocking sendto)"
        return described

    def cleanup(self) -> None:
        if self.budgets is not None:
            self.budgets.cleanup()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def median(values: list[float]) -> float:
    return percentile(values, 0.5)


class Bench:
    def __init__(self, lab, workdir: Path, args: argparse.Namespace, isolation: Isolation) -> None:
        self.lab, self.workdir = lab, workdir
        self.isolation = isolation
        self.group = ProcessGroup(workdir)
        self.duration = float(args.duration)
        self.size = int(args.size)
        self.paced_rate = int(args.paced_rate)
        self.paced_duration = float(args.paced_duration)
        self.repeat = max(1, int(args.repeat))
        self.n = 0
        self.boxd: Role | None = None
        self.control = str(workdir / "boxd.sock")

    # -- processes
    def start(self, node: str, argv: list[str], name: str, side: str | None = None) -> Role:
        """``argv`` in ``node``'s namespace as a role of this bench (``side``: its CPU and cgroup)."""
        return self.group.start(name, self.isolation.wrap(side, self.lab.command(node, argv)), stats=False)

    def role(self, node: str, module: str, role: str, *extra: str, side: str | None = None) -> tuple[Role, Path, Path]:
        self.n += 1
        out = self.workdir / f"{self.n:02d}-{role}.json"
        ready = self.workdir / f"{self.n:02d}-{role}.ready"
        proc = self.start(node, [*python_module(module), role, "--out", str(out), "--ready", str(ready), *extra],
                          out.stem, side)
        return proc, out, ready

    def wait_ready(self, role: Role, ready: Path, timeout: float = 120) -> None:
        self.group.wait_path_sync(role, ready, timeout)

    def finish(self, role: Role, out: Path, ready: Path) -> dict:
        """Tell a role that waits for it to stop; its JSON output."""
        Path(str(ready) + ".stop").touch()
        self.group.wait_exit_sync(role, 60)
        return json.loads(out.read_text()) if out.exists() else {}

    def rules_role(self, kind: str, count: int = 1, timeout: float = 120) -> tuple[Role, Path, Path]:
        proc, out, ready = self.role("box", "tools.bench_datapath_xdp", "rules", "--control", self.control,
                                     "--kind", kind, "--count", str(count), side="booster")
        self.wait_ready(proc, ready, timeout)
        return proc, out, ready

    def start_boxd(self, engine: str) -> None:
        extra = (["--xdp-stall", "10"] if engine == "xdp" else ["--linux-stall", "10", "--linux-queue-len", "8192"])
        self.boxd = self.start("box", [*python_module("boxcore.boxd"), "--engine", engine, "--control",
                                       self.control, "--state", str(self.workdir / f"state-{engine}"),
                                       "--http", f"127.0.0.1:{HTTP_PORT}", "--log-level", "warning",
                                       "--max-rules-per-booster", "2000", *extra], f"boxd-{engine}", side="boxd")
        self.group.wait_path_sync(self.boxd, Path(self.control), 30)
        self.isolation.pin_receive()       # attaching XDP may have rebuilt the NAPI thread

    def stop_boxd(self) -> None:
        if self.boxd is not None:
            self.group.stop_sync(self.boxd, grace=300)   # the linux engine removes its rules one transaction each
            self.boxd = None
            Path(self.control).unlink(missing_ok=True)
            self.isolation.pin_receive()   # detaching XDP may have rebuilt the NAPI thread

    def rule_packets(self) -> int:
        with self.lab.inside("box"):
            rules = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/api/rules", timeout=10).read())
        return sum(r["packets"] for r in rules)

    # -- traffic
    def counter(self, node: str, iface: str, which: str) -> int:
        return int(self.lab.run(node, ["cat", f"/sys/class/net/{iface}/statistics/{which}"]).stdout)

    def write_generator_config(self, dst: str, dmac: str) -> Path:
        from boxcore.packet import Packet

        smac = self.mac("client", "eth0")
        ip = Packet(17, CLIENT, GENERATOR_SPORT, dst, PORT, b"\0" * self.size).to_ip()
        frame = bytes.fromhex(dmac.replace(":", "")) + bytes.fromhex(smac.replace(":", "")) + b"\x08\x00" + ip
        path = self.workdir / f"trafgen-{dst}.cfg"
        path.write_text("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n")
        return path

    def sent_counter(self) -> tuple[int, int]:
        """The client's veth: frames transmitted and frames refused (with a NAPI receiver - XDP
        attached, or ``--box-receive`` thread/fifo - a frame that finds the peer's ring full is
        refused, counted in ``tx_dropped`` and not in ``tx_packets``)."""
        return self.counter("client", "eth0", "tx_packets"), self.counter("client", "eth0", "tx_dropped")

    def mac(self, node: str, iface: str) -> str:
        return json.loads(self.lab.run(node, ["ip", "-j", "link", "show", iface]).stdout)[0]["address"]

    def blast(self, dst: str = SERVER, *, rate: int | None = None, count=None, probe: bool = False) -> dict:
        """trafgen for ``duration`` s (as fast as its CPU sends, or at ``rate`` packets/s); returns
        sent (the client's veth transmitted, plus what it refused on trafgen's ring path, where a
        refused frame is lost: :meth:`sent_counter`), arrived (server rx) and, with ``count``, the case's own counter's
        growth.  With ``probe``, a low-rate stream of stamped datagrams runs through the box
        during the blast and ``latencies`` are its one-way latencies (its packets are not
        counted in sent / arrived)."""
        config = self.write_generator_config(dst, self.mac("box", BOX_INGRESS))
        if probe:
            sink, sink_out, sink_ready = self.role("server", "tools.bench_datapath_linux", "sink", "--bind",
                                                   f"{SERVER}:{PORT}", "--wait", "30")
            self.wait_ready(sink, sink_ready)
        tx0, rx0, backlog0 = self.sent_counter(), self.counter("server", "eth0", "rx_packets"), backlog_drops()
        c0 = count() if count else 0
        if probe:    # it ends before the blast does (its interpreter starts while trafgen runs)
            sender, sender_out, _ = self.role("client", "tools.bench_datapath_linux", "sender", "--target",
                                              f"{SERVER}:{PORT}", "--rate", str(self.paced_rate), "--duration",
                                              str(round(self.duration * 0.7, 3)), "--size", str(max(self.size, 16)))
        self.n += 1
        pace = rate or self.isolation.generator_flood_rate()
        gen = ["timeout", "-s", "INT", "-k", "5", str(self.duration), "trafgen", "-o", "eth0", "-i", str(config),
               "-P", "1", "--no-sock-mem", "-C", "-Q", *(["-b", f"{int(pace)}pps"] if pace else [])]
        start = time.monotonic()
        generator = self.start("client", gen, f"{self.n:02d}-trafgen", side="generator")
        self.group.wait_exit_sync(generator, self.duration + 30)
        seconds = time.monotonic() - start
        probe_sent = probe_arrived = 0
        latencies: list[float] = []
        if probe:
            self.group.wait_exit_sync(sender, 60)
            self.group.wait_exit_sync(sink, 60)
            probe_sent = json.loads(sender_out.read_text())["sent"]
            arrived = json.loads(sink_out.read_text())
            probe_arrived, latencies = arrived["received"], arrived["latencies"]
        else:
            time.sleep(0.3)                       # what is in flight lands
        tx1, rx1, backlog1 = self.sent_counter(), self.counter("server", "eth0", "rx_packets"), backlog_drops()
        transmitted, refused = tx1[0] - tx0[0], tx1[1] - tx0[1]
        # a frame the veth refuses (its peer's NAPI ring full) is lost on trafgen's ring path;
        # its paced path (-b) gets ENOBUFS and sends the same frame again
        lost = 0 if pace else refused
        return {"sent": transmitted + lost - probe_sent, "arrived": rx1 - rx0 - probe_arrived, "seconds": seconds,
                "dropped_at_veth": lost, "veth_refused_and_resent": refused - lost,
                "backlog_dropped_host": backlog1 - backlog0,
                "counted": (count() - c0) if count else None, "rate": rate, "latencies": latencies,
                "probe": {"sent": probe_sent, "arrived": probe_arrived} if probe else None}

    def generator_alone(self) -> dict:
        """trafgen's own top rate on its CPU (its ring path): into a veth in the client's
        namespace whose peer is down, so that it frees every frame at once (no receiver, no
        box; this kernel has no dummy device): the most any case can be offered here.  (Its
        paced path, used with a NAPI receiver, resends a refused frame forever: not measurable
        this way.)"""
        config = self.write_generator_config(SERVER, "02:00:00:00:00:01")
        self.lab.run("client", ["ip", "link", "add", GENERATOR_DUMMY, "type", "veth", "peer", "name", GENERATOR_DUMMY + "p"])
        try:
            self.lab.run("client", ["ip", "link", "set", GENERATOR_DUMMY, "up"])

            def once() -> dict:
                self.n += 1
                tx0 = self.handed(GENERATOR_DUMMY)
                start = time.monotonic()
                gen = self.start("client", ["timeout", "-s", "INT", "-k", "5", str(self.duration), "trafgen",
                                            "-o", GENERATOR_DUMMY, "-i", str(config), "-P", "1", "--no-sock-mem",
                                            "-C", "-Q"],
                                 f"{self.n:02d}-trafgen-alone", side="generator")
                self.group.wait_exit_sync(gen, self.duration + 30)
                seconds = time.monotonic() - start
                return {"sent": self.handed(GENERATOR_DUMMY) - tx0, "seconds": seconds}

            alone = self.repeated(once, key=lambda r: r["sent"] / r["seconds"])
        finally:
            self.lab.run("client", ["ip", "link", "del", GENERATOR_DUMMY], check=False)
        return {"alone_pps": round(alone["median"], 1), "runs": alone["runs"],
                "how": f"trafgen -P 1 ring path into a veth ({GENERATOR_DUMMY}) whose peer is down, on the "
                       "generator's CPU"}

    def handed(self, iface: str) -> int:
        return self.counter("client", iface, "tx_packets") + self.counter("client", iface, "tx_dropped")

    def repeated(self, run_once, key) -> dict:
        """``repeat`` runs of one measurement; the median run by ``key`` (every run's figure in ``runs``)."""
        runs = [run_once() for _ in range(self.repeat)]
        values = [key(r) for r in runs]
        middle = median(values)
        chosen = dict(min(runs, key=lambda r: abs(key(r) - middle)))
        chosen["median"] = middle
        chosen["runs"] = [round(v, 1) for v in values]
        chosen["latencies"] = [lat for r in runs for lat in r.get("latencies") or ()]
        return chosen

    def find_knee(self, unlimited_pps: float) -> tuple[int, list[dict], str]:
        """The offered rate where plain forwarding starts to lose: the highest rate of a ladder
        (fractions of the unlimited ceiling) the ceiling still delivers with loss <= KNEE_LOSS.
        The ladder also stops where the generator no longer reaches the rate it is asked for
        (then the knee is the sender's, and ``limit`` says so)."""
        steps, knee, limit = [], int(unlimited_pps * KNEE_FRACTIONS[0]), "ladder top (no loss)"
        for fraction in KNEE_FRACTIONS:
            rate = int(unlimited_pps * fraction)
            result = self.blast(rate=rate)
            loss = 1 - result["arrived"] / max(result["sent"], 1)
            offered = result["sent"] / result["seconds"]
            steps.append({"rate": rate, "offered_pps": round(offered, 1),
                          "delivered_pps": round(result["arrived"] / result["seconds"], 1), "loss": round(loss, 4)})
            if loss > KNEE_LOSS:
                limit = "the ceiling lost packets above it"
                break
            knee = rate
            if offered < GENERATOR_REACHES * rate:
                limit = "the generator fell short of the next rate"
                break
        return knee, steps, limit

    def booster_paced(self, verdict: str = "consume", batch: bool = False) -> tuple[dict, list[float]]:
        """A consuming booster: ``repeat`` blasts (median) for pps, then a paced run for its latency."""
        flags = ["--batch"] if batch else []

        def once() -> dict:
            booster, out, ready = self.role("box", "tools.bench_datapath_linux", "booster", "--control",
                                            self.control, "--port", str(PORT), "--verdict", verdict, "--wait",
                                            "600", *flags, side="booster")
            self.wait_ready(booster, ready)
            cpu0 = cpu_seconds(booster.proc.pid)
            blast = self.blast()
            time.sleep(0.5)
            blast["booster_cpu_s"] = round(cpu_seconds(booster.proc.pid) - cpu0, 3)
            consumed = self.finish(booster, out, ready)
            blast["consumed"] = consumed["received"]
            blast["batched"] = consumed.get("batched", False)
            return blast

        blast = self.repeated(once, key=lambda r: r["consumed"] / r["seconds"])
        booster, out, ready = self.role("box", "tools.bench_datapath_linux", "booster", "--control", self.control,
                                        "--port", str(PORT), "--verdict", verdict, "--wait", "600", *flags,
                                        side="booster")
        self.wait_ready(booster, ready)
        sender, _, _ = self.role("client", "tools.bench_datapath_linux", "sender", "--target", f"{SERVER}:{PORT}",
                                 "--rate", str(self.paced_rate), "--duration", str(self.paced_duration),
                                 "--size", str(max(self.size, 16)))
        self.group.wait_exit_sync(sender, self.paced_duration + 60)
        time.sleep(0.5)
        paced = self.finish(booster, out, ready)
        return blast, paced["latencies"]

    def paced(self, target: str = f"{SERVER}:{PORT}", sink_port: int = PORT) -> list[float]:
        """Stamped datagrams at ``paced_rate`` through the box, no other load; latencies at a sink."""
        sink, sink_out, sink_ready = self.role("server", "tools.bench_datapath_linux", "sink", "--bind",
                                               f"{SERVER}:{sink_port}", "--wait", "30")
        self.wait_ready(sink, sink_ready)
        sender, _, _ = self.role("client", "tools.bench_datapath_linux", "sender", "--target", target,
                                 "--rate", str(self.paced_rate), "--duration", str(self.paced_duration),
                                 "--size", str(max(self.size, 16)))
        self.group.wait_exit_sync(sender, self.paced_duration + 60)
        self.group.wait_exit_sync(sink, 60)
        return json.loads(sink_out.read_text())["latencies"]


def backlog_drops() -> int:
    """Packets the host's CPUs dropped at their input backlog (``netdev_max_backlog``, where a
    veth without NAPI delivers), all namespaces and all jobs on the machine together."""
    try:
        lines = Path("/proc/net/softnet_stat").read_text().split("\n")
    except OSError:
        return 0
    return sum(int(line.split()[1], 16) for line in lines if line.strip())


def case(name: str, engine: str, rules: int, pps: float, loss: float, latencies: list[float] | None,
         **extra) -> dict:
    """One JSON case.  ``offered_pps`` (the generator's rate in that blast) tells a case the box
    kept up with (loss 0: ``pps`` is the generator's limit, a lower bound of the box's) from one
    it could not."""
    latency = summary(latencies, (50, 99), digits=1) if latencies else {"p50": None, "p99": None}
    return {"case": name, "engine": engine, "rules": rules, "pps": round(pps, 1), "loss": round(max(0.0, loss), 4),
            "latency_us": latency, **extra}


def generator_bound(blast: dict) -> dict:
    """A drop that lost nothing dropped all the generator sent: its rate is the generator's,
    a lower bound of the box's."""
    bound = blast["counted"] >= blast["sent"] and blast.get("dropped_at_veth", 0) == 0
    return {"generator_bound": bound, "generator_sent_pps": round(blast["sent"] / blast["seconds"], 1)}


def _blast_fields(blast: dict, value: float) -> dict:
    """What every case records of its (median) blast."""
    return {"sent": blast["sent"], "offered_pps": round(blast["sent"] / blast["seconds"], 1),
            "dropped_at_veth": blast.get("dropped_at_veth", 0),
            "veth_refused_and_resent": blast.get("veth_refused_and_resent", 0),
            "backlog_dropped_host": blast.get("backlog_dropped_host", 0),
            "pps_runs": blast["runs"], "median_of": len(blast["runs"]), "median_run_pps": round(value, 1)}


def run(args: argparse.Namespace) -> dict:
    """Called by ``booster-loadgen datapath --engine xdp``; returns the figures."""
    from boxcore.lab import Lab
    from cliruntime import ConfigError

    if os.geteuid() != 0:
        raise ConfigError("the xdp data-path benchmark needs root (it builds a lab of namespaces)")
    if shutil.which("trafgen") is None:
        raise ConfigError("the xdp data-path benchmark needs trafgen (Debian package netsniff-ng)")
    if shutil.which("taskset") is None:
        raise ConfigError("the xdp data-path benchmark needs taskset (Debian package util-linux)")
    from boxcore.engines.xdp import XdpEngine

    problem = XdpEngine.problem()
    if problem:
        raise ConfigError(problem)
    cases: list[dict] = []
    load_at_start = os.getloadavg()
    isolation = Isolation(not getattr(args, "no_isolation", False), float(getattr(args, "cpu_budget", 1.0)),
                          receive=getattr(args, "box_receive", "softirq"),
                          priority=int(getattr(args, "box_receive_priority", 50)))
    try:
        with tempfile.TemporaryDirectory(prefix="bbdpxdp") as tmp, Lab.up("transparent") as lab:
            workdir = Path(tmp)
            os.chmod(workdir, 0o755)
            bench = Bench(lab, workdir, args, isolation)
            try:
                knee = measure(bench, lab, args, cases)
            finally:
                bench.group.stop_all_sync()
                isolation.restore_receive(lab)
    finally:
        isolation.cleanup()
    result = figures(cases, args)
    result["isolation"] = isolation.describe()
    result["load_average"] = {"start": [round(v, 2) for v in load_at_start],
                              "end": [round(v, 2) for v in os.getloadavg()]}
    result["generator_alone"] = knee.pop("generator")
    result["drop"]["generator_alone_pps"] = result["generator_alone"]["alone_pps"]
    result["knee"] = knee
    result["program_ns"] = program_cost(int(args.size))
    return result


def measure(bench: Bench, lab, args: argparse.Namespace, cases: list[dict]) -> dict:
    """Every case, in one lab; returns how the knee rate was found."""
    bench.isolation.threaded_receive(lab)
    # the server counts the generator's packets on its interface and drops them early
    lab.run("server", ["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--sport", str(GENERATOR_SPORT),
                       "-j", "DROP"])
    # fan-out members other than the latency sink's port: dropped early too (no ICMP storms)
    lab.run("server", ["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport",
                       f"{PORT + 2}:{PORT + FANOUT_MEMBERS}", "-j", "DROP"])

    def delivered(r: dict) -> float:
        return r["arrived"] / r["seconds"]

    def loss_of(r: dict) -> float:
        return 1 - r["arrived"] / max(r["sent"], 1)

    generator = bench.generator_alone()
    # ---- plain kernel forwarding: as fast as the generator sends, then the knee, then at the knee
    unlimited = bench.repeated(bench.blast, key=delivered)
    knee_rate, steps, knee_limit = bench.find_knee(unlimited["median"])
    latency_rate = int(knee_rate * LATENCY_LOAD)
    cases.append(case("ceiling", "linux", 0, unlimited["median"], loss_of(unlimited), bench.paced(),
                      offered="unlimited", **_blast_fields(unlimited, unlimited["median"])))
    at_knee = bench.repeated(lambda: bench.blast(rate=knee_rate, probe=True), key=delivered)
    cases.append(case("ceiling", "linux", 0, at_knee["median"], loss_of(at_knee), at_knee["latencies"],
                      offered=knee_rate, offered_share_of_knee=1.0, latency_from="probe during the load",
                      **_blast_fields(at_knee, at_knee["median"])))
    below = bench.repeated(lambda: bench.blast(rate=latency_rate, probe=True), key=delivered)
    cases.append(case("ceiling", "linux", 0, below["median"], loss_of(below), below["latencies"],
                      offered=latency_rate, offered_share_of_knee=LATENCY_LOAD, latency_from="probe during the load",
                      **_blast_fields(below, below["median"])))

    # ---- the same, with an XDP program attached that passes everything (no boxd): what any XDP
    # program costs on this interface (on veth: its NAPI mode), apart from boxd's classifier
    if NOOP_OBJECT.exists():
        lab.run("box", ["ip", "link", "set", "dev", BOX_INGRESS, "xdpdrv", "obj", str(NOOP_OBJECT), "sec", "xdp"])
        try:
            bench.isolation.pin_receive()      # attaching XDP may have rebuilt the NAPI thread
            noop = bench.repeated(lambda: bench.blast(rate=knee_rate, probe=True), key=delivered)
        finally:
            lab.run("box", ["ip", "link", "set", "dev", BOX_INGRESS, "xdpdrv", "off"])
            bench.isolation.pin_receive()
        cases.append(case("ceiling", "linux", 0, noop["median"], loss_of(noop), noop["latencies"],
                          offered=knee_rate, offered_share_of_knee=1.0, latency_from="probe during the load",
                          xdp="a no-op program (XDP_PASS) attached", **_blast_fields(noop, noop["median"])))

    # ---- xdp
    bench.start_boxd("xdp")
    try:
        for count in (1, 100, 1000):
            proc, out, ready = bench.rules_role("pass", count, timeout=300)
            for rate, share in ((knee_rate, 1.0), (latency_rate, LATENCY_LOAD)):
                blast = bench.repeated(lambda rate=rate: bench.blast(rate=rate, probe=True), key=delivered)
                cases.append(case("pass", "xdp", count, blast["median"], loss_of(blast), blast["latencies"],
                                  offered=rate, offered_share_of_knee=share, latency_from="probe during the load",
                                  **_blast_fields(blast, blast["median"])))
            bench.finish(proc, out, ready)

        proc, out, ready = bench.rules_role("drop")
        blast = bench.repeated(lambda: bench.blast(count=bench.rule_packets),
                               key=lambda r: r["counted"] / r["seconds"])
        cases.append(case("drop", "xdp", 1, blast["median"], 1 - blast["counted"] / max(blast["sent"], 1), None,
                          offered="unlimited", leaked_to_server=blast["arrived"], **generator_bound(blast),
                          **_blast_fields(blast, blast["median"])))
        bench.finish(proc, out, ready)

        consume_cases(bench, "xdp", cases)

        def copy_blast() -> dict:
            proc, out, ready = bench.rules_role("copy")
            result = bench.blast(rate=knee_rate, probe=True)
            time.sleep(0.5)
            result["copies"] = bench.finish(proc, out, ready).get("received", 0)
            return result
        blast = bench.repeated(copy_blast, key=delivered)
        cases.append(case("copy", "xdp", 1, blast["median"], loss_of(blast), blast["latencies"], offered=knee_rate,
                          latency_from="probe during the load", copies_received=blast["copies"],
                          copies_pps=round(blast["copies"] / blast["seconds"], 1),
                          **_blast_fields(blast, blast["median"])))

        proc, out, ready = bench.rules_role("fanout")
        time.sleep(0.5)                 # neighbour resolution of the members
        blast = bench.repeated(bench.blast, key=delivered)
        latencies = bench.paced(sink_port=PORT + 1)
        bench.finish(proc, out, ready)
        cases.append(case("fanout", "xdp", 1, blast["median"], 1 - blast["arrived"] / max(blast["sent"] * FANOUT_MEMBERS, 1),
                          latencies, members=FANOUT_MEMBERS, offered="unlimited", datagrams_out=blast["arrived"],
                          **_blast_fields(blast, blast["median"])))
    finally:
        bench.stop_boxd()

    # ---- linux, same run
    bench.start_boxd("linux")
    try:
        consume_cases(bench, "linux", cases)
        if getattr(args, "linux_pass_rules", 0):
            proc, out, ready = bench.rules_role("pass", args.linux_pass_rules, timeout=900)
            blast = bench.repeated(lambda: bench.blast(rate=knee_rate, probe=True), key=delivered)
            cases.append(case("pass", "linux", args.linux_pass_rules, blast["median"], loss_of(blast),
                              blast["latencies"], offered=knee_rate, offered_share_of_knee=1.0,
                              latency_from="probe during the load",
                              **_blast_fields(blast, blast["median"])))
            bench.finish(proc, out, ready)
    finally:
        bench.stop_boxd()

    # ---- the user-space sendmmsg reflector, same run
    def reflector_blast() -> dict:
        proc, out, ready = bench.role("box", "tools.bench_datapath_xdp", "reflector", side="booster")
        bench.wait_ready(proc, ready)
        cpu0 = cpu_seconds(proc.proc.pid)
        result = bench.blast(dst=BOX_CLIENT_SIDE)
        result["reflector_cpu_s"] = round(cpu_seconds(proc.proc.pid) - cpu0, 3)
        result["reflector"] = bench.finish(proc, out, ready)
        return result
    blast = bench.repeated(reflector_blast, key=delivered)
    # a fresh reflector for the latency run (the blast's backlog would reach the sink)
    proc, out, ready = bench.role("box", "tools.bench_datapath_xdp", "reflector", side="booster")
    bench.wait_ready(proc, ready)
    latencies = bench.paced(target=f"{BOX_CLIENT_SIDE}:{PORT}", sink_port=PORT + 1)
    bench.finish(proc, out, ready)
    cases.append(case("fanout", "user", 0, blast["median"], 1 - blast["arrived"] / max(blast["sent"] * FANOUT_MEMBERS, 1),
                      latencies, members=FANOUT_MEMBERS, offered="unlimited", datagrams_out=blast["arrived"],
                      reflector=blast["reflector"], reflector_cpu_s=blast["reflector_cpu_s"],
                      **_blast_fields(blast, blast["median"])))
    return {"rate": knee_rate, "loss_bound": KNEE_LOSS, "ladder": steps, "limit": knee_limit,
            "unlimited_ceiling_pps": round(unlimited["median"], 1), "generator": generator}


def consume_cases(bench: Bench, engine: str, cases: list[dict]) -> None:
    """The same consuming Python booster, per packet and asking for batches
    (``Subscription.receive_batches``: granted on a socket delivery, refused on nfqueue, whose
    receiver already reads and gives verdicts in batches)."""
    for batch in (False, True):
        blast, latencies = bench.booster_paced(batch=batch)
        cases.append(case("redirect_consume_batch" if batch else "redirect_consume", engine, 1, blast["median"],
                          1 - blast["consumed"] / max(blast["sent"], 1), latencies, offered="unlimited",
                          passed_to_server=blast["arrived"], booster_cpu_s=blast["booster_cpu_s"],
                          consumed_per_booster_cpu_s=round(blast["consumed"] / max(blast["booster_cpu_s"], 1e-3), 1),
                          batched=blast["batched"], **_blast_fields(blast, blast["median"])))


def program_cost(size: int, repeat: int = 200_000) -> dict[str, float]:
    """The XDP program's own run time per packet (kernel-timed BPF_PROG_TEST_RUN, ``repeat`` runs)
    for a packet that matches no rule, with 1 / 100 / 1000 rules installed (as in the pass cases)."""
    from boxcore.engines import libbpf as bpf
    from boxcore.engines.xdp_maps import Datapath
    from boxcore.packet import Packet
    from boxcore.rules import Action, Match, Rule

    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + Packet(17, CLIENT, GENERATOR_SPORT, SERVER, PORT, b"\0" * size).to_ip()
    out: dict[str, float] = {}
    dp = Datapath()
    try:
        dp.set_config(lease_until_ns=2**64 - 1)
        installed = 0
        for count in (1, 100, 1000):
            while installed < count:
                dp.add(Rule(Match(proto="udp", dst_port=OTHER_PORTS + installed), Action.DROP, cookie=installed + 1))
                installed += 1
            timing: list[int] = []
            bpf.prog_test_run(dp.xdp_fd, frame, repeat=repeat, timing=timing)
            out[f"pass_{count}_rules"] = float(timing[0])
        dp.add(Rule(Match(proto="udp", dst_port=PORT), Action.DROP, cookie=10_000))
        timing = []
        bpf.prog_test_run(dp.xdp_fd, frame, repeat=repeat, timing=timing)
        out["drop_1000_rules"] = float(timing[0])
    finally:
        dp.close()
    return out


def _find(cases: list[dict], name: str, engine: str, rules: int | None = None, *,
          at_rate: bool | None = None, noop_xdp: bool = False, share: float = 1.0) -> dict | None:
    """The case by name and engine (``at_rate``: True = offered a share of the knee rate, False =
    unlimited; ``share``: that share, 1.0 = the knee itself; ``noop_xdp``: the ceiling with the
    no-op XDP program attached)."""
    return next((c for c in cases if c["case"] == name and c["engine"] == engine
                 and (rules is None or c["rules"] == rules)
                 and (at_rate is None or (c.get("offered") != "unlimited") == at_rate)
                 and c.get("offered_share_of_knee", 1.0) == share
                 and ("xdp" in c) == noop_xdp), None)


def figures(cases: list[dict], args: argparse.Namespace) -> dict:
    ceiling = _find(cases, "ceiling", "linux", at_rate=False)
    ceiling_at_knee = _find(cases, "ceiling", "linux", at_rate=True)
    ceiling_noop = _find(cases, "ceiling", "linux", at_rate=True, noop_xdp=True) or {"pps": None, "loss": 1}
    pass1, pass1000 = _find(cases, "pass", "xdp", 1), _find(cases, "pass", "xdp", 1000)
    # the latency target's figures: offered LATENCY_LOAD of the knee (the path's latency, not a queue's)
    pass1_below = _find(cases, "pass", "xdp", 1, share=LATENCY_LOAD) or {"latency_us": {"p50": None, "p99": None}}
    pass1000_below = _find(cases, "pass", "xdp", 1000, share=LATENCY_LOAD) or {"latency_us": {"p50": None, "p99": None}}
    drop = _find(cases, "drop", "xdp")
    consume_xdp, consume_linux = _find(cases, "redirect_consume", "xdp"), _find(cases, "redirect_consume", "linux")
    fan_xdp, fan_user = _find(cases, "fanout", "xdp"), _find(cases, "fanout", "user")
    batch_xdp = _find(cases, "redirect_consume_batch", "xdp")
    batch_linux = _find(cases, "redirect_consume_batch", "linux")

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    ratios = {
        # both offered the knee rate (where plain forwarding starts to lose): the box, not the sender
        "pass1000_over_ceiling": ratio(pass1000["pps"], ceiling_at_knee["pps"]),
        # the box alone: the share of what the generator really offered that arrived, pass over ceiling
        "pass1000_delivered_share_over_ceiling": ratio(1 - pass1000["loss"], 1 - ceiling_at_knee["loss"]),
        # what attaching any XDP program costs here, and boxd's classifier apart from that
        "noop_xdp_over_ceiling": ratio(ceiling_noop["pps"], ceiling_at_knee["pps"]),
        "pass1000_over_noop_xdp": ratio(pass1000["pps"], ceiling_noop["pps"]),
        # the probe stream while the generator offers LATENCY_LOAD of the knee rate: the target's figure
        "pass1000_p50_over_pass1_p50": ratio(pass1000_below["latency_us"]["p50"], pass1_below["latency_us"]["p50"]),
        "pass1000_p99_over_pass1_p99": ratio(pass1000_below["latency_us"]["p99"], pass1_below["latency_us"]["p99"]),
        # the same probe while it offers the knee rate itself (a queue builds up: kept, not the target's)
        "pass1000_p50_over_pass1_p50_at_knee": ratio(pass1000["latency_us"]["p50"], pass1["latency_us"]["p50"]),
        "drop_over_linux_consume": ratio(drop["pps"], consume_linux["pps"]),
        # the headline: the same booster code asking for batches (Subscription.receive_batches):
        # recvmmsg-style reads of its socket on xdp, the nfqueue receiver's own batches on linux
        "xdp_consume_over_linux_consume": ratio(batch_xdp["pps"], batch_linux["pps"]),
        "xdp_per_packet_consume_over_linux_consume": ratio(consume_xdp["pps"], consume_linux["pps"]),
        "xdp_fanout_over_user_fanout": ratio(fan_xdp["pps"], fan_user["pps"]),
        # contention-proof: packets consumed per CPU-second the Python booster spent
        "xdp_consume_per_cpu_over_linux": ratio(batch_xdp.get("consumed_per_booster_cpu_s"),
                                                batch_linux.get("consumed_per_booster_cpu_s")),
        "xdp_per_packet_consume_per_cpu_over_linux": ratio(consume_xdp.get("consumed_per_booster_cpu_s"),
                                                           consume_linux.get("consumed_per_booster_cpu_s")),
    }
    met = {
        "pass1000_ge_0.95_ceiling": (ratios["pass1000_over_ceiling"] or 0) >= 0.95,
        "pass1000_p50_within_10pct": ratios["pass1000_p50_over_pass1_p50"] is not None
        and abs(ratios["pass1000_p50_over_pass1_p50"] - 1) <= 0.10,
        "drop_ge_10x_linux_consume": (ratios["drop_over_linux_consume"] or 0) >= 10,
        "consume_ge_3x_linux": (ratios["xdp_consume_over_linux_consume"] or 0) >= 3,
        "fanout_ge_5x_user": (ratios["xdp_fanout_over_user_fanout"] or 0) >= 5,
    }
    # is drop the box's rate or the generator's?  What 10x the linux consume would need.
    drop_figures = {"generator_bound": drop.get("generator_bound"), "generator_sent_pps": drop.get("generator_sent_pps"),
                    "dropped_pps": drop["pps"],
                    "needed_for_10x_linux_consume_pps": round(10 * consume_linux["pps"], 1) if consume_linux["pps"] else None}
    return {"engine": "xdp", "topology": "transparent", "generator": "trafgen -P 1 (one static frame)",
            "ceiling_pps": ceiling["pps"], "payload_bytes": int(args.size), "duration_s": float(args.duration),
            "repeat": int(args.repeat), "statistic": "median of the repeats",
            "latency_load_share_of_knee": LATENCY_LOAD, "paced_rate": int(args.paced_rate), "cases": cases,
            "ratios": ratios, "target_met": met, "drop": drop_figures}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    short = {"redirect_consume": "consume", "redirect_consume_batch": "consume\n(batches)"}
    labels = [f"{short.get(c['case'], c['case'])}\n{c['engine']}" + (f" {c['rules']}r" if c["case"] == "pass" else "")
              + ("" if c.get("offered", "unlimited") == "unlimited"
                 else "\n@knee" if c.get("offered_share_of_knee", 1.0) == 1.0 else f"\n@{c['offered_share_of_knee']:g} knee")
              + ("\nno-op XDP" if "xdp" in c else "")
              for c in cases]
    colors = {"xdp": "tab:green", "linux": "tab:blue", "user": "tab:orange"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(20, 6.5))
    ax1.bar(range(len(cases)), [c["pps"] for c in cases], color=[colors[c["engine"]] for c in cases])
    offered = [(i, c["offered_pps"] * (c.get("members") or 1)) for i, c in enumerate(cases) if c.get("offered_pps")]
    ax1.scatter([i for i, _ in offered], [v for _, v in offered], marker="_", s=600, color="black",
                label="offered by the generator (x members for fan-out)")
    ax1.legend(fontsize=7, loc="lower left")
    ax1.set_yscale("log")
    ax1.set_ylabel("packets/s (fan-out: datagrams/s delivered)")
    ax1.set_xticks(range(len(cases)), labels, fontsize=7, rotation=45)
    ax1.set_title(f"throughput (ceiling {result['ceiling_pps']:,.0f} pps)")
    with_latency = [c for c in cases if c["latency_us"]["p50"] is not None]
    x = range(len(with_latency))
    ax2.bar([i - 0.2 for i in x], [c["latency_us"]["p50"] for c in with_latency], width=0.4, label="p50",
            color=[colors[c["engine"]] for c in with_latency])
    ax2.bar([i + 0.2 for i in x], [c["latency_us"]["p99"] for c in with_latency], width=0.4, label="p99",
            color="lightgray")
    ax2.set_yscale("log")
    ax2.set_ylabel("one-way latency (us)")
    ax2.set_title("latency: probe during the load (@knee, @0.5 knee), else a paced run")
    ax2.set_xticks(list(x), [labels[cases.index(c)] for c in with_latency], fontsize=7, rotation=45)
    ax2.legend()
    iso = result.get("isolation", {})
    fig.suptitle("booster box data path: xdp engine vs linux engine vs user space (one run, median of "
                 f"{result.get('repeat', 1)}; knee {result.get('knee', {}).get('rate', 0):,} pps; "
                 f"{'generator and box on separate CPUs and cgroups' if iso.get('isolated') else 'not isolated'}; "
                 f"box receive: {iso.get('box_receive', 'softirq')})")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(role_main(sys.argv[1:]))
