"""The FCD booster's dashboard panel: the city with each road coloured by its queue, the lights,
and the box's report rate (published with :func:`boxcore.panels.publish_panel_every`).

Computed from what the booster holds: the city (:class:`fcd.city.City`), the aggregator's
per-road state (:meth:`fcd.aggregate.Aggregator.road_states` at the newest probe time), its light
masks, and the :class:`fcd.booster.BoxAggregator` counters.  :func:`prediction_map` colours the same
map by the model's predicted traverse time, for a process that holds a
:class:`fcd.model.Prediction` (the server).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from boxcore.panels import Rates, Series, colour_scale_part, figures_part
from fcd.city import City


KEEP_RIGHT = 8.0   # metres: each direction of a two-way street is drawn on its own side


def _drawn(city: City) -> np.ndarray:
    """(R, 4) segments moved KEEP_RIGHT metres to the right of travel, so u->v and v->u both show."""
    dx, dy = city.x1 - city.x0, city.y1 - city.y0
    norm = np.maximum(np.hypot(dx, dy), 1e-9)
    right_x, right_y = dy / norm, -dx / norm      # the road's direction turned clockwise
    shift = np.stack([right_x, right_y, right_x, right_y], axis=1) * KEEP_RIGHT
    return np.stack([city.x0, city.y0, city.x1, city.y1], axis=1) + shift


def road_lines(city: City) -> list[list[int]]:
    """Every road as one segment, in metres rounded to the metre (keeps the panel small)."""
    return np.rint(_drawn(city)).astype(int).tolist()


def light_points(city: City, masks: dict[int, int]) -> list[list]:
    """A marker at the stop line of every road a light controls: green, red, or grey (not seen yet)."""
    ends = np.rint(_drawn(city)[:, 2:]).astype(int)
    points = []
    for light in city.lights:
        mask = masks.get(light.id)
        for bit, road in enumerate(light.roads):
            colour = "grey" if mask is None else ("green" if mask >> bit & 1 else "red")
            points.append([int(ends[road, 0]), int(ends[road, 1]), colour, f"light {light.id}"])
    return points


LIGHT_LEGEND = [["green", "green light"], ["red", "red light"], ["grey", "light not seen yet"]]


def queue_map(city: City, queue: np.ndarray, masks: dict[int, int], title: str = "queue per road",
              lines: list[list[int]] | None = None) -> dict:
    return colour_scale_part(lines or road_lines(city), queue.tolist(), label="queue", unit="cars", title=title,
                             scale=(0, max(4, int(queue.max()) if len(queue) else 4)),
                             points=light_points(city, masks), legend=LIGHT_LEGEND)


def prediction_map(city: City, prediction: Any, step: int = 1, masks: dict[int, int] | None = None) -> dict:
    """The map coloured by predicted traverse time ``step`` cycles ahead (seconds)."""
    traverse = np.asarray(prediction.traverse[min(step, len(prediction.traverse) - 1)], dtype=float)
    values = [None if not np.isfinite(v) else round(float(v), 1) for v in traverse]
    finite = traverse[np.isfinite(traverse)]
    top = float(finite.max()) if len(finite) else 1.0
    return colour_scale_part(road_lines(city), values, label=f"predicted traverse time, {step} cycle(s) ahead",
                             unit="s", title="predicted traverse time", scale=(0, max(top, 1.0)),
                             points=light_points(city, masks or {}), legend=LIGHT_LEGEND if masks else [])


class BoxPanel:
    """Builds the fcd-booster's panel from a :class:`fcd.booster.BoxAggregator` (call once a second)."""

    def __init__(self, box: Any, clock=time.monotonic, history: int = 120) -> None:
        self.box = box
        self.clock = clock
        self.rates = Rates()
        self.series = Series(history)
        self._lines: tuple[Any, list[list[int]]] | None = None     # (city, its road lines): drawn once

    def build(self) -> dict:
        box, now = self.box, self.clock()
        if self._lines is None or self._lines[0] is not box.city:
            self._lines = (box.city, road_lines(box.city))
        agg = box.ingest.aggregator
        used = agg.used
        data_time = float(np.max(agg.t_last[:used])) if used else 0.0
        cars, queue, _mean = agg.road_states(data_time)
        counters = box.counters()
        reports_rate = self.rates.rate("reports", counters["reports"], now)
        datagrams_rate = self.rates.rate("received", counters["received"], now)
        self.series.add(now, **{"datagrams in/s": datagrams_rate, "reports out/s": reports_rate})
        city = box.city
        return {"title": f"FCD box {box.box_id}: {city.name}", "parts": [
            figures_part([
                ("datagrams in", datagrams_rate, "/s"), ("road reports out", reports_rate, "/s"),
                ("cars tracked", int(cars.sum()), ""), ("queued cars", int(queue.sum()), ""),
                ("lost datagrams", counters["lost"], ""), ("malformed", counters["malformed"], ""),
                ("reports not yet acknowledged", counters["unacked"], ""), ("data time", round(data_time, 1), "s"),
            ]),
            queue_map(city, queue, agg.light_mask, title=f"queue per road ({city.n_roads} roads, lights at stop lines)",
                      lines=self._lines[1]),
            self.series.part("what the box takes in and sends to the server", "per s"),
        ]}
