import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fcd import wire
from fcd.wire import CarProbe, LightChange, SeqTracker, WireDecodeError, decode, encode

f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
probes = st.builds(CarProbe, generator=st.integers(0, 0xFFFF), seq=st.integers(0, 2**32 - 1),
                   car=st.integers(0, 2**32 - 1), t=st.floats(0, 1e9),
                   x=st.floats(-1e6, 1e6, width=32), y=st.floats(-1e6, 1e6, width=32),
                   speed=st.floats(0, 100, width=32), heading=st.floats(0, 359.5, width=32))
lights = st.builds(LightChange, generator=st.integers(0, 0xFFFF), seq=st.integers(0, 2**32 - 1),
                   light=st.integers(0, 2**32 - 1), t=st.floats(0, 1e9), phase=st.integers(0, 255),
                   green=st.integers(0, 2**32 - 1))


@settings(max_examples=150)
@given(st.one_of(probes, lights))
def test_round_trip(msg):
    assert decode(encode(msg)) == msg


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_garbage_raises_decode_error_only(data):
    try:
        decode(data)
    except WireDecodeError:
        pass


@settings(max_examples=150)
@given(probes, st.integers(0, wire.PROBE_SIZE - 1), st.integers(0, 255))
def test_batch_decoder_agrees_with_scalar(msg, pos, byte):
    raw = bytearray(encode(msg))
    raw[pos] = byte
    raw = bytes(raw)
    try:
        decode(raw)
        scalar_ok = True
    except WireDecodeError:
        scalar_ok = False
    arr, others, bad = wire.decode_probe_batch([raw])
    assert others == []
    assert (len(arr) == 1) == scalar_ok and bad == (0 if scalar_ok else 1)


def test_specific_errors_say_what_is_wrong():
    good = encode(CarProbe(1, 2, 3, 4.0, 5.0, 6.0, 7.0, 8.0))
    with pytest.raises(WireDecodeError, match="magic"):
        decode(b"XX" + good[2:])
    with pytest.raises(WireDecodeError, match="version"):
        decode(good[:2] + b"\x09" + good[3:])
    with pytest.raises(WireDecodeError, match="38 bytes"):
        decode(good[:-1])
    with pytest.raises(WireDecodeError, match="speed"):
        decode(encode(CarProbe(1, 2, 3, 4.0, 5.0, 6.0, -1.0, 8.0)))
    with pytest.raises(WireDecodeError, match="heading"):
        decode(encode(CarProbe(1, 2, 3, 4.0, 5.0, 6.0, 1.0, 360.0)))
    nan_t = good[:14] + struct.pack("!d", math.nan) + good[22:]
    with pytest.raises(WireDecodeError, match="time"):
        decode(nan_t)


def test_batch_encoding_from_trace_rows(small_trace):
    rows = small_trace.probes[:50]
    data = wire.probes_from_trace(rows, generator=7, first_seq=10)
    msgs = [decode(data[i:i + wire.PROBE_SIZE]) for i in range(0, len(data), wire.PROBE_SIZE)]
    assert [m.seq for m in msgs] == list(range(10, 60))
    assert all(m.generator == 7 for m in msgs)
    assert np.allclose([m.x for m in msgs], rows["x"])


def test_seq_tracker_counts_gaps_and_reordering():
    tracker = SeqTracker()
    for seq in [0, 1, 2, 5, 4, 9]:
        tracker.add(3, seq)
    tracker.add_batch(np.array([8, 8, 8]), np.array([100, 102, 103]))
    assert tracker.total_received == 9
    assert tracker.total_lost == (10 - 6) + 1


def test_seq_tracker_takes_the_wires_big_endian_fields_as_they_are():
    """add_batch converts byte order itself: big-endian and native arrays count alike."""
    gens = np.array([1, 1, 2, 1, 2, 7], dtype=np.uint16)
    seqs = np.array([10, 12, 5, 11, 9, 70000], dtype=np.uint32)
    native, wire_order = SeqTracker(), SeqTracker()
    native.add_batch(gens, seqs)
    wire_order.add_batch(gens.astype(">u2"), seqs.astype(">u4"))
    wire_order.add_batch(np.array([3, 3], dtype=">u2"), np.array([1, 4], dtype=">u4"))   # one generator
    native.add_batch(np.array([3, 3], dtype=np.uint16), np.array([1, 4], dtype=np.uint32))
    assert wire_order.snapshot() == native.snapshot() == {"received": 8, "lost": 3 + 2, "generators": 4}
    assert wire_order.first == {1: 10, 2: 5, 7: 70000, 3: 1} and wire_order.last[7] == 70000
