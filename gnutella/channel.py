"""What sits between a socket and the Gnutella or HTTP bytes: TLS and deflate stream compression.

Both layers are sans-IO at their core, so nothing is lost at a protocol switch:

- :class:`Inflater` / :class:`Deflater`: one zlib stream per direction of a link
  (``Content-Encoding: deflate``).  Inflation is bounded: output is produced in chunks of at most
  ``chunk`` bytes and a stream whose output outgrows its input by more than ``max_ratio`` (after a
  ``slack`` allowance) is a decompression bomb: :class:`CompressionError`, the link is closed and
  counted by the caller.  Every send ends with a sync flush, as gtk-gnutella's streams do.
- TLS through :class:`ssl.SSLObject` on memory BIOs: bytes that arrived before the switch (a
  ClientHello read together with the last handshake block) are fed to TLS instead of being lost.

:class:`Channel` is the thin asyncio adapter: ``read``/``write``/``drain``/``close`` over a
``StreamReader``/``StreamWriter``, with :meth:`Channel.start_tls` switching it to TLS in place.
:func:`tls_contexts` builds the client and server contexts with a self-signed certificate made at
start (Gnutella peers do not authenticate each other's certificates: TLS hides the traffic).
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_RATIO = 64          # gtk-gnutella's streams inflate 2-3x; 64x is far beyond legitimate traffic
DEFAULT_SLACK = 256 * 1024       # the first bytes may inflate more (a QRP patch of zeros)
DEFAULT_CHUNK = 64 * 1024


class CompressionError(ValueError):
    """A deflate stream that cannot be trusted (corrupt, or inflating beyond the allowed ratio)."""


@dataclass
class Inflater:
    max_ratio: int = DEFAULT_MAX_RATIO
    slack: int = DEFAULT_SLACK
    chunk: int = DEFAULT_CHUNK
    bytes_in: int = 0
    bytes_out: int = 0
    _z: object = field(default_factory=zlib.decompressobj)

    def feed(self, data: bytes):
        """Yield inflated chunks of at most ``chunk`` bytes (the caller consumes each before the next)."""
        self.bytes_in += len(data)
        pending = data
        while True:
            try:
                out = self._z.decompress(pending, self.chunk)       # type: ignore[attr-defined]
            except zlib.error as exc:
                raise CompressionError(f"corrupt deflate stream: {exc}") from None
            self.bytes_out += len(out)
            if self.bytes_out > self.slack + self.max_ratio * self.bytes_in:
                raise CompressionError(f"decompression bomb: {self.bytes_in} bytes inflate to more than "
                                       f"{self.bytes_out} (limit {self.max_ratio}x)")
            if out:
                yield out
            pending = self._z.unconsumed_tail                       # type: ignore[attr-defined]
            if not pending:
                return


@dataclass
class Deflater:
    level: int = 6
    bytes_in: int = 0
    bytes_out: int = 0
    _z: object = None

    def __post_init__(self) -> None:
        self._z = zlib.compressobj(self.level)

    def compress(self, data: bytes) -> bytes:
        """Compress and sync-flush: the peer can decode everything sent so far."""
        out = self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)     # type: ignore[union-attr]
        self.bytes_in += len(data)
        self.bytes_out += len(out)
        return out


# ---------------------------------------------------------------- TLS

@dataclass(frozen=True)
class TlsContexts:
    client: ssl.SSLContext
    server: ssl.SSLContext


def self_signed_certificate(common_name: str = "gnutella") -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM), made now, valid for a year."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def tls_contexts(common_name: str = "gnutella") -> TlsContexts:
    cert, key = self_signed_certificate(common_name)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="gnutella-tls-") as tmp:   # load_cert_chain reads files only
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        server.load_cert_chain(cert_path, key_path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    client.check_hostname = False           # peers are anonymous: TLS hides traffic, it does not authenticate
    client.verify_mode = ssl.CERT_NONE
    return TlsContexts(client, server)


class Channel:
    """A connection's byte stream, in clear or TLS (switched in place with :meth:`start_tls`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read_size: int = 1 << 16) -> None:
        self.reader = reader
        self.writer = writer
        self.read_size = read_size
        self._tls: ssl.SSLObject | None = None
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self.raw_in = 0
        self.raw_out = 0

    @property
    def tls(self) -> bool:
        return self._tls is not None

    def tls_version(self) -> str | None:
        return self._tls.version() if self._tls is not None else None

    def peername(self):
        return self.writer.get_extra_info("peername")

    def sockname(self):
        return self.writer.get_extra_info("sockname")

    def is_closing(self) -> bool:
        return self.writer.is_closing()

    def write_buffer_size(self) -> int:
        transport = self.writer.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    async def _read_raw(self) -> bytes:
        data = await self.reader.read(self.read_size)
        self.raw_in += len(data)
        return data

    def _write_raw(self, data: bytes) -> None:
        if data:
            self.raw_out += len(data)
            self.writer.write(data)

    def _flush_tls(self) -> None:
        assert self._outgoing is not None
        self._write_raw(self._outgoing.read())

    async def read(self) -> bytes:
        """Up to ``read_size`` bytes of the (decrypted) stream; b"" at its end."""
        if self._tls is None:
            return await self._read_raw()
        assert self._incoming is not None
        while True:
            try:
                data = self._tls.read(self.read_size)
                self._flush_tls()       # TLS 1.3 may answer (key update, tickets)
                return data
            except ssl.SSLWantReadError:
                self._flush_tls()
                raw = await self._read_raw()
                if not raw:
                    return b""
                self._incoming.write(raw)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def write(self, data: bytes) -> None:
        if self._tls is None:
            self._write_raw(data)
            return
        self._tls.write(data)
        self._flush_tls()

    async def drain(self) -> None:
        await self.writer.drain()

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool, leftover: bytes = b"") -> None:
        """Run the TLS handshake on this connection; ``leftover``: bytes already read past the switch."""
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        if leftover:
            self._incoming.write(leftover)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._write_raw(self._outgoing.read())
                await self.writer.drain()
                raw = await self._read_raw()
                if not raw:
                    raise ConnectionResetError("connection closed during the TLS handshake")
                self._incoming.write(raw)
        self._tls = tls
        self._flush_tls()
        await self.writer.drain()

    def close(self) -> None:
        if self._tls is not None and not self.writer.is_closing():
            try:
                self._tls.unwrap()
            except ssl.SSLError:
                pass
            self._flush_tls()
        if not self.writer.is_closing():
            self.writer.close()
