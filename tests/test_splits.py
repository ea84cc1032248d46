"""Splitters against invariants: no row on both sides, nothing lost, time order, per-group ratios."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timedelta

import numpy as np
import pytest
from pyspark.sql import DataFrame, SparkSession

from pipelines.core import splits
from pipelines.core.errors import ConfigError

START = datetime(2026, 10, 1)


@pytest.fixture(scope="module")
def events(spark: SparkSession) -> DataFrame:
    """30 users with 1 to 12 distinct items each at random times, some sharing a timestamp."""
    rng = np.random.default_rng(3)
    rows = []
    for user in range(30):
        count = 1 + user % 12
        items = rng.choice(60, size=count, replace=False)
        for item in items:
            minutes = int(rng.integers(0, 20)) * 60 * 24  # whole days: ties are common
            rows.append((user, int(item), START + timedelta(minutes=minutes)))
    return spark.createDataFrame(rows, "user_idx int, item_idx int, event_ts timestamp").cache()


def _rows(df: DataFrame) -> list[tuple]:
    return [(r.user_idx, r.item_idx, r.event_ts) for r in df.collect()]


def _assert_partition(whole: DataFrame, train: DataFrame, test: DataFrame) -> tuple[list, list]:
    """Every input row is on exactly one side."""
    left, right = _rows(train), _rows(test)
    assert not set(left) & set(right)
    assert sorted(left + right) == sorted(_rows(whole))
    return left, right


def test_temporal_split_cuts_at_the_instant(events: DataFrame) -> None:
    cut = START + timedelta(days=14)
    train, test = splits.temporal_split(events, cut)
    left, right = _assert_partition(events, train, test)
    assert max(ts for _, _, ts in left) < cut <= min(ts for _, _, ts in right)


def test_leave_last_n_holds_out_each_users_latest_rows(events: DataFrame) -> None:
    train, test = splits.leave_last_n_split(events, n=2)
    left, right = _assert_partition(events, train, test)
    per_user_total = Counter(u for u, _, _ in _rows(events))
    held = defaultdict(list)
    for u, item, ts in right:
        held[u].append((ts, item))
    for user, total in per_user_total.items():
        assert len(held[user]) == (2 if total > 2 else 0)  # users with <= n rows stay in train
    for u, item, ts in left:
        # temporal order: nothing in train is later than the user's held-out rows (item id breaks ties)
        assert all((ts, item) < later for later in held[u])


def test_leave_last_n_rejects_n_below_one(events: DataFrame) -> None:
    with pytest.raises(ConfigError, match="leave_last_n"):
        splits.leave_last_n_split(events, n=0)


@pytest.mark.parametrize("by", ["user", "item"])
def test_random_split_keeps_the_ratio_within_every_group(events: DataFrame, by: str) -> None:
    train, test = splits.random_stratified_split(events, ratio=0.75, seed=11, by=by)
    left, right = _assert_partition(events, train, test)
    position = 0 if by == "user" else 1
    totals = Counter(row[position] for row in left + right)
    kept = Counter(row[position] for row in left)
    for group, total in totals.items():
        assert kept[group] == splits.expected_train_rows(total, 0.75)
        if total >= 2:
            assert 0 < kept[group] < total


def test_random_split_is_reproducible_and_depends_on_the_seed(events: DataFrame) -> None:
    first = sorted(_rows(splits.random_stratified_split(events, seed=5)[1]))
    again = sorted(_rows(splits.random_stratified_split(events.repartition(7), seed=5)[1]))
    other = sorted(_rows(splits.random_stratified_split(events, seed=6)[1]))
    assert first == again
    assert first != other


def test_expected_train_rows_rounds_half_up() -> None:
    assert [splits.expected_train_rows(n, 0.75) for n in (1, 2, 3, 4, 6, 10)] == [1, 1, 2, 3, 5, 8]
