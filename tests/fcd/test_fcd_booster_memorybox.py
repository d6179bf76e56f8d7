"""The booster's packet path through the real booster library and controller (MemoryBox, the
in-process box with the memory engine): the per-packet handler path used by engines that do not
delegate a socket."""

from boxcore.packet import Packet
from boxcore.rules import Match
from boxcore.testing import MemoryBox
from fcd import wire
from fcd.aggregate import Aggregator
from fcd.booster import BoxAggregator, read_delegated_socket
from fcd.rpc import KeepAliveClient, ReliableUplink
from fcd.trace import Trace


async def test_redirected_packets_become_queued_reports(tmp_path, small_trace):
    short = Trace(small_trace.city, small_trace.probes[small_trace.probes["t"] < 45],
                  small_trace.lights[small_trace.lights["t"] < 45])
    uplink = ReliableUplink(KeepAliveClient("127.0.0.1", 9))      # never started: we read its queue
    agg = BoxAggregator(short.city, "mem", uplink)
    async with MemoryBox(state=tmp_path) as box:
        booster = await box.connect("fcd-booster")
        sub = await booster.redirect(Match(proto="udp", dst="10.0.0.9", dst_port=7000), agg.on_packet)
        assert read_delegated_socket(sub, agg) is False     # no socket to take over here
        seq = 0
        for t, probes, lights in short.steps():
            data = wire.probes_from_trace(probes, 3, seq)
            seq += len(probes)
            payloads = [data[i * wire.PROBE_SIZE:(i + 1) * wire.PROBE_SIZE] for i in range(len(probes))]
            payloads += [wire.encode(wire.LightChange(3, seq + k, int(ch["light"]), t, int(ch["phase"]),
                                                      int(ch["green"]))) for k, ch in enumerate(lights)]
            seq += len(lights)
            for payload in payloads:
                outcome = await box.inject(Packet(17, "10.0.1.5", 40000, "10.0.0.9", 7000, payload))
                assert outcome.action == "consumed"
        outcome = await box.inject(Packet(17, "10.0.1.5", 40000, "10.0.0.9", 7001, b"other port"))
        assert outcome.action != "consumed"
        assert all(p.dport != 7000 for p in box.sent())            # nothing for the server left the box
    agg.flush()
    expected = Aggregator(short.city)
    want = []
    for t, probes, lights in short.steps():
        expected.feed(probes)
        for ch in lights:
            want += [r.to_xmlrpc() for r in expected.light_change(int(ch["light"]), t, int(ch["green"]))]
    queued = [rep for _, method, params in uplink.queue if method == "fcd.report" for rep in params[1]]
    assert queued == want and len(want) > 10
    assert agg.counters()["received"] == seq and agg.counters()["lost"] == 0
