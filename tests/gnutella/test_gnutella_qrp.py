import zlib
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from gnutella.qrp import MAX_TABLE_SIZE, RouteTable, TableReceiver, keywords, qrp_hash, receive_table
from gnutella.wire import GnutellaDecodeError, QrpPatch, QrpReset, decode_message


# The QRP specification's test vectors (as also checked by LimeWire and gtk-gnutella).
SPEC_VECTORS = [
    ("", 13, 0), ("eb", 13, 6791), ("ebc", 13, 7082), ("ebck", 13, 6698), ("ebckl", 13, 3179),
    ("ebcklm", 13, 3235), ("ebcklme", 13, 6438), ("ebcklmen", 13, 1062), ("ebcklmenq", 13, 3527),
    ("", 16, 0), ("n", 16, 65003), ("nd", 16, 54193), ("ndf", 16, 4953), ("ndfl", 16, 58201),
    ("ndfla", 16, 34830), ("ndflal", 16, 36910), ("ndflale", 16, 34586), ("ndflalem", 16, 37658),
    ("ndflaleme", 16, 45559), ("ol2j34lj", 10, 318), ("asdfas23", 10, 503), ("9um3o34fd", 10, 758),
    ("a234d", 10, 281), ("a3f", 10, 767), ("3nja9", 10, 581), ("2459345938032343", 10, 146),
    ("7777a88a8a8a8", 10, 342), ("asdfjklkj3k", 10, 861), ("adfk32l", 10, 1011),
    ("zzzzzzzzzzz", 10, 944), ("3NJA9", 10, 581), ("3nJa9", 10, 581),
]


@pytest.mark.parametrize("word,bits,expected", SPEC_VECTORS)
def test_spec_hash_vectors(word, bits, expected):
    assert qrp_hash(word, bits) == expected


def test_spec_says_FAIL_does_not_hash_to_37458():
    assert qrp_hash("FAIL", 16) != 37458


def test_gtk_gnutella_table_decodes_and_routes(captures):
    receiver = TableReceiver()
    table = None
    for _, _, raw in captures[1:3]:
        table = receiver.receive(decode_message(raw).payload)
    assert table is not None and table.size == 16384
    # gtk-gnutella shared one file, "booster-sample-alpha.txt"
    assert table.matches("booster sample") and table.matches("alpha txt")
    assert not table.matches("zebra crossing")
    assert len(table.present) == 10


def test_keywords_split_and_lower():
    assert keywords("Free_Software-Song.OGG") == ["free", "software", "song", "ogg"]
    assert keywords("a bb ccc") == ["ccc"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=3, max_size=12), max_size=40),
       st.sampled_from([10, 13, 16]), st.sampled_from([4, 8]), st.sampled_from([100, 4096]))
def test_table_survives_reset_and_patches(names, bits, entry_bits, chunk):
    table = RouteTable(bits)
    for name in names:
        table.add_text(name)
    receiver = TableReceiver()
    rebuilt = None
    for msg in table.to_messages(entry_bits=entry_bits, max_chunk=chunk):
        rebuilt = receiver.receive(QrpPatch.decode(msg.encode()) if isinstance(msg, QrpPatch) else QrpReset.decode(msg.encode()))
    assert rebuilt is not None and rebuilt.present == table.present
    for name in names:
        assert rebuilt.matches(name)


def test_patch_before_reset_and_out_of_sequence_are_refused():
    receiver = TableReceiver()
    with pytest.raises(GnutellaDecodeError, match="before RESET"):
        receiver.receive(QrpPatch(1, 1, 0, 4, b"\x00" * 512))
    receiver.receive(QrpReset(1024, 7))
    with pytest.raises(GnutellaDecodeError, match="out of sequence"):
        receiver.receive(QrpPatch(2, 2, 0, 4, b""))


def test_bad_zlib_and_wrong_size_and_oversized_table():
    receiver = TableReceiver(max_table_size=1 << 12)
    with pytest.raises(GnutellaDecodeError, match="outside"):
        receiver.receive(QrpReset(1 << 16, 7))
    receiver.receive(QrpReset(1024, 7))
    with pytest.raises(GnutellaDecodeError, match="zlib"):
        receiver.receive(QrpPatch(1, 1, 1, 4, b"not zlib"))
    with pytest.raises(GnutellaDecodeError, match="table needs 512"):
        receiver.receive(QrpPatch(1, 1, 1, 4, zlib.compress(b"\x00" * 100)))


def _flood_patch(slots: int) -> list:
    """A RESET and one zlib PATCH marking every slot present: a few hundred bytes on the wire."""
    return [QrpReset(slots, 7), QrpPatch(1, 1, 1, 4, zlib.compress(b"\xaa" * (slots // 2), 9))]


def test_huge_table_is_refused_and_counted_and_its_patches_dropped():
    """Review finding: a RESET of 2**20 slots plus one 543-byte PATCH built a 1,048,576-entry
    set (66 MB, seconds of CPU on the event loop).  Larger than MAX_TABLE_SIZE is refused."""
    class Link:
        qrp = TableReceiver()
        table = None
    stats: Counter = Counter()
    reset, patch = _flood_patch(1 << 20)
    assert len(patch.encode()) < 1100
    assert not receive_table(Link, reset, stats)
    assert not receive_table(Link, patch, stats)
    assert Link.table is None
    assert stats == Counter(qrp_refused_size=1, qrp_patches_dropped=1)


def test_a_full_table_of_the_largest_accepted_size_is_cheap():
    receiver = TableReceiver()
    table = None
    for msg in _flood_patch(MAX_TABLE_SIZE):
        table = receiver.receive(msg)
    assert table is not None and table.fill_ratio() == 1.0
    assert len(table.bitmap) == MAX_TABLE_SIZE // 8      # a bitmap, not a set of ints
    assert table.matches("anything at all")


def test_resets_are_rate_limited_per_link():
    class Link:
        qrp = TableReceiver(reset_burst=2, reset_interval=10.0)
        table = None
    stats: Counter = Counter()
    small = RouteTable(10, {1, 2, 3}).to_messages()
    for now in (0.0, 1.0, 2.0):
        for msg in small:
            receive_table(Link, msg, stats, now)
    assert stats["qrp_tables"] == 2 and stats["qrp_rate_limited"] == 1
    assert stats["qrp_patches_dropped"] == 1
    for msg in small:        # the window has passed: accepted again
        receive_table(Link, msg, stats, 25.0)
    assert stats["qrp_tables"] == 3


def test_patch_bytes_buffered_are_bounded():
    receiver = TableReceiver()
    receiver.receive(QrpReset(1 << 10, 7))
    receiver.receive(QrpPatch(1, 3, 0, 4, b"\x00" * 400))
    with pytest.raises(GnutellaDecodeError, match="exceeds 512"):
        receiver.receive(QrpPatch(2, 3, 0, 4, b"\x00" * 400))


def _reference_present(size: int, infinity: int, patches: list[tuple[int, bytes]]) -> set[int]:
    """The specification's arithmetic slot by slot (the slow loop the receiver used to run)."""
    values = [infinity] * size
    for bits, data in patches:
        per_byte, mask, sign = 8 // bits, (1 << bits) - 1, 1 << (bits - 1)
        for i, byte in enumerate(data):
            for k in range(per_byte):
                nib = (byte >> (8 - bits * (k + 1))) & mask
                delta = nib - (1 << bits) if nib & sign else nib
                values[i * per_byte + k] = (values[i * per_byte + k] + delta) & 0xFF
    return {i for i, v in enumerate(values) if v < infinity}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([64, 128, 1024]), st.integers(1, 255), st.data())
def test_vectorised_patches_match_the_specifications_arithmetic(size, infinity, data):
    receiver = TableReceiver()
    receiver.receive(QrpReset(size, infinity))
    patches = []
    table = None
    for _ in range(data.draw(st.integers(1, 3))):
        bits = data.draw(st.sampled_from([1, 2, 4, 8]))
        raw = data.draw(st.binary(min_size=size * bits // 8, max_size=size * bits // 8))
        patches.append((bits, raw))
        table = receiver.receive(QrpPatch(1, 1, 0, bits, raw))
    assert table is not None and table.present == _reference_present(size, infinity, patches)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(
    st.builds(QrpReset, st.sampled_from([1 << k for k in range(0, 24)]), st.integers(1, 255)),
    st.builds(QrpPatch, st.integers(1, 3), st.integers(3, 3), st.sampled_from([0, 1]), st.sampled_from([1, 2, 4, 8]),
              st.binary(max_size=600))), max_size=8))
def test_any_qrp_sequence_is_decoded_or_refused_and_stays_bounded(messages):
    class Link:
        qrp = TableReceiver()
        table = None
    stats: Counter = Counter()
    for now, msg in enumerate(messages):
        receive_table(Link, msg, stats, float(now))
        if Link.table is not None:
            assert Link.table.size <= MAX_TABLE_SIZE and len(Link.table.bitmap) == max(1, Link.table.size // 8)
    assert sum(stats.values()) <= len(messages)
