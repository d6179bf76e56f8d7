"""np4gs3-emu in namespaces: forwarding, redirect, copy, drop, multicast, tables over the
real control interface (AF_PACKET), npctl, and malformed control frames."""

import json
import signal
import socket
import subprocess

import pytest

from npdrv import netns, wire
from npdrv.card import COPY_MAC
from npdrv.driver import NpDriver, NpTimeout
from npdrv.wire import NpAction, NpRule, Scope, Table

from npdrv_netlab import MARKER, VENV_BIN, card_lab, receive_until_marker

pytestmark = pytest.mark.root
UDP = dict(proto=17, proto_mask=0xFF)


def _sniffer(lab, ns, ifname):
    sock = lab.socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))   # ETH_P_ALL: both ways
    sock.bind((ifname, 3))
    sock.settimeout(0.05)
    return sock


def _sniffed(sock, dport):
    frames = []
    while True:
        try:
            frame = sock.recv(65535)
        except (socket.timeout, BlockingIOError):
            return frames
        if len(frame) >= 38 and frame[12:14] == b"\x08\x00" and frame[23] == 17 and int.from_bytes(frame[36:38], "big") == dport:
            frames.append(frame)


def _recv_all(sock, expect, wait=2.0):
    got = []
    sock.settimeout(wait)
    try:
        while len(got) < expect:
            got.append(sock.recvfrom(2048))
            sock.settimeout(0.2)
    except socket.timeout:
        pass
    return got


def _nothing_waiting(sock) -> bool:
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(2048)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(timeout)
    return False


async def _driver(lab):
    with netns.inside(lab.box):
        return await NpDriver("npc", timeout=0.3, retries=3).open()


async def test_card_forwards_redirects_copies_drops_and_multicasts(tmp_path):
    with card_lab(tmp_path) as lab:
        np = await _driver(lab)
        try:
            client_mac, server_mac = lab.mac(lab.client, "eth0"), lab.mac(lab.server, "eth0")
            await np.code_load("booster")
            await np.fwd_add("10.2.0.2/32", port=1, next_hop=server_mac)
            await np.fwd_add("10.1.0.2/32", port=0, next_hop=client_mac)
            await np.execute([
                wire.request(NpRule(1, 100, NpAction.REDIRECT, **UDP, dport=(7000, 7000))),
                wire.request(NpRule(2, 100, NpAction.COPY, **UDP, dport=(7001, 7001))),
                wire.request(NpRule(3, 100, NpAction.DROP, **UDP, dport=(7002, 7002))),
                wire.request(NpRule(4, 100, NpAction.MULTICAST, group=5, **UDP, dst=wire.ip_int("10.1.0.1"),
                                    dst_mask=0xFFFFFFFF, dport=(9000, 9000))),
            ])
            await np.mcast_set(5, [("10.2.0.2", 4000), ("10.2.0.2", 4001)])
            client = lab.udp(lab.client, ("10.1.0.2", 4002))
            servers = {port: lab.udp(lab.server, ("0.0.0.0", port)) for port in (4000, 4001, 7000, 7001, 7002, 7003)}
            np0 = _sniffer(lab, lab.box, "np0")
            np1 = _sniffer(lab, lab.box, "np1")

            # Plain forwarding by the card: MACs rewritten, TTL decremented, the box never sees it.
            for i in range(5):
                client.sendto(b"fwd%d" % i, ("10.2.0.2", 7003))
            assert len(_recv_all(servers[7003], 5)) == 5
            assert _sniffed(np0, 7003) == [] and _sniffed(np1, 7003) == []

            # Redirect: up the host interface of the ingress port; the box's kernel (a router,
            # no booster bound) forwards it on through np1: the fail-open path.
            client.sendto(b"redirect me", ("10.2.0.2", 7000))
            assert _recv_all(servers[7000], 1)[0][0] == b"redirect me"
            assert len(_sniffed(np0, 7000)) == 1 and len(_sniffed(np1, 7000)) == 1

            # Copy: the server gets the original from the card, the box a tagged copy that
            # its kernel does not forward (ip_forward is on: only the tag stops it).  A marker
            # redirected after it takes the way a forwarded copy would (up np0, out np1): once
            # the marker is in, a second "copy me" would have been too.
            client.sendto(b"copy me", ("10.2.0.2", 7001))
            assert _recv_all(servers[7001], 1)[0][0] == b"copy me"
            client.sendto(MARKER, ("10.2.0.2", 7000))
            assert receive_until_marker(servers[7000]) == []
            assert _nothing_waiting(servers[7001])
            (copy,) = _sniffed(np0, 7001)
            assert copy[:6] == COPY_MAC

            # Drop: a marker the card forwards after it proves the card handled the dropped one.
            client.sendto(b"drop me", ("10.2.0.2", 7002))
            client.sendto(MARKER, ("10.2.0.2", 7003))
            assert receive_until_marker(servers[7003]) == []
            assert _nothing_waiting(servers[7002])

            # Multicast: one frame to the group address, one copy per member, from the sender.
            client.sendto(b"to the group", ("10.1.0.1", 9000))
            got = _recv_all(servers[4000], 1) + _recv_all(servers[4001], 1)
            assert [(d, a) for d, a in got] == [(b"to the group", ("10.1.0.2", 4002))] * 2

            counts = {r.rule.rule_id: r.packets for r in await np.dump(Table.RULES)}
            assert counts == {1: 2, 2: 1, 3: 1, 4: 1}          # the redirect rule saw a marker too
            rx = await np.counters(Scope.PORT_RX, 0)
            assert rx.packets >= 11
        finally:
            await np.close()
        stats = lab.stop_emulator()["emulator"]
        assert stats["card"]["forwarded"] >= 5 and stats["card"]["mcast_copies"] == 2
        wall, modelled = stats["latency_us"]["wall_port_to_port"], stats["latency_us"]["modelled"]
        assert wall["count"] >= 5 and 12 <= modelled["p50_us"] <= 18


async def test_tables_round_trip_over_the_control_interface_and_npctl(tmp_path):
    with card_lab(tmp_path) as lab:
        np = await _driver(lab)
        try:
            await np.code_load("booster")
            rules = [NpRule(i, i % 7, NpAction.REDIRECT if i % 2 else NpAction.COPY, **UDP, dport=(i, i + i % 3),
                            src=wire.ip_int("10.1.0.0"), src_mask=0xFFFFFF00,
                            patterns=(wire.Pattern(2, b"\x01\x00", b"\xff\x0f"),) if i % 5 == 0 else ())
                     for i in range(1, 151)]
            await np.execute([wire.request(r) for r in rules])
            routes = [wire.FwdAdd(f"10.{i}.0.0/16", i % 2, f"02:00:00:00:{i:02x}:01") for i in range(3, 60)]
            await np.execute([wire.request(r) for r in routes])
            await np.mcast_set(3, [("10.2.0.2", 5000 + i) for i in range(50)])
            dumped = await np.dump(Table.RULES)                     # several fragments
            # The dump lists the table in match order: priority, then id.
            assert [r.rule for r in dumped] == sorted(rules, key=lambda r: (-r.priority, r.rule_id))
            assert sorted(await np.dump(Table.FORWARDING), key=lambda r: r.network) == \
                sorted(routes, key=lambda r: r.network)
            (group,) = await np.dump(Table.MULTICAST)
            assert group.group == 3 and len(group.members) == 50
            await np.rule_delete(5)
            assert 5 not in {r.rule.rule_id for r in await np.dump(Table.RULES)}
        finally:
            await np.close()
        npctl = [str(VENV_BIN / "npctl"), "--netns", lab.box, "--iface", "npc"]
        out = subprocess.run(npctl + ["--json", "tables", "fwd"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)) == len(routes)
        out = subprocess.run(npctl + ["echo", "hi"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.startswith("hi")
        out = subprocess.run(npctl + ["fwd", "del", "10.250.0.0/16"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "FWD_DELETE failed: NOT_FOUND" in out.stderr
        out = subprocess.run(npctl + ["fwd", "add", "10.0.0.0/33", "1"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and "error" in out.stderr


async def test_card_survives_malformed_control_frames_and_driver_times_out_on_silence(tmp_path):
    with card_lab(tmp_path) as lab:
        raw = lab.socket(lab.box, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(wire.ETHERTYPE))
        raw.bind(("npc", wire.ETHERTYPE))
        src = raw.getsockname()[4]
        garbage = [b"", b"\x01", b"\x02" * 40, wire.HEADER.pack(1, 0, 5, 0, 1) + b"\x01\x00\xff\xff"]
        for payload in garbage:
            raw.send(wire.ETH_HEADER.pack(wire.BROADCAST, src, wire.ETHERTYPE) + payload)
        np = await _driver(lab)
        try:
            assert await np.echo(b"still alive") == b"still alive"
        finally:
            await np.close()
        # A card that stops answering (the process frozen): the driver names the command that
        # timed out; once the card runs again its late replies are ignored as stale.
        with netns.inside(lab.box):
            np = await NpDriver("npc", timeout=0.05, retries=1).open()
        try:
            lab.emu.proc.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(NpTimeout) as err:
                    await np.fwd_add("10.9.0.0/16", port=1)
            finally:
                lab.emu.proc.send_signal(signal.SIGCONT)
            assert "FWD_ADD failed: TIMEOUT" in str(err.value) and np.stats["retries"] == 1
            assert await np.echo(b"back") == b"back"      # replies come in order: the stale ones first
            assert np.stats["stale"] == 2
        finally:
            await np.close()
        stats = lab.stop_emulator()["emulator"]["control"]
        assert stats["malformed"] == len(garbage)
        assert stats["duplicate_requests"] == 1           # the resent FWD_ADD ran once


async def test_tcp_bulk_transfer_through_the_card(tmp_path):
    """Wire-sized frames only (segmentation offload is off on the card's peers): a TCP
    transfer in both directions is forwarded by the card's LPM table alone."""
    import asyncio
    import threading

    with card_lab(tmp_path) as lab:
        np = await _driver(lab)
        try:
            await np.fwd_add("10.2.0.2/32", port=1, next_hop=lab.mac(lab.server, "eth0"))
            await np.fwd_add("10.1.0.2/32", port=0, next_hop=lab.mac(lab.client, "eth0"))
        finally:
            await np.close()
        listener = lab.socket(lab.server, socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("10.2.0.2", 8000))
        listener.listen(1)
        received = []

        def serve():
            conn, _ = listener.accept()
            with conn:
                total = 0
                while chunk := conn.recv(65536):
                    total += len(chunk)
                conn.sendall(str(total).encode())
            received.append(total)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client = lab.socket(lab.client, socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(10)
        data = bytes(range(256)) * 4096          # 1 MiB
        await asyncio.to_thread(client.connect, ("10.2.0.2", 8000))
        await asyncio.to_thread(client.sendall, data)
        client.shutdown(socket.SHUT_WR)
        answer = await asyncio.to_thread(client.recv, 100)
        client.close()
        thread.join(10)
        listener.close()
        assert answer == str(len(data)).encode() and received == [len(data)]
        stats = lab.stop_emulator()["emulator"]
        assert stats["card"]["forwarded"] > len(data) // 1500 and not stats["adapter"]
