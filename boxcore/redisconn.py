"""Opening a Redis store from a URL, one way for every store of the suite.

``redis://HOST:PORT/N``, ``rediss://...`` and ``unix:///path/redis.sock?db=N`` open one server;
``?cluster=1`` on a ``redis://`` URL opens a Redis Cluster from that startup node.  Clients are
``redis.asyncio`` clients that return bytes (values are msgpack or raw bytes).
"""

from __future__ import annotations

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
