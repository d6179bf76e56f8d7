"""boxcore.directory: per-booster persistent key-value state in SQLite,
limits, watches, persistence across reopen and across a killed process."""

import asyncio
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from boxcore.directory import Directory, DirectoryError, QuotaExceeded
from cliruntime import ConfigError


@pytest.fixture
def directory(tmp_path):
    d = Directory(tmp_path / "state")
    yield d
    d.close()


def test_put_get_delete_items(directory):
    assert directory.get("fcd", "road/1") is None
    assert directory.get("fcd", "road/1", default=0) == 0
    directory.put("fcd", "road/1", {"queue": 3, "density": 0.25, "cars": [1, 2]})
    directory.put("fcd", "road/2", 7)
    directory.put("fcd", "light/9", b"\x00\x01")
    directory.put("mmpog", "road/1", "other booster, same key")
    assert directory.get("fcd", "road/1") == {"queue": 3, "density": 0.25, "cars": [1, 2]}
    assert directory.items("fcd", "road/") == [("road/1", {"queue": 3, "density": 0.25, "cars": [1, 2]}),
                                               ("road/2", 7)]
    assert [k for k, _ in directory.items("fcd")] == ["light/9", "road/1", "road/2"]
    assert directory.get("mmpog", "road/1") == "other booster, same key"
    directory.put("fcd", "road/2", 8)                     # overwrite keeps the count
    assert directory.count("fcd") == 3
    assert directory.delete("fcd", "road/2") and not directory.delete("fcd", "road/2")
    assert directory.count("fcd") == 2
    assert directory.boosters()["fcd"]["keys"] == 2
    assert directory.clear("fcd") == 2 and directory.count("fcd") == 0
    assert directory.stats["puts"] == 5 and directory.stats["deletes"] == 3


def test_unicode_prefixes(directory):
    for key in ("a", "a\U0010ffff", "a\U0010ffffz", "ab", "b", "é/1", "é/2", "ê"):
        directory.put("x", key, key)
    assert [k for k, _ in directory.items("x", "a\U0010ffff")] == ["a\U0010ffff", "a\U0010ffffz"]
    assert [k for k, _ in directory.items("x", "é/")] == ["é/1", "é/2"]
    assert [k for k, _ in directory.items("x", "a")] == ["a", "ab", "a\U0010ffff", "a\U0010ffffz"]
    assert [k for k, _ in directory.items("x", "\ud7ff")] == []


def test_keys_lists_names_in_order_without_reading_values(directory, monkeypatch):
    for key in ("b", "a", "ab", "\u00e9t\u00e9", "z"):
        directory.put("keeper", key, {"big": "x" * 1000})
    directory.put("other", "a", 1)
    import boxcore.directory as module

    monkeypatch.setattr(module, "decode_value", lambda blob: pytest.fail("a value was decoded"))
    assert directory.keys("keeper") == ["a", "ab", "b", "z", "\u00e9t\u00e9"]
    assert directory.keys("keeper", "a") == ["a", "ab"]
    assert directory.keys("keeper", limit=2) == ["a", "ab"]
    assert directory.keys("keeper", "\u00e9") == ["\u00e9t\u00e9"]
    assert directory.keys("nobody") == [] and directory.keys("keeper", limit=0) == []
    with pytest.raises(DirectoryError):
        directory.keys("keeper", limit=-1)
    with pytest.raises(DirectoryError):
        directory.keys("keeper", "\ud800")


def test_limits_are_enforced_and_counted(tmp_path):
    d = Directory(tmp_path, max_keys_per_booster=2, max_value_bytes=16, max_key_chars=8)
    d.put("b", "k1", 1)
    d.put("b", "k2", 2)
    with pytest.raises(QuotaExceeded, match="already has 2 keys"):
        d.put("b", "k3", 3)
    d.put("b", "k2", 22)                  # overwriting is not a new key
    d.put("other", "k3", 3)               # the quota is per booster
    with pytest.raises(DirectoryError, match="exceeds the limit of 16"):
        d.put("b", "k1", "x" * 20)
    with pytest.raises(DirectoryError, match="use delete"):
        d.put("b", "k1", None)
    with pytest.raises(DirectoryError, match="msgpack"):
        d.put("b", "k1", object())
    with pytest.raises(DirectoryError, match="exceeds the limit of 8"):
        d.put("b", "k" * 9, 1)
    with pytest.raises(DirectoryError, match="non-empty string"):
        d.put("b", "", 1)
    with pytest.raises(DirectoryError, match="not valid Unicode"):
        d.put("b", "\ud800", 1)
    with pytest.raises(DirectoryError, match="Unicode string"):
        d.items("b", "\udfff")
    assert d.get("b", "k1") == 1
    assert (d.stats["refused_too_many_keys"], d.stats["refused_value_too_large"],
            d.stats["refused_bad_value"], d.stats["refused_bad_key"]) == (1, 1, 2, 3)
    d.close()
    with pytest.raises(ConfigError, match="max_keys_per_booster"):
        Directory(tmp_path, max_keys_per_booster=0)


def test_survives_close_and_reopen(tmp_path):
    d = Directory(tmp_path / "state", max_keys_per_booster=3)
    d.put("fcd", "a", [1, 2, 3])
    d.put("fcd", "b", {"x": 1})
    d.close()
    d = Directory(tmp_path / "state", max_keys_per_booster=3)
    assert d.items("fcd") == [("a", [1, 2, 3]), ("b", {"x": 1})]
    assert d.count("fcd") == 2                   # quota state is reloaded too
    d.put("fcd", "c", 3)
    with pytest.raises(QuotaExceeded):
        d.put("fcd", "d", 4)
    d.close()


def test_survives_a_killed_process(tmp_path):
    state = tmp_path / "state"
    child = textwrap.dedent(f"""
        import os, signal
        from boxcore.directory import Directory
        d = Directory({str(state)!r})
        for i in range(100):
            d.put("booster", f"key/{{i:03d}}", {{"i": i}})
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)     # no close(), no clean shutdown
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL and "written" in result.stdout, result.stderr
    d = Directory(state)
    items = d.items("booster", "key/")
    assert len(items) == 100 and items[42] == ("key/042", {"i": 42})
    d.close()


def test_bad_database_is_a_config_error(tmp_path):
    (tmp_path / "directory.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="cannot open directory database"):
        Directory(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create state directory"):
        Directory(blocker / "state")


async def test_watch_sees_changes_under_its_prefix(directory):
    watch = directory.watch("fcd", "road/")
    received = []

    async def consume():
        async for key, value in watch.events():
            received.append((key, value))
            if len(received) == 3:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    directory.put("fcd", "road/1", 1)
    directory.put("fcd", "light/1", "not watched")
    directory.put("other", "road/1", "other booster")
    await asyncio.sleep(0)
    directory.put("fcd", "road/2", {"q": 2})
    await asyncio.sleep(0)
    directory.delete("fcd", "road/1")
    await asyncio.wait_for(task, 5)
    assert received == [("road/1", 1), ("road/2", {"q": 2}), ("road/1", None)]
    watch.close()
    assert directory.watcher_count == 0


async def test_watch_initial_coalescing_overflow_and_close(directory):
    directory.put("b", "k/0", "before")
    watch = directory.watch("b", "k/", initial=True, max_pending=3)
    for i in range(5):
        directory.put("b", "k/1", i)              # coalesced into one pending change
    assert watch.pending() == [("k/0", "before"), ("k/1", 4)]
    for i in range(5):
        directory.put("b", f"k/{i}", "x")         # five distinct keys, room for three
    assert watch.overflowed == 2 and directory.stats["watch_overflow"] == 2
    assert [k for k, _ in watch.pending()] == ["k/2", "k/3", "k/4"]
    directory.put("b", "k/9", "last")
    watch.close()
    # already pending changes are still delivered, then the iteration ends
    assert [item async for item in watch.events()] == [("k/9", "last")]
    directory.put("b", "k/10", "after close")
    assert watch.pending() == []


async def test_closing_the_directory_ends_watchers(tmp_path):
    d = Directory(tmp_path, max_watchers=1)
    watch = d.watch("b")
    with pytest.raises(DirectoryError, match="too many watchers"):
        d.watch("b")
    waiter = asyncio.create_task(watch.get())
    await asyncio.sleep(0)
    d.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, 5)


# ------------------------------------------------------ model-based check

keys = st.sampled_from(["a", "a/1", "a/2", "b", "b/1", "é"])
values = st.one_of(st.integers(-5, 5), st.text(max_size=5), st.lists(st.integers(0, 3), max_size=3),
                   st.dictionaries(st.sampled_from(["x", "y"]), st.booleans(), max_size=2))
ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(["p", "q"]), keys, values),
    st.tuples(st.just("delete"), st.sampled_from(["p", "q"]), keys, st.none()),
    st.tuples(st.just("reopen"), st.none(), st.none(), st.none()),
), max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_directory_behaves_like_a_dict(tmp_path_factory, operations):
    path = tmp_path_factory.mktemp("model")
    d = Directory(path, max_keys_per_booster=4)
    model: dict[str, dict] = {"p": {}, "q": {}}
    for op, booster, key, value in operations:
        if op == "put":
            if key not in model[booster] and len(model[booster]) >= 4:
                with pytest.raises(QuotaExceeded):
                    d.put(booster, key, value)
            else:
                d.put(booster, key, value)
                model[booster][key] = value
        elif op == "delete":
            assert d.delete(booster, key) == (model[booster].pop(key, None) is not None)
        else:
            d.close()
            d = Directory(path, max_keys_per_booster=4)
    for booster in ("p", "q"):
        assert d.items(booster) == sorted(model[booster].items())
        assert d.items(booster, "a/") == sorted((k, v) for k, v in model[booster].items() if k.startswith("a/"))
        assert d.count(booster) == len(model[booster])
    d.close()


def test_names_are_bound_to_their_first_uid_for_good(tmp_path):
    with Directory(tmp_path) as d:
        assert d.bind_name("fcd-booster", 0) is None
        assert d.bind_name("fcd-booster", 0) is None
        assert d.bind_name("fcd-booster", 65534) == 0
        assert d.names_of(0) == ["fcd-booster"]
    with Directory(tmp_path) as d:                      # persisted
        assert d.name_owner("fcd-booster") == 0 and d.bind_name("fcd-booster", 65534) == 0
        assert d.release_name("fcd-booster") and d.bind_name("fcd-booster", 65534) is None


def test_bytes_are_accounted_and_bounded(tmp_path):
    with Directory(tmp_path, max_total_bytes=1000) as d:
        d.put("a", "k", b"x" * 400)
        size = d.bytes_of("a")
        assert 400 < size < 410 and d.total_bytes == size
        with pytest.raises(QuotaExceeded, match="quota"):
            d.put("a", "k2", b"x" * 100, max_growth=50)
        d.put("a", "k", b"x" * 10, max_growth=0)       # shrinking always fits
        d.put("b", "k", b"y" * 500)
        with pytest.raises(QuotaExceeded, match="directory is full"):
            d.put("c", "k", b"z" * 600)
        assert d.stats["refused_directory_full"] == 1 and d.stats["refused_quota_bytes"] == 1
        d.delete("b", "k")
        assert d.bytes_of("b") == 0 and d.total_bytes == d.bytes_of("a")
    with Directory(tmp_path) as d:                      # reloaded at open
        assert d.total_bytes == d.bytes_of("a") > 0


def test_pages_cover_everything_once(tmp_path):
    with Directory(tmp_path) as d:
        for i in range(25):
            d.put("a", f"k{i:02}", "v" * 100)
        d.put("a", "other", 1)
        seen, after = [], None
        while True:
            items, after = d.page("a", "k", after, limit=7, max_bytes=1 << 20)
            seen += [k for k, _ in items]
            if after is None:
                break
        assert seen == [f"k{i:02}" for i in range(25)]
        items, after = d.page("a", "", None, limit=100, max_bytes=250)   # bounded by bytes too
        assert len(items) == 2 and after == "k01"
