"""The mmpog part of ``booster-demo``: a short game session through the reflector booster.

boxd (user engine) is started with one UDP listener; ``mmpog-reflector`` runs
as a booster on it (the listener's socket is delegated to it); the game server
maps a 2x1 world onto that reflector; 8 bots walk between the two locations
and send position updates (unreliable) and events (reliable) through a relay
that drops 5% of the datagrams in each direction.  Prints the delivery figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .bots import Params


async def run_demo(workdir: Path, say: Callable[[str], None]) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    params = Params(players=8, locations=2, duration=4.0, loss=0.05, rate=20.0, reliable_fraction=0.3,
                    deadline=1.0, move_interval=1.5, seed=11, reflector_mode="booster",
                    workdir=str(workdir / "boxd"), drain=1.5)
    from tools.mmpog_experiment import run_experiment   # the experiment around the bots lives under tools/

    result = await run_experiment(params, say=say)
    transport = result["reflector"]["transport"]
    say(f"reflector ran as a booster (engine {transport.get('engine')}, delivery {transport.get('delivery')}, "
        f"fan-out {transport.get('fanout')}); {result['moves']} location changes")
    for name in ("reliable", "unreliable"):
        section = result[name]
        latency = section["latency_ms"]
        say(f"{name:>10}: {section['sent']} sent, {section['expected']} expected deliveries, "
            f"delivered {section['delivered_ratio']:.2%}, latency p50 {latency['p50']} ms, p99 {latency['p99']} ms")
    missed = {k: v for k, v in result["reliable"]["missed"].items() if v}
    if missed:
        say(f"reliable deliveries missed, and why: {missed}")
    say(f"duplicates delivered to the game: {result['duplicates_delivered']}; retransmissions "
        f"{result['retransmissions_detail']['by_senders']} by senders, {result['retransmissions_detail']['by_reflector']} "
        f"from the reflector's buffer; reflector sent {result['reflector_pps']:.0f} datagrams/s")
    return {
        "players": result["players"], "locations": result["locations"], "loss": result["loss"],
        "reliable_delivered_ratio": result["reliable"]["delivered_ratio"],
        "reliable_p99_ms": result["reliable"]["latency_ms"]["p99"],
        "reliable_unaccounted": result["reliable"]["missed"]["unaccounted"],
        "unreliable_delivered_ratio": result["unreliable"]["delivered_ratio"],
        "duplicates_delivered": result["duplicates_delivered"],
        "retransmissions": result["retransmissions"],
        "reflector_pps": result["reflector_pps"],
    }
