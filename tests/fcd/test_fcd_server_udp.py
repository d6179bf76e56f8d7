"""Batch receive as the server's raw UDP path uses it (boxcore.udpbatch): recvmmsg and its recv_into fallback agree."""

import socket

import numpy as np

import pytest

from boxcore.udpbatch import BatchReceiver


@pytest.fixture
def pair():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)      # room for all 300
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield rx, tx
    rx.close()
    tx.close()


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
