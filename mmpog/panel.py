"""The multicast reflector's dashboard panel: locations and their members, datagram rates in and
out, retransmissions and NACKs (paper section III-C).

Computed from a :class:`mmpog.reflector.ReflectorService`: its I/O counters and the sans-IO
core's per-location counters (:meth:`mmpog.reliability.ReflectorCore.location_stats`, ``totals``)
and members.  Publish it with :func:`boxcore.panels.publish_panel_every`.
"""

from __future__ import annotations

import time
from typing import Any

from boxcore.panels import MAX_ROWS, Rates, Series, figures_part, table_part

MEMBERS_SHOWN = 8


class ReflectorPanel:
    """Builds the mmpog-reflector's panel (call once a second)."""

    def __init__(self, service: Any, clock=time.monotonic, history: int = 120) -> None:
        self.service = service
        self.clock = clock
        self.rates = Rates()
        self.series = Series(history)

    def build(self) -> dict:
        service, core, now = self.service, self.service.core, self.clock()
        io, totals = service.counters, core.totals()
        rate = self.rates.rate
        in_rate = rate("in", io["datagrams_in"], now)
        out_rate = rate("out", io["datagrams_out"], now)
        retx_rate = rate("retx", totals["retransmitted"], now)
        nack_rate = rate("nacks", totals["nacks"], now)
        self.series.add(now, **{"in/s": in_rate, "out/s": out_rate, "retransmissions/s": retx_rate,
                                "NACKs/s": nack_rate})
        rows = []
        members_total = 0
        for location in sorted(core.locations())[:MAX_ROWS]:
            stats = core.location_stats(location)
            players = sorted(core.member_players(location))
            members_total += len(players)
            shown = ", ".join(str(p) for p in players[:MEMBERS_SHOWN]) + (" …" if len(players) > MEMBERS_SHOWN else "")
            rows.append([location, stats["members"], stats["bound"],
                         rate(f"loc{location}.in", stats["received"], now),
                         rate(f"loc{location}.out", stats["fanout_datagrams"], now),
                         stats["reliable"], stats["retransmitted"], stats["nacks"], stats["heartbeats"],
                         stats["buffered"], stats["last_seq"], shown])
        transport = service.transport
        return {"title": "game reflector" + (f" ({transport.get('fanout')})" if transport.get("fanout") else ""),
                "parts": [
                    figures_part([
                        ("locations", len(rows), ""), ("members", members_total, ""),
                        ("datagrams in", in_rate, "/s"), ("fan-out", out_rate, "/s"),
                        ("retransmissions", totals["retransmitted"], ""), ("NACKs", totals["nacks"], ""),
                        ("NACKs rate-limited", totals["nack_rate_limited"], ""),
                        ("NACKs too late (evicted)", totals["nack_unavailable"], ""),
                        ("heartbeats", totals["heartbeats"], ""), ("send dropped", io["send_dropped"], ""),
                    ]),
                    self.series.part("reflector rates", "per s"),
                    table_part(["location", "members", "bound", "in/s", "out/s", "reliable", "retransmitted",
                                "NACKs", "heartbeats", "buffered", "last seq", "players"], rows,
                               title="locations"),
                ]}
