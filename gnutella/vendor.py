"""Vendor messages (0x31) a servent exchanges right after the handshake, sans-IO.

Layout of every vendor message: vendor code (4 bytes), selector (uint16 LE), version (uint16 LE),
then the selector's data.  What we send and answer, as gtk-gnutella 1.2.3 does
(``tests/gnutella/fixtures/gtk-gnutella-1.2.3-vendor-messages.txt``):

- **Messages Supported** (vendor ``00000000``, selector 0, version 0; all-zero GUID, TTL 1): a
  uint16 LE count then (vendor 4, selector uint16 LE, version uint16 LE) per entry.  Sent once per
  link; a peer that never sends it is not a genuine servent to gtk-gnutella.  We list only what we
  answer: the GTKG Time Sync request and reply.
- **Features Supported** (``00000000``/10): uint16 LE count then (feature 4, version uint16 LE);
  recorded, never answered.
- **Time Sync request** (``GTKG``/9 v1, data: one flags byte): answered with a **Time Sync reply**
  (``GTKG``/10 v1) whose GUID keeps the request's first 8 bytes (its send time) and ends with our
  send time (seconds, microseconds: big-endian uint32 each), and whose data is our flags byte
  (bit 0: NTP; 0 here) and the time we received the request.
- Anything else is ignored and counted: vendor messages travel one hop and are never relayed.
"""

from __future__ import annotations

from dataclasses import dataclass

from cliruntime.wirefields import Layout

from .wire import GnutellaDecodeError, Message, VendorMessage

SUPPORTED_VENDOR = b"\0\0\0\0"
MESSAGES_SUPPORTED = 0
FEATURES_SUPPORTED = 10
GTKG = b"GTKG"
TIME_SYNC_REQUEST = 9
TIME_SYNC_REPLY = 10
ZERO_GUID = bytes(16)

_ENTRY = Layout("<", (("vendor", "4s"), ("selector", "H"), ("version", "H")))     # Messages Supported
_FEATURE = Layout("<", (("feature", "4s"), ("version", "H")))                     # Features Supported
_COUNT = Layout("<", (("count", "H"),))
_STAMP = Layout(">", (("seconds", "I"), ("microseconds", "I")))                  # Time Sync

# (vendor, selector, version) we answer; listed in our Messages Supported
OUR_MESSAGES: tuple[tuple[bytes, int, int], ...] = ((GTKG, TIME_SYNC_REQUEST, 1), (GTKG, TIME_SYNC_REPLY, 1))


@dataclass(frozen=True, slots=True)
class Supported:
    """A decoded Messages Supported or Features Supported list."""
    kind: str                                   # "messages" | "features"
    entries: tuple[tuple[bytes, int, int], ...]  # (vendor or feature, selector (0 for features), version)


def encode_messages_supported(entries=OUR_MESSAGES) -> VendorMessage:
    data = _COUNT.pack(len(entries)) + b"".join(_ENTRY.pack(v, s, ver) for v, s, ver in entries)
    return VendorMessage(SUPPORTED_VENDOR, MESSAGES_SUPPORTED, 0, data)


def messages_supported_message(entries=OUR_MESSAGES) -> Message:
    return Message(ZERO_GUID, 1, 0, encode_messages_supported(entries))


def decode_supported(vm: VendorMessage) -> Supported:
    if vm.vendor != SUPPORTED_VENDOR or vm.selector not in (MESSAGES_SUPPORTED, FEATURES_SUPPORTED):
        raise GnutellaDecodeError("not a supported-messages or supported-features list")
    features = vm.selector == FEATURES_SUPPORTED
    item = _FEATURE if features else _ENTRY
    if len(vm.data) < _COUNT.size:
        raise GnutellaDecodeError("supported list without its count")
    (count,) = _COUNT.unpack_from(vm.data)
    if len(vm.data) != _COUNT.size + count * item.size:
        raise GnutellaDecodeError(f"supported list: count {count} does not match {len(vm.data)} bytes")
    entries = []
    for i in range(count):
        fields = item.unpack_from(vm.data, _COUNT.size + i * item.size)
        entries.append((fields[0], 0, fields[1]) if features else fields)
    return Supported("features" if features else "messages", tuple(entries))


def _stamp(wall: float) -> bytes:
    seconds = int(wall)
    return _STAMP.pack(seconds & 0xFFFFFFFF, int((wall - seconds) * 1_000_000))


def time_sync_reply(request: Message, received_wall: float, sent_wall: float) -> Message:
    """The answer to a GTKG Time Sync request received at ``received_wall`` and answered at ``sent_wall``."""
    guid = request.guid[:8] + _stamp(sent_wall)
    return Message(guid, 1, 0, VendorMessage(GTKG, TIME_SYNC_REPLY, 1, b"\0" + _stamp(received_wall)))


def answer(msg: Message, wall: float, stats) -> list[Message]:
    """What to send back to the peer that sent vendor message ``msg`` (usually nothing)."""
    vm = msg.payload
    assert isinstance(vm, VendorMessage)
    key = (vm.vendor, vm.selector)
    if key in ((SUPPORTED_VENDOR, MESSAGES_SUPPORTED), (SUPPORTED_VENDOR, FEATURES_SUPPORTED)):
        try:
            decode_supported(vm)
        except GnutellaDecodeError:
            stats["vendor_malformed"] += 1
            return []
        stats["vendor_supported_lists"] += 1
        return []
    if key == (GTKG, TIME_SYNC_REQUEST) and vm.version == 1 and not vm.standard:
        stats["vendor_time_sync_answered"] += 1
        return [time_sync_reply(msg, wall, wall)]
    stats["vendor_ignored"] += 1
    return []
