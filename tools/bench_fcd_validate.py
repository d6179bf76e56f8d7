"""``booster-loadgen fcd-validate``: fcd against SUMO on generated networks and real city cuts.

The same experiment as the ``fcd-validate`` console script (``fcd/validate.py``): SUMO runs each
scenario, its FCD and light switches go through the generators' encoding, the aggregation of a
box / the server and the prediction model, and the queues, traverse times and routes are compared
with SUMO's own outputs.  JSON figures per scenario and a PNG plot.  ``--through processes``
replays through real processes over loopback (fcd-gen, boxd + fcd-booster, fcd-server) and reads
the reports back from the server's history.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from fcd.validate import add_arguments
    p = subparsers.add_parser(
        "fcd-validate", help="fcd's queues, traverse times and routes against SUMO (grid, spider, random, RESCO)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  booster-loadgen fcd-validate --scenarios grid-static,cologne3 --json out/v.json --plot out/v.png\n"
               "  booster-loadgen fcd-validate --json out/fcd-validate.json --plot out/fcd-validate.png\n"
               "  booster-loadgen fcd-validate --scenarios grid-static,cologne1 --through processes --json out/vp.json")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from fcd.validate import run_validation
    results = run_validation(args)
    return 0 if results else 1
