"""cliruntime.procs.ProcessGroup (re-exported as boxcore.procs): one way to start, await, run to completion and stop a role, in
asyncio code and in synchronous code alike (real processes)."""

import asyncio
import signal
import sys
import time

import pytest

from cliruntime.procs import ProcessGroup

pytestmark = pytest.mark.timeout(60)

# a role that prints "up", then on SIGTERM prints "bye" and exits 0 (or, stubborn, ignores SIGTERM)
ROLE = r"""
import signal, sys, time
stubborn = sys.argv[1] == "stubborn"
stop = []
signal.signal(signal.SIGTERM, signal.SIG_IGN if stubborn else lambda *_: stop.append(1))
print("up", flush=True)
while not stop:
    time.sleep(0.01)
print("bye", flush=True)
"""


def role_argv(kind: str = "polite") -> list[str]:
    return [sys.executable, "-c", ROLE, kind]


def test_run_sync_returns_the_output_and_raises_on_failure(tmp_path):
    group = ProcessGroup(tmp_path)
    role = group.run_sync("echo", [sys.executable, "-c",
                                   "import sys; print('out', flush=True); print('err', file=sys.stderr)"])
    assert role.returncode == 0 and role.output().split() == ["out", "err"]
    with pytest.raises(RuntimeError, match=r"fails failed \(3\)"):
        group.run_sync("fails", [sys.executable, "-c", "raise SystemExit(3)"])
    assert group.run_sync("fails", [sys.executable, "-c", "raise SystemExit(3)"], check=False).returncode == 3


def test_run_sync_stops_a_role_that_outlives_its_timeout(tmp_path):
    group = ProcessGroup(tmp_path)
    with pytest.raises(RuntimeError, match="still running after 0.5s"):
        group.run_sync("sleeper", role_argv(), timeout=0.5)
    assert group.roles[0].returncode is not None


def test_stop_sync_terms_then_kills_after_the_grace(tmp_path):
    group = ProcessGroup(tmp_path)
    polite = group.start("polite", role_argv(), stats=False)
    stubborn = group.start("stubborn", role_argv("stubborn"), stats=False)
    group.wait_for_log_sync(polite, "up")
    group.wait_for_log_sync(stubborn, "up")
    assert group.stop_sync(polite) == 0 and polite.output().split() == ["up", "bye"]
    started = time.monotonic()
    assert group.stop_sync(stubborn, grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - started >= 0.5
    assert "bye" not in stubborn.output()


def test_terminate_only_signals_and_the_wait_sees_the_exit(tmp_path):
    group = ProcessGroup(tmp_path)
    roles = [group.start(f"r{i}", role_argv(), stats=False) for i in range(2)]
    for role in roles:
        group.wait_for_log_sync(role, "up")
    group.terminate(roles)
    assert [group.wait_exit_sync(role, 20) for role in roles] == [0, 0]
    assert all(role.output().split() == ["up", "bye"] for role in roles)


def test_waits_fail_loudly_when_the_role_dies(tmp_path):
    group = ProcessGroup(tmp_path)
    dead = group.start("dead", [sys.executable, "-c", "print('boom'); raise SystemExit(2)"], stats=False)
    with pytest.raises(RuntimeError, match="dead exited with 2: boom"):
        group.wait_path_sync(dead, tmp_path / "never")
    with pytest.raises(RuntimeError, match="dead exited with 2"):
        asyncio.run(group.wait_until(dead, lambda: False, 5, "never true"))


def test_async_run_and_stop_all(tmp_path):
    async def scenario():
        group = ProcessGroup(tmp_path)
        done = await group.run("quick", [sys.executable, "-c", "print('done')"])
        roles = [group.start(name, role_argv(), stats=False) for name in ("first", "second")]
        for role in roles:
            await group.wait_for_log(role, "up")
        await group.stop_all(grace=5)
        return done, roles

    done, roles = asyncio.run(scenario())
    assert done.output().strip() == "done"
    assert [role.returncode for role in roles] == [0, 0]
    assert all(role.output().split() == ["up", "bye"] for role in roles)


def test_boxcore_procs_is_the_same_helper():
    import boxcore.procs
    import cliruntime.procs

    assert boxcore.procs.ProcessGroup is cliruntime.procs.ProcessGroup
    assert boxcore.procs.free_port is cliruntime.procs.free_port
