"""Booster-to-booster protocol: the upper level of the two-level overlay.

Frames are the suite's (:mod:`boxcore.framing`: a 4-byte big-endian length then one msgpack map).  Every message
type and its fields are declared once in :data:`SCHEMA` and checked strictly
on decode (:class:`B2BDecodeError` names what was wrong).

=======  ===============================================================
hello    ``id`` booster name, ``cluster`` list of prefixes, ``v`` version
table    ``bits`` table size exponent, ``slots`` zlib-compressed bitmap of
         the QRP slots present in the cluster (the cluster's keyword table)
query    ``guid``, ``ttl``, ``hops``, ``criteria``, ``flags``, ``urns``
hit      ``guid`` (the query's), ``hops``, ``payload`` raw QueryHit payload
push     ``payload`` raw Push payload (routed by servent GUID)
bye      ``reason``
alive    (nothing) sent on a link quiet for a while, so silence means gone
=======  ===============================================================

Before any of these, with a shared secret, both ends authenticate (:class:`PeerAuth`):

=========  ===========================================================
challenge  ``nonce`` 32 random bytes, sent by each end at once
auth       ``mac`` HMAC-SHA256(secret, label, the peer's nonce, ours),
           the label saying which end computed it (connector/acceptor)
=========  ===========================================================
"""

from __future__ import annotations

import hashlib
import hmac
import zlib

from boxcore.framing import FrameDecoder, FramingError, encode_frame

from .qrp import RouteTable

__all__ = ["B2BAuthError", "B2BDecodeError", "FramingError", "PeerAuth", "SCHEMA", "VERSION", "encode",
           "frame_decoder", "table_from_message", "table_message", "validate"]

VERSION = 1
DEFAULT_MAX_FRAME = 256 * 1024


class B2BDecodeError(ValueError):
    """A malformed booster-to-booster frame; the message says what was wrong."""


SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"id": str, "cluster": list, "v": int},
    "table": {"bits": int, "slots": bytes},
    "query": {"guid": bytes, "ttl": int, "hops": int, "criteria": str, "flags": int, "urns": list},
    "hit": {"guid": bytes, "hops": int, "payload": bytes},
    "push": {"payload": bytes},
    "bye": {"reason": str},
    "alive": {},
    "challenge": {"nonce": bytes},
    "auth": {"mac": bytes},
}
NONCE_BYTES = 32
MIN_SECRET_BYTES = 16

# Integer fields that end up in a Gnutella header or payload: exactly the ranges those hold.
RANGES = {"ttl": (0, 255), "hops": (0, 255), "flags": (0, 0xFFFF), "v": (0, 0xFFFF)}


def validate(obj: object) -> dict:
    if not isinstance(obj, dict):
        raise B2BDecodeError(f"frame is a {type(obj).__name__}, not a map")
    kind = obj.get("t")
    if kind not in SCHEMA:
        raise B2BDecodeError(f"unknown message type {kind!r}")
    for name, typ in SCHEMA[kind].items():
        if name not in obj:
            raise B2BDecodeError(f"{kind}: missing field {name!r}")
        value = obj[name]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise B2BDecodeError(f"{kind}: field {name!r} is {type(value).__name__}, expected {typ.__name__}")
    extra = set(obj) - set(SCHEMA[kind]) - {"t"}
    if extra:
        raise B2BDecodeError(f"{kind}: unexpected fields {sorted(extra)}")
    if kind in ("query", "hit") and len(obj["guid"]) != 16:
        raise B2BDecodeError(f"{kind}: guid of {len(obj['guid'])} bytes, expected 16")
    for name, (low, high) in RANGES.items():
        if name in SCHEMA[kind] and not low <= obj[name] <= high:
            raise B2BDecodeError(f"{kind}: {name} {obj[name]} outside {low}..{high}")
    if kind == "challenge" and len(obj["nonce"]) != NONCE_BYTES:
        raise B2BDecodeError(f"challenge: nonce of {len(obj['nonce'])} bytes, expected {NONCE_BYTES}")
    if kind == "auth" and len(obj["mac"]) != hashlib.sha256().digest_size:
        raise B2BDecodeError(f"auth: mac of {len(obj['mac'])} bytes")
    if kind == "query" and "\x00" in obj["criteria"]:
        raise B2BDecodeError("query: NUL in criteria")
    if kind == "table" and not 1 <= obj["bits"] <= 20:
        raise B2BDecodeError(f"table: bits {obj['bits']} outside 1..20")
    if kind == "query" and not all(isinstance(u, str) for u in obj["urns"]):
        raise B2BDecodeError("query: urns must be strings")
    if kind == "hello" and not all(isinstance(c, str) for c in obj["cluster"]):
        raise B2BDecodeError("hello: cluster must be a list of prefixes")
    return obj


def encode(obj: dict) -> bytes:
    validate(obj)
    return encode_frame(obj)


def frame_decoder(max_frame: int = DEFAULT_MAX_FRAME) -> FrameDecoder:
    """The suite's framer with this protocol's validator: each malformed frame comes back as a
    :class:`B2BDecodeError` in the list (the stream goes on); a bad length raises
    :class:`~boxcore.framing.FramingError` (boundaries lost: close the link)."""
    return FrameDecoder(max_frame, error=B2BDecodeError, validate=validate)


def table_message(table: RouteTable) -> dict:
    return {"t": "table", "bits": table.bits, "slots": zlib.compress(bytes(table.bitmap))}


def table_from_message(msg: dict) -> RouteTable:
    bits = msg["bits"]
    size = 1 << bits
    want = size // 8 or 1
    decomp = zlib.decompressobj()
    try:
        bitmap = decomp.decompress(msg["slots"], want + 1)
    except zlib.error as exc:
        raise B2BDecodeError(f"table: bad zlib data: {exc}") from None
    if len(bitmap) != want:
        raise B2BDecodeError(f"table: bitmap of {len(bitmap)} bytes, expected {want}")
    if size < 8:   # a table smaller than its one byte: bits past the end are not slots
        bitmap = bytes([bitmap[0] & ((1 << size) - 1)])
    return RouteTable(bits, bitmap=bitmap)


class B2BAuthError(B2BDecodeError):
    """A peer that did not prove it holds the shared secret (or spoke before it did)."""


_AUTH_LABEL = b"booster-boxes gnutella b2b auth v1"


class PeerAuth:
    """Mutual challenge-response over one b2b link (sans-IO).

    Each end sends :meth:`challenge` at once; given the peer's challenge it answers with an
    ``auth`` whose MAC covers the peer's nonce (freshness), its own nonce and which end it is
    (so a MAC obtained by opening a second connection to a booster can never be replayed on the
    first: there that booster is the other end).  The peer's ``auth`` is checked in constant
    time; until it checks, any other frame is refused.  :attr:`done` once the peer is proven.
    """

    def __init__(self, secret: bytes, outgoing: bool, nonce: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"b2b secret of {len(secret)} bytes: at least {MIN_SECRET_BYTES} needed")
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce of {len(nonce)} bytes, expected {NONCE_BYTES}")
        self.secret = secret
        self.outgoing = outgoing
        self.nonce = nonce
        self.peer_nonce: bytes | None = None
        self.done = False

    def challenge(self) -> dict:
        return {"t": "challenge", "nonce": self.nonce}

    def _mac(self, connector: bool, verifier_nonce: bytes, prover_nonce: bytes) -> bytes:
        label = _AUTH_LABEL + (b" connector " if connector else b" acceptor ")
        return hmac.new(self.secret, label + verifier_nonce + prover_nonce, hashlib.sha256).digest()

    def receive(self, obj: dict) -> list[dict]:
        """Feed one validated frame of the peer; returns the frames to send back."""
        kind = obj["t"]
        if kind == "challenge" and self.peer_nonce is None:
            if hmac.compare_digest(obj["nonce"], self.nonce):
                raise B2BAuthError("challenge: our own nonce sent back")
            self.peer_nonce = obj["nonce"]
            return [{"t": "auth", "mac": self._mac(self.outgoing, self.peer_nonce, self.nonce)}]
        if kind == "auth" and self.peer_nonce is not None and not self.done:
            expected = self._mac(not self.outgoing, self.nonce, self.peer_nonce)
            if not hmac.compare_digest(obj["mac"], expected):
                raise B2BAuthError("auth: wrong MAC (not the shared secret)")
            self.done = True
            return []
        raise B2BAuthError(f"{kind} before authentication")
