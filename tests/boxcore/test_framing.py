"""boxcore.framing: the one length-prefixed msgpack framer, fuzzed."""

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from boxcore.framing import LENGTH, FrameDecoder, FramingError, encode_frame


class DemoError(ValueError):
    pass


def only_maps(obj):
    if not isinstance(obj, dict):
        raise DemoError(f"not a map: {type(obj).__name__}")
    return obj


def test_frames_split_anywhere_come_out_whole():
    msgs = [{"a": 1}, {"b": b"x" * 300}, {"c": [1, 2, 3]}]
    stream = b"".join(encode_frame(m) for m in msgs)
    for cut in range(len(stream) + 1):
        dec = FrameDecoder(1024, error=DemoError, validate=only_maps)
        assert dec.feed(stream[:cut]) + dec.feed(stream[cut:]) == msgs
        assert dec.buffered == 0


def test_invalid_frame_is_returned_and_the_stream_goes_on():
    dec = FrameDecoder(1024, error=DemoError, validate=only_maps)
    garbage = LENGTH.pack(1) + b"\xc1"          # 0xc1 is never valid msgpack
    out = dec.feed(encode_frame([1]) + garbage + encode_frame({"ok": True}))
    assert isinstance(out[0], DemoError) and "not a map" in str(out[0])
    assert isinstance(out[1], DemoError) and "undecodable" in str(out[1])
    assert out[2] == {"ok": True}


@pytest.mark.parametrize("length", [0, 1025, 2**32 - 1])
def test_bad_length_is_fatal(length):
    dec = FrameDecoder(1024, error=DemoError)
    with pytest.raises(FramingError):
        dec.feed(LENGTH.pack(length) + b"x")


def test_ext_hook_errors_make_the_frame_invalid():
    def hook(code, data):
        raise DemoError(f"unknown extension {code}")
    dec = FrameDecoder(1024, error=DemoError, ext_hook=hook)
    [err] = dec.feed(encode_frame(msgpack.ExtType(5, b"z")))
    assert isinstance(err, DemoError) and "unknown extension 5" in str(err)


@settings(max_examples=300)
@given(st.binary(max_size=2048))
def test_fuzz_never_raises_anything_but_framing_error(data):
    dec = FrameDecoder(512, error=DemoError, validate=only_maps)
    try:
        out = dec.feed(data)
    except FramingError:
        return
    assert all(isinstance(o, (dict, DemoError)) for o in out)
    assert dec.buffered <= 512 + LENGTH.size
