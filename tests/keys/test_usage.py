import contextlib
from pathlib import Path

from keys.db import open_db
from keys.usage import HOUR, Tally, UsageEvent, UsageRow, UsageStore, aggregate, hour_bucket
from tests.keys.helpers import T0

H0 = hour_bucket(T0)


def test_hour_bucket() -> None:
    assert H0 % HOUR == 0 and H0 <= T0 < H0 + HOUR
    assert hour_bucket(H0 + HOUR - 0.001) == H0


def test_aggregate_folds_per_key_model_and_hour() -> None:
    batch = aggregate(
        [
            UsageEvent("k1", "m", 10, 5, H0 + 1),
            UsageEvent("k1", "m", 20, 7, H0 + 2),
            UsageEvent("k1", "other", 1, 1, H0 + 3),
            UsageEvent("k1", "m", 3, 3, H0 + HOUR),
            UsageEvent("k2", "m", 4, 4, H0 + 9),
        ]
    )
    assert sorted(batch.rows, key=lambda r: (r.key_id, r.model, r.hour)) == [
        UsageRow("k1", "m", H0, 2, 30, 12),
        UsageRow("k1", "m", H0 + HOUR, 1, 3, 3),
        UsageRow("k1", "other", H0, 1, 1, 1),
        UsageRow("k2", "m", H0, 1, 4, 4),
    ]
    assert batch.last_used == {"k1": H0 + HOUR, "k2": H0 + 9}


def test_tally_merge_adds_counts_and_keeps_the_latest_time() -> None:
    kept, meanwhile = Tally(), Tally()
    kept.add("k1", "m", 10, 5, H0 + 5)
    kept.add("k2", "m", 1, 1, H0 + 9)
    meanwhile.add("k1", "m", 2, 2, H0 + 7)
    meanwhile.add("k1", "m", 3, 3, H0 + HOUR)
    meanwhile.add("k2", "m", 1, 1, H0 + 1)
    kept.merge(meanwhile)
    assert kept.events == 5 and len(kept) == 3
    assert sorted(kept.batch().rows, key=lambda r: (r.key_id, r.hour)) == [
        UsageRow("k1", "m", H0, 2, 12, 7),
        UsageRow("k1", "m", H0 + HOUR, 1, 3, 3),
        UsageRow("k2", "m", H0, 2, 2, 2),
    ]
    assert kept.batch().last_used == {"k1": H0 + HOUR, "k2": H0 + 9}


def test_store_upserts_and_filters(tmp_path: Path) -> None:
    with contextlib.closing(open_db(tmp_path / "usage.db")) as conn:
        store = UsageStore(conn)
        store.write(aggregate([UsageEvent("k1", "m", 10, 5, H0 + 1)]))
        store.write(aggregate([UsageEvent("k1", "m", 1, 2, H0 + 2)]))
        store.write(aggregate([UsageEvent("k2", "m", 7, 7, H0 + 2 * HOUR)]))
        assert store.usage() == [
            UsageRow("k1", "m", H0, 2, 11, 7),
            UsageRow("k2", "m", H0 + 2 * HOUR, 1, 7, 7),
        ]
        assert store.usage(key_id="k2") == [UsageRow("k2", "m", H0 + 2 * HOUR, 1, 7, 7)]
        # since includes the hour it falls in; until is exclusive
        assert [r.key_id for r in store.usage(since=H0 + 2 * HOUR + 59)] == ["k2"]
        assert [r.key_id for r in store.usage(until=H0 + 2 * HOUR)] == ["k1"]
        assert store.last_used("k1") == H0 + 2
        assert store.last_used("nobody") is None
        # an older event does not move last_used back
        store.write(aggregate([UsageEvent("k1", "m", 1, 1, H0)]))
        assert store.last_used_all() == {"k1": H0 + 2, "k2": H0 + 2 * HOUR}


def test_database_uses_wal(tmp_path: Path) -> None:
    with contextlib.closing(open_db(tmp_path / "usage.db")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
