"""The Gnutella booster's dashboard panel: the overlay as this booster sees it, coloured by
cluster, with the messages that crossed each cluster edge (paper Fig. 9).

Computed from a :class:`gnutella.booster.GnutellaBooster`: its local servents (the intercepted
connections, ``core.locals``), the boosters of other clusters it peers with (``peer_names`` and
the cluster each announced in its hello, ``core.peers``), conventional links to outside servents
(``core.upstreams``), and the per-peer traffic counters.  Publish it with
:func:`boxcore.panels.publish_panel_every`.
"""

from __future__ import annotations

import time
from typing import Any

from boxcore.panels import MAX_EDGES, MAX_NODES, Rates, figures_part, graph_part, table_part


def _cluster_label(name: str, prefixes: tuple[str, ...] | list[str]) -> str:
    return f"{name} {','.join(prefixes)}" if prefixes else name


class OverlayPanel:
    """Builds the gnutella-booster's panel (call once a second)."""

    def __init__(self, adapter: Any, clock=time.monotonic) -> None:
        self.adapter = adapter
        self.clock = clock
        self.rates = Rates()

    def build(self) -> dict:
        adapter, core, now = self.adapter, self.adapter.core, self.clock()
        me = core.config.name
        home = _cluster_label(me, core.config.cluster)
        me_id = f"booster:{me}"
        nodes = [(me_id, f"booster {me}", home)]
        edges: list[tuple] = []
        seen = {me_id}
        for peer in list(core.locals.values()):
            node_id = f"servent:{peer.listen[0]}:{peer.listen[1]}"
            if node_id in seen or len(nodes) >= MAX_NODES - 64:
                continue
            seen.add(node_id)
            nodes.append((node_id, f"{peer.listen[0]}:{peer.listen[1]}", home))
            edges.append((node_id, me_id))
        rows = []
        for pid, name in sorted(adapter.peer_names.items(), key=lambda item: item[1]):
            remote = core.peers.get(pid)
            cluster = _cluster_label(name, remote.cluster if remote is not None else ())
            traffic = adapter.peer_traffic.get(name, {})
            messages = traffic.get("msgs_out", 0) + traffic.get("msgs_in", 0)
            node_id = f"booster:{name}"
            if node_id not in seen:
                seen.add(node_id)
                nodes.append((node_id, f"booster {name}", cluster))
            edges.append((me_id, node_id, messages))
            rows.append([name, cluster, traffic.get("msgs_out", 0), traffic.get("msgs_in", 0),
                         traffic.get("query_out", 0), traffic.get("bytes_out", 0), traffic.get("bytes_in", 0)])
        for uid in list(core.upstreams):
            node_id = f"outside:{uid}"
            nodes.append((node_id, f"outside peer {uid}", "outside (no booster)"))
            edges.append((me_id, node_id, None))
        edges = edges[:MAX_EDGES]
        boundary = adapter.boundary()
        out_rate = self.rates.rate("out", boundary["messages_out"], now)
        in_rate = self.rates.rate("in", boundary["messages_in"], now)
        stats = adapter.stats
        parts = [
            figures_part([
                ("local servents", len(core.locals), ""), ("booster peers", len(adapter.peer_names), ""),
                ("messages out of the cluster", boundary["messages_out"], ""), ("out", out_rate, "/s"),
                ("messages into the cluster", boundary["messages_in"], ""), ("in", in_rate, "/s"),
                ("local queries", stats.get("local_queries", 0), ""),
                ("kept inside the cluster", stats.get("queries_kept_inside", 0), ""),
                ("forwarded outside", sum(stats.get(k, 0) for k in ("forwarded_by_count", "forwarded_by_timeout",
                                                                    "forwarded_by_tables")), ""),
                ("to outside servents", boundary["upstream_messages_out"], "msgs"),
            ]),
            graph_part(nodes, edges, title="overlay by cluster (this booster's view)"),
            table_part(["booster", "cluster", "msgs out", "msgs in", "queries out", "bytes out", "bytes in"], rows,
                       title="messages across cluster edges"),
        ]
        return {"title": f"Gnutella booster {me}", "parts": parts}
