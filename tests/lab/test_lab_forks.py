"""boxcore.lab beside an asyncio program."""

from __future__ import annotations

import asyncio


async def test_a_forked_helper_s_sigterm_does_not_reach_the_parent_s_loop():
    """pyroute2 forks helpers and SIGTERMs them: importing boxcore.lab makes every forked child drop
    the parent's signal wake-up descriptor, so the parent's loop never sees the child's SIGTERM."""
    import os
    import signal

    import boxcore.lab  # noqa: F401  (registers the at-fork hook)

    loop = asyncio.get_running_loop()
    terminated, marker = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, terminated.set)
    loop.add_signal_handler(signal.SIGUSR1, marker.set)
    try:
        pid = os.fork()
        if pid == 0:                                   # the "helper": SIGTERMed, then gone
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0)
        os.waitpid(pid, 0)
        os.kill(os.getpid(), signal.SIGUSR1)           # read from the same descriptor, after it
        await asyncio.wait_for(marker.wait(), 10)
        assert not terminated.is_set()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGUSR1)
