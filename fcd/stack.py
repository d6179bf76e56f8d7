"""Start and stop the FCD roles as real processes (demo, integration tests, experiment).

Each role is its console-script module run with the current interpreter; readiness is a JSON
file the role writes once its sockets are bound (or its redirect is installed).  Every process
started here is stopped here (SIGTERM, then SIGKILL after a grace period), by its own pid.
"""

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
from typing import Callable


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Role:
    name: str
    proc: subprocess.Popen
    log: Path
    ready: Path | None = None
    stats: Path | None = None

    def read_stats(self) -> dict:
        if self.stats and self.stats.exists():
            return json.loads(self.stats.read_text())
        return {}


@dataclass
class Stack:
    workdir: Path
    log_level: str = "warning"
    on_start: Callable[[Role], None] | None = None   # e.g. put the pid into a cgroup
    roles: list[Role] = field(default_factory=list)

    def start(self, name: str, module: str, args: list[str], ready: bool = True, stats: bool = True,
              wrap: list[str] | None = None) -> Role:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{name}.log"
        ready_file = self.workdir / f"{name}.ready.json" if ready else None
        stats_file = self.workdir / f"{name}.stats.json" if stats else None
        for f in (ready_file, stats_file):
            if f is not None and f.exists():
                f.unlink()
        argv = (wrap or []) + [sys.executable, "-m", module, *args, "--log-level", self.log_level]
        if ready_file is not None:
            argv += ["--ready-file", str(ready_file)]
        if stats_file is not None:
            argv += ["--stats-json", str(stats_file)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log_file = open(log, "w")
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log_file, env=env,
                                    start_new_session=True)
        finally:
            log_file.close()          # the child has its own copy of the descriptor
        role = Role(name, proc, log, ready_file, stats_file)
        self.roles.append(role)
        if self.on_start is not None:
            self.on_start(role)
        return role

    async def wait_ready(self, role: Role, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if role.proc.poll() is not None:
                raise RuntimeError(f"{role.name} exited with {role.proc.returncode}: {role.log.read_text()[-800:]}")
            if role.ready is not None and role.ready.exists() and role.ready.stat().st_size:
                return json.loads(role.ready.read_text())
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{role.name} not ready after {timeout}s: {role.log.read_text()[-800:]}")

    async def wait_socket(self, role: Role, path: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if role.proc.poll() is not None:
                raise RuntimeError(f"{role.name} exited with {role.proc.returncode}: {role.log.read_text()[-800:]}")
            if path.exists():
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{role.name}: {path} did not appear: {role.log.read_text()[-800:]}")

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

    async def stop_all(self) -> None:
        for role in reversed(self.roles):   # boosters before boxd, servers last
            await self.stop(role)

    # ------------------------------------------------------------ roles
    def server(self, city: Path, udp: int, http: int, tuplespace: int | None, extra: list[str] = ()) -> Role:
        args = ["--city", str(city), "--udp", f"127.0.0.1:{udp}", "--http", f"127.0.0.1:{http}", *extra]
        if tuplespace:
            args += ["--serve-tuplespace", f"127.0.0.1:{tuplespace}"]
        return self.start("server", "fcd.server", args)

    async def box(self, name: str, city: Path, listen: int, server_udp: int, server_http: int,
                  engine_args: list[str] | None = None, booster_extra: list[str] = (),
                  control: Path | None = None) -> tuple[Role, Role]:
        """boxd (user engine, listening on ``listen``, relaying to the server) + fcd-booster."""
        control = control or self.workdir / f"{name}.sock"
        if control.exists():
            control.unlink()
        engine_args = engine_args if engine_args is not None else [
            "--engine", "user", "--listen", f"udp:127.0.0.1:{listen}=127.0.0.1:{server_udp}"]
        boxd = self.start(f"{name}-boxd", "boxcore.boxd",
                          [*engine_args, "--control", str(control), "--state", str(self.workdir / f"{name}-state")],
                          ready=False)
        await self.wait_socket(boxd, control)
        booster = self.start(f"{name}-booster", "fcd.booster",
                             ["--control", str(control), "--city", str(city), "--server-udp",
                              f"127.0.0.1:{server_udp}", "--server-http", f"127.0.0.1:{server_http}",
                              "--box-id", name, *booster_extra])
        await self.wait_ready(booster)
        return boxd, booster


def run_gen(trace: Path, targets: list[tuple[str, int]], extra: list[str], log_level: str = "warning",
            timeout: float = 300.0) -> dict:
    """Run fcd-gen to completion; its JSON summary."""
    argv = [sys.executable, "-m", "fcd.gen", "--trace", str(trace),
            "--targets", ",".join(f"{h}:{p}" for h, p in targets), "--log-level", log_level, *extra]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"fcd-gen failed ({out.returncode}): {out.stderr[-800:]}")
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1])


async def run_gen_async(*args, **kw) -> dict:
    return await asyncio.to_thread(run_gen, *args, **kw)
