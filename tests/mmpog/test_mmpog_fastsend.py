"""sendmmsg fan-out: every member gets the datagram, from the sending socket."""

import socket

import pytest

from mmpog import fastsend

pytestmark = pytest.mark.skipif(not fastsend.available(), reason="libc has no sendmmsg")


def test_one_call_reaches_every_member_and_batches_are_reused():
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    sender.setblocking(False)
    members = []
    for _ in range(5):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2)
        members.append(sock)
    addresses = tuple(sock.getsockname() for sock in members)
    fan = fastsend.FanoutSender(sender)
    try:
        assert fan.send(b"first", addresses, key=1) == (5, 0)
        first_three = addresses[:3]
        assert fan.send(b"second, longer", first_three, key=2) == (3, 0)
        assert fan.send(b"", ()) == (0, 0)
        for index, sock in enumerate(members):
            data, source = sock.recvfrom(100)
            assert (data, source) == (b"first", sender.getsockname())
            if index < 3:
                assert sock.recv(100) == b"second, longer"
        assert len(fan._batches) == 2
        assert fan.send(b"third", addresses[3:], key=1) == (2, 0)      # key 1's members changed: rebuilt
        assert [sock.recv(100) for sock in members[3:]] == [b"third", b"third"]
        assert len(fan._batches) == 2
        assert fan.send(b"bad", (("not-an-ip", 1),), key=3) == (0, 1) and fan.errors == 1
    finally:
        sender.close()
        for sock in members:
            sock.close()
