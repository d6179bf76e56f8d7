"""Verdicts: what happens to a redirected packet."""

from __future__ import annotations

from typing import Any

from boxcore.wire import VerdictCode

__all__ = ["Verdict", "VerdictCode"]


class Verdict:
    """What happens to a redirected packet.

    ``Verdict.CONSUME`` (the booster keeps it; a handler returning None means
    this), ``Verdict.PASS`` (it goes on unchanged), ``Verdict.modify(payload)``
    (it goes on with a new payload).
    """

    __slots__ = ("code", "payload")
    CONSUME: "Verdict"
    PASS: "Verdict"

    def __init__(self, code: VerdictCode, payload: bytes | None = None) -> None:
        self.code = VerdictCode(code)
        self.payload = payload

    @classmethod
    def modify(cls, payload: bytes) -> "Verdict":
        return cls(VerdictCode.MODIFY, bytes(payload))

    @staticmethod
    def coerce(result: Any) -> "Verdict":
        """A redirect handler's return value as a verdict (None: CONSUME; bytes: modify)."""
        if result is None:
            return Verdict.CONSUME
        if isinstance(result, Verdict):
            return result
        if isinstance(result, (bytes, bytearray, memoryview)):
            return Verdict.modify(bytes(result))
        raise TypeError(f"a redirect handler must return a Verdict, bytes or None, not {type(result).__name__}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Verdict) and (self.code, self.payload) == (other.code, other.payload)

    def __hash__(self) -> int:
        return hash((self.code, self.payload))

    def __repr__(self) -> str:
        if self.code is VerdictCode.MODIFY:
            return f"Verdict.modify({self.payload!r:.40})"
        return f"Verdict.{self.code.name}"


Verdict.CONSUME = Verdict(VerdictCode.CONSUME)
Verdict.PASS = Verdict(VerdictCode.PASS)
