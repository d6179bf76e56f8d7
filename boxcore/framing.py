"""Length-prefixed msgpack frames, the one framer of every stream protocol in the suite.

A frame is a 4-byte big-endian length then one msgpack object.  The boxd control protocol
(:mod:`boxcore.wire`), the booster-to-booster links of gnutella and the tuplespace protocol all
use it, each with its own validator and its own ``...DecodeError``.

Sans-IO: :class:`FrameDecoder` takes bytes and returns messages.  Bad input is reported two ways,
by how much of the stream survives it:

- a frame whose body is not valid (undecodable msgpack, or refused by the validator) comes back
  *in the list* as an instance of the protocol's error class; the stream goes on;
- a length of 0 or above ``max_frame`` raises :class:`FramingError`: boundaries are lost, the
  connection must be closed.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

import msgpack

from cliruntime.wirefields import Layout

LENGTH = Layout("!", (("length", "I"),))     # of the msgpack body that follows

T = TypeVar("T")


class FramingError(ValueError):
    """The frame boundaries are lost (a bad length): close the connection."""


def encode_frame(obj: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """One frame: the length prefix and the msgpack body."""
    body = msgpack.packb(obj, default=default, use_bin_type=True)
    return LENGTH.pack(len(body)) + body


class FrameDecoder(Generic[T]):
    """Bytes in; decoded (and, given ``validate``, validated) messages out.

    ``error`` is the protocol's ``ValueError`` subclass: undecodable or invalid frames are
    returned as instances of it.  ``ext_hook`` decodes msgpack extension types; anything it
    raises makes the frame invalid.
    """

    def __init__(self, max_frame: int, *, error: type[ValueError] = ValueError,
                 validate: Callable[[Any], T] | None = None,
                 ext_hook: Callable[[int, bytes], Any] | None = None) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self.max_frame = max_frame
        self._error = error
        self._validate = validate
        self._unpack_kwargs: dict[str, Any] = {"raw": False, "strict_map_key": False,
                                               "max_bin_len": max_frame, "max_str_len": max_frame}
        if ext_hook is not None:
            self._unpack_kwargs["ext_hook"] = ext_hook
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[T | ValueError]:
        self._buf += data
        out: list[T | ValueError] = []
        while len(self._buf) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._buf)
            if length == 0 or length > self.max_frame:
                raise FramingError(f"frame length {length} outside 1..{self.max_frame}")
            end = LENGTH.size + length
            if len(self._buf) < end:
                break
            body = bytes(self._buf[LENGTH.size:end])
            del self._buf[:end]
            out.append(self._decode(body))
        return out

    def _decode(self, body: bytes) -> T | ValueError:
        try:
            obj = msgpack.unpackb(body, **self._unpack_kwargs)
        except self._error as exc:
            return exc
        except Exception as exc:  # msgpack raises several unrelated types for garbage
            return self._error(f"undecodable msgpack: {type(exc).__name__}: {exc}")
        if self._validate is None:
            return obj
        try:
            return self._validate(obj)
        except self._error as exc:
            return exc

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held so far (bounded by ``max_frame`` + 4)."""
        return len(self._buf)
