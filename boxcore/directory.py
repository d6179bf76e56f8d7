"""The directory service: persistent key-value state per booster.

boxd keeps one SQLite database under its ``--state`` directory.  Each
booster has its own namespace of string keys holding msgpack-able values, so
a booster that restarts (or a boxd that restarts) finds its state again.
Boosters may also *watch* a key prefix and get every change as an event.

Design choices:

* SQLite in WAL mode with ``synchronous=NORMAL``: each write is its own small
  transaction without an fsync, durable across process crashes (not power
  loss), and readers never block the writer.
* Per-booster key counts are kept in memory (loaded at open) so the quota
  check costs no query.
* Limits: ``max_keys_per_booster``, ``max_value_bytes`` (of the msgpack
  encoding), ``max_key_chars``, ``max_watchers``, ``max_total_bytes`` (all
  values of all boosters: a box-wide bound), and a caller's ``max_growth`` per
  put (boxd's per-uid byte quota); every refusal is counted in
  :attr:`Directory.stats`.  Per-booster key counts and byte sizes are kept in
  memory (loaded at open).
* Names: the ``names`` table binds each booster name to the uid that first
  used it (:meth:`Directory.bind_name`), so a name - and the state under it -
  stays with its uid while the booster is down and across restarts.
* A watcher's queue is bounded and *coalescing*: pending changes are kept per
  key (latest value wins), so a slow watcher still converges to the current
  state; when more than ``max_pending`` distinct keys are pending the oldest
  is dropped and counted (``watch_overflow``, and ``Watch.overflowed``).
"""

from __future__ import annotations

import asyncio
import collections
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import msgpack

SCHEMA_VERSION = 2          # 2: the names table (booster names bound to uids)
DB_NAME = "directory.sqlite3"
DEFAULT_MAX_KEYS = 10_000
DEFAULT_MAX_VALUE_BYTES = 65_536
DEFAULT_MAX_KEY_CHARS = 1024
DEFAULT_MAX_WATCHERS = 1024
DEFAULT_MAX_PENDING = 1024
DEFAULT_MAX_TOTAL_BYTES = 256 << 20   # every booster's values together (box-wide bound)

_MISSING = object()


class DirectoryError(ValueError):
    """A refused directory operation (bad key or value, quota, limits)."""


class DirectoryOpenError(RuntimeError):
    """A directory that cannot be opened as configured (bad limit, unusable database or Redis URL,
    unreachable fleet store).  boxd reports it as a configuration error (one line, exit 2)."""


class DirectoryUnavailable(RuntimeError):
    """The directory's store cannot be reached now (a fleet directory's Redis): the operation did
    not happen; try again later."""


class QuotaExceeded(DirectoryError):
    """The booster already holds ``max_keys_per_booster`` keys."""


def encode_value(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DirectoryError(f"value is not msgpack-able: {exc}") from None


def decode_value(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:   # lone surrogates
        return False
    return True


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``
    (SQLite compares UTF-8 bytes, which orders like code points)."""
    chars = list(prefix)
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF and not 0xD7FF <= last < 0xE000:
            chars[-1] = chr(last + 1)
            return "".join(chars)
        chars.pop()
    return None


def set_limits(directory: Any, **limits: Any) -> None:
    """Check a backend's limits (positive integers) and set them as its attributes."""
    for name, limit in limits.items():
        if not isinstance(limit, int) or limit <= 0:
            raise DirectoryOpenError(f"directory {name} must be a positive integer, got {limit!r}")
    for name, limit in limits.items():
        setattr(directory, name, limit)


def check_key(stats: collections.Counter, max_key_chars: int, booster: str, key: str) -> None:
    """Refuse (and count) a booster name or key no backend may store."""
    if not isinstance(booster, str) or not booster:
        raise DirectoryError(f"booster name must be a non-empty string, got {booster!r}")
    if not isinstance(key, str) or not key:
        stats["refused_bad_key"] += 1
        raise DirectoryError(f"key must be a non-empty string, got {key!r}")
    if len(key) > max_key_chars:
        stats["refused_bad_key"] += 1
        raise DirectoryError(f"key of {len(key)} characters exceeds the limit of {max_key_chars}")
    if not _is_utf8(key) or not _is_utf8(booster):
        stats["refused_bad_key"] += 1
        raise DirectoryError(f"key {key!r} of booster {booster!r} is not valid Unicode text")


def check_value(stats: collections.Counter, max_value_bytes: int, value: Any) -> bytes:
    """``value`` encoded for storage; refuse (and count) what no backend may store."""
    if value is None:
        stats["refused_bad_value"] += 1
        raise DirectoryError("value None is reserved for deletions; use delete()")
    try:
        blob = encode_value(value)
    except DirectoryError:
        stats["refused_bad_value"] += 1
        raise
    if len(blob) > max_value_bytes:
        stats["refused_value_too_large"] += 1
        raise DirectoryError(f"value of {len(blob)} bytes exceeds the limit of {max_value_bytes}")
    return blob


def check_prefix(prefix: str, after: str | None = None) -> None:
    if not isinstance(prefix, str) or not _is_utf8(prefix):
        raise DirectoryError(f"prefix must be a Unicode string, got {prefix!r}")
    if after is not None and (not isinstance(after, str) or not _is_utf8(after)):
        raise DirectoryError(f"after must be a Unicode string, got {after!r}")


def new_watch(directory: Any, booster: str, prefix: str, max_pending: int | None) -> "Watch":
    """A :class:`Watch` on ``directory`` (either backend), within its limit of watchers (refusals counted)."""
    if not isinstance(prefix, str):
        raise DirectoryError(f"prefix must be a string, got {prefix!r}")
    if len(directory._watches) >= directory.max_watchers:
        directory.stats["refused_watchers"] += 1
        raise DirectoryError(f"too many watchers (limit {directory.max_watchers})")
    return Watch(directory, booster, prefix, max_pending or directory.max_pending)


class Watch:
    """Changes under ``prefix`` of one booster's keys: ``async for key, value
    in watch.events()`` (value None = deleted).  Close it when done."""

    def __init__(self, directory: "Directory", booster: str, prefix: str, max_pending: int) -> None:
        self.directory = directory
        self.booster = booster
        self.prefix = prefix
        self.max_pending = max_pending
        self.overflowed = 0
        self.closed = False
        self._pending: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._wakeup = asyncio.Event()
        self.live = True                            # False while a backend starts it (changes ignored)
        self.loading: asyncio.Task | None = None    # a backend starting it or reading the initial items

    async def ready(self) -> None:
        """Wait until the watch is live and the initial items (``watch(..., initial=True)``) are queued."""
        if self.loading is not None:
            await asyncio.shield(self.loading)

    def _offer(self, key: str, value: Any) -> None:
        if key in self._pending:
            self._pending[key] = value          # coalesce: the latest value wins
        else:
            if len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)
                self.overflowed += 1
                self.directory.stats["watch_overflow"] += 1
            self._pending[key] = value
        self._wakeup.set()

    def pending(self) -> list[tuple[str, Any]]:
        """Take every pending change now (no waiting)."""
        changes = list(self._pending.items())
        self._pending.clear()
        self._wakeup.clear()
        return changes

    async def get(self) -> tuple[str, Any]:
        """The next change; raises :class:`StopAsyncIteration` once closed."""
        while not self._pending:
            if self.closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._pending.popitem(last=False)

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        while True:
            try:
                yield await self.get()
            except StopAsyncIteration:
                return

    def __aiter__(self) -> AsyncIterator[tuple[str, Any]]:
        return self.events()

    def close(self) -> None:
        """Stop watching; a consumer waiting in :meth:`events` ends after the
        changes already pending."""
        if not self.closed:
            self.closed = True
            self.directory._unwatch(self)
            self._wakeup.set()


class Directory:
    """Per-booster persistent key-value store (see the module docstring)."""

    def __init__(self, path: str | Path, max_keys_per_booster: int = DEFAULT_MAX_KEYS,
                 max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES, *,
                 max_key_chars: int = DEFAULT_MAX_KEY_CHARS, max_watchers: int = DEFAULT_MAX_WATCHERS,
                 max_pending: int = DEFAULT_MAX_PENDING, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES) -> None:
        set_limits(self, max_keys_per_booster=max_keys_per_booster, max_value_bytes=max_value_bytes,
                   max_key_chars=max_key_chars, max_watchers=max_watchers, max_pending=max_pending,
                   max_total_bytes=max_total_bytes)
        self.path = self._db_path(Path(path))
        self.stats: collections.Counter[str] = collections.Counter()
        self._watches: list[Watch] = []
        self._db = self._open(self.path)
        self._counts: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        for booster, count, size in self._db.execute(
                "SELECT booster, COUNT(*), SUM(LENGTH(value)) FROM kv GROUP BY booster"):
            self._counts[booster] = count
            self._bytes[booster] = size or 0
        self.total_bytes = sum(self._bytes.values())

    # ---------------------------------------------------------- opening
    @staticmethod
    def _db_path(path: Path) -> Path:
        """``path`` is the state directory (created if missing) or a database file."""
        if path.suffix in (".sqlite3", ".sqlite", ".db"):
            db = path
        else:
            db = path / DB_NAME
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DirectoryOpenError(f"cannot create state directory {db.parent}: {exc.strerror or exc}") from None
        return db

    @staticmethod
    def _open(db_path: Path) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DirectoryOpenError(f"directory {db_path} has schema version {version}, "
                                     f"this boxd knows up to {SCHEMA_VERSION}")
            db.execute("CREATE TABLE IF NOT EXISTS kv (booster TEXT NOT NULL, key TEXT NOT NULL, "
                       "value BLOB NOT NULL, PRIMARY KEY (booster, key)) WITHOUT ROWID")
            db.execute("CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, uid INTEGER NOT NULL) "
                       "WITHOUT ROWID")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise DirectoryOpenError(f"cannot open directory database {db_path}: {exc}") from None
        return db

    def close(self) -> None:
        for watch in list(self._watches):
            watch.close()
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> "Directory":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---------------------------------------------------------- checks
    def _check_key(self, booster: str, key: str) -> None:
        check_key(self.stats, self.max_key_chars, booster, key)

    # ---------------------------------------------------------- operations
    def get(self, booster: str, key: str, default: Any = None) -> Any:
        self._check_key(booster, key)
        self.stats["gets"] += 1
        row = self._db.execute("SELECT value FROM kv WHERE booster=? AND key=?", (booster, key)).fetchone()
        return default if row is None else decode_value(row[0])

    def put(self, booster: str, key: str, value: Any, *, max_growth: int | None = None) -> None:
        """Store ``value`` (anything msgpack can encode, except None: use
        :meth:`delete`).  ``max_growth``: how many more bytes the caller's quota allows.
        Raises :class:`DirectoryError` / :class:`QuotaExceeded`."""
        self._check_key(booster, key)
        blob = check_value(self.stats, self.max_value_bytes, value)
        row = self._db.execute("SELECT LENGTH(value) FROM kv WHERE booster=? AND key=?",
                               (booster, key)).fetchone()
        growth = len(blob) - (row[0] if row else 0)
        if max_growth is not None and growth > max_growth:
            self.stats["refused_quota_bytes"] += 1
            raise QuotaExceeded(f"value of {len(blob)} bytes exceeds the byte quota of booster {booster!r}'s "
                                f"uid ({max(max_growth, 0)} bytes left)")
        if growth > 0 and self.total_bytes + growth > self.max_total_bytes:
            self.stats["refused_directory_full"] += 1
            raise QuotaExceeded(f"the directory is full ({self.total_bytes} of {self.max_total_bytes} bytes)")
        if row:
            self._db.execute("UPDATE kv SET value=? WHERE booster=? AND key=?", (blob, booster, key))
        else:
            count = self._counts.get(booster, 0)
            if count >= self.max_keys_per_booster:
                self.stats["refused_too_many_keys"] += 1
                raise QuotaExceeded(f"booster {booster!r} already has {count} keys "
                                    f"(limit {self.max_keys_per_booster})")
            self._db.execute("INSERT INTO kv (booster, key, value) VALUES (?, ?, ?)", (booster, key, blob))
            self._counts[booster] = count + 1
        self._grow(booster, growth)
        self.stats["puts"] += 1
        # Watchers get the decoded form, as a reader calling get() would.
        self._notify(booster, key, decode_value(blob))

    def delete(self, booster: str, key: str) -> bool:
        """Remove ``key``; True if it existed."""
        self._check_key(booster, key)
        row = self._db.execute("DELETE FROM kv WHERE booster=? AND key=? RETURNING LENGTH(value)",
                               (booster, key)).fetchone()
        if row is None:
            return False
        self._decrement(booster)
        self._grow(booster, -row[0])
        self.stats["deletes"] += 1
        self._notify(booster, key, None)
        return True

    def clear(self, booster: str) -> int:
        """Remove every key of ``booster``; returns how many."""
        keys = [key for key, _ in self.items(booster)]
        for key in keys:
            self.delete(booster, key)
        return len(keys)

    def _grow(self, booster: str, growth: int) -> None:
        self.total_bytes += growth
        size = self._bytes.get(booster, 0) + growth
        if size > 0:
            self._bytes[booster] = size
        else:
            self._bytes.pop(booster, None)

    def bytes_of(self, booster: str) -> int:
        """Bytes of ``booster``'s values (their msgpack encodings)."""
        return self._bytes.get(booster, 0)

    def _decrement(self, booster: str) -> None:
        remaining = self._counts.get(booster, 1) - 1
        if remaining > 0:
            self._counts[booster] = remaining
        else:
            self._counts.pop(booster, None)

    def items(self, booster: str, prefix: str = "") -> list[tuple[str, Any]]:
        """(key, value) pairs of ``booster`` whose key starts with ``prefix``, sorted by key."""
        return [(key, decode_value(blob)) for key, blob in self._rows(booster, prefix)]

    def _rows(self, booster: str, prefix: str, after: str | None = None) -> Iterator[tuple[str, bytes]]:
        check_prefix(prefix, after)
        upper = prefix_upper_bound(prefix)
        low, op = (prefix, ">=") if after is None or after < prefix else (after, ">")
        if upper is None:
            query = f"SELECT key, value FROM kv WHERE booster=? AND key{op}? ORDER BY key"
            args: tuple = (booster, low)
        else:
            query = f"SELECT key, value FROM kv WHERE booster=? AND key{op}? AND key<? ORDER BY key"
            args = (booster, low, upper)
        for key, blob in self._db.execute(query, args):
            if key.startswith(prefix):
                yield key, blob

    def page(self, booster: str, prefix: str = "", after: str | None = None, limit: int = 100,
             max_bytes: int = 1 << 20) -> tuple[list[tuple[str, Any]], str | None]:
        """At most ``limit`` items (and about ``max_bytes``) of ``booster`` under ``prefix`` whose
        key sorts after ``after``; returns them and the key to continue after (None: the end)."""
        out: list[tuple[str, Any]] = []
        size = 0
        for key, blob in self._rows(booster, prefix, after):
            if len(out) >= limit or (out and size + len(blob) > max_bytes):
                return out, out[-1][0]
            out.append((key, decode_value(blob)))
            size += len(blob) + len(key)
        return out, None

    def keys(self, booster: str, prefix: str = "", limit: int = 100) -> list[str]:
        """The first ``limit`` key names of ``booster`` under ``prefix``, in order; no value is
        read (the dashboard shows names, never values)."""
        if limit < 0:
            raise DirectoryError(f"limit must not be negative, got {limit}")
        check_prefix(prefix)
        upper = prefix_upper_bound(prefix)
        if upper is None:
            query, args = "SELECT key FROM kv WHERE booster=? AND key>=? ORDER BY key LIMIT ?", (booster, prefix, limit)
        else:
            query = "SELECT key FROM kv WHERE booster=? AND key>=? AND key<? ORDER BY key LIMIT ?"
            args = (booster, prefix, upper, limit)
        return [key for (key,) in self._db.execute(query, args) if key.startswith(prefix)]

    def count(self, booster: str) -> int:
        return self._counts.get(booster, 0)

    def boosters(self) -> dict[str, dict[str, int]]:
        """{booster: {"keys": n, "bytes": size of values}} (for the management API)."""
        rows = self._db.execute("SELECT booster, COUNT(*), SUM(LENGTH(value)) FROM kv GROUP BY booster")
        return {booster: {"keys": n, "bytes": size or 0} for booster, n, size in rows}

    # ---------------------------------------------------------- names
    def bind_name(self, name: str, uid: int) -> int | None:
        """Bind ``name`` to ``uid`` if it is free; returns the uid it is bound to when that
        is another uid (the caller refuses), else None."""
        row = self._db.execute("SELECT uid FROM names WHERE name=?", (name,)).fetchone()
        if row is not None:
            return None if row[0] == uid else row[0]
        self._db.execute("INSERT INTO names (name, uid) VALUES (?, ?)", (name, uid))
        self.stats["names_bound"] += 1
        return None

    def name_owner(self, name: str) -> int | None:
        row = self._db.execute("SELECT uid FROM names WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]

    def names_of(self, uid: int) -> list[str]:
        return [n for (n,) in self._db.execute("SELECT name FROM names WHERE uid=? ORDER BY name", (uid,))]

    def release_name(self, name: str) -> bool:
        """Forget a binding (an operator's decision; its state stays)."""
        return self._db.execute("DELETE FROM names WHERE name=?", (name,)).rowcount > 0

    # ---------------------------------------------------------- watching
    def watch(self, booster: str, prefix: str = "", *, initial: bool = False,
              max_pending: int | None = None) -> Watch:
        """Watch changes of ``booster``'s keys under ``prefix``.  With
        ``initial`` the current items are queued first, so the watcher sees
        the whole state and then every change (no gap)."""
        watch = new_watch(self, booster, prefix, max_pending)
        if initial:
            for key, value in self.items(booster, prefix):
                watch._offer(key, value)
        self._watches.append(watch)
        return watch

    def _unwatch(self, watch: Watch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)

    def _notify(self, booster: str, key: str, value: Any) -> None:
        for watch in self._watches:
            if watch.booster == booster and key.startswith(watch.prefix):
                watch._offer(key, value)

    @property
    def watcher_count(self) -> int:
        return len(self._watches)


class AsyncDirectory:
    """The interface boxd's controller uses, whichever the backend: awaitable ``get``, ``put``
    (with the caller's uid and its byte quota), ``delete``, ``items``, ``page``, ``count``,
    ``bytes_of``, ``uid_bytes`` and names (``bind_name``, ``name_owner``, ``names_of``,
    ``release_name``); synchronous ``watch`` and ``boosters`` (the management views); ``aclose``.

    This class serves it from a SQLite :class:`Directory` by calling it directly: each operation
    is one small local transaction (tens of microseconds), cheaper than a hop to a thread.
    :class:`boxcore.directory_redis.RedisDirectory` serves the same interface from Redis.
    """

    is_async = True

    def __init__(self, directory: Directory) -> None:
        self.sync = directory

    @property
    def stats(self) -> collections.Counter[str]:
        return self.sync.stats

    async def get(self, booster: str, key: str, default: Any = None) -> Any:
        return self.sync.get(booster, key, default)

    async def put(self, booster: str, key: str, value: Any, *, uid: int | None = None,
                  max_uid_bytes: int | None = None) -> None:
        max_growth = None
        if max_uid_bytes is not None and uid is not None:
            max_growth = max_uid_bytes - self.sync_uid_bytes(uid)
        self.sync.put(booster, key, value, max_growth=max_growth)

    def sync_uid_bytes(self, uid: int) -> int:
        return sum(self.sync.bytes_of(name) for name in self.sync.names_of(uid))

    async def delete(self, booster: str, key: str) -> bool:
        return self.sync.delete(booster, key)

    async def clear(self, booster: str) -> int:
        return self.sync.clear(booster)

    async def items(self, booster: str, prefix: str = "") -> list[tuple[str, Any]]:
        return self.sync.items(booster, prefix)

    async def page(self, booster: str, prefix: str = "", after: str | None = None, limit: int = 100,
                   max_bytes: int = 1 << 20) -> tuple[list[tuple[str, Any]], str | None]:
        return self.sync.page(booster, prefix, after, limit, max_bytes)

    async def count(self, booster: str) -> int:
        return self.sync.count(booster)

    async def bytes_of(self, booster: str) -> int:
        return self.sync.bytes_of(booster)

    async def uid_bytes(self, uid: int) -> int:
        return self.sync_uid_bytes(uid)

    async def total_bytes(self) -> int:
        return self.sync.total_bytes

    def boosters(self) -> dict[str, dict[str, int]]:
        return self.sync.boosters()

    async def bind_name(self, name: str, uid: int) -> int | None:
        return self.sync.bind_name(name, uid)

    async def name_owner(self, name: str) -> int | None:
        return self.sync.name_owner(name)

    async def names_of(self, uid: int) -> list[str]:
        return self.sync.names_of(uid)

    async def keys(self, booster: str, prefix: str = "", limit: int = 100) -> list[str]:
        return self.sync.keys(booster, prefix, limit)

    async def release_name(self, name: str) -> bool:
        return self.sync.release_name(name)

    async def sync_watches(self) -> None:
        """Changes reach local watchers as they are made: nothing to wait for."""

    def watch(self, booster: str, prefix: str = "", *, initial: bool = False,
              max_pending: int | None = None) -> Watch:
        return self.sync.watch(booster, prefix, initial=initial, max_pending=max_pending)

    @property
    def watcher_count(self) -> int:
        return self.sync.watcher_count

    async def aclose(self) -> None:
        self.sync.close()


def as_async(directory: Any) -> Any:
    """The async interface of ``directory``: itself if it has one (Redis), else an
    :class:`AsyncDirectory` over a SQLite :class:`Directory`; None stays None."""
    if directory is None or getattr(directory, "is_async", False):
        return directory
    return AsyncDirectory(directory)
