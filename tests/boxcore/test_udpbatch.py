"""The shared batch receiver: recvmmsg and its one-call-per-datagram fallback give the same datagrams,
and each datagram its own ancillary data (the kernel's receive stamp), over real loopback sockets; the
one-datagram stamped read (stdlib recvmsg) gives what the batch reads give."""

import math
import socket
import struct
import time

import numpy as np
import pytest

from boxcore import udpbatch
from boxcore.udpbatch import (SCM_TIMESTAMPNS, STAMP_CONTROL, TIMESPEC, BatchReceiver, enable_timestamps,
                              parse_ancillary, timestamp_of)

IP_PKTINFO = 8        # Linux; the stdlib does not name it


@pytest.fixture
def pair():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield rx, tx
    rx.close()
    tx.close()


def _send(tx, rx, payloads):
    for payload in payloads:
        tx.sendto(payload, rx.getsockname())        # loopback: queued on the receiver on return


@pytest.mark.parametrize("use_recvmmsg", [True, False])
def test_stamped_batches_keep_order_and_each_datagram_its_own_kernel_stamp(pair, use_recvmmsg):
    rx, tx = pair
    enable_timestamps(rx)
    receiver = BatchReceiver(rx, batch=16, slot=2048, control=STAMP_CONTROL, use_recvmmsg=use_recvmmsg)
    sent, stamps_before = [], []
    for i in range(40):
        stamps_before.append(time.time())
        payload = bytes([i]) * (i * 37 % 1500)
        sent.append(payload)
        _send(tx, rx, [payload])
        time.sleep(0.0005)                          # distinct, increasing kernel stamps
    got, stamps = [], []
    while True:
        read_at = time.time()
        payloads, batch_stamps = receiver.receive_stamped()
        assert len(payloads) == len(batch_stamps) <= 16
        if not payloads:
            break
        got += payloads
        stamps += batch_stamps
    assert got == sent
    # each its own stamp (not the batch's: they differ), taken between its send and the read; not
    # bounded by the next send, since a busy host's softirq may stamp a datagram after it, nor ordered:
    # this VM's realtime clock can step back
    assert len(set(stamps)) == len(stamps)
    for before, stamp in zip(stamps_before, stamps):
        assert before - 0.001 <= stamp <= read_at + 0.001
    assert receiver.truncated == receiver.control_truncated == 0
    assert receiver.kind == ("recvmmsg" if use_recvmmsg else "recvmsg")
    if use_recvmmsg:
        assert receiver.syscalls == 4               # 16 + 16 + 8, then the empty call


@pytest.mark.parametrize("use_recvmmsg", [True, False])
def test_oversized_datagrams_are_cut_and_counted(pair, use_recvmmsg):
    rx, tx = pair
    enable_timestamps(rx)
    receiver = BatchReceiver(rx, batch=8, slot=100, control=STAMP_CONTROL, use_recvmmsg=use_recvmmsg)
    _send(tx, rx, [b"a" * 50, b"b" * 150, b"c" * 100, b"d" * 101])
    payloads, stamps = receiver.receive_stamped()
    assert payloads == [b"a" * 50, b"b" * 100, b"c" * 100, b"d" * 100]
    assert not any(math.isnan(s) for s in stamps)
    assert receiver.truncated == 2


@pytest.mark.parametrize("use_recvmmsg", [True, False])
def test_ancillary_is_what_recvmsg_gives_and_a_stamp_need_not_come_first(pair, use_recvmmsg):
    rx, tx = pair
    rx.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    _send(tx, rx, [b"one"])
    reference = rx.recvmsg(64, 256)[1]              # [(IPPROTO_IP, IP_PKTINFO, ...)]: no stamp asked for
    assert [(level, kind) for level, kind, _ in reference] == [(socket.IPPROTO_IP, IP_PKTINFO)]
    receiver = BatchReceiver(rx, batch=8, slot=64, control=256, use_recvmmsg=use_recvmmsg)
    _send(tx, rx, [b"two", b"three"])
    got = receiver.receive_ancillary()
    assert [data for data, _ in got] == [b"two", b"three"]
    for _, ancillary in got:
        assert [(level, kind, len(data)) for level, kind, data in ancillary] == \
            [(level, kind, len(data)) for level, kind, data in reference]
    _send(tx, rx, [b"four"])
    payloads, stamps = receiver.receive_stamped()     # the first cmsg is not a stamp: the slot's list is walked
    assert payloads == [b"four"] and math.isnan(stamps[0])
    enable_timestamps(rx)
    _send(tx, rx, [b"five"])
    payloads, stamps = receiver.receive_stamped()
    assert payloads == [b"five"] and abs(stamps[0] - time.time()) < 5


@pytest.mark.parametrize("first", ["receive", "receive_stamped", "receive_ancillary", "receive_slots"])
def test_control_room_is_given_back_after_every_call(pair, first):
    """The kernel writes back how much control room a slot used (none, here): the next call needs it all again."""
    rx, tx = pair
    receiver = BatchReceiver(rx, batch=4, slot=64, control=STAMP_CONTROL)
    _send(tx, rx, [b"x", b"y", b"z"])
    got = receiver.receive_slots(8) if first == "receive_slots" else getattr(receiver, first)()
    assert len(got[1] if first == "receive_slots" else got[0] if first == "receive_stamped" else got) == 3
    enable_timestamps(rx)
    _send(tx, rx, [b"p", b"q", b"r", b"s"])
    payloads, stamps = receiver.receive_stamped()
    assert payloads == [b"p", b"q", b"r", b"s"]
    assert not any(math.isnan(s) for s in stamps) and receiver.control_truncated == 0


def test_receiver_without_control_room_reports_no_stamps(pair):
    rx, tx = pair
    enable_timestamps(rx)
    receiver = BatchReceiver(rx, batch=4, slot=64)
    _send(tx, rx, [b"x", b"y"])
    payloads, stamps = receiver.receive_stamped()
    assert payloads == [b"x", b"y"] and all(math.isnan(s) for s in stamps)
    assert receiver.control_truncated == 2          # the kernel had a stamp and no room for it


@pytest.mark.parametrize("use_recvmmsg", [True, False])
def test_raw_paths_unchanged(pair, use_recvmmsg):
    """receive() and receive_slots() (the fcd server's raw ingest) on the same receiver type."""
    rx, tx = pair
    sent = [bytes(range(i % 7, i % 7 + 1 + i % 70)) for i in range(300)]     # 1..70 bytes
    _send(tx, rx, sent)
    receiver = BatchReceiver(rx, batch=128, slot=64, use_recvmmsg=use_recvmmsg)
    first = receiver.receive()
    rows, lengths = receiver.receive_slots(38)
    assert first == [p[:64] for p in sent[:128]]
    assert lengths.tolist() == [min(len(p), 64) for p in sent[128:256]]
    assert rows.dtype == np.uint8
    for row, payload in zip(rows, sent[128:256]):
        assert row[:min(len(payload), 38)].tobytes() == payload[:38]
    assert receiver.receive() == [p[:64] for p in sent[256:]]


def _cmsg(level: int, kind: int, data: bytes) -> bytes:
    header = struct.pack("@NiI", udpbatch._CMSG_DATA + len(data), level, kind)
    return (header + data).ljust(socket.CMSG_SPACE(len(data)), b"\0")


def test_parse_ancillary_walks_every_cmsg_and_stops_at_a_cut_one():
    stamp = struct.pack("@qq", 1_700_000_000, 250_000_000)
    control = _cmsg(socket.IPPROTO_IP, IP_PKTINFO, bytes(12)) + _cmsg(socket.SOL_SOCKET, udpbatch.SCM_TIMESTAMPNS, stamp)
    parsed = parse_ancillary(control)
    assert [(level, kind) for level, kind, _ in parsed] == [(socket.IPPROTO_IP, IP_PKTINFO),
                                                            (socket.SOL_SOCKET, udpbatch.SCM_TIMESTAMPNS)]
    assert timestamp_of(parsed) == 1_700_000_000.25
    assert parse_ancillary(control[:-8]) == parsed[:1]               # the second one cut: not read
    assert math.isnan(timestamp_of(parse_ancillary(control[:-8])))
    assert parse_ancillary(b"") == [] and parse_ancillary(bytes(8)) == []


def test_bad_arguments_refused(pair):
    rx, _ = pair
    for kwargs in ({"batch": 0}, {"slot": 0}, {"control": -1}):
        with pytest.raises(ValueError):
            BatchReceiver(rx, **kwargs)
    with pytest.raises(ValueError):
        BatchReceiver(rx, batch=4, slot=64).receive_slots(65)


# what fcd-server's raw front relies on
@pytest.mark.parametrize("use_recvmmsg", [True, False])
def test_batches_in_order_with_oversized_datagrams_cut(pair, use_recvmmsg):
    rx, tx = pair
    sent = [bytes([i % 251]) * (i % 90) for i in range(300)]       # 0..89 bytes, some over the slot
    for payload in sent:
        tx.sendto(payload, rx.getsockname())                       # loopback: queued on return
    receiver = BatchReceiver(rx, batch=128, slot=64, use_recvmmsg=use_recvmmsg)
    got = []
    while batch := receiver.receive():
        assert len(batch) <= 128
        got += batch
    assert got == [p[:64] for p in sent]
    assert receiver.receive() == []
    if use_recvmmsg:
        assert receiver.kind == "recvmmsg" and receiver.syscalls == 5       # 128 + 128 + 44, then two empty


@pytest.mark.parametrize("use_recvmmsg", [True, False])
def test_slot_rows_hold_each_datagrams_first_bytes_and_its_length(pair, use_recvmmsg):
    """The raw path's receive: rows of the first ``keep`` bytes, lengths uncut up to the slot."""
    rx, tx = pair
    sent = [bytes(range(i % 7, i % 7 + 1 + i % 70)) for i in range(300)]     # 1..70 bytes
    for payload in sent:
        tx.sendto(payload, rx.getsockname())
    receiver = BatchReceiver(rx, batch=128, slot=64, use_recvmmsg=use_recvmmsg)
    rows, lengths = [], []
    while True:
        r, n = receiver.receive_slots(38)
        assert r.shape == (len(n), 38) and r.dtype == np.uint8 and len(n) <= 128
        if not len(n):
            break
        rows.append(r.copy())
        lengths.append(n)
    rows, lengths = np.concatenate(rows), np.concatenate(lengths)
    assert lengths.tolist() == [min(len(p), 64) for p in sent]
    for row, payload in zip(rows, sent):
        assert row[:min(len(payload), 38)].tobytes() == payload[:38]
    with pytest.raises(ValueError):
        receiver.receive_slots(65)


# ---------------------------------------------------------------- one datagram with its stamp (recvmsg)

def _peek_stamp(rx) -> tuple[bytes, float]:
    """The next datagram, left in the socket, and its stamp from recvmsg's ancillary list, in seconds as
    ``receive_stamped`` gives it (seconds + nanoseconds * 1e-9: the float the bots' latencies used)."""
    data, ancillary, _, _ = rx.recvmsg(2048, 256, socket.MSG_PEEK)
    (seconds, nanoseconds), = [TIMESPEC.unpack(cmsg) for level, kind, cmsg in ancillary
                               if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS]
    return data, seconds + nanoseconds * 1e-9


def test_each_datagram_and_its_stamp_equal_the_recvmsg_reference(pair):
    rx, tx = pair
    enable_timestamps(rx)
    receiver = BatchReceiver(rx, batch=8, slot=2048, control=STAMP_CONTROL)
    payloads = [bytes([i]) * (i + 1) for i in range(20)]
    for payload in payloads:
        tx.sendto(payload, rx.getsockname())
    got, stamps = [], []
    while True:
        if len(got) == len(payloads):
            break
        reference = _peek_stamp(rx)
        one = receiver.receive_one_stamped()
        assert one == reference                    # the same datagram, the same stamp to the nanosecond's float
        got.append(one[0])
        stamps.append(one[1])
    assert got == payloads
    assert stamps == sorted(stamps) and not any(math.isnan(s) for s in stamps)
    assert receiver.syscalls == len(payloads)
    assert receiver.receive_one_stamped() is None and receiver.syscalls == len(payloads) + 1


def test_the_same_stamps_as_the_batch_read(pair):
    """Two receivers on one socket: alternating one-datagram and batch reads give every datagram once,
    in order, each with a stamp no earlier than the one before (the kernel stamps in arrival order)."""
    rx, tx = pair
    enable_timestamps(rx)
    one = BatchReceiver(rx, batch=4, slot=2048, control=STAMP_CONTROL)
    batch = BatchReceiver(rx, batch=4, slot=2048, control=STAMP_CONTROL)
    payloads = [b"%d" % i for i in range(30)]
    for payload in payloads:
        tx.sendto(payload, rx.getsockname())
    got, stamps = [], []
    while len(got) < len(payloads):
        reference = _peek_stamp(rx)
        first = one.receive_one_stamped()
        assert first == reference
        got.append(first[0])
        stamps.append(first[1])
        more, more_stamps = batch.receive_stamped()
        got += more
        stamps += more_stamps
    assert got == payloads
    assert stamps == sorted(stamps) and not any(math.isnan(s) for s in stamps)


def test_cut_datagrams_and_missing_stamps_counted(pair):
    rx, tx = pair
    receiver = BatchReceiver(rx, batch=4, slot=10, control=STAMP_CONTROL)
    tx.sendto(b"x" * 50, rx.getsockname())          # no timestamps enabled yet: no stamp
    data, stamp = receiver.receive_one_stamped()
    assert data == b"x" * 10 and math.isnan(stamp) and receiver.truncated == 1
    enable_timestamps(rx)
    no_room = BatchReceiver(rx, batch=4, slot=64)    # no control room: the kernel's stamp is cut
    tx.sendto(b"y", rx.getsockname())
    data, stamp = no_room.receive_one_stamped()
    assert data == b"y" and math.isnan(stamp) and no_room.control_truncated == 1


def test_other_ancillary_data_beside_or_instead_of_the_stamp(pair):
    rx, tx = pair
    rx.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    receiver = BatchReceiver(rx, batch=4, slot=64, control=STAMP_CONTROL + socket.CMSG_SPACE(12))
    tx.sendto(b"no stamp", rx.getsockname())        # only IP_PKTINFO: the list is walked, no stamp found
    data, stamp = receiver.receive_one_stamped()
    assert data == b"no stamp" and math.isnan(stamp) and receiver.control_truncated == 0
    enable_timestamps(rx)
    tx.sendto(b"z", rx.getsockname())
    _, ancillary, _, _ = rx.recvmsg(64, 256, socket.MSG_PEEK)
    assert len(ancillary) == 2                        # the stamp and IP_PKTINFO
    reference = _peek_stamp(rx)
    assert receiver.receive_one_stamped() == reference == (b"z", reference[1])
