"""Opening a Redis store from a URL, one way for every store of the suite.

``redis://HOST:PORT/N``, ``rediss://...`` and ``unix:///path/redis.sock?db=N`` open one server;
``?cluster=1`` on a ``redis://`` URL opens a Redis Cluster from that startup node.  Clients are
``redis.asyncio`` clients that return bytes (values are msgpack or raw bytes).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

REDIS_SCHEMES = ("redis", "rediss", "unix")


def is_redis_url(text: str | None) -> bool:
    return isinstance(text, str) and urlsplit(text).scheme in REDIS_SCHEMES


def open_redis(url: str, *, max_connections: int | None = None):
    """A ``redis.asyncio.Redis`` (or ``RedisCluster`` with ``?cluster=1``) for ``url``."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster

    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError(f"not a Redis URL: {url!r} (redis://HOST:PORT/N, rediss://..., unix:///path)")
    query = parse_qs(parts.query)
    if query.get("cluster", ["0"])[0] in ("1", "true", "yes"):
        if parts.scheme == "unix":
            raise ValueError("a Redis Cluster is reached over TCP (redis://HOST:PORT?cluster=1)")
        plain = parts._replace(query="").geturl()
        return RedisCluster.from_url(plain, decode_responses=False,
                                     **({"max_connections": max_connections} if max_connections else {}))
    kwargs = {"decode_responses": False}
    if max_connections:
        kwargs["max_connections"] = max_connections
    return aioredis.Redis.from_url(url, **kwargs)


def redacted(url: str) -> str:
    """``url`` without its password (error messages and logs must not carry it)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name if it has none): for one-line errors."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def unavailable_on_redis_errors(error: type[Exception], what: str, counter: str,
                                slots: str | None = None) -> Callable:
    """Decorate a store's async methods: a lost or refusing Redis becomes ``error("<what> is
    unreachable: <reason>")`` (one line, no traceback), counted in ``self.stats[counter]``.

    With ``slots`` (the name of an ``asyncio.Semaphore`` attribute), at most that many calls run at
    once and the others wait their turn: redis-py's pool refuses past its size rather than waiting."""
    def decorate(method):
        @functools.wraps(method)
        async def wrapper(self: Any, *args: Any, **kwargs: Any):
            from redis.exceptions import RedisError

            gate = getattr(self, slots) if slots else contextlib.nullcontext()
            try:
                async with gate:
                    return await method(self, *args, **kwargs)
            except (RedisError, OSError) as exc:
                self.stats[counter] += 1
                raise error(f"{what} is unreachable: {first_line(exc)}") from None
        return wrapper
    return decorate
