"""Running the gnutella roles (and boxd) as real processes: for the demo, tests and the experiment."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

BIN = Path(sys.executable).parent


def script(name: str) -> str:
    """Path of a console script of this environment (falls back to PATH)."""
    path = BIN / name
    return str(path) if path.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Role:
    name: str
    argv: list[str]
    proc: subprocess.Popen
    log: Path
    stats: Path | None = None

    def read_stats(self) -> dict:
        if self.stats is None or not self.stats.exists():
            return {}
        return json.loads(self.stats.read_text())

    def tail(self, chars: int = 1200) -> str:
        try:
            return self.log.read_text()[-chars:]
        except OSError:
            return ""


@dataclass
class Procs:
    """Processes of one scenario, each logging to ``workdir/<name>.log``, stopped in reverse order."""

    workdir: Path
    roles: list[Role] = field(default_factory=list)
    env: dict | None = None

    def start(self, name: str, argv: Sequence[str], prefix: Sequence[str] = (), stats: bool = True) -> Role:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{name}.log"
        stats_path = self.workdir / f"{name}.stats.json" if stats else None
        full = [*prefix, *argv]
        if stats_path is not None:
            full += ["--stats-json", str(stats_path)]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with log.open("wb") as fh:
            proc = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        role = Role(name, full, proc, log, stats_path)
        self.roles.append(role)
        return role

    async def wait_for_log(self, role: Role, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in role.tail(1 << 20):
                return
            if role.proc.poll() is not None:
                raise RuntimeError(f"{role.name} exited with {role.proc.returncode}: {role.tail()}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{role.name}: {text!r} not logged within {timeout}s: {role.tail()}")

    async def wait_path(self, role: Role, path: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return
            if role.proc.poll() is not None:
                raise RuntimeError(f"{role.name} exited with {role.proc.returncode}: {role.tail()}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{role.name}: {path} did not appear: {role.tail()}")

    async def stop(self, role: Role, grace: float = 8.0) -> int:
        if role.proc.poll() is None:
            role.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while role.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if role.proc.poll() is None:
                role.proc.kill()
                role.proc.wait()
        return role.proc.returncode

    async def stop_all(self, grace: float = 8.0) -> None:
        for role in reversed(self.roles):
            await self.stop(role, grace)

    async def stop_many(self, roles: Sequence[Role], grace: float = 8.0) -> None:
        """SIGTERM a set of roles at once, then wait for them (faster than one by one)."""
        for role in roles:
            if role.proc.poll() is None:
                role.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(r.proc.poll() is None for r in roles) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for role in roles:
            if role.proc.poll() is None:
                role.proc.kill()
                role.proc.wait()
