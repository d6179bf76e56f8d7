"""GcWatch times the collector's pauses; freeze_startup_heap keeps start-up's objects out of later ones."""

import gc

from mmpog.gcwatch import GcWatch, freeze_startup_heap


def test_a_full_collection_is_recorded_with_its_duration():
    watch = GcWatch().start()
    try:
        gc.collect()          # a full collection
        gc.collect(1)
    finally:
        watch.stop()
    generations = [generation for _, generation, _ in watch.pauses]
    assert generations.count(2) == 1 and generations.count(1) == 1
    assert all(ms >= 0 for _, _, ms in watch.pauses)
    snap = watch.snapshot()
    assert snap["gen2_collections"] == 1 and snap["gen1_collections"] == 1
    began = watch.pauses[0][0]
    assert watch.since(began)[0][:2] == [0.0, 2]
    assert watch.since(began + 3600) == []
    gc.collect()
    assert watch.snapshot()["gen2_collections"] == 1          # stopped: no longer counts


def test_freezing_moves_what_start_up_left_out_of_the_collected_heap():
    gc.unfreeze()
    kept = [[n] for n in range(10_000)]           # long-lived, gc-tracked start-up state
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(kept)
        probe = kept[1234]
        assert not any(obj is probe for obj in gc.get_objects(2))     # a full collection no longer walks it
        gc.unfreeze()
        gc.collect()
        assert any(obj is probe for obj in gc.get_objects(2))         # (without the freeze it would)
    finally:
        gc.unfreeze()
