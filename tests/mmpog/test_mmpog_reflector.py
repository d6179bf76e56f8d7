"""Reflector membership and anti-spoofing: the sans-IO core in memory, then the real process over sockets."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from boxcore.procs import free_port
from mmpog import wire
from mmpog.reliability import BufferFull, MembersChanged, ReflectorConfig, ReflectorCore
from mmpog.wire import Flag, Header, Kind

# these tests are about resends and fan-out: a path taken as clean from the start (no redundant copies;
# the default is a conservative start that copies until the path shows itself clean, test_mmpog_redundancy)
CLEAN_PATH = dict(loss_prior=0.01)

LOC = 3
ALICE, BOB = ("127.0.0.1", 4001), ("127.0.0.1", 4002)
TOKEN_A, TOKEN_B = b"a" * 16, b"b" * 16


def hello(player, token, location=LOC, pid=77):
    return wire.encode(Header(Kind.HELLO, rto_ms=40, location=location, sender=player, packet_id=pid), token)


def data(player, pid, payload=b"x", reliable=False, location=LOC):
    return wire.encode(Header(Kind.DATA, int(Flag.RELIABLE) if reliable else 0, 40, location, player, pid), payload)


def bound_core(config=None):
    core = ReflectorCore(config or ReflectorConfig(**CLEAN_PATH))
    core.add_member(LOC, 1, TOKEN_A)
    core.add_member(LOC, 2, TOKEN_B)
    core.receive_datagram(hello(1, TOKEN_A), ALICE, 0.0)
    core.receive_datagram(hello(2, TOKEN_B), BOB, 0.0)
    core.datagrams_to_send(0.0)
    while core.next_event():
        pass
    return core


def test_hello_with_valid_token_binds_and_is_welcomed_without_amplification():
    core = ReflectorCore(ReflectorConfig(**CLEAN_PATH))
    core.add_member(LOC, 1, TOKEN_A)
    request = hello(1, TOKEN_A, pid=1234)
    core.receive_datagram(request, ALICE, 0.0)
    [(reply, dest)] = core.datagrams_to_send(0.0)
    header, _ = wire.decode(reply)
    assert dest == ALICE and header.kind is Kind.WELCOME and header.packet_id == 1234
    assert len(reply) < len(request)
    assert core.next_event() == MembersChanged(LOC, (ALICE,))
    assert core.members(LOC) == (ALICE,)


@pytest.mark.parametrize("player, token, location", [
    (1, b"z" * 16, LOC),      # wrong token
    (9, TOKEN_A, LOC),        # not a member
    (1, TOKEN_A, LOC + 1),    # unknown location
])
def test_hello_without_valid_token_gets_nothing_back(player, token, location):
    core = ReflectorCore(ReflectorConfig(**CLEAN_PATH))
    core.add_member(LOC, 1, TOKEN_A)
    core.receive_datagram(hello(player, token, location), ("203.0.113.9", 9), 0.0)
    assert core.datagrams_to_send(0.0) == []
    assert core.members(LOC) == ()


def test_only_bound_members_may_send_and_only_as_themselves():
    core = bound_core()
    core.receive_datagram(data(1, 5), ("127.0.0.1", 9999), 0.0)     # unbound address claiming alice
    core.receive_datagram(data(2, 5), ALICE, 0.0)                   # alice claiming bob's id
    assert core.datagrams_to_send(0.0) == []
    assert core.location_stats(LOC)["not_member"] == 2
    core.receive_datagram(data(1, 6), ALICE, 0.0)
    [(out, dest)] = core.datagrams_to_send(0.0)
    assert dest == LOC and set(core.members(LOC)) == {ALICE, BOB}  # fan-out to every member, sender included


def test_reliable_sequenced_and_buffer_bounded_by_count_and_age():
    core = bound_core(ReflectorConfig(**CLEAN_PATH, buffer_packets=3, buffer_age=1.0))
    for pid in range(5):
        core.receive_datagram(data(1, 100 + pid, reliable=True), ALICE, 0.0)
    seqs = [wire.decode(d)[0].seq for d, _ in core.datagrams_to_send(0.0)]
    assert seqs == [1, 2, 3, 4, 5]
    stats = core.location_stats(LOC)
    assert (stats["buffered"], stats["lowest"], stats["buffer_evicted_count"]) == (3, 3, 2)
    core.handle_timer(2.0)
    stats = core.location_stats(LOC)
    assert (stats["buffered"], stats["lowest"], stats["buffer_evicted_age"]) == (0, 6, 3)


def test_token_is_bound_to_its_address_and_moving_needs_a_fresh_token():
    core = bound_core()
    thief = ("127.0.0.1", 5555)
    core.receive_datagram(hello(1, TOKEN_A), thief, 1.0)          # a valid token, from another address
    assert core.next_event() is None and core.members(LOC) == (ALICE, BOB)
    assert core.datagrams_to_send(1.0) == []                       # not even a WELCOME
    assert core.location_stats(LOC)["hello_rebind_refused"] == 1
    core.receive_datagram(data(1, 1), thief, 1.0)                  # and it cannot send as the player
    assert core.location_stats(LOC)["not_member"] == 1
    core.receive_datagram(hello(1, TOKEN_A), ALICE, 1.0)           # the bound address may say HELLO again (lost WELCOME)
    assert [dest for _, dest in core.datagrams_to_send(1.0)] == [ALICE]
    # moving (a NAT rebinding, a new device) needs a fresh token from the game server
    core.add_member(LOC, 1, b"n" * 16)                             # a new token unbinds until a new HELLO
    assert core.next_event() == MembersChanged(LOC, (BOB,))
    core.receive_datagram(hello(1, b"n" * 16), thief, 1.0)
    assert core.next_event() == MembersChanged(LOC, (BOB, thief))


def test_members_changed_on_removal():
    core = bound_core()
    assert core.remove_member(LOC, 2)
    assert core.next_event() == MembersChanged(LOC, (ALICE,))
    core.receive_datagram(data(2, 1), BOB, 1.0)                    # the removed member is no longer a member
    assert core.location_stats(LOC)["not_member"] == 1
    assert core.remove_member(LOC, 1)                               # the last member: the location is forgotten
    assert core.locations() == []
    assert core.totals()["not_member"] == 1                         # ... but its counters still count


def test_nack_ranges_clipped_to_the_buffer_before_walking(monkeypatch):
    """One 412-byte NACK with 64 ranges of 65535 seqs walked 4.2M seqs; now only what the buffer holds."""
    import mmpog.reliability as reliability
    core = bound_core()
    for n in range(10):
        core.receive_datagram(data(1, 100 + n, reliable=True), ALICE, 1.0)
    core.datagrams_to_send(1.0)
    walked = []
    real_range = range

    def counting_range(*args):
        r = real_range(*args)
        walked.append(len(r))
        return r

    monkeypatch.setattr(reliability, "range", counting_range, raising=False)
    ranges = [(1 + i * 65535, 65535) for i in range(wire.MAX_NACK_RANGES)]
    nack = wire.encode(Header(Kind.NACK, rto_ms=40, location=LOC, sender=2), wire.encode_nack_ranges(ranges))
    core.receive_datagram(nack, BOB, 1.0)
    assert sum(walked) <= 10
    stats = core.location_stats(LOC)
    assert stats["retransmitted"] == 10
    assert stats["nack_unavailable"] == 64 * 65535 - 10


def test_a_small_nack_is_answered_within_a_byte_budget():
    """One 34-byte NACK returned 91 KB in a burst; now at most nack_burst_bytes per member."""
    config = ReflectorConfig(**CLEAN_PATH, nack_burst=1000, nack_rate=0.0, nack_bytes_rate=0.0, nack_burst_bytes=8192)
    core = bound_core(config)
    for n in range(64):
        core.receive_datagram(data(1, 100 + n, payload=bytes(1400), reliable=True), ALICE, 1.0)
    core.datagrams_to_send(1.0)
    nack = wire.encode(Header(Kind.NACK, rto_ms=40, location=LOC, sender=2), wire.encode_nack_ranges([(1, 64)]))
    assert len(nack) == 34
    core.receive_datagram(nack, BOB, 1.0)
    out = core.datagrams_to_send(1.0)
    sent = sum(len(d) for d, _ in out)
    assert 0 < sent <= 8192 and {dest for _, dest in out} == {BOB}
    assert core.location_stats(LOC)["nack_byte_limited"] == 64 - len(out)


def test_membership_bounds_are_enforced_and_counted():
    core = ReflectorCore(ReflectorConfig(**CLEAN_PATH, max_locations=1, max_members=1))
    core.add_member(1, 1, TOKEN_A)
    with pytest.raises(BufferFull):
        core.add_member(1, 2, TOKEN_B)
    with pytest.raises(BufferFull):
        core.add_member(2, 1, TOKEN_A)
    assert core.stats["members_refused"] == 1 and core.stats["locations_refused"] == 1


def test_malformed_and_client_set_seq_dropped():
    core = bound_core()
    core.receive_datagram(b"garbage", ALICE, 0.0)
    forged = wire.encode(Header(Kind.DATA, int(Flag.RELIABLE), 40, LOC, 1, 5, seq=99, lowest=1))
    core.receive_datagram(forged, ALICE, 0.0)
    assert core.datagrams_to_send(0.0) == []
    assert core.stats["malformed"] == 1 and core.location_stats(LOC)["malformed_client_fields"] == 1


def test_heartbeat_interval_follows_member_rto_and_backs_off_when_idle():
    # every probe sent (probe_skip_target=0): the schedule itself (which probes are skipped: test_mmpog_probes)
    core = bound_core(ReflectorConfig(**CLEAN_PATH, heartbeat_min=0.01, heartbeat_max=0.5, heartbeat_factor=0.5,
                                      probe_skip_target=0.0))
    core.receive_datagram(data(1, 1, reliable=True), ALICE, 10.0)
    core.datagrams_to_send(10.0)
    times = []
    now = 10.0
    for _ in range(20):
        now = core.get_timer()
        core.handle_timer(now)
        out = core.datagrams_to_send(now)
        if not out:
            continue            # the timer may be early (traffic postponed the heartbeat): it re-arms
        assert [wire.decode(d)[0].kind for d, _ in out] == [Kind.HEARTBEAT]
        times.append(round(now - 10.0, 6))
        if len(times) == 4:
            break
    assert times == [0.02, 0.06, 0.14, 0.3]  # half the 40 ms RTO, then doubling while idle


def test_heartbeat_timer_scales_to_many_locations():
    core = ReflectorCore(ReflectorConfig(**CLEAN_PATH, max_locations=5000, probe_skip_target=0.0))   # (idle: would skip)
    for location in range(4000):
        core.add_member(location, 1, TOKEN_A)
        core.receive_datagram(hello(1, TOKEN_A, location=location), ("127.0.0.1", 10000 + location % 50000), 0.0)
    core.datagrams_to_send(0.0)
    core.handle_timer(0.001)                    # nothing due: must not touch every location
    assert core.datagrams_to_send(0.001) == []
    core.handle_timer(0.05)
    assert len(core.datagrams_to_send(0.05)) == 4000


# ---------------------------------------------------------------- the real process


@pytest.fixture
def reflector_process():
    udp, http = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-m", "mmpog.reflector", "--mode", "standalone", "--listen",
                             f"127.0.0.1:{udp}", "--http", f"127.0.0.1:{http}", "--api-key", "k3y",
                             "--log-level", "warning"])
    base = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=1).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "reflector did not start"
            time.sleep(0.05)
    yield ("127.0.0.1", udp), base
    proc.terminate()
    assert proc.wait(10) == 0


def http(method, url, body=None, key="k3y"):
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def udp_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    return sock


def recv_data(sock):
    """The next DATA datagram (heartbeats of the idle location are skipped)."""
    while True:
        header, payload = wire.decode(sock.recv(2048))
        if header.kind is not Kind.HEARTBEAT:
            return header, payload


def test_real_reflector_membership_api_anti_spoofing_and_fanout(reflector_process):
    udp, base = reflector_process
    assert http("PUT", f"{base}/locations/{LOC}/members/1", {"token": TOKEN_A.hex()}, key="wrong")[0] == 401
    assert http("PUT", f"{base}/locations/{LOC}/members/1", {"token": "zz"})[0] == 400
    assert http("PUT", f"{base}/locations/{LOC}/members/1", {"token": TOKEN_A.hex()})[0] == 200
    assert http("PUT", f"{base}/locations/{LOC}/members/2", {"token": TOKEN_B.hex()})[0] == 200
    alice, bob, mallory = udp_socket(), udp_socket(), udp_socket()
    try:
        # mallory guesses a token: nothing comes back, and she cannot send into the location
        mallory.sendto(hello(1, b"m" * 16), udp)
        mallory.sendto(data(1, 1), udp)
        alice.sendto(hello(1, TOKEN_A, pid=10), udp)
        assert wire.decode(alice.recv(2048))[0].kind is Kind.WELCOME
        bob.sendto(hello(2, TOKEN_B, pid=20), udp)
        assert wire.decode(bob.recv(2048))[0].kind is Kind.WELCOME
        alice.sendto(data(1, 11, b"hello", reliable=True), udp)
        for sock in (alice, bob):                      # the sender gets its echo, the other member the data
            header, payload = wire.decode(sock.recv(2048))
            assert (header.sender, header.packet_id, header.seq, payload) == (1, 11, 1, b"hello")
        # a new member's downlink is taken as lossy until it shows otherwise: bob also gets the update's
        # redundant copies, marked COPY (the sender never does)
        copy, payload = wire.decode(bob.recv(2048))
        assert (copy.flags, copy.seq, payload) == (wire.RELIABLE | wire.COPY, 1, b"hello")
        mallory.settimeout(0.3)
        with pytest.raises(socket.timeout):
            mallory.recv(2048)
        status, stats = http("GET", f"{base}/stats")
        loc = stats["locations"][str(LOC)]
        assert loc["hello_rejected"] == 1 and loc["not_member"] == 1 and loc["bound"] == 2
        assert stats["io"]["datagrams_out"] >= 4
        assert http("DELETE", f"{base}/locations/{LOC}/members/2")[0] == 200
        assert http("DELETE", f"{base}/locations/{LOC}/members/2")[0] == 404
        alice.sendto(data(1, 12, b"again"), udp)
        assert recv_data(alice)[0].packet_id == 12
        bob.settimeout(0.3)
        with pytest.raises(socket.timeout):
            while True:                                 # bob is no longer a member: at most the rest of
                header = recv_data(bob)[0]              # the first update's copies, nothing after
                assert header.packet_id == 11 and header.flags & wire.COPY
    finally:
        for sock in (alice, bob, mallory):
            sock.close()


def test_reflector_bad_config_exits_2():
    proc = subprocess.run([sys.executable, "-m", "mmpog.reflector", "--mode", "standalone",
                           "--heartbeat-min", "2", "--heartbeat-max", "1"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "heartbeat_min" in proc.stderr and proc.stderr.count("\n") == 1


def test_tail_probe_follows_a_reliable_packet_on_a_location_that_was_idle():
    """The heartbeat after a reliable packet is one interval after it, not at the backed-off idle time."""
    core = bound_core(ReflectorConfig(**CLEAN_PATH, heartbeat_min=0.01, heartbeat_max=1.0, heartbeat_factor=0.5,
                                      probe_skip_target=0.0))
    now = 10.0
    beats = 0
    while beats < 4:                                   # idle: 20, 40, 80, 160 ms apart
        now = core.get_timer()
        core.handle_timer(now)
        beats += len(core.datagrams_to_send(now))
    sent_at = now + 0.001
    core.receive_datagram(data(1, 9, reliable=True), ALICE, sent_at)
    core.datagrams_to_send(sent_at)
    while True:
        now = core.get_timer()
        core.handle_timer(now)
        out = core.datagrams_to_send(now)
        if out:
            break
    assert [wire.decode(d)[0].kind for d, _ in out] == [Kind.HEARTBEAT]
    assert now - sent_at == pytest.approx(0.02)       # half the members' 40 ms RTO


def test_reflector_refuses_to_start_without_a_control_key():
    env = {k: v for k, v in os.environ.items() if k != "MMPOG_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "mmpog.reflector", "--mode", "standalone"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2
    assert "--api-key" in proc.stderr and proc.stderr.count("\n") == 1


def test_control_key_compared_in_constant_time(monkeypatch):
    import hmac

    from mmpog import reflector as reflector_module
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(reflector_module.hmac, "compare_digest", spy)
    service = reflector_module.ReflectorService(ReflectorCore(ReflectorConfig(**CLEAN_PATH)), api_key="k3y")

    class FakeRequest:
        headers = {"Authorization": "Bearer k3x"}

    assert not service._key_matches(FakeRequest())
    FakeRequest.headers = {"Authorization": "Bearer k3y"}
    assert service._key_matches(FakeRequest())
    assert calls == [(b"Bearer k3x", b"Bearer k3y"), (b"Bearer k3y", b"Bearer k3y")]


def test_bundles_from_a_member_are_handled_item_by_item_and_fanned_out_packable():
    from mmpog.reliability import ClientEndpoint, Received
    core = bound_core()
    bob = ClientEndpoint(2, LOC, TOKEN_B)
    bob.connect(0.9)
    [hello_dgram] = bob.datagrams_to_send(0.9)
    core.receive_datagram(hello_dgram, BOB, 0.9)
    [(welcome, _)] = core.datagrams_to_send(0.9)
    bob.receive_datagram(welcome, 0.95)
    [single] = wire.pack([data(1, 11, reliable=True), data(1, 12), data(2, 13)])    # the last claims to be Bob
    core.receive_datagram(single, ALICE, 1.0)
    out = core.datagrams_to_send(1.0)
    assert [dest for _, dest in out] == [LOC, LOC]                 # items checked one by one: Bob's refused
    assert core.location_stats(LOC)["not_member"] == 1 and core.stats["bundles"] == 1
    [packed] = wire.pack([d for d, _ in out])
    bob.receive_datagram(packed, 1.0)
    got = []
    while (event := bob.next_event()) is not None:
        if isinstance(event, Received):
            got.append(event.packet_id)
    assert got == [11, 12] and bob.stats["bundles"] == 1


async def test_service_packs_what_one_loop_pass_fans_out_and_counts_updates():
    """Three updates read in one pass of the loop leave as one BUNDLE per location; updates_out counts 3 x members."""
    import asyncio

    from mmpog.reflector import ReflectorService
    service = ReflectorService(bound_core())
    sent = []
    service.fanout = lambda location, data: sent.append((location, data))
    service.send_to = lambda data, addr: sent.append((addr, data))
    for pid in (1, 2, 3):
        service.on_datagram(data(1, pid, reliable=pid == 2), ALICE)
    assert sent == []                                        # answered once the pass is over
    await asyncio.sleep(0)
    [(location, bundle)] = sent
    header, payload = wire.decode(bundle)
    assert location == LOC and header.kind is Kind.BUNDLE and len(wire.unpack(header, payload)) == 3
    assert service.counters["updates_out"] == 3 * 2 and service.counters["bundles_out"] == 1
    unpacked = ReflectorService(bound_core(ReflectorConfig(**CLEAN_PATH, pack=False)))
    unpacked.fanout = lambda location, data: sent.append((location, data))
    sent.clear()
    unpacked.on_datagram(data(1, 9), ALICE)
    assert len(sent) == 1 and wire.decode(sent[0][1])[0].kind is Kind.DATA   # --no-pack: at once, unpacked


async def test_socket_reader_sends_what_it_read_packed_as_soon_as_the_socket_is_empty():
    """The standalone reader: what queued while the reflector was busy leaves packed, with no extra loop pass
    (a lone update on an idle path is not held at all); a --pack-budget still holds it."""
    import asyncio

    from mmpog.reflector import ReflectorService
    service = ReflectorService(bound_core())
    sent = []
    service.fanout = lambda location, data: sent.append((location, data))
    for pid in (1, 2):
        service.receive(data(1, pid), ALICE)
    assert sent == []
    service.reads_done()
    [(location, bundle)] = sent                              # at once: no call_soon, no timer
    header, payload = wire.decode(bundle)
    assert header.kind is Kind.BUNDLE and len(wire.unpack(header, payload)) == 2
    sent.clear()
    service.receive(data(1, 3), ALICE)
    service.reads_done()
    assert len(sent) == 1 and wire.decode(sent[0][1])[0].kind is Kind.DATA   # alone: as it came
    budgeted = ReflectorService(bound_core(ReflectorConfig(**CLEAN_PATH, pack_budget=0.001)))
    budgeted.fanout = lambda location, data: sent.append((location, data))
    sent.clear()
    budgeted.receive(data(1, 4), ALICE)
    budgeted.reads_done()
    assert sent == []                                        # held for company up to the budget
    await asyncio.sleep(0.05)
    assert len(sent) == 1
