"""The item-kNN baseline against a hand count: the same co-occurrence cosine and recent items as the product's
neighbour lists (pipelines/core/neighbours.py), one row per (user, item) however often it was touched."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pytest
from pyspark.sql import SparkSession

from pipelines.baselines import recommend_item_knn
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import EvaluateConfig

T0 = datetime(2026, 11, 1)


def test_item_knn_scores_are_summed_cosines_to_the_users_recent_items(spark: SparkSession) -> None:
    """Baskets {1, 2}, {1, 2, 3}, {2, 3}: cos(1, 2) = cos(2, 3) = 2 / sqrt(2 * 3), cos(1, 3) = 1 / sqrt(2 * 2).
    User 0 gets item 3 (cos(1, 3) + cos(2, 3)), user 2 gets item 1, user 1 owns everything. User 0's item 1
    appears twice (two rows of the same pair): it counts once."""
    rows = [(0, 1, 1.0, 1), (0, 1, 2.0, 3), (0, 2, 1.0, 2), (1, 1, 1.0, 1), (1, 2, 1.0, 2), (1, 3, 1.0, 3)]
    rows += [(2, 2, 1.0, 1), (2, 3, 1.0, 2)]
    train = spark.createDataFrame(
        [(u, i, s, T0 + timedelta(days=d)) for u, i, s, d in rows],
        "user_idx int, item_idx int, strength double, event_ts timestamp",
    )
    users = spark.createDataFrame([(0,), (1,), (2,)], "user_idx int")
    lists = recommend_item_knn(train, users, EvaluateConfig(), 10, train.select("user_idx", "item_idx"))
    got = {(r.user_idx, r.item_idx): (r.score, r.rank) for r in lists.collect()}
    expected = 2 / math.sqrt(6) + 1 / 2
    assert set(got) == {(0, 3), (2, 1)}
    assert got[(0, 3)] == (pytest.approx(expected), 1)
    assert got[(2, 1)] == (pytest.approx(expected), 1)


@pytest.mark.steps
def test_unseen_relevance_and_the_baselines_leave_out_what_the_user_owned_not_what_they_viewed(
    spark: SparkSession, config: ShelfConfig
) -> None:
    """The publish path never recommends a consumed item again, but does recommend a viewed one: "unseen" relevance
    and the baselines follow the same rule (recommend.consumed_event_types), so a viewed item bought in the test
    days is a hit any model can earn, and an item bought again is not (unless evaluate.relevant is "any")."""
    from pipelines.baselines import to_relevant
    from pipelines.core import holdout, tables

    schema = "user_idx int, item_idx int, event_type string"
    train = spark.createDataFrame([(0, 1, "view"), (0, 2, "purchase"), (0, 3, "add_to_cart"), (1, 9, "view")], schema)
    test = spark.createDataFrame([(0, 1, "purchase"), (0, 2, "purchase"), (0, 4, "view"), (5, 1, "view")], schema)
    tables.write(train, holdout.holdout_config(config), "silver", "interactions", "r1")
    owned = holdout.read_owned(spark, config)
    assert {(r.user_idx, r.item_idx) for r in owned.collect()} == {(0, 2)}  # shops: a purchase consumes
    pairs = {(r.user_idx, r.item_idx) for r in to_relevant(train, test, owned).collect()}
    assert pairs == {(0, 1), (0, 4)}  # the viewed item 1 counts; the re-bought 2 does not; user 5 is cold
    assert {(r.user_idx, r.item_idx) for r in to_relevant(train, test, None).collect()} == {(0, 1), (0, 2), (0, 4)}
    as_views = config.model_copy(
        update={"recommend": config.recommend.model_copy(update={"consumed_event_types": ["view"]})}
    )
    assert {(r.user_idx, r.item_idx) for r in holdout.read_owned(spark, as_views).collect()} == {(0, 1), (1, 9)}
