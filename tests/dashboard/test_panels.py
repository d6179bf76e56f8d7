"""The panel format (boxcore.panels): validation, size bound, rate limit, and the verticals' builders."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from boxcore.panels import (MAX_PANEL_BYTES, PANEL_KEY, PanelError, PanelPublisher, Rates, Series, encoded_size,
                            figures_part, publish_panel, validate_panel)
from boxcore.testing import MemoryBox
from tools import demo_panels as verticals


def good_panel(**extra) -> dict:
    return {"title": "t", "parts": [figures_part([("a", 1, "/s"), ("b", None)]), *extra.get("parts", [])]}


def test_canonical_form_fills_optional_fields():
    panel = validate_panel({"title": "x", "parts": [
        {"kind": "map", "lines": [[0, 0, 10, 10]]},
        {"kind": "graph", "nodes": [["a", "A", "g1"], ["b", "B", "g2"]], "edges": [["a", "b", 3]]},
        {"kind": "table", "columns": ["c"], "rows": [[1], ["x"], [None]]},
        {"kind": "series", "series": {"s": [[0, 1], [1, float("nan")]]}},
    ]})
    assert panel["v"] == 1
    assert panel["parts"][0]["values"] == [None] and panel["parts"][0]["points"] == []
    assert panel["parts"][3]["series"]["s"][1] == [1, None]      # NaN is "no value", never sent as NaN


@pytest.mark.parametrize("panel, words", [
    ("nope", "expected a map"),
    ({"title": "t", "parts": []}, "at least 1"),
    ({"title": "t", "parts": [{"kind": "html", "html": "<script>"}]}, "kind 'html'"),
    ({"title": "t", "parts": [{"kind": "map", "lines": [[0, 0, 1, 1, 2]]}]}, "odd length"),
    ({"title": "t", "parts": [{"kind": "map", "lines": [[0, 0, 1, 1]], "values": [1, 2]}]}, "2 values for 1 lines"),
    ({"title": "t", "parts": [{"kind": "map", "lines": [[0, 0, 1, 1]], "points": [[0, 0, "url(x)"]]}]}, "colour"),
    ({"title": "t", "parts": [{"kind": "graph", "nodes": [["a", "A", "g"]], "edges": [["a", "zz"]]}]}, "no node 'zz'"),
    ({"title": "t", "parts": [{"kind": "graph", "nodes": [["a", "A", "g"], ["a", "B", "g"]]}]}, "duplicate id"),
    ({"title": "t", "parts": [{"kind": "table", "columns": ["a", "b"], "rows": [[1]]}]}, "at least 2"),
    ({"title": "t", "parts": [{"kind": "figures", "items": [["a", {"x": 1}]]}]}, "expected text"),
    ({"title": "t", "parts": [{"kind": "figures", "items": [], "style": "x"}]}, "unknown field(s) style"),
    ({"title": "x" * 500, "parts": [{"kind": "figures", "items": []}]}, "exceeds 200"),
    ({"v": 2, "title": "t", "parts": [{"kind": "figures", "items": []}]}, "version 2"),
    ({"title": "t", "parts": [{"kind": "map", "lines": [[0, 0, 1, math.inf]]}]}, "not a finite number"),
])
def test_malformed_panels_are_refused_saying_what(panel, words):
    with pytest.raises(PanelError, match=None) as info:
        validate_panel(panel)
    assert words in str(info.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "title", "parts", "x"]), json_values, max_size=4)
       | st.fixed_dictionaries({"title": st.text(max_size=5), "parts": st.lists(
           st.dictionaries(st.sampled_from(["kind", "items", "lines", "values", "nodes", "edges", "columns", "rows",
                                            "series", "points", "scale", "title"]),
                           json_values | st.sampled_from(["figures", "map", "graph", "table", "series"]), max_size=6),
           max_size=3)}))
def test_validator_only_ever_raises_panel_error(panel):
    try:
        out = validate_panel(panel)
    except PanelError:
        return
    assert validate_panel(out) == out          # canonical form is a fixed point


def test_rates_and_series():
    rates = Rates()
    assert rates.rate("x", 10, 0.0) is None
    assert rates.rate("x", 30, 2.0) == 10.0
    assert rates.rate("x", 5, 3.0) is None          # counter reset
    series = Series(maxlen=2)
    for t in range(3):
        series.add(t, a=t)
    assert series.part()["series"]["a"] == [[1, 1], [2, 2]]


async def test_publisher_writes_at_most_once_per_interval_latest_wins(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        booster = await box.connect("panelled")
        pub = PanelPublisher(booster, min_interval=1.0)
        assert await pub.publish(good_panel()) is True
        assert (await booster.directory.get(PANEL_KEY))["title"] == "t"
        for title in ("second", "third"):
            assert await pub.publish({**good_panel(), "title": title}) is False
        assert (await booster.directory.get(PANEL_KEY))["title"] == "t"
        await box.advance(1.0)
        assert (await booster.directory.get(PANEL_KEY))["title"] == "third"
        assert pub.stats["published"] == 2 and pub.stats["coalesced"] == 1
        await box.advance(1.0)                        # nothing pending: no write
        assert pub.stats["published"] == 2


async def test_publisher_refuses_oversized_and_invalid_panels(tmp_path):
    async with MemoryBox(state=tmp_path) as box:
        booster = await box.connect("panelled")
        huge = {"title": "big", "parts": [{"kind": "map", "lines": [[i, i, i + 1, i + 1.5] for i in range(5000)]}]}
        assert encoded_size(validate_panel(huge)) > MAX_PANEL_BYTES
        with pytest.raises(PanelError, match="exceeds the limit"):
            await publish_panel(booster, huge)
        with pytest.raises(PanelError):
            await publish_panel(booster, {"title": "t"})
        assert await booster.directory.get(PANEL_KEY) is None


@pytest.mark.parametrize("kind", ["fcd", "gnutella", "mmpog"])
def test_vertical_panels_are_valid_and_bounded(kind):
    builder = getattr(verticals, f"{kind}_builder")()[0]
    for _ in range(2):                           # the second build has rates
        panel = validate_panel(builder.build())
    assert encoded_size(panel) < MAX_PANEL_BYTES
    assert {part["kind"] for part in panel["parts"]} >= {"figures"}


def test_fcd_panel_has_every_road_and_the_queues_the_aggregator_holds():
    builder, city = verticals.fcd_builder()
    panel = validate_panel(builder.build())
    map_part = next(p for p in panel["parts"] if p["kind"] == "map")
    assert len(map_part["lines"]) == city.n_roads
    agg = builder.box.ingest.aggregator
    _, queue, _ = agg.road_states(float(agg.t_last[:agg.used].max()))
    assert map_part["values"] == queue.tolist() and sum(map_part["values"]) > 0
    lights = {colour for _, _, colour, _ in map_part["points"]}
    assert lights <= {"green", "red", "grey"} and "green" in lights and "red" in lights


def test_fcd_panel_of_the_full_city_fits():
    builder, city = verticals.fcd_builder(grid=8, cars=400, seconds=20)
    assert city.n_roads == 224
    assert encoded_size(validate_panel(builder.build())) < MAX_PANEL_BYTES


def test_gnutella_panel_counts_messages_on_cross_cluster_edges():
    builder, core = verticals.gnutella_builder()
    graph = next(p for p in validate_panel(builder.build())["parts"] if p["kind"] == "graph")
    groups = {node_id: group for node_id, _, group in graph["nodes"]}
    cross = [(a, b, n) for a, b, n in graph["edges"] if groups[a] != groups[b]]
    assert sorted(n for _, _, n in cross) == [47, 48]           # msgs out + in per peer booster
    assert len({groups[f"booster:{name}"] for name in ("edge1", "edge2", "edge3")}) == 3
    assert sum(1 for n in graph["nodes"] if n[0].startswith("servent:")) == len(core.locals)


def test_mmpog_panel_lists_locations_and_members():
    builder, service = verticals.mmpog_builder()
    table = next(p for p in validate_panel(builder.build())["parts"] if p["kind"] == "table")
    assert [row[0] for row in table["rows"]] == [1, 2, 3]
    assert all(row[1] == 4 for row in table["rows"])


async def test_a_panel_timer_outliving_its_booster_writes_nothing(tmp_path):
    from boxcore.panels import publish_panel_every, publisher

    async with MemoryBox(state=tmp_path) as box:
        booster = await box.connect("short-lived")
        builds = []
        publish_panel_every(booster, lambda: builds.append(1) or good_panel())
        await box.advance(1.0)
        assert publisher(booster).stats["published"] == 1
        await booster.close()
        built = len(builds)
        await box.advance(2.0)
        # the booster's timers die with it: nothing is built or written after the close
        assert len(builds) == built and publisher(booster).stats["published"] == 1
        # and a publish that still reaches a closed booster is skipped, not an error
        assert await publisher(booster).publish(good_panel()) is False
        assert publisher(booster).stats["skipped_closed"] == 1
        assert booster.stats["handler_errors"] == 0
