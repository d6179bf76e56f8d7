"""The one way to declare a fixed wire layout (cliruntime.wirefields.Layout), checked on every
layout the suite declares: struct and numpy dtype agree on size, offsets and every value."""

from __future__ import annotations

import importlib
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cliruntime.wirefields import Layout

MODULES = ("boxcore.framing", "boxcore.packet", "fcd.wire", "gnutella.wire", "gnutella.vendor", "mmpog.wire",
           "npdrv.wire", "npdrv.card", "npdrv.emulator")


def declared_layouts() -> dict[str, Layout]:
    """Every Layout at module level or as a class attribute of the modules above."""
    found: dict[str, Layout] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, Layout):
                found[f"{module_name}.{name}"] = value
            elif isinstance(value, type) and value.__module__ == module_name:
                for attr, inner in vars(value).items():
                    if isinstance(inner, Layout):
                        found[f"{module_name}.{name}.{attr}"] = inner
    return found


LAYOUTS = declared_layouts()


def test_every_converted_module_declares_its_layouts():
    # a module whose layouts went back to bare struct.Struct would drop out of the checks below
    for module_name in MODULES:
        assert any(name.startswith(module_name + ".") for name in LAYOUTS), module_name
    assert len(LAYOUTS) >= 40


_INTEGER_BITS = {"b": (8, True), "B": (8, False), "h": (16, True), "H": (16, False), "i": (32, True),
                 "I": (32, False), "q": (64, True), "Q": (64, False)}


def _field_strategy(code: str):
    count, kind = (code[:-1], code[-1])
    if kind == "s":
        n = int(count or 1)
        return st.binary(min_size=n, max_size=n)
    if kind in _INTEGER_BITS:
        bits, signed = _INTEGER_BITS[kind]
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else st.integers(0, 2 ** bits - 1)
    if kind == "?":
        return st.booleans()
    width = {"e": 16, "f": 32, "d": 64}[kind]
    return st.floats(width=width, allow_nan=False)


def _values(layout: Layout):
    return st.tuples(*(_field_strategy(code) for _, code in layout.fields if not code.endswith("x")))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_struct_and_dtype_agree(name):
    layout = LAYOUTS[name]
    assert layout.struct.size == layout.dtype.itemsize == layout.size
    position = 0
    for field_name, code in layout.fields:
        if not code.endswith("x"):
            assert layout.offset(field_name) == position == layout.dtype.fields[field_name][1]
        position += struct.calcsize(layout.byte_order + code)
    assert position == layout.size


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_round_trip_through_struct_and_dtype(name, data):
    layout = LAYOUTS[name]
    values = data.draw(_values(layout))
    raw = layout.pack(*values)
    assert len(raw) == layout.size
    assert layout.unpack(raw) == values
    record = np.frombuffer(raw, dtype=layout.dtype)[0]
    for field_name, value in zip(layout.names, values):
        got = record[field_name]
        if isinstance(value, bytes):      # numpy's S fields drop trailing NULs when read
            assert bytes(got).ljust(len(value), b"\0") == value, field_name
        elif isinstance(value, float):
            assert got == value or (math.isinf(value) and math.isinf(got))
        else:
            assert got == value, field_name
    # and back: numpy writes the same bytes (padding zeroed, as struct writes it)
    written = np.zeros(1, dtype=layout.dtype)
    for field_name, value in zip(layout.names, values):
        written[field_name] = value
    assert written.tobytes() == raw


def test_offsets_and_concatenation():
    header = Layout("!", (("version", "B"), ("pad", "x"), ("length", "H")))
    record = header + (("seq", "I"), ("name", "3s"))
    assert record.format == "!BxHI3s"
    assert record.size == 11
    assert [record.offset(n) for n in record.names] == [0, 2, 4, 8]
    assert "pad" not in record.names and "pad" not in record.dtype.names
    assert record.unpack(record.pack(1, 2, 3, b"abc")) == (1, 2, 3, b"abc")
    with pytest.raises(KeyError, match="no field 'missing'"):
        record.offset("missing")


@pytest.mark.parametrize("order, fields, message", [
    ("@", (("a", "I"),), "byte order"),
    ("!", (("a", "II"),), "one struct code"),
    ("!", (("a", "4I"),), "count only goes with"),
    ("!", (("a", "B"), ("a", "H")), "declared twice"),
])
def test_bad_declarations_are_refused(order, fields, message):
    with pytest.raises(ValueError, match=message):
        Layout(order, fields)


def test_byte_orders_do_not_mix():
    with pytest.raises(ValueError, match="cannot join"):
        Layout("!", (("a", "H"),)) + Layout("<", (("b", "H"),))


def test_little_endian_dtype_matches_struct():
    layout = Layout("<", (("port", "H"), ("ip", "4s"), ("files", "I")))
    raw = layout.pack(0x1234, b"\x7f\0\0\1", 7)
    assert raw[:2] == b"\x34\x12"
    record = np.frombuffer(raw, layout.dtype)[0]
    assert (record["port"], record["ip"], record["files"]) == (0x1234, b"\x7f\0\0\1", 7)
