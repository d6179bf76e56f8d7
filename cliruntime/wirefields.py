"""Fixed-layout wire records declared once: named fields with struct codes.

A :class:`Layout` is declared as a byte order and a tuple of ``(name, code)`` fields, where
``code`` is one struct code with an optional count (``"B"``, ``"I"``, ``"6s"``, ``"3x"``; a
``"x"`` field is padding and carries no value).  From that one declaration it derives:

- the ``struct.Struct`` (``layout.struct``), whose ``pack``/``unpack``/``unpack_from``/
  ``pack_into``/``iter_unpack``/``size`` the layout offers directly, so a layout is used
  wherever a ``struct.Struct`` was;
- a numpy structured dtype of the same bytes (``layout.dtype``) for vectorised paths
  (``itemsize == size``; built on first use, so only users of numpy pay for importing it);
- each field's byte offset (``layout.offset("seq")``) for hot paths that patch one field.

Layouts concatenate (``HEADER + (("car", "I"), ...)``), so a family of messages shares its
header declaration.  Only the standard-size byte orders are accepted (``!``, ``>``, ``<``,
``=``): no native alignment, so the offsets are the same on every host.

This module lives in ``cliruntime`` because every package may import it (npdrv must not
import boxcore); it has no other dependency.
"""

from __future__ import annotations

import re
import struct
from functools import cached_property
from typing import Iterable

BYTE_ORDERS = {"!": ">", ">": ">", "<": "<", "=": "="}
_CODE = re.compile(r"^(\d*)([xbBhHiIqQefd?s])$")
# struct code -> numpy kind and size; "s" and "x" take their count as the size
_NUMPY_KIND = {"b": "i1", "B": "u1", "?": "b1", "h": "i2", "H": "u2", "i": "i4", "I": "u4",
               "q": "i8", "Q": "u8", "e": "f2", "f": "f4", "d": "f8"}


class Layout:
    """A fixed-size record: struct and numpy dtype derived from one field list."""

    def __init__(self, byte_order: str, fields: Iterable[tuple[str, str]]) -> None:
        if byte_order not in BYTE_ORDERS:
            raise ValueError(f"byte order {byte_order!r} is not one of {' '.join(BYTE_ORDERS)}")
        self.byte_order = byte_order
        self.fields = tuple((name, code) for name, code in fields)
        offsets: dict[str, int] = {}
        position = 0
        for name, code in self.fields:
            match = _CODE.match(code)
            if match is None:
                raise ValueError(f"field {name!r}: {code!r} is not one struct code with an optional count")
            if match.group(1) and match.group(2) not in "sx":
                raise ValueError(f"field {name!r}: a count only goes with 's' or 'x', got {code!r}")
            if match.group(2) != "x":
                if name in offsets:
                    raise ValueError(f"field {name!r} declared twice")
                offsets[name] = position
            position += struct.calcsize(byte_order + code)
        self._offsets = offsets
        self.names = tuple(offsets)
        self.struct = struct.Struct(byte_order + "".join(code for _, code in self.fields))
        assert self.struct.size == position
        self.size = self.struct.size
        self.format = self.struct.format
        # the struct's own bound methods: a layout costs nothing on the hot paths
        self.pack = self.struct.pack
        self.pack_into = self.struct.pack_into
        self.unpack = self.struct.unpack
        self.unpack_from = self.struct.unpack_from
        self.iter_unpack = self.struct.iter_unpack

    def __add__(self, more: "Layout | Iterable[tuple[str, str]]") -> "Layout":
        """This layout followed by more fields (a layout of the same byte order, or a field list)."""
        if isinstance(more, Layout):
            if more.byte_order != self.byte_order:
                raise ValueError(f"cannot join byte orders {self.byte_order!r} and {more.byte_order!r}")
            more = more.fields
        return Layout(self.byte_order, self.fields + tuple(more))

    def offset(self, name: str) -> int:
        """Byte offset of a field from the start of the record."""
        try:
            return self._offsets[name]
        except KeyError:
            raise KeyError(f"no field {name!r} in {self!r}") from None

    @cached_property
    def dtype(self):
        """The numpy structured dtype of the same bytes (padding left out, offsets kept)."""
        import numpy as np

        order = BYTE_ORDERS[self.byte_order]
        formats = []
        for name, code in self.fields:
            count, kind = _CODE.match(code).groups()
            if kind == "x":
                continue
            if kind == "s":
                formats.append(f"S{count or 1}")
            elif kind in "bB?":
                formats.append(_NUMPY_KIND[kind])
            else:
                formats.append(order + _NUMPY_KIND[kind])
        dtype = np.dtype({"names": list(self.names), "formats": formats,
                          "offsets": [self._offsets[name] for name in self.names], "itemsize": self.size})
        assert dtype.itemsize == self.size
        return dtype

    def __repr__(self) -> str:
        fields = " ".join(f"{name}:{code}" for name, code in self.fields)
        return f"Layout({self.byte_order!r}, {fields}; {self.size} bytes)"
