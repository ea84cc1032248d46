"""The models evaluation compares, by name: the published lists as written, popularity, recent popularity,
item-kNN, ALS and EASE, each ranked for a set of users from a training split (`recommend`).

The baselines skip the items a user owned (consumed) in training, as the publish path does, unless
`evaluate.relevant` is "any" (`holdout.read_owned`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import ease, holdout, metrics, tables
from pipelines.core.als import STRENGTH, als_recommend, load_model, to_pairs
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import EvaluateConfig
from pipelines.core.neighbours import cooccurrence_neighbours, with_recent_items
from pipelines.core.runs import RunContext
from pipelines.core.schemas import (
    ALS_RERANK,
    EASE,
    EASE_SCORE,
    EVENT_TS,
    ITEM_IDX,
    ITEM_KNN,
    ITEM_KNN_FRESH,
    MODEL,
    NEIGHBOUR_IDX,
    POPULARITY,
    PUBLISHED,
    RANK,
    RECENT_POPULARITY,
    RUN_ID,
    SCORE,
    USER_IDX,
)
from pipelines.core.splits import leave_last_n_split, random_stratified_split, temporal_split

HOLDOUT_MODELS = (PUBLISHED, EASE)  # lists of the holdout run (pipelines.runner): scored only with its run id
METRICS_COLUMNS = (RUN_ID, MODEL, metrics.METRIC, metrics.K, metrics.METRIC_VALUE)
# Popularity lists are drawn from this many extra items beyond k, to survive seen-item removal.
POPULAR_POOL_MARGIN = 1000
REPLAY_EXTRA_MODELS = (ITEM_KNN_FRESH, ALS_RERANK)


def split_pairs(interactions: DataFrame, evaluate: EvaluateConfig, ctx: RunContext) -> tuple[DataFrame, DataFrame]:
    """(train, test) at the (user, item) grain (strength, latest event time) for the configured protocol."""
    if evaluate.protocol == "temporal":
        cut = ctx.as_of - timedelta(days=evaluate.holdout_days)
        before, after = temporal_split(interactions, cut)
        return to_pairs(before), to_pairs(after)
    pairs = to_pairs(interactions)
    if evaluate.protocol == "leave_last":
        return leave_last_n_split(pairs, n=evaluate.leave_last_n)
    by: Literal["user", "item"] = "user" if evaluate.protocol == "random_user" else "item"
    return random_stratified_split(pairs, ratio=1.0 - evaluate.test_ratio, seed=evaluate.seed, by=by)


def to_relevant(train: DataFrame, test: DataFrame, owned: DataFrame | None = None) -> DataFrame:
    """Test (user, item) pairs of users seen in training, minus the `owned` (user, item) pairs (evaluate.relevant
    "unseen": what the user consumed in training, holdout.read_owned; None keeps every test pair: "any")."""
    warm = train.select(USER_IDX).distinct()
    pairs = test.select(USER_IDX, ITEM_IDX).distinct()
    if owned is not None:
        pairs = metrics.remove_seen(pairs, owned)
    return pairs.join(warm, on=USER_IDX, how="inner").select(USER_IDX, ITEM_IDX)


def _max_seen(train: DataFrame, users: DataFrame) -> int:
    own = train.select(USER_IDX, ITEM_IDX).distinct().join(users, on=USER_IDX, how="inner")
    most = own.groupBy(USER_IDX).count().agg(F.max("count")).first()
    return int((most[0] if most is not None else 0) or 0)


def recommend_popular(item_scores: DataFrame, users: DataFrame, train: DataFrame, k: int) -> DataFrame:
    """The k highest-scoring items each user has not seen: (user, item, score, rank).

    Only the top `k + most items any user saw` items can make a list, so the cross join with users is
    bounded by that pool, not by the catalog.
    """
    targets = users.select(USER_IDX).distinct()
    pool = min(k + _max_seen(train, targets), k + POPULAR_POOL_MARGIN)
    top = item_scores.orderBy(F.col(SCORE).desc(), F.col(ITEM_IDX).asc()).limit(pool)
    candidates = targets.crossJoin(F.broadcast(top))
    return metrics.top_k(metrics.remove_seen(candidates, train), k)


def popularity_scores(train: DataFrame) -> DataFrame:
    """(item, score): the number of training users who interacted with the item."""
    return train.groupBy(ITEM_IDX).agg(F.countDistinct(USER_IDX).cast("double").alias(SCORE))


def recent_popularity_scores(train: DataFrame, recent_days: float) -> DataFrame:
    """Popularity over the pairs whose latest event falls in the last `recent_days` of the training data."""
    latest = train.agg(F.max(EVENT_TS).alias("_latest"))
    window_seconds = F.lit(recent_days * 86400.0)
    recent = train.crossJoin(F.broadcast(latest)).filter(
        F.unix_timestamp(EVENT_TS) >= F.unix_timestamp("_latest") - window_seconds
    )
    return popularity_scores(recent)


def recommend_item_knn(
    train: DataFrame, users: DataFrame, evaluate: EvaluateConfig, k: int, excluded: DataFrame
) -> DataFrame:
    """Item-kNN: score = summed co-occurrence cosine of an item to the user's `knn_recent_items` most recent items
    (`neighbours.with_recent_items` on the pairs' strength), among each item's `knn_neighbours` best neighbours
    in those same baskets; `excluded` pairs skipped."""
    recent = with_recent_items(train, evaluate.knn_recent_items, weight=STRENGTH)
    neighbours = cooccurrence_neighbours(recent, evaluate.knn_neighbours)
    scores = (
        recent.join(users.select(USER_IDX).distinct(), on=USER_IDX, how="inner")
        .join(neighbours, on=ITEM_IDX, how="inner")
        .groupBy(USER_IDX, F.col(NEIGHBOUR_IDX).alias(ITEM_IDX))
        .agg(F.sum(SCORE).alias(SCORE))
    )
    return metrics.top_k(metrics.remove_seen(scores, excluded), k)


def published_lists(spark: SparkSession, config: ShelfConfig, run_id: str, users: DataFrame, k: int) -> DataFrame:
    """The holdout's published lists of `users`, as written (nothing removed), cut at k: user, item, score, rank."""
    lists = holdout.read_published(spark, config, run_id)
    return lists.join(users.select(USER_IDX).distinct(), on=USER_IDX, how="inner").filter(F.col(RANK) <= k)


def recommend(
    spark: SparkSession,
    name: str,
    train: DataFrame,
    users: DataFrame,
    config: ShelfConfig,
    k: int,
    run_id: str,
    excluded: DataFrame,
) -> DataFrame:
    """Top-k lists of one model for `users`, trained on `train` only (`published`, `als`: the holdout run's).

    The baselines skip the `excluded` (user, item) pairs: with evaluate.relevant "unseen" what the user owned in
    training (consumed, the rule the publish path follows); with "any" none, so a baseline may repeat too (a
    fair rival for buy-again lists)."""
    if name == PUBLISHED:
        return published_lists(spark, config, run_id, users, k)
    if name == POPULARITY:
        return recommend_popular(popularity_scores(train), users, excluded, k)
    if name == RECENT_POPULARITY:
        return recommend_popular(recent_popularity_scores(train, config.evaluate.recent_days), users, excluded, k)
    if name == ITEM_KNN:
        return recommend_item_knn(train, users, config.evaluate, k, excluded)
    if name == EASE:
        return recommend_ease(spark, config, run_id, users, excluded, k)
    return als_recommend(load_model(holdout.holdout_config(config), run_id), users, excluded, k)


def recommend_ease(
    spark: SparkSession, config: ShelfConfig, run_id: str, users: DataFrame, excluded: DataFrame, k: int
) -> DataFrame:
    """EASE alone: the holdout run's B (gold.ease_neighbours) scores each user's top-k items outside `excluded`; no
    list when the holdout run fitted no EASE (catalogue over train.ease.max_items, or disabled)."""
    held = holdout.holdout_config(config)
    neighbours = ease.neighbours_of_run(spark, held, run_id)
    if neighbours is None:
        return spark.createDataFrame([], f"{USER_IDX} int, {ITEM_IDX} int, {SCORE} double, {RANK} int")
    interactions = tables.read(spark, held, "silver", "interactions").join(users, on=USER_IDX, how="left_semi")
    x = ease.to_ease_input(interactions, config.train.ease.values)
    seen = excluded.select(USER_IDX, ITEM_IDX)
    scores = ease.ease_candidates(x, neighbours, seen, k).withColumnRenamed(EASE_SCORE, SCORE)
    return metrics.top_k(scores, k)


def cutoffs(evaluate: EvaluateConfig) -> list[int]:
    return sorted({evaluate.k, *evaluate.ks})


def diversity_factors(spark: SparkSession, config: ShelfConfig, run_id: str) -> DataFrame | None:
    """gold.item_factors of `run_id` (the train step of the same run; pass the holdout config for the holdout
    run's) for intra-list diversity, or None when that run trained no factors (diversity then uses
    co-occurrence cosine on the training split)."""
    if not tables.exists(spark, config, "gold", "item_factors"):
        return None
    factors = tables.read(spark, config, "gold", "item_factors").filter(F.col(RUN_ID) == run_id)
    return factors if factors.limit(1).count() > 0 else None
