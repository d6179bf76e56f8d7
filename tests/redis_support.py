"""Real Redis servers for tests: one node and a 3-node cluster, started once per module.

Outside CI a missing ``redis-server`` skips with a reason; in CI it fails (bootstrap installs it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import tempfile
from pathlib import Path

import pytest

from boxcore.redisproc import RedisClusterNodes, RedisServer, redis_server_binary
from cliruntime import in_ci


def require_redis() -> None:
    if redis_server_binary() is None:
        if in_ci():
            pytest.fail("redis-server is missing in CI (tools/bootstrap.sh installs it as root)", pytrace=False)
        pytest.skip("redis-server is not installed")


def _in_own_loop(coro_fn) -> None:
    """Run ``coro_fn()`` to the end on a loop of its own (a fixture may be set up inside a test's loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro_fn()).result()


def _serve(factory):
    require_redis()
    with tempfile.TemporaryDirectory(prefix="bbredis") as tmp:
        server = factory(Path(tmp))
        _in_own_loop(server.start)
        try:
            yield server
        finally:
            _in_own_loop(server.stop)


@pytest.fixture(scope="module")
def redis_node():
    yield from _serve(lambda tmp: RedisServer(tmp))


@pytest.fixture(scope="module")
def redis_cluster():
    yield from _serve(lambda tmp: RedisClusterNodes(tmp, 3))
