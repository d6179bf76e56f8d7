"""The one-datagram stamped read (stdlib recvmsg) gives what the batch reads give: the same datagrams
in order and each one's own kernel stamp, over real loopback sockets."""

import math
import socket

import pytest

from boxcore.udpbatch import SCM_TIMESTAMPNS, STAMP_CONTROL, TIMESPEC, BatchReceiver, enable_timestamps

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
