"""Running a booster as a console script: :func:`run_booster` and ``--control``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
from typing import Any, AsyncContextManager, Awaitable, Callable, Union

from boxcore.booster.core import DEFAULT_CONTROL, Booster
from boxcore.booster.errors import BoosterError, BoxdGone
from cliruntime import EXIT_FAILURE, EXIT_OK, ConfigError

log = logging.getLogger("boxcore.booster")

__all__ = ["run_booster", "add_booster_options"]

Serve = Callable[[Booster], Union[Awaitable[Any], AsyncContextManager[Any]]]


async def run_booster(name: str, serve: Serve, *, stop: asyncio.Event, control: str | os.PathLike | None = None,
                      **options: Any) -> int:
    """Run booster ``name`` until ``stop`` is set; returns the exit status for ``amain``.

    Connects to boxd (``control``; ``options`` go to :class:`Booster`), then sets the booster up
    with ``serve(booster)``: either a coroutine function (set-up only) or an async context
    manager (``@contextlib.asynccontextmanager``: set-up before its ``yield``, tear-down after it,
    run while the booster is still connected).  Background work goes in ``booster.spawn`` (the
    booster's :class:`~cliruntime.supervisor.Supervisor`, ``booster.tasks``).

    * A failure to start - boxd cannot be reached or refuses the booster or one of its rules
      (:class:`BoxdGone`, :class:`BoosterError`) - raises :class:`cliruntime.ConfigError`: one line
      on stderr, exit status 2.
    * ``stop`` set (SIGINT/SIGTERM): tear down, return 0.
    * boxd goes away, or a critical background task fails: logged as an error, tear down,
      return 1.
    """
    booster = Booster(name, control, **options)
    try:
        await booster.connect()
    except BoxdGone as exc:
        raise ConfigError(str(exc)) from None
    except BoosterError as exc:
        raise ConfigError(f"boxd refused booster {name!r}: {exc}") from None
    teardown = contextlib.AsyncExitStack()
    try:
        try:
            served = serve(booster)
            if hasattr(served, "__aenter__"):
                await teardown.enter_async_context(served)
            elif inspect.isawaitable(served):
                await served
        except BoxdGone as exc:
            raise ConfigError(f"boxd went away while {name} was starting: {exc}") from None
        except BoosterError as exc:
            raise ConfigError(f"boxd refused: {exc}") from None
        why = await booster.run_until_stopped(stop)
        if why == "stopped":
            log.info("%s: stopping", name)
            status = EXIT_OK
        elif booster.tasks.failed is not None:
            log.error("%s: stopping because a critical task failed: %s", name, why)
            status = EXIT_FAILURE
        else:
            log.error("%s: boxd went away (%s): stopping", name, why)
            status = EXIT_FAILURE
        try:
            await teardown.aclose()
        except (BoxdGone, BoosterError) as exc:     # boxd left while we were finishing
            log.warning("%s: tear-down could not reach boxd: %s", name, exc)
    finally:
        await teardown.aclose()
        await booster.close()
    return status


def add_booster_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--control PATH`` (default ``$BOXD_CONTROL`` or /run/boxd/control.sock)."""
    parser.add_argument("--control", metavar="PATH",
                        default=os.environ.get("BOXD_CONTROL", DEFAULT_CONTROL),
                        help="boxd's control socket")
