"""The server's model starts its light queues from the queue on every road now, and its
correction from the cars, queue and speed on every road now (``Model.present``), only when its
own aggregator saw every car: raw probes only.  Behind a box, whose cars it never sees, it keeps
the queues of the lights' last switches."""

import asyncio

import numpy as np

from fcd.aggregate import Ingest
from fcd.server import RAW_KEEP, FcdServer
from tests.fcd.test_fcd_server_datatime import datagrams


def feed_raw(server: FcdServer, payloads: list[bytes]) -> None:
    """As the UDP front hands a receive batch over: rows of the datagrams' first bytes."""
    rows = np.zeros((len(payloads), RAW_KEEP), dtype=np.uint8)
    for i, data in enumerate(payloads):
        rows[i, :len(data)] = np.frombuffer(data, dtype=np.uint8)
    server._take(rows, np.array([len(p) for p in payloads], dtype=np.int64))
    server.process_pending()


def raw_server(trace, until: float) -> FcdServer:
    server = FcdServer(trace.city)
    for t, payloads in datagrams(trace):
        if t >= until:
            break
        feed_raw(server, payloads)
    return server


def test_raw_only_server_starts_its_light_queues_from_the_queues_now(small_trace):
    server = raw_server(small_trace, until=150.0)
    assert server.own_view_is_complete()
    aggregator = server.ingest.aggregator
    now = float(aggregator.t_last[:aggregator.used].max())
    cars, queues, speed = aggregator.road_states(now)
    lit = np.flatnonzero(server.model.lit)
    assert queues[lit].sum() > 0                     # some light holds a queue: the check can fail
    asyncio.run(server.publish())
    assert server.stats["present_queues"] == 1
    assert np.array_equal(server.model.report_queue[lit], queues[lit])
    assert np.all(server.model.report_t[lit] == now)
    # every road's state now, for the model's correction: cars, queue and moving speed
    assert np.array_equal(server.model.state, np.stack([cars, queues, speed]))
    assert np.all(server.model.state_t == now)


def test_a_box_report_keeps_the_model_on_the_lights_switches(small_trace):
    server = raw_server(small_trace, until=150.0)
    box = Ingest(small_trace.city)                    # a box's aggregator: cars the server never sees
    report = next(rep for t, payloads in datagrams(small_trace) if t >= 150.0 for rep in box.ingest(payloads))
    assert server.accept(report, "box")
    assert not server.own_view_is_complete()
    before_t = server.model.report_t.copy()
    asyncio.run(server.publish())
    assert server.stats["present_queues"] == 0
    assert np.array_equal(server.model.report_t, before_t, equal_nan=True)
