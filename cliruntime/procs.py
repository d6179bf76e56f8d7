"""Running the suite's roles as real processes, for demos, integration tests and experiments.

A :class:`ProcessGroup` (also importable as ``boxcore.procs``; it lives here because npdrv
uses it and never imports boxcore) starts console scripts (or anything else) with their output in
``workdir/<name>.log`` and, optionally, ``--stats-json workdir/<name>.stats.json`` and
``--ready-file workdir/<name>.ready.json``; it waits for them to be ready and stops them
(SIGTERM, then SIGKILL after a grace period), each by its own pid::

    group = ProcessGroup(workdir)
    boxd = group.start("boxd", [script("boxd"), "--engine", "user", ...])
    await group.wait_path(boxd, control_socket)
    ...
    await group.stop_all()          # in reverse start order: boosters before boxd

Synchronous code uses the ``*_sync`` twins (same checks, same SIGTERM-then-SIGKILL stop), and a
role that runs to completion (a generator, a sub-experiment) is :meth:`ProcessGroup.run`: its
output (stdout and stderr) is its log, read back with :meth:`Role.output`.
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
from typing import Callable, Sequence

BIN = Path(sys.executable).parent
POLL_INTERVAL = 0.05   # for conditions that have no event to wait on (a file, a log line)


def script(name: str) -> str:
    """Path of a console script of this environment (falls back to PATH)."""
    path = BIN / name
    return str(path) if path.exists() else name


def python_module(module: str) -> list[str]:
    """Command line running ``module`` with this interpreter (``python -m module``)."""
    return [sys.executable, "-m", module]


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port the kernel just gave out on ``host`` (free now, not reserved)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Role:
    """One started process."""

    name: str
    argv: list[str]
    proc: subprocess.Popen
    log: Path
    stats: Path | None = None
    ready: Path | None = None

    def read_stats(self) -> dict:
        if self.stats is None or not self.stats.exists():
            return {}
        return json.loads(self.stats.read_text())

    def tail(self, chars: int = 1200) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def output(self) -> str:
        """Everything the role printed so far (stdout and stderr, in order)."""
        return self.tail(1 << 62)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")


@dataclass
class ProcessGroup:
    """The processes of one scenario."""

    workdir: Path
    env: dict | None = None
    on_start: Callable[[Role], None] | None = None   # e.g. put the pid into a cgroup
    roles: list[Role] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], *, stats: bool = True, ready: bool = False,
              new_session: bool = False) -> Role:
        """Start ``argv`` (a full command line); ``stats``/``ready`` append the suite's options."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{name}.log"
        stats_path = self.workdir / f"{name}.stats.json" if stats else None
        ready_path = self.workdir / f"{name}.ready.json" if ready else None
        full = list(argv)
        for option, path in (("--stats-json", stats_path), ("--ready-file", ready_path)):
            if path is not None:
                path.unlink(missing_ok=True)
                full += [option, str(path)]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with log.open("wb") as fh:
            proc = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=new_session)
        role = Role(name, full, proc, log, stats_path, ready_path)
        self.roles.append(role)
        if self.on_start is not None:
            self.on_start(role)
        return role

    @staticmethod
    def _poll_step(role: Role, done: Callable[[], bool], deadline: float, what: str) -> bool:
        """One look: True when ``done``; raises if the role died or the deadline passed."""
        if done():
            return True
        role._check_alive()
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{role.name}: {what} in time: {role.tail()}")
        return False

    async def wait_until(self, role: Role, done: Callable[[], bool], timeout: float = 20.0,
                         what: str = "condition not met") -> None:
        """Poll ``done`` (for conditions with no event to wait on) while the role keeps running."""
        deadline = time.monotonic() + timeout
        while not self._poll_step(role, done, deadline, what):
            await asyncio.sleep(POLL_INTERVAL)

    def wait_until_sync(self, role: Role, done: Callable[[], bool], timeout: float = 20.0,
                        what: str = "condition not met") -> None:
        deadline = time.monotonic() + timeout
        while not self._poll_step(role, done, deadline, what):
            time.sleep(POLL_INTERVAL)

    async def wait_for_log(self, role: Role, text: str, timeout: float = 20.0) -> None:
        await self.wait_until(role, lambda: text in role.output(), timeout, f"{text!r} not logged")

    async def wait_path(self, role: Role, path: Path, timeout: float = 20.0) -> None:
        await self.wait_until(role, path.exists, timeout, f"{path} did not appear")

    def wait_path_sync(self, role: Role, path: Path, timeout: float = 20.0) -> None:
        self.wait_until_sync(role, path.exists, timeout, f"{path} did not appear")

    def wait_for_log_sync(self, role: Role, text: str, timeout: float = 20.0) -> None:
        self.wait_until_sync(role, lambda: text in role.output(), timeout, f"{text!r} not logged")

    async def wait_ready(self, role: Role, timeout: float = 20.0) -> dict:
        """Wait for the role's ``--ready-file`` and return what it says."""
        if role.ready is None:
            raise ValueError(f"{role.name} was started without ready=True")
        path = role.ready
        await self.wait_until(role, lambda: path.exists() and path.stat().st_size > 0, timeout, "not ready")
        return json.loads(path.read_text())

    # ------------------------------------------------------------ stopping
    @staticmethod
    def terminate(roles: Sequence[Role]) -> None:
        """SIGTERM the roles still running, without waiting (e.g. from a signal handler)."""
        for role in roles:
            if role.proc.poll() is None:
                role.proc.send_signal(signal.SIGTERM)

    def stop_many_sync(self, roles: Sequence[Role], grace: float = 8.0) -> None:
        """SIGTERM a set of roles at once, wait for them, SIGKILL what is left after ``grace``."""
        self.terminate(roles)
        deadline = time.monotonic() + grace
        for role in roles:
            try:
                role.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                role.proc.kill()
                role.proc.wait()

    async def stop_many(self, roles: Sequence[Role], grace: float = 8.0) -> None:
        await asyncio.to_thread(self.stop_many_sync, roles, grace)

    def stop_sync(self, role: Role, grace: float = 8.0) -> int:
        self.stop_many_sync([role], grace)
        return role.proc.returncode

    async def stop(self, role: Role, grace: float = 8.0) -> int:
        await self.stop_many([role], grace)
        return role.proc.returncode

    def stop_all_sync(self, grace: float = 8.0) -> None:
        """Stop every role, one by one in reverse start order (boosters before boxd)."""
        for role in reversed(self.roles):
            self.stop_sync(role, grace)

    async def stop_all(self, grace: float = 8.0) -> None:
        await asyncio.to_thread(self.stop_all_sync, grace)

    # ------------------------------------------------------------ roles that run to completion
    def wait_exit_sync(self, role: Role, timeout: float | None = None) -> int:
        """Wait for the role to end by itself; past ``timeout`` it is stopped and this raises."""
        try:
            return role.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop_sync(role)
            raise RuntimeError(f"{role.name} still running after {timeout}s: {role.tail()}") from None

    def run_sync(self, name: str, argv: Sequence[str], timeout: float | None = None, *,
                 stats: bool = False, check: bool = True) -> Role:
        """Start ``argv`` and wait for it to end; ``check`` raises on a non-zero exit status."""
        role = self.start(name, argv, stats=stats)
        code = self.wait_exit_sync(role, timeout)
        if check and code != 0:
            raise RuntimeError(f"{name} failed ({code}): {role.tail(800)}")
        return role

    async def run(self, name: str, argv: Sequence[str], timeout: float | None = None, *,
                  stats: bool = False, check: bool = True) -> Role:
        return await asyncio.to_thread(self.run_sync, name, argv, timeout, stats=stats, check=check)
