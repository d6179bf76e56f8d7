"""Shared helpers for the gnutella tests: the real gtk-gnutella captures."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def hex_captures() -> list[tuple[str, str, bytes]]:
    """(mode, kind, bytes) rows of gtk-gnutella-1.2.3-server-side.hex.txt."""
    rows = []
    for line in (FIXTURES / "gtk-gnutella-1.2.3-server-side.hex.txt").read_text().splitlines():
        if line.strip():
            mode, kind, hx = line.split()
            rows.append((mode, kind, bytes.fromhex(hx)))
    return rows


def client_handshake(name: str) -> bytes:
    """The CONNECT block gtk-gnutella sent when it connected out (from a readable capture)."""
    text = (FIXTURES / name).read_text().splitlines()
    start = text.index("--- client handshake ---") + 1
    end = text.index("--- client final ---")
    return ("\r\n".join(text[start:end]) + "\r\n\r\n").encode()


@pytest.fixture
def captures():
    return hex_captures()


@pytest.fixture
def gtk_connect():
    """gtk_connect("leaf"|"ultrapeer") -> the bytes of gtk-gnutella's CONNECT block."""
    return lambda mode: client_handshake(f"gtk-gnutella-1.2.3-connects-as-{mode}.txt")
