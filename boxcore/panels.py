"""Booster panels: a booster shows its own state on boxd's dashboard.

A booster publishes a *panel* (a title and a few parts: figures, a map, a graph, a table, time
series) under the reserved directory key :data:`PANEL_KEY` of its own namespace, with the
booster's ordinary directory API.  boxd's dashboard (:mod:`boxcore.dashboard`) watches that key
for every connected booster and streams each change to the browser over the same Server-Sent
Events channel as the box's own figures; the panel disappears when the booster leaves.

::

    from boxcore.panels import publish_panel_every, figures_part, table_part

    def build():
        return {"title": "my booster", "parts": [
            figures_part([("packets/s", rates.rate("packets", booster.stats["packets"]), "p/s")]),
            table_part(["client", "packets"], sorted(per_client.items())[:50]),
        ]}

    publish_panel_every(booster, build, interval=1.0)      # or: await publish_panel(booster, build())

The format is declared once here (:func:`validate_panel`) and checked on both sides: by the
publisher before it writes, and by the dashboard before it streams (a booster may write anything
under its keys; a bad panel is shown as an error, never rendered).  Limits: at most
:data:`MAX_PANEL_BYTES` of msgpack (below the directory's value limit) and one update per
:data:`MIN_INTERVAL` seconds (later updates coalesce: the latest wins).
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from typing import Any, Callable, Iterable

import msgpack


PANEL_KEY = "panel"
FORMAT_VERSION = 1
MAX_PANEL_BYTES = 60_000          # the directory refuses values above 65,536 bytes
MIN_INTERVAL = 1.0                # seconds between two writes of one booster's panel
MAX_PARTS = 8
MAX_TEXT = 200
MAX_FIGURES = 40
MAX_LINES = 5000                  # map polylines
MAX_LINE_POINTS = 64              # coordinates pairs per polyline
MAX_POINTS = 2000                 # map markers
MAX_NODES = 500
MAX_EDGES = 2000
MAX_COLUMNS = 16
MAX_ROWS = 200
MAX_SERIES = 8
MAX_SERIES_POINTS = 600
# Marker colours a map may use (names, so a panel cannot inject CSS).
MARKER_COLOURS = ("green", "red", "amber", "grey", "blue")
PART_KINDS = ("figures", "map", "graph", "table", "series")


class PanelError(ValueError):
    """A panel that does not follow the format (says what and where)."""


# ------------------------------------------------------------------ validation

def _text(value: Any, where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise PanelError(f"{where}: expected text, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise PanelError(f"{where}: text of {len(value)} characters exceeds {MAX_TEXT}")
    return value


def _number(value: Any, where: str, *, optional: bool = False) -> float | int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PanelError(f"{where}: expected a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        if optional:
            return None
        raise PanelError(f"{where}: {value} is not a finite number")
    return value


_PLAIN_NUMBERS = {int, float}


def _numbers(values: list, where: str, *, optional: bool = False) -> list:
    """A list of numbers (or None when ``optional``); checked at C speed when all are plain and finite."""
    kinds = set(map(type, values))
    if kinds <= _PLAIN_NUMBERS and (kinds == {int} or all(map(math.isfinite, values))):
        return list(values)
    return [_number(v, f"{where}[{i}]", optional=optional) for i, v in enumerate(values)]


def _list(value: Any, where: str, limit: int, *, min_len: int = 0) -> list:
    if not isinstance(value, (list, tuple)):
        raise PanelError(f"{where}: expected a list, got {type(value).__name__}")
    if len(value) > limit:
        raise PanelError(f"{where}: {len(value)} entries exceed the limit of {limit}")
    if len(value) < min_len:
        raise PanelError(f"{where}: needs at least {min_len} entries")
    return list(value)


def _keys(part: dict, where: str, allowed: set[str]) -> None:
    extra = set(part) - allowed
    if extra:
        raise PanelError(f"{where}: unknown field(s) {', '.join(sorted(map(str, extra)))}")


def _cell(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return _number(value, where, optional=True)
    return _text(value, where)


def _figures(part: dict, where: str) -> dict:
    _keys(part, where, {"kind", "title", "items"})
    items = []
    for i, item in enumerate(_list(part.get("items"), f"{where}.items", MAX_FIGURES)):
        item = _list(item, f"{where}.items[{i}]", 3, min_len=2)
        label = _text(item[0], f"{where}.items[{i}] label")
        value = _cell(item[1], f"{where}.items[{i}] value")
        unit = _text(item[2], f"{where}.items[{i}] unit") if len(item) > 2 else ""
        items.append([label, value, unit])
    return {"kind": "figures", "title": _text(part.get("title", ""), f"{where}.title"), "items": items}


def _map(part: dict, where: str) -> dict:
    _keys(part, where, {"kind", "title", "lines", "values", "label", "unit", "scale", "points", "legend"})
    lines = []
    for i, line in enumerate(_list(part.get("lines"), f"{where}.lines", MAX_LINES, min_len=1)):
        line = _list(line, f"{where}.lines[{i}]", 2 * MAX_LINE_POINTS, min_len=4)
        if len(line) % 2:
            raise PanelError(f"{where}.lines[{i}]: needs x, y pairs (odd length {len(line)})")
        lines.append(_numbers(line, f"{where}.lines[{i}]"))
    values = _numbers(_list(part.get("values", [None] * len(lines)), f"{where}.values", MAX_LINES),
                      f"{where}.values", optional=True)
    if len(values) != len(lines):
        raise PanelError(f"{where}: {len(values)} values for {len(lines)} lines")
    scale = part.get("scale")
    if scale is not None:
        scale = _list(scale, f"{where}.scale", 2, min_len=2)
        scale = [_number(scale[0], f"{where}.scale"), _number(scale[1], f"{where}.scale")]
        if not scale[0] < scale[1]:
            raise PanelError(f"{where}.scale: low {scale[0]} must be below high {scale[1]}")
    points = []
    for i, point in enumerate(_list(part.get("points", []), f"{where}.points", MAX_POINTS)):
        point = _list(point, f"{where}.points[{i}]", 4, min_len=3)
        colour = point[2]
        if colour not in MARKER_COLOURS:
            raise PanelError(f"{where}.points[{i}]: colour {colour!r} is not one of {', '.join(MARKER_COLOURS)}")
        points.append([_number(point[0], f"{where}.points[{i}] x"), _number(point[1], f"{where}.points[{i}] y"),
                       colour, _text(point[3], f"{where}.points[{i}] label") if len(point) > 3 else ""])
    legend = []
    for i, entry in enumerate(_list(part.get("legend", []), f"{where}.legend", len(MARKER_COLOURS))):
        entry = _list(entry, f"{where}.legend[{i}]", 2, min_len=2)
        if entry[0] not in MARKER_COLOURS:
            raise PanelError(f"{where}.legend[{i}]: colour {entry[0]!r} is not one of {', '.join(MARKER_COLOURS)}")
        legend.append([entry[0], _text(entry[1], f"{where}.legend[{i}] label")])
    return {"kind": "map", "title": _text(part.get("title", ""), f"{where}.title"), "lines": lines,
            "values": values, "label": _text(part.get("label", ""), f"{where}.label"),
            "unit": _text(part.get("unit", ""), f"{where}.unit"), "scale": scale, "points": points,
            "legend": legend}


def _graph(part: dict, where: str) -> dict:
    _keys(part, where, {"kind", "title", "nodes", "edges"})
    nodes, ids = [], set()
    for i, node in enumerate(_list(part.get("nodes"), f"{where}.nodes", MAX_NODES, min_len=1)):
        node = _list(node, f"{where}.nodes[{i}]", 3, min_len=3)
        node_id = _text(node[0], f"{where}.nodes[{i}] id")
        if node_id in ids:
            raise PanelError(f"{where}.nodes[{i}]: duplicate id {node_id!r}")
        ids.add(node_id)
        nodes.append([node_id, _text(node[1], f"{where}.nodes[{i}] label"), _text(node[2], f"{where}.nodes[{i}] group")])
    edges = []
    for i, edge in enumerate(_list(part.get("edges", []), f"{where}.edges", MAX_EDGES)):
        edge = _list(edge, f"{where}.edges[{i}]", 3, min_len=2)
        a, b = _text(edge[0], f"{where}.edges[{i}] from"), _text(edge[1], f"{where}.edges[{i}] to")
        for end in (a, b):
            if end not in ids:
                raise PanelError(f"{where}.edges[{i}]: no node {end!r}")
        edges.append([a, b, _number(edge[2], f"{where}.edges[{i}] count", optional=True) if len(edge) > 2 else None])
    return {"kind": "graph", "title": _text(part.get("title", ""), f"{where}.title"), "nodes": nodes, "edges": edges}


def _table(part: dict, where: str) -> dict:
    _keys(part, where, {"kind", "title", "columns", "rows"})
    columns = [_text(c, f"{where}.columns[{i}]")
               for i, c in enumerate(_list(part.get("columns"), f"{where}.columns", MAX_COLUMNS, min_len=1))]
    rows = []
    for i, row in enumerate(_list(part.get("rows", []), f"{where}.rows", MAX_ROWS)):
        row = _list(row, f"{where}.rows[{i}]", len(columns), min_len=len(columns))
        rows.append([_cell(cell, f"{where}.rows[{i}][{j}]") for j, cell in enumerate(row)])
    return {"kind": "table", "title": _text(part.get("title", ""), f"{where}.title"), "columns": columns, "rows": rows}


def _series(part: dict, where: str) -> dict:
    _keys(part, where, {"kind", "title", "unit", "series"})
    series = part.get("series")
    if not isinstance(series, dict) or len(series) > MAX_SERIES:
        raise PanelError(f"{where}.series: expected a map of at most {MAX_SERIES} named series")
    out = {}
    for name, points in series.items():
        _text(name, f"{where}.series name")
        checked = []
        for i, point in enumerate(_list(points, f"{where}.series[{name}]", MAX_SERIES_POINTS)):
            point = _list(point, f"{where}.series[{name}][{i}]", 2, min_len=2)
            checked.append([_number(point[0], f"{where}.series[{name}][{i}] t"),
                            _number(point[1], f"{where}.series[{name}][{i}] value", optional=True)])
        out[name] = checked
    return {"kind": "series", "title": _text(part.get("title", ""), f"{where}.title"),
            "unit": _text(part.get("unit", ""), f"{where}.unit"), "series": out}


_PARTS: dict[str, Callable[[dict, str], dict]] = {
    "figures": _figures, "map": _map, "graph": _graph, "table": _table, "series": _series}


def validate_panel(panel: Any) -> dict:
    """The panel in its canonical form (optional fields filled in); raises :class:`PanelError`."""
    if not isinstance(panel, dict):
        raise PanelError(f"panel: expected a map, got {type(panel).__name__}")
    _keys(panel, "panel", {"v", "title", "parts"})
    version = panel.get("v", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise PanelError(f"panel: format version {version!r} unknown (this boxd reads {FORMAT_VERSION})")
    parts = []
    for i, part in enumerate(_list(panel.get("parts"), "panel.parts", MAX_PARTS, min_len=1)):
        where = f"panel.parts[{i}]"
        if not isinstance(part, dict):
            raise PanelError(f"{where}: expected a map, got {type(part).__name__}")
        kind = part.get("kind")
        if not isinstance(kind, str) or kind not in _PARTS:
            raise PanelError(f"{where}: kind {kind!r} is not one of {', '.join(PART_KINDS)}")
        parts.append(_PARTS[kind](part, where))
    return {"v": FORMAT_VERSION, "title": _text(panel.get("title"), "panel.title"), "parts": parts}


def encoded_size(panel: dict) -> int:
    return len(msgpack.packb(panel, use_bin_type=True))


# ------------------------------------------------------------------ builders (plain dicts)

def figures_part(items: Iterable[tuple], title: str = "") -> dict:
    """``items``: (label, value) or (label, value, unit)."""
    return {"kind": "figures", "title": title, "items": [list(item) for item in items]}


def table_part(columns: list[str], rows: Iterable[Iterable[Any]], title: str = "") -> dict:
    return {"kind": "table", "title": title, "columns": list(columns), "rows": [list(r) for r in rows][:MAX_ROWS]}


def colour_scale_part(lines: list[list[float]], values: list[float | None], *, label: str, unit: str = "",
                      title: str = "", scale: tuple[float, float] | None = None,
                      points: list[list] = (), legend: list[list] = ()) -> dict:
    """A map: ``lines`` (x0, y0, x1, y1, ...) coloured by ``values`` (None: no data)."""
    return {"kind": "map", "title": title, "lines": lines, "values": values, "label": label, "unit": unit,
            "scale": list(scale) if scale else None, "points": list(points), "legend": list(legend)}


def graph_part(nodes: list[tuple[str, str, str]], edges: list[tuple], title: str = "") -> dict:
    """``nodes``: (id, label, group); ``edges``: (from, to) or (from, to, count)."""
    return {"kind": "graph", "title": title, "nodes": [list(n) for n in nodes], "edges": [list(e) for e in edges]}


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


class Rates:
    """Per-second rates of monotonically growing counters, from one sample to the next."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}

    def rate(self, name: str, value: float, now: float) -> float | None:
        """The rate since the previous sample of ``name`` (None on the first, or after a reset)."""
        previous = self._last.get(name)
        self._last[name] = (now, value)
        if previous is None or now <= previous[0] or value < previous[1]:
            return None
        return round((value - previous[1]) / (now - previous[0]), 2)


class Series:
    """Named time series with a bounded history, as a panel's ``series`` part."""

    def __init__(self, maxlen: int = 120) -> None:
        if not 0 < maxlen <= MAX_SERIES_POINTS:
            raise ValueError(f"maxlen must be within 1..{MAX_SERIES_POINTS}")
        self.maxlen = maxlen
        self._series: dict[str, deque] = {}

    def add(self, t: float, **values: float | None) -> None:
        for name, value in values.items():
            if name not in self._series:
                if len(self._series) >= MAX_SERIES:
                    raise ValueError(f"at most {MAX_SERIES} series")
                self._series[name] = deque(maxlen=self.maxlen)
            self._series[name].append([round(t, 3), _finite(value)])

    def part(self, title: str = "", unit: str = "") -> dict:
        return {"kind": "series", "title": title, "unit": unit,
                "series": {name: list(points) for name, points in self._series.items()}}


# ------------------------------------------------------------------ publishing

class PanelPublisher:
    """Writes one booster's panel, at most once per ``min_interval`` (the latest update wins)."""

    def __init__(self, booster: Any, *, min_interval: float = MIN_INTERVAL, max_bytes: int = MAX_PANEL_BYTES) -> None:
        self.booster = booster
        self.min_interval = min_interval
        self.max_bytes = max_bytes
        self.stats = {"published": 0, "coalesced": 0, "refused_invalid": 0, "refused_too_large": 0,
                      "write_errors": 0, "skipped_closed": 0}
        self._holding = False           # a write happened less than min_interval ago
        self._pending: dict | None = None

    async def publish(self, panel: dict) -> bool:
        """Validate and write ``panel`` now, or keep it for when the interval is over.

        Returns True when written now, False when deferred (or the booster is no longer connected:
        a timer may outlive it).  Raises :class:`PanelError` for a panel that breaks the format or
        exceeds ``max_bytes``: nothing is written then.
        """
        if getattr(self.booster, "closed", False):
            self.stats["skipped_closed"] += 1
            return False
        try:
            panel = validate_panel(panel)
        except PanelError:
            self.stats["refused_invalid"] += 1
            raise
        size = encoded_size(panel)
        if size > self.max_bytes:
            self.stats["refused_too_large"] += 1
            raise PanelError(f"panel of {size} bytes exceeds the limit of {self.max_bytes}")
        if self._holding:
            if self._pending is not None:
                self.stats["coalesced"] += 1
            self._pending = panel
            return False
        await self._write(panel)
        return True

    async def _write(self, panel: dict) -> None:
        self._holding = True
        self.booster.call_later(self.min_interval, self._release)
        try:
            await self.booster.directory.put(PANEL_KEY, panel)
        except Exception:
            self.stats["write_errors"] += 1
            raise
        self.stats["published"] += 1

    async def _release(self) -> None:
        self._holding = False
        panel, self._pending = self._pending, None
        if panel is not None and not getattr(self.booster, "closed", False):
            await self._write(panel)

    async def remove(self) -> None:
        """Delete the panel (the dashboard also drops it when the booster leaves)."""
        self._pending = None
        await self.booster.directory.delete(PANEL_KEY)


_publishers: "weakref.WeakKeyDictionary[Any, PanelPublisher]" = weakref.WeakKeyDictionary()


def publisher(booster: Any) -> PanelPublisher:
    """The booster's one :class:`PanelPublisher` (created on first use)."""
    pub = _publishers.get(booster)
    if pub is None:
        pub = _publishers[booster] = PanelPublisher(booster)
    return pub


async def publish_panel(booster: Any, panel: dict) -> bool:
    """Publish ``panel`` for ``booster`` (rate-limited, size-bounded; see :class:`PanelPublisher`)."""
    return await publisher(booster).publish(panel)


async def remove_panel(booster: Any) -> None:
    await publisher(booster).remove()


def publish_panel_every(booster: Any, build: Callable[[], dict], interval: float = 1.0) -> Any:
    """Call ``build()`` every ``interval`` seconds and publish what it returns; returns the timer
    (``timer.cancel()``).  A build that raises is logged and counted by the booster library."""
    if interval < MIN_INTERVAL:
        raise ValueError(f"interval must be at least {MIN_INTERVAL} s")

    async def tick() -> None:
        await publish_panel(booster, build())

    return booster.call_every(interval, tick)
