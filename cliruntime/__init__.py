"""One way to run a console script: argparse with examples, logging to stderr,
a uvloop event loop, clean SIGINT/SIGTERM shutdown, one clear line and a
non-zero exit on bad arguments or config, and ``--stats-json FILE``.

Every console script of the suite is built the same way::

    def build_parser() -> argparse.ArgumentParser:
        parser = make_parser("fcd-server", "Run the FCD server.",
                             examples=["fcd-server --http 127.0.0.1:8080"])
        parser.add_argument("--http", type=host_port, required=True)
        return parser

    async def amain(args, ctx: RunContext) -> int | None:
        ...                      # ctx.stop is set on SIGINT/SIGTERM
        ctx.stats["requests"] += 1
        await ctx.stop.wait()

    def main(argv=None) -> int:
        return run_async(build_parser(), amain, argv)

Synchronous tools use :func:`run_sync` instead.  Code anywhere below ``amain``
raises :class:`ConfigError` for bad configuration; it becomes
``prog: error: <message>`` on stderr and exit status 2.  Domain modules raise
their own typed errors instead (``fcd.city.CityError``, ...); a script names
the ones that mean "bad configuration" once, ``run_async(parser, amain, argv,
config_errors=(CityError,))``, and they are reported the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping

log = logging.getLogger("cliruntime")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class ConfigError(Exception):
    """Bad arguments or configuration: reported as one line, exit status 2."""


class Stats(Counter):
    """Counters a script keeps; written to ``--stats-json`` on exit.

    A plain ``Counter`` so ``stats["x"] += 1`` works; ``providers`` add
    structured sections (callables returning JSON-able mappings) computed
    only when the stats are written.
    """

    def __init__(self) -> None:
        super().__init__()
        self.providers: dict[str, Callable[[], Any]] = {}

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self)
        for name, provider in self.providers.items():
            out[name] = provider()
        return out


@dataclass
class RunContext:
    """What a script's ``amain`` gets besides its arguments."""

    prog: str
    stop: asyncio.Event
    stats: Stats = field(default_factory=Stats)
    started: float = field(default_factory=time.monotonic)

    def uptime(self) -> float:
        return time.monotonic() - self.started


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit status 2.

    Subcommand parsers made with ``add_subparsers`` inherit the class.
    """

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(prog: str, description: str, examples: Iterable[str] = ()) -> argparse.ArgumentParser:
    """An ArgumentParser with the suite's common options and an examples epilog."""
    examples = list(examples)
    epilog = None
    if examples:
        epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    parser = Parser(prog=prog, description=description, epilog=epilog, formatter_class=_Formatter)
    add_common_options(parser)
    return parser


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=os.environ.get("BOOSTER_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="logging verbosity (logs go to stderr)",
    )
    parser.add_argument(
        "--stats-json", metavar="FILE", type=Path, default=None,
        help="write the final counters to FILE as JSON on exit",
    )


def setup_logging(level: str, prog: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format=f"%(asctime)s {prog} %(levelname)s %(name)s: %(message)s",
        force=True,
    )


# ---------------------------------------------------------------- argument types

def host_port(text: str) -> tuple[str, int]:
    """argparse type for ``HOST:PORT`` (``[v6]:PORT`` for IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host, number


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {value}")
    return value


def probability(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type for ``1,2,4``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


# ---------------------------------------------------------------- running

def write_stats(path: Path | None, stats: Mapping[str, Any]) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_async(
    parser: argparse.ArgumentParser,
    amain: Callable[[argparse.Namespace, RunContext], Awaitable[int | None]],
    argv: list[str] | None = None,
    config_errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parse ``argv``, then run ``amain(args, ctx)`` on uvloop until it returns.

    SIGINT/SIGTERM set ``ctx.stop``; a second signal cancels ``amain``.
    :class:`ConfigError`, and the domain errors named in ``config_errors``,
    become one ``prog: error: <message>`` line and exit status 2.
    """
    args = parser.parse_args(argv)
    prog = parser.prog
    setup_logging(args.log_level, prog)
    ctx_holder: dict[str, RunContext] = {}

    async def runner() -> int | None:
        loop = asyncio.get_running_loop()
        ctx = RunContext(prog=prog, stop=asyncio.Event())
        ctx_holder["ctx"] = ctx
        task = asyncio.current_task()

        def on_signal(signame: str) -> None:
            if ctx.stop.is_set():
                log.warning("second %s: cancelling", signame)
                if task is not None:
                    task.cancel()
                return
            log.info("%s received: shutting down", signame)
            ctx.stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal, sig.name)
        return await amain(args, ctx)

    try:
        import uvloop
        status = uvloop.run(runner())
    except (ConfigError, *config_errors) as exc:
        status = _fail(prog, str(exc))
    except asyncio.CancelledError:
        status = EXIT_FAILURE
    except KeyboardInterrupt:
        status = 130
    finally:
        ctx = ctx_holder.get("ctx")
        if ctx is not None:
            try:
                write_stats(args.stats_json, ctx.stats.snapshot())
            except OSError as exc:
                print(f"{prog}: error: cannot write stats: {exc}", file=sys.stderr)
    return EXIT_OK if status is None else int(status)


def run_sync(
    parser: argparse.ArgumentParser,
    fn: Callable[[argparse.Namespace, Stats], int | None],
    argv: list[str] | None = None,
    config_errors: tuple[type[Exception], ...] = (),
) -> int:
    """Like :func:`run_async` for synchronous tools: ``fn(args, stats)``."""
    args = parser.parse_args(argv)
    prog = parser.prog
    setup_logging(args.log_level, prog)
    stats = Stats()
    try:
        status = fn(args, stats)
    except (ConfigError, *config_errors) as exc:
        status = _fail(prog, str(exc))
    except KeyboardInterrupt:
        status = 130
    finally:
        write_stats(args.stats_json, stats.snapshot())
    return EXIT_OK if status is None else int(status)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@contextlib.contextmanager
def progress(description: str, total: float | None):
    """A progress bar on a terminal (stderr), silent when piped.

    Yields ``advance(amount=1)``.
    """
    if not sys.stderr.isatty():
        yield lambda amount=1: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda amount=1: bar.advance(task, amount)
