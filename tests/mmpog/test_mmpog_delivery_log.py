"""mmpog.bots.DeliveryLog: the bots' per-delivery record (flat arrays in play, dicts when read) gives
what the per-delivery dicts gave: first delivery kept, later ones counted as duplicates, socket
latencies only where a stamp was taken; and a Bot records through it from real Received events."""

import math
import random
import struct

from mmpog.bots import NO_STAMP, UPDATE, Bot, DeliveryLog, dump_bots, load_bots
from mmpog.reliability import Received


def _dict_reference(records):
    got, arrived, duplicates = {}, {}, 0
    for key, game, sock in records:
        if key in got:
            duplicates += 1
            continue
        got[key] = game
        if sock is not None:
            arrived[key] = sock
    return got, arrived, duplicates


def test_delivery_log_equals_the_per_delivery_dicts():
    rng = random.Random(7)
    records = [(rng.randrange(40), rng.random(), None if rng.random() < 0.2 else rng.random()) for _ in range(500)]
    log = DeliveryLog(capacity=100)               # grows (in place) past its room, twice
    keys = log.keys
    for key, game, sock in records[:250]:
        log.record(key, game, NO_STAMP if sock is None else sock)
    assert log.keys is keys and log.count == 250
    half = _dict_reference(records[:250])
    assert (log.got, log.arrived, log.duplicates) == half       # read mid-way ...
    for key, game, sock in records[250:]:
        log.record(key, game, NO_STAMP if sock is None else sock)
    got, arrived, duplicates = _dict_reference(records)
    assert duplicates > 0 and len(arrived) < len(got)            # the case has both
    assert (log.got, log.arrived, log.duplicates) == (got, arrived, duplicates)   # ... and again after more


class _Client:
    def __init__(self, arrivals):
        self.arrival_of = arrivals.get


def test_bot_records_received_events_and_survives_dump_and_load(tmp_path):
    arrivals = {10.5: 10.25}                       # only the first datagram had a kernel stamp
    bot = Bot(3, _Client(arrivals), random.Random(0), deliveries=DeliveryLog(capacity=2))   # grows once
    pad = bytes(8)
    events = [Received(5, 1, UPDATE.pack(5, 70000, 10.0) + pad, False, 0, 10.5, 0),
              Received(6, 2, UPDATE.pack(6, 1, 10.2) + pad, True, 1, 10.75, 0),
              Received(5, 1, UPDATE.pack(5, 70000, 10.0) + pad, False, 0, 11.0, 0)]   # a duplicate
    for event in events:
        bot.on_event(event)
    assert bot.got == {(5, 70000): 10.5 - 10.0, (6, 1): 10.75 - 10.2}
    assert bot.arrived == {(5, 70000): 0.25}
    assert bot.duplicates == 1
    path = tmp_path / "bots.msgpack"
    dump_bots([bot], [{}], {"gc_pauses": []}, path)
    (loaded,), _, _ = load_bots(path)
    assert loaded.got == bot.got and loaded.arrived == bot.arrived and loaded.duplicates == 1


def test_expected_deliveries_gives_room_for_a_whole_session():
    from mmpog.bots import expected_deliveries
    mean = 10 * 10 * 63                                     # 64 players in one location, 10 updates/s, 10 s
    assert expected_deliveries(10, 10, 64, 1) == int(1.5 * mean) + 1024
    assert expected_deliveries(10, 10, 64, 1, receivers=16) == int(1.5 * mean * 16) + 1024
    assert expected_deliveries(10, 10, 32, 4) < expected_deliveries(10, 10, 32, 1)
