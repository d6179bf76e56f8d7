"""Throwaway Redis servers for tests, demos and experiments (real ``redis-server`` processes).

:class:`RedisServer` is one node listening on a Unix socket in its own directory (no TCP port, no
persistence); :class:`RedisClusterNodes` is an N-node Redis Cluster on loopback TCP ports (a cluster
bus needs TCP), formed with ``redis-cli --cluster create``.  Both run through
:class:`boxcore.procs.ProcessGroup` and are stopped with it::

    async with RedisServer(tmpdir) as server:
        client = redis.asyncio.Redis.from_url(server.url)

``redis_server_binary()`` is None when ``redis-server`` is not installed; tests skip with a reason
outside CI and fail in CI (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

from boxcore.procs import ProcessGroup, Role, free_port

COMMON_OPTIONS = ["--save", "", "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"]


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def _require_binary() -> str:
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed (tools/bootstrap.sh installs it when run as root)")
    return binary


async def _wait_until(check, role: Role, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        role._check_alive()
        if check():
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{role.name}: {what} within {timeout}s: {role.tail()}")


def _cli(*args: str) -> str:
    out = subprocess.run(["redis-cli", *args], capture_output=True, text=True, timeout=30)
    return out.stdout + out.stderr


class RedisServer:
    """One ``redis-server`` on a Unix socket under ``workdir``."""

    def __init__(self, workdir: Path, name: str = "redis") -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.socket = self.workdir / f"{name}.sock"
        self.group = ProcessGroup(self.workdir)
        self.role: Role | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def start(self, timeout: float = 10.0) -> "RedisServer":
        binary = _require_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.role = self.group.start(self.name, [binary, "--port", "0", "--unixsocket", str(self.socket),
                                                 "--unixsocketperm", "700", "--dir", str(self.workdir),
                                                 *COMMON_OPTIONS], stats=False)
        try:
            await _wait_until(lambda: "PONG" in _cli("-s", str(self.socket), "ping"), self.role, timeout,
                              "no PONG")
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        await self.group.stop_all(grace=5.0)

    async def __aenter__(self) -> "RedisServer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


class RedisClusterNodes:
    """An N-node Redis Cluster (masters only) on loopback ports, formed and ready."""

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        if nodes < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self.workdir = Path(workdir)
        self.count = nodes
        self.group = ProcessGroup(self.workdir)
        self.ports: list[int] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=1"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.ports]

    async def start(self, timeout: float = 30.0) -> "RedisClusterNodes":
        binary = _require_binary()
        roles = []
        for index in range(self.count):
            port = free_port()
            node_dir = self.workdir / f"node{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            role = self.group.start(f"redis-node{index}", [
                binary, "--port", str(port), "--cluster-port", str(free_port()), "--bind", "127.0.0.1",
                "--dir", str(node_dir),
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "2000", *COMMON_OPTIONS], stats=False)
            self.ports.append(port)
            roles.append(role)
        try:
            await self._form(roles, timeout)
        except BaseException:
            await self.stop()        # no node of a cluster that did not form is left running
            raise
        return self

    async def _form(self, roles: list[Role], timeout: float) -> None:
        for role, port in zip(roles, self.ports):
            await _wait_until(lambda p=port: "PONG" in _cli("-p", str(p), "ping"), role, timeout, "no PONG")
        created = _cli("--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                       "--cluster-replicas", "0", "--cluster-yes")
        if "[OK] All 16384 slots covered" not in created:
            raise RuntimeError(f"redis cluster did not form: {created[-600:]}")
        for role, port in zip(roles, self.ports):
            await _wait_until(lambda p=port: "cluster_state:ok" in _cli("-p", str(p), "cluster", "info"),
                              role, timeout, "cluster not ok")

    async def stop(self) -> None:
        await self.group.stop_all(grace=5.0)

    async def __aenter__(self) -> "RedisClusterNodes":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
