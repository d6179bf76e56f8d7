"""Start and stop the FCD roles as real processes (demo, integration tests, experiment).

Each role is its console-script module run with the current interpreter, started, awaited and
stopped by the suite's :class:`boxcore.procs.ProcessGroup`: readiness is a JSON file the role
writes once its sockets are bound (or its redirect is installed); every process started here is
stopped here (SIGTERM, then SIGKILL after a grace period), by its own pid.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from boxcore.procs import ProcessGroup, Role, free_port, python_module

__all__ = ["Stack", "Role", "free_port", "run_gen", "run_gen_async"]


@dataclass
class Stack:
    """The FCD roles of one scenario, on a :class:`boxcore.procs.ProcessGroup`."""

    workdir: Path
    log_level: str = "warning"
    on_start: Callable[[Role], None] | None = None   # e.g. put the pid into a cgroup
    group: ProcessGroup = field(init=False)

    def __post_init__(self) -> None:
        self.group = ProcessGroup(self.workdir)

    @property
    def roles(self) -> list[Role]:
        return self.group.roles

    def start(self, name: str, module: str, args: list[str], ready: bool = True, stats: bool = True,
              wrap: list[str] | None = None) -> Role:
        """Run ``python -m module args`` (behind ``wrap``, e.g. a namespace command) in its own session."""
        argv = [*(wrap or []), *python_module(module), *args, "--log-level", self.log_level]
        self.group.on_start = self.on_start
        return self.group.start(name, argv, stats=stats, ready=ready, new_session=True)

    async def wait_ready(self, role: Role, timeout: float = 20.0) -> dict:
        return await self.group.wait_ready(role, timeout)

    async def wait_socket(self, role: Role, path: Path, timeout: float = 20.0) -> None:
        await self.group.wait_path(role, path, timeout)

    async def stop(self, role: Role, grace: float = 8.0) -> int:
        return await self.group.stop(role, grace)

    async def stop_all(self) -> None:
        await self.group.stop_all()   # reverse start order: boosters before boxd, servers last

    # ------------------------------------------------------------ roles
    def server(self, city: Path, udp: int, http: int, tuplespace: int | None, extra: list[str] = ()) -> Role:
        args = ["--city", str(city), "--udp", f"127.0.0.1:{udp}", "--http", f"127.0.0.1:{http}", *extra]
        if tuplespace:
            args += ["--serve-tuplespace", f"127.0.0.1:{tuplespace}"]
        return self.start("server", "fcd.server", args)

    async def box(self, name: str, city: Path, listen: int, server_udp: int, server_http: int,
                  engine_args: list[str] | None = None, booster_extra: list[str] = (),
                  control: Path | None = None, *, host: str = "127.0.0.1", server_host: str = "127.0.0.1",
                  wrap: list[str] | None = None, ready_timeout: float = 20.0) -> tuple[Role, Role]:
        """boxd (user engine, listening on ``host:listen``, relaying to the server at
        ``server_host``) + fcd-booster, both behind ``wrap`` (e.g. a lab node's namespace command)."""
        control = control or self.workdir / f"{name}.sock"
        if control.exists():
            control.unlink()
        engine_args = engine_args if engine_args is not None else [
            "--engine", "user", "--listen", f"udp:{host}:{listen}={server_host}:{server_udp}"]
        boxd = self.start(f"{name}-boxd", "boxcore.boxd",
                          [*engine_args, "--control", str(control), "--state", str(self.workdir / f"{name}-state")],
                          ready=False, wrap=wrap)
        await self.wait_socket(boxd, control)
        booster = self.start(f"{name}-booster", "fcd.booster",
                             ["--control", str(control), "--city", str(city), "--server-udp",
                              f"{server_host}:{server_udp}", "--server-http", f"{server_host}:{server_http}",
                              "--box-id", name, *booster_extra], wrap=wrap)
        await self.wait_ready(booster, ready_timeout)
        return boxd, booster


def run_gen(trace: Path, targets: list[tuple[str, int]], extra: list[str], log_level: str = "warning",
            timeout: float = 300.0) -> dict:
    """Run fcd-gen to completion (a :class:`ProcessGroup` role); its JSON summary."""
    argv = [*python_module("fcd.gen"), "--trace", str(trace),
            "--targets", ",".join(f"{h}:{p}" for h, p in targets), "--log-level", log_level, *extra]
    with tempfile.TemporaryDirectory(prefix="fcd-gen-") as tmp:
        role = ProcessGroup(Path(tmp)).run_sync("fcd-gen", argv, timeout)
        lines = [l for l in role.output().splitlines() if l.startswith("{")]
    return json.loads(lines[-1])


async def run_gen_async(*args, **kw) -> dict:
    return await asyncio.to_thread(run_gen, *args, **kw)
