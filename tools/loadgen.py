"""``booster-loadgen``: the load generators and experiments that reproduce the paper's figures.

Each experiment lives in its own module ``tools/bench_<name>.py`` that exposes
``register(subparsers)``; registering adds a subcommand whose ``func(args)``
returns an exit status.  Experiments print JSON figures and write PNG plots.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cliruntime import ConfigError, Parser, add_common_options, setup_logging

# Subcommand modules, in the order they appear in --help.
BENCHMARKS = ("datapath", "np_latency", "fcd", "fcd_scale", "fcd_validate", "gnutella", "mmpog", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="booster-loadgen",
        description="Load generators and experiments that reproduce the paper's results.",
        epilog="examples:\n"
        "  booster-loadgen datapath --engine user --json out/datapath-user.json\n"
        "  booster-loadgen np-latency --json out/np.json --plot out/np.png\n"
        "  booster-loadgen fcd --rates 1000,4000,8000 --boxes 0,1,2,4 --json out/fcd.json --plot out/fcd.png\n"
        "  booster-loadgen gnutella --clusters 3 --servents 20 --json out/g.json --plot out/g.png\n"
        "  booster-loadgen mmpog --players 64 --locations 1 --duration 10 --loss 0.05 --json out/m.json\n"
        "  booster-loadgen mmpog --compare kcp,enet --players 32 --locations 4 --loss 0.05 --json out/c.json\n"
        "  booster-loadgen datapath --engine xdp --json out/datapath-xdp.json --plot out/datapath-xdp.png\n"
        "  booster-loadgen fcd-validate --json out/fcd-validate.json --plot out/fcd-validate.png\n"
        "  booster-loadgen fcd-scale --json out/fcd-scale.json --plot out/fcd-scale.png\n"
        "  booster-loadgen report --out out/report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="EXPERIMENT")
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(f"tools.bench_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tools.bench_{name}":
                raise
            continue
        module.register(subparsers)
    for sub in subparsers.choices.values():
        add_common_options(sub)
    return parser


# What an experiment's set-up may refuse with one clear line (exit 2) rather than a traceback:
# no root for a lab, a city that does not load, an engine or a directory that cannot start.
def _config_errors() -> tuple[type[Exception], ...]:
    from boxcore.directory import DirectoryOpenError
    from boxcore.engines.base import EngineSetupError
    from boxcore.lab import LabError
    from fcd.city import CityError

    return (ConfigError, LabError, CityError, DirectoryOpenError, EngineSetupError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, f"booster-loadgen {args.command}")
    try:
        return int(args.func(args) or 0)
    except _config_errors() as exc:
        print(f"booster-loadgen {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
