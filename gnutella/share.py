"""The shared-directory index: files with their SHA-1 URNs and keywords."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from .qrp import RouteTable, keywords

_CHUNK = 1 << 16


def sha1_base32(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return base64.b32encode(digest.digest()).decode("ascii")


def sha1_base32_bytes(data: bytes) -> str:
    return base64.b32encode(hashlib.sha1(data).digest()).decode("ascii")


@dataclass(frozen=True, slots=True)
class SharedFile:
    index: int
    name: str
    size: int
    sha1: str          # base32, upper case
    path: Path

    @property
    def urn(self) -> str:
        return f"urn:sha1:{self.sha1}"


class ShareIndex:
    """Files of one directory (not recursive), indexed from 1, bounded by ``max_files``."""

    def __init__(self, files: list[SharedFile] | None = None) -> None:
        self.files: dict[int, SharedFile] = {f.index: f for f in files or []}
        self.by_sha1 = {f.sha1: f for f in self.files.values()}
        self._words = {f.index: set(keywords(f.name)) for f in self.files.values()}

    @classmethod
    def scan(cls, directory: Path | None, max_files: int = 10000) -> "ShareIndex":
        if directory is None:
            return cls([])
        if not directory.is_dir():
            raise NotADirectoryError(f"shared directory {directory} does not exist")
        files = []
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            if len(files) >= max_files:
                break
            files.append(SharedFile(len(files) + 1, path.name, path.stat().st_size, sha1_base32(path), path))
        return cls(files)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def kbytes(self) -> int:
        return sum(f.size for f in self.files.values()) // 1024

    def search(self, criteria: str, urns: tuple[str, ...] = (), limit: int = 50) -> list[SharedFile]:
        """Files whose name holds every keyword of the criteria, or whose SHA-1 is asked for."""
        found: list[SharedFile] = []
        for urn in urns:
            if urn.lower().startswith("urn:sha1:"):
                hit = self.by_sha1.get(urn[9:].upper())
                if hit is not None:
                    found.append(hit)
        wanted = set(keywords(criteria))
        if wanted:
            for index, words in self._words.items():
                if wanted <= words and self.files[index] not in found:
                    found.append(self.files[index])
        return found[:limit]

    def route_table(self, bits: int) -> RouteTable:
        table = RouteTable(bits)
        for shared in self.files.values():
            table.add_text(shared.name)
        return table

    def get(self, index: int) -> SharedFile | None:
        return self.files.get(index)
