"""shelf evaluate: offline ranking metrics of the published lists, the baselines and ALS on a held-out split.

The model that matters is `published`: `pipelines.core.holdout` writes the training part of silver.interactions
under the holdout namespace, the publishing steps (train, similarities, candidates, rerank) run unchanged on it
(`pipelines.runner` does that before this step), and this step scores the lists they wrote to
holdout_gold.recommendations as they were written. The baselines learn from the same training part; `als` is the
holdout's own trained model (no second fit).

Reads the holdout tables. The split, by `evaluate.protocol` (the preset's when unset):

- temporal: train on events before `as_of - holdout_days`, test on the events after
- leave_last: each user's last `leave_last_n` items are the test set
- random_user / random_item: 75/25 stratified by user or item, seeded (the MovieLens protocol)
- replay: ALS trains on events before T = as_of - replay_horizon_days - replay_fresh_days; the
  fresh window [T, T + d) feeds the re-rank (`pipelines.core.reranking`, model `als_rerank`) and
  `item_knn_fresh`; the test window is [T + d, as_of). The re-rank gets the kind of candidates
  `shelf candidates` gives it: ALS's rerank.max_candidates best unseen items plus the co-occurrence
  neighbours (`pipelines.core.neighbours`, the similarities step's recipe, over the events before T + d) of each user's
  recommend.recent_items most recent items; the same neighbour lists feed its co-occurrence features.
  Items a user touched before T + d are removed from the relevant set and from every list.

The relevant items of a user are the test items they had not interacted with in training; users
absent from training (cold users) are not scored. Every model ranks unseen items only.

Writes gold.metrics, one row per (run_id, model, metric, k) (replaced per run id), and the run's report
(`summary.md`, `metrics_at_k.png`, `metric_vs_k.png`) as rows of ops.reports (`pipelines.core.reports`;
`shelf report` prints or exports it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from pyspark.ml.recommendation import ALSModel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.core import ease, holdout, metrics, reports, tables
from pipelines.core.als import AlsParams, als_recommend, fit_als, load_model, to_pairs
from pipelines.core.cli import step_main
from pipelines.core.config import EvaluateConfig, RecommendConfig, RerankConfig, ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.neighbours import to_cooccurrence_neighbours
from pipelines.core.quality import ts_lit
from pipelines.core.reranking import (
    ALS_SCORE,
    FEATURES,
    NEIGHBOUR_IDX,
    RANK,
    SCORE,
    SOURCES,
    Reranked,
    read_catalog,
    rerank_candidates,
)
from pipelines.core.runs import RunContext, step_log
from pipelines.core.schemas import EVENT_TS, ITEM_IDX, RUN_ID, USER_IDX
from pipelines.core.splits import leave_last_n_split, random_stratified_split, temporal_split

STEP = "evaluate"
MODEL = "model"
PUBLISHED = "published"
POPULARITY = "popularity"
RECENT_POPULARITY = "recent_popularity"
ITEM_KNN = "item_knn"
ALS_MODEL = "als"
EASE = "ease"
HOLDOUT_MODELS = (PUBLISHED, EASE)  # lists of the holdout run (pipelines.runner): scored only with its run id
NEIGHBOUR = "neighbour"
SIMILARITY = "similarity"
METRICS_COLUMNS = (RUN_ID, MODEL, metrics.METRIC, metrics.K, metrics.METRIC_VALUE)
# Popularity lists are drawn from this many extra items beyond k, to survive seen-item removal.
POPULAR_POOL_MARGIN = 1000


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


def to_relevant(train: DataFrame, test: DataFrame, relevant: str = "unseen") -> DataFrame:
    """Test (user, item) pairs of users seen in training, minus items they already had in training
    (`relevant` "unseen"; "any" keeps them: repeat purchases count, for recommend.repeat_purchase)."""
    warm = train.select(USER_IDX).distinct()
    pairs = test.select(USER_IDX, ITEM_IDX).distinct()
    if relevant != "any":
        pairs = metrics.remove_seen(pairs, train)
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
    top = item_scores.orderBy(F.col(metrics.SCORE).desc(), F.col(ITEM_IDX).asc()).limit(pool)
    candidates = targets.crossJoin(F.broadcast(top))
    return metrics.top_k(metrics.remove_seen(candidates, train), k)


def popularity_scores(train: DataFrame) -> DataFrame:
    """(item, score): the number of training users who interacted with the item."""
    return train.groupBy(ITEM_IDX).agg(F.countDistinct(USER_IDX).cast("double").alias(metrics.SCORE))


def recent_popularity_scores(train: DataFrame, recent_days: float) -> DataFrame:
    """Popularity over the pairs whose latest event falls in the last `recent_days` of the training data."""
    latest = train.agg(F.max(EVENT_TS).alias("_latest"))
    window_seconds = F.lit(recent_days * 86400.0)
    recent = train.crossJoin(F.broadcast(latest)).filter(
        F.unix_timestamp(EVENT_TS) >= F.unix_timestamp("_latest") - window_seconds
    )
    return popularity_scores(recent)


def recent_items(train: DataFrame, per_user: int) -> DataFrame:
    """Each user's `per_user` most recent items (ties on time: higher item id first)."""
    latest_first = Window.partitionBy(USER_IDX).orderBy(F.col(EVENT_TS).desc(), F.col(ITEM_IDX).desc())
    return (
        train.withColumn("_pos", F.row_number().over(latest_first))
        .filter(F.col("_pos") <= per_user)
        .select(USER_IDX, ITEM_IDX)
    )


def item_neighbours(recent: DataFrame, neighbours: int) -> DataFrame:
    """Cosine co-occurrence neighbours: (item, neighbour, similarity), the top `neighbours` per item.

    The self-join runs on each user's recent items only, so a user adds at most N^2 pairs.
    """
    item_users = recent.groupBy(ITEM_IDX).agg(F.count(F.lit(1)).alias("_users"))
    left = recent.select(USER_IDX, ITEM_IDX)
    right = recent.select(USER_IDX, F.col(ITEM_IDX).alias(NEIGHBOUR))
    co = (
        left.join(right, on=USER_IDX, how="inner")
        .filter(F.col(ITEM_IDX) != F.col(NEIGHBOUR))
        .groupBy(ITEM_IDX, NEIGHBOUR)
        .agg(F.count(F.lit(1)).alias("_co"))
    )
    own = item_users.select(ITEM_IDX, F.col("_users").alias("_n_item"))
    other = item_users.select(F.col(ITEM_IDX).alias(NEIGHBOUR), F.col("_users").alias("_n_neighbour"))
    best = Window.partitionBy(ITEM_IDX).orderBy(F.col(SIMILARITY).desc(), F.col(NEIGHBOUR).asc())
    return (
        co.join(own, on=ITEM_IDX, how="inner")
        .join(other, on=NEIGHBOUR, how="inner")
        .withColumn(SIMILARITY, F.col("_co") / F.sqrt(F.col("_n_item") * F.col("_n_neighbour")))
        .withColumn("_pos", F.row_number().over(best))
        .filter(F.col("_pos") <= neighbours)
        .select(ITEM_IDX, NEIGHBOUR, SIMILARITY)
    )


def recommend_item_knn(
    train: DataFrame, users: DataFrame, evaluate: EvaluateConfig, k: int, excluded: DataFrame
) -> DataFrame:
    """Item-kNN: score = summed similarity of an item to the user's recent items, `excluded` pairs skipped."""
    recent = recent_items(train, evaluate.knn_recent_items)
    neighbours = item_neighbours(recent, evaluate.knn_neighbours)
    scores = (
        recent.join(users.select(USER_IDX).distinct(), on=USER_IDX, how="inner")
        .join(neighbours, on=ITEM_IDX, how="inner")
        .groupBy(USER_IDX, F.col(NEIGHBOUR).alias(ITEM_IDX))
        .agg(F.sum(SIMILARITY).alias(metrics.SCORE))
    )
    return metrics.top_k(metrics.remove_seen(scores, excluded), k)


def published_lists(spark: SparkSession, config: ShelfConfig, run_id: str, users: DataFrame, k: int) -> DataFrame:
    """The holdout's published lists of `users`, as written (nothing removed), cut at k: user, item, score, rank."""
    lists = holdout.read_published(spark, config, run_id)
    return lists.join(users.select(USER_IDX).distinct(), on=USER_IDX, how="inner").filter(F.col(metrics.RANK) <= k)


def recommend(
    spark: SparkSession, name: str, train: DataFrame, users: DataFrame, config: ShelfConfig, k: int, run_id: str
) -> DataFrame:
    """Top-k lists of one model for `users`, trained on `train` only (`published`, `als`: the holdout run's).

    The baselines skip the items a user touched in training, unless evaluate.relevant is "any": when repeats
    count, a baseline may recommend them too (a fair rival for buy-again lists)."""
    if name == PUBLISHED:
        return published_lists(spark, config, run_id, users, k)
    excluded = train if config.evaluate.relevant == "unseen" else train.limit(0)
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
        return spark.createDataFrame([], f"{USER_IDX} int, {ITEM_IDX} int, {metrics.SCORE} double, {metrics.RANK} int")
    interactions = tables.read(spark, held, "silver", "interactions").join(users, on=USER_IDX, how="left_semi")
    x = ease.to_ease_input(interactions, config.train.ease.values)
    seen = excluded.select(USER_IDX, ITEM_IDX)
    scores = ease.ease_candidates(x, neighbours, seen, k).withColumnRenamed(ease.EASE_SCORE, metrics.SCORE)
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


def evaluate_models(
    spark: SparkSession, train: DataFrame, test: DataFrame, config: ShelfConfig, run_id: str
) -> DataFrame:
    """gold.metrics rows: one per (model, metric, k) for every configured model."""
    ks = cutoffs(config.evaluate)
    relevant = to_relevant(train, test, config.evaluate.relevant).cache()
    users = relevant.select(USER_IDX).distinct().cache()
    if users.limit(1).count() == 0:
        raise InputDataError(
            "The test split has no user with an unseen item who also appears in training; widen "
            "evaluate.holdout_days or evaluate.test_ratio, or check silver.interactions."
        )
    lists = []
    for name in config.evaluate.models:
        # Each model's lists are materialised once; all models are then scored in one metrics pass.
        recs = recommend(spark, name, train, users, config, max(ks), run_id).withColumn(MODEL, F.lit(name)).cache()
        recs.count()
        lists.append(recs)
    combined = lists[0]
    for recs in lists[1:]:
        combined = combined.unionByName(recs)
    factors = diversity_factors(spark, holdout.holdout_config(config), run_id)
    named = spark.createDataFrame([(m,) for m in config.evaluate.models], f"{MODEL} string")
    scored = metrics.ranking_metrics(combined, relevant, train, ks, by=[MODEL], item_factors=factors, groups=named)
    # models x metrics x ks rows: small, brought back so the caches can be released.
    table = spark.createDataFrame(scored.collect(), scored.schema)
    for recs in lists:
        recs.unpersist()
    relevant.unpersist()
    users.unpersist()
    return table.withColumn(RUN_ID, F.lit(run_id)).select(*METRICS_COLUMNS)


# Temporal replay (evaluate.protocol: replay) -------------------------------------------------------
ALS_RERANK = "als_rerank"
ITEM_KNN_FRESH = "item_knn_fresh"
REPLAY_EXTRA_MODELS = (ITEM_KNN_FRESH, ALS_RERANK)


@dataclass(frozen=True)
class ReplayWindow:
    """One replay window with ALS fitted at T. Frames are cached: call `release` when done.

    Items a user touched before T + d are never relevant and never recommended by any model.
    """

    cut: datetime  # T: ALS and the plain baselines see events before it
    fresh_end: datetime  # T + d: the re-rank (and item_knn_fresh) see events before it
    train: DataFrame  # (user, item, strength, event_ts) pairs before T
    history: DataFrame  # events before T + d
    seen: DataFrame  # (user, item) pairs before T + d
    relevant: DataFrame  # (user, item) pairs of [T + d, as_of) not seen, of users ALS trained on
    users: DataFrame  # the users scored: those with a relevant item
    model: ALSModel
    neighbours: DataFrame  # co-occurrence top-N lists over the events before T + d: item_idx, neighbour_idx, score

    def release(self) -> None:
        for frame in (self.train, self.seen, self.relevant, self.users, self.neighbours):
            frame.unpersist()


def replay_cuts(evaluate: EvaluateConfig, as_of: datetime) -> tuple[datetime, datetime]:
    """(T, T + d): the test window is [T + d, as_of) with T + d = as_of - replay_horizon_days."""
    fresh_end = as_of - timedelta(days=evaluate.replay_horizon_days)
    return fresh_end - timedelta(days=evaluate.replay_fresh_days), fresh_end


def prepare_replay(spark: SparkSession, interactions: DataFrame, config: ShelfConfig, as_of: datetime) -> ReplayWindow:
    """Split silver.interactions at T and T + d, fit ALS on the events before T.

    Raises:
        InputDataError: no user trained on touches a new item in the test window.
    """
    cut, fresh_end = replay_cuts(config.evaluate, as_of)
    ts = F.col(EVENT_TS)
    history = interactions.filter(ts < ts_lit(fresh_end))
    train = to_pairs(interactions.filter(ts < ts_lit(cut))).cache()
    seen = history.select(USER_IDX, ITEM_IDX).distinct().cache()
    test = to_pairs(interactions.filter((ts >= ts_lit(fresh_end)) & (ts < ts_lit(as_of))))
    relevant = (
        metrics.remove_seen(test.select(USER_IDX, ITEM_IDX), seen)
        .join(train.select(USER_IDX).distinct(), on=USER_IDX, how="inner")
        .cache()
    )
    users = relevant.select(USER_IDX).distinct().cache()
    if users.limit(1).count() == 0:
        raise InputDataError(
            f"The replay test window [{fresh_end:%Y-%m-%d %H:%M}, {as_of:%Y-%m-%d %H:%M}) has no user who was "
            "in training and touched a new item; pass another --as-of or widen evaluate.replay_horizon_days."
        )
    model = fit_als(spark, train, AlsParams.from_config(config.train, config.clean.half_life_days), config.train)
    neighbours = to_cooccurrence_neighbours(history, config.similarities).select(ITEM_IDX, NEIGHBOUR_IDX, SCORE)
    return ReplayWindow(cut, fresh_end, train, history, seen, relevant, users, model, neighbours.cache())


def replay_item_knn(pairs: DataFrame, window: ReplayWindow, evaluate: EvaluateConfig, k: int) -> DataFrame:
    """Item-kNN over `pairs` (the history it may see), with everything seen before T + d removed."""
    recent = recent_items(pairs, evaluate.knn_recent_items)
    neighbours = item_neighbours(recent, evaluate.knn_neighbours)
    scores = (
        recent.join(window.users, on=USER_IDX, how="inner")
        .join(neighbours, on=ITEM_IDX, how="inner")
        .groupBy(USER_IDX, F.col(NEIGHBOUR).alias(ITEM_IDX))
        .agg(F.sum(SIMILARITY).alias(metrics.SCORE))
    )
    return metrics.top_k(metrics.remove_seen(scores, window.seen), k)


def replay_baseline(name: str, window: ReplayWindow, evaluate: EvaluateConfig, k: int) -> DataFrame:
    """Top-k lists (user, item, score, rank) of a model that does not re-rank."""
    if name == POPULARITY:
        return recommend_popular(popularity_scores(window.train), window.users, window.seen, k)
    if name == RECENT_POPULARITY:
        scores = recent_popularity_scores(window.train, evaluate.recent_days)
        return recommend_popular(scores, window.users, window.seen, k)
    if name == ITEM_KNN:
        return replay_item_knn(window.train, window, evaluate, k)
    if name == ITEM_KNN_FRESH:
        return replay_item_knn(to_pairs(window.history), window, evaluate, k)
    return als_recommend(window.model, window.users, window.seen, k)


NEIGHBOUR_SOURCE = "neighbours"  # the candidate source tag `shelf candidates` uses


def replay_candidates(
    window: ReplayWindow, rerank_config: RerankConfig, recommend: RecommendConfig | None = None
) -> DataFrame:
    """The re-rank's candidates (user_idx, item_idx, als_score, sources) for the scored users, as `shelf
    candidates` builds them: ALS's rerank.max_candidates best unseen items and the top
    recommend.neighbours_per_item co-occurrence neighbours of each user's recommend.recent_items most
    recent items before T + d; nothing seen before T + d."""
    rc = recommend or RecommendConfig()
    pool = als_recommend(window.model, window.users, window.seen, rerank_config.max_candidates)
    als = pool.select(USER_IDX, ITEM_IDX, F.col(metrics.SCORE).alias(ALS_SCORE), F.lit(ALS_MODEL).alias("_source"))
    best = Window.partitionBy(ITEM_IDX).orderBy(F.col(SCORE).desc(), F.col(NEIGHBOUR_IDX).asc())
    lists = window.neighbours.withColumn("_r", F.row_number().over(best)).filter(F.col("_r") <= rc.neighbours_per_item)
    recent = recent_items(to_pairs(window.history), rc.recent_items).join(window.users, on=USER_IDX, how="inner")
    near = (
        recent.join(lists, on=ITEM_IDX, how="inner")
        .select(USER_IDX, F.col(NEIGHBOUR_IDX).alias(ITEM_IDX))
        .distinct()
        .join(window.seen, on=[USER_IDX, ITEM_IDX], how="left_anti")
        .select(
            USER_IDX, ITEM_IDX, F.lit(None).cast("double").alias(ALS_SCORE), F.lit(NEIGHBOUR_SOURCE).alias("_source")
        )
    )
    return (
        als.unionByName(near)
        .groupBy(USER_IDX, ITEM_IDX)
        .agg(F.max(ALS_SCORE).alias(ALS_SCORE), F.array_sort(F.collect_set("_source")).alias(SOURCES))
    )


def replay_factors(window: ReplayWindow) -> tuple[DataFrame, DataFrame]:
    """(user_idx, features), (item_idx, features) of the ALS model fitted at T."""

    def factors(frame: DataFrame, id_col: str) -> DataFrame:
        return frame.select(F.col("id").cast("int").alias(id_col), F.col(FEATURES))

    return factors(window.model.userFactors, USER_IDX), factors(window.model.itemFactors, ITEM_IDX)


def replay_rerank(
    spark: SparkSession,
    window: ReplayWindow,
    rerank_config: RerankConfig,
    item_index: DataFrame,
    catalog: DataFrame | None,
    k: int,
    recommend: RecommendConfig | None = None,
) -> Reranked:
    """The re-rank over `replay_candidates` with the events before T + d and the window's co-occurrence lists.

    Args:
        recommend: the neighbour-candidate settings (recent_items, neighbours_per_item); None: defaults.
    """
    user_factors, item_factors = replay_factors(window)
    return rerank_candidates(
        spark,
        replay_candidates(window, rerank_config, recommend),
        user_factors,
        item_factors,
        item_index,
        catalog,
        window.history,
        rerank_config,
        window.fresh_end,
        top_k=k,
        neighbours=window.neighbours,
    )


@dataclass(frozen=True)
class ReplayLists:
    """Every model's top-k lists on one window, (model, user_idx, item_idx, score, rank), cached: `release` them."""

    models: tuple[str, ...]
    combined: DataFrame
    parts: tuple[DataFrame, ...]
    held: tuple[Reranked, ...]

    def release(self) -> None:
        for recs in self.parts:
            recs.unpersist()
        for done in self.held:
            done.unpersist()


def replay_lists(
    spark: SparkSession,
    window: ReplayWindow,
    config: ShelfConfig,
    item_index: DataFrame,
    catalog: DataFrame | None,
    models: dict[str, RerankConfig | None],
    k: int,
    run_id: str | None = None,
) -> ReplayLists:
    """Top-k lists of each named model, built once; a name mapped to a RerankConfig is ALS + that re-rank;
    `published` (needs `run_id`) is the holdout run's lists as written."""
    parts, held = [], []
    for name, rr in models.items():
        if name == PUBLISHED and run_id is not None:
            recs = published_lists(spark, config, run_id, window.users, k)
        elif name == EASE and run_id is not None:  # the holdout run's EASE: it learnt from the events before T + d
            recs = recommend_ease(spark, config, run_id, window.users, window.seen, k)
        elif rr is not None:
            done = replay_rerank(spark, window, rr, item_index, catalog, k, recommend=config.recommend)
            held.append(done)
            recs = done.rows.select(USER_IDX, ITEM_IDX, F.col(SCORE).alias(metrics.SCORE), RANK)
        else:
            recs = replay_baseline(name, window, config.evaluate, k)
        recs = recs.withColumn(MODEL, F.lit(name)).cache()
        recs.count()
        parts.append(recs)
    combined = parts[0]
    for recs in parts[1:]:
        combined = combined.unionByName(recs)
    return ReplayLists(tuple(models), combined, tuple(parts), tuple(held))


def score_replay_lists(spark: SparkSession, window: ReplayWindow, lists: ReplayLists, ks: list[int]) -> DataFrame:
    """Metric rows (model, metric, k, value) of the lists; diversity uses the ALS item factors fitted at T."""
    factors = window.model.itemFactors.select(F.col("id").cast("int").alias(ITEM_IDX), F.col(FEATURES))
    named = spark.createDataFrame([(m,) for m in lists.models], f"{MODEL} string")  # a model with no list scores 0
    scored = metrics.ranking_metrics(
        lists.combined, window.relevant, window.train, ks, by=[MODEL], item_factors=factors, groups=named
    )
    return spark.createDataFrame(scored.collect(), scored.schema)  # models x metrics x ks rows


def replay_metrics(
    spark: SparkSession,
    window: ReplayWindow,
    config: ShelfConfig,
    item_index: DataFrame,
    catalog: DataFrame | None,
    models: list[str],
    rerank_config: RerankConfig | None = None,
    run_id: str | None = None,
) -> DataFrame:
    """Metric rows (model, metric, k, value) of `models` on one window; `als_rerank` uses `rerank_config`;
    `published` is scored only with the `run_id` of a holdout run (pipelines.runner)."""
    ks = cutoffs(config.evaluate)
    rr = rerank_config or config.rerank
    named = {name: (rr if name == ALS_RERANK else None) for name in models if name not in HOLDOUT_MODELS or run_id}
    lists = replay_lists(spark, window, config, item_index, catalog, named, max(ks), run_id)
    try:
        return score_replay_lists(spark, window, lists, ks)
    finally:
        lists.release()


def replay_models(evaluate: EvaluateConfig) -> list[str]:
    return [*evaluate.models, *[m for m in REPLAY_EXTRA_MODELS if m not in evaluate.models]]


def evaluate_replay(
    spark: SparkSession, interactions: DataFrame, config: ShelfConfig, ctx: RunContext
) -> tuple[DataFrame, dict[str, float]]:
    """gold.metrics rows of every model on the replay window ending at as_of, and the report's sizes."""
    window = prepare_replay(spark, interactions, config, ctx.as_of)
    try:
        item_index = tables.read(spark, config, "silver", "item_index")
        table = replay_metrics(
            spark,
            window,
            config,
            item_index,
            read_catalog(spark, config),
            replay_models(config.evaluate),
            run_id=ctx.run_id,
        )
        sizes = {
            "train pairs (before T)": float(window.train.count()),
            "fresh events (T to T + d)": float(window.history.filter(F.col(EVENT_TS) >= ts_lit(window.cut)).count()),
            "relevant pairs (T + d to as_of)": float(window.relevant.count()),
            "users scored": float(window.users.count()),
        }
    finally:
        window.release()
    return table.withColumn(RUN_ID, F.lit(ctx.run_id)).select(*METRICS_COLUMNS), sizes


def run_replay(
    spark: SparkSession, interactions: DataFrame, config: ShelfConfig, ctx: RunContext, counts: dict[str, float]
) -> None:
    """The replay protocol's run: gold.metrics rows and the report, with the windows and the re-rank's lift."""
    table, sizes = evaluate_replay(spark, interactions, config, ctx)
    tables.write(table, config, "gold", "metrics", ctx.run_id, mode="run", comment="offline ranking metrics")
    rows = [r.asDict() for r in table.collect()]  # models x metrics x ks: a few hundred rows at most
    counts.update(sizes)
    counts["metric_rows"] = len(rows)
    files = report_files(rows, config, ctx, sizes)
    cut, fresh_end = replay_cuts(config.evaluate, ctx.as_of)
    k = config.evaluate.k
    value = {(r[MODEL], r[metrics.METRIC]): float(r[metrics.METRIC_VALUE]) for r in rows if r[metrics.K] == k}
    lift = [
        f"| {m} | {value[(ALS_MODEL, m)]:.4f} | {value[(ALS_RERANK, m)]:.4f} | "
        + (f"{value[(ALS_RERANK, m)] / value[(ALS_MODEL, m)] - 1:+.1%} |" if value[(ALS_MODEL, m)] else "- |")
        for m in metrics.PER_USER_METRICS
        if (ALS_MODEL, m) in value and (ALS_RERANK, m) in value
    ]
    notes = [
        "## Replay windows",
        "",
        f"- T = {cut.isoformat()}: ALS, popularity and item_knn learn from the events before T",
        f"- fresh window [T, T + d) ends {fresh_end.isoformat()}: the re-rank (and item_knn_fresh) also see it",
        "- test window [T + d, as_of): what users went on to touch; items seen before T + d are removed "
        "from the relevant set and from every list",
        "",
        f"## ALS + re-rank vs ALS at k = {k}",
        "",
        "| metric | als | als_rerank | lift |",
        "|---|---|---|---|",
        *lift,
        "",
    ]
    files[reports.SUMMARY] += "\n".join(notes).encode("utf-8")
    reports.save(spark, config, ctx.run_id, files)


def _png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def report_files(
    rows: list[dict[str, object]], config: ShelfConfig, ctx: RunContext, sizes: dict[str, float]
) -> dict[str, bytes]:
    """The report from the gold.metrics rows: summary.md and PNG plots (metrics per model at k, metric vs k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = config.evaluate.k
    present = {str(r[MODEL]) for r in rows}
    models = [m for m in (*config.evaluate.models, *REPLAY_EXTRA_MODELS) if m in present]
    names = [*metrics.PER_USER_METRICS, *metrics.CATALOG_METRICS]
    value = {
        (str(r[MODEL]), str(r[metrics.METRIC]), cast(int, r[metrics.K])): cast(float, r[metrics.METRIC_VALUE])
        for r in rows
    }

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [value.get((model, m, k), 0.0) for m in names], width=width, label=model)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_title(f"metrics at k={k} ({config.evaluate.protocol} split, run {ctx.run_id})")
    ax.legend()
    fig.tight_layout()
    at_k = _png(fig)

    ks = cutoffs(config.evaluate)
    shown = ("precision", "recall", "ndcg", "map")
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.5))
    for ax, metric in zip(axes, shown, strict=True):
        for model in models:
            ax.plot(ks, [value.get((model, metric, kk), 0.0) for kk in ks], marker="o", label=model)
        ax.set_title(f"{metric} vs k")
        ax.set_xlabel("k")
    axes[0].legend()
    fig.tight_layout()
    vs_k = _png(fig)

    header = "| model | " + " | ".join(names) + " |"
    lines = [
        f"# shelf evaluation, run {ctx.run_id}",
        "",
        f"- as of: {ctx.as_of.isoformat()}",
        f"- protocol: {config.evaluate.protocol}, k = {k}, seen items removed, cold users not scored",
        *[f"- {name}: {int(v)}" for name, v in sizes.items()],
        "",
        f"## Metrics at k = {k}",
        "",
        header,
        "|" + "---|" * (len(names) + 1),
        *[
            f"| {model} | " + " | ".join(f"{value.get((model, m, k), 0.0):.4f}" for m in names) + " |"
            for model in models
        ],
        "",
        "MAP divides by min(k, relevant); MAP_rel divides by the number of relevant items.",
        "Novelty is the mean -log2(share of training users who had the item) of recommended items; diversity "
        "is the mean (1 - cosine) of item pairs within a list, with the run's ALS item factors when the run "
        "trained them, else co-occurrence cosine on the training split.",
        "",
        "![metrics at k](metrics_at_k.png)",
        "",
        "![metric vs k](metric_vs_k.png)",
        "",
    ]
    return {reports.SUMMARY: "\n".join(lines).encode("utf-8"), "metrics_at_k.png": at_k, "metric_vs_k.png": vs_k}


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Split, score every configured model, write gold.metrics and the report."""
    with step_log(STEP, ctx) as counts:
        interactions = tables.read(spark, config, "silver", "interactions")
        if config.evaluate.protocol == "replay":  # its own windows, models and report notes
            run_replay(spark, interactions, config, ctx, counts)
            return
        train = holdout.read_train(spark, config).cache()
        test = holdout.read_test(spark, config, ctx.run_id).cache()
        counts["train_pairs"] = train.count()
        counts["test_pairs"] = test.count()
        table = evaluate_models(spark, train, test, config, ctx.run_id)
        tables.write(table, config, "gold", "metrics", ctx.run_id, mode="run", comment="offline ranking metrics")
        rows = [r.asDict() for r in table.collect()]  # models x metrics x ks: a few hundred rows at most
        counts["metric_rows"] = len(rows)
        sizes = {"train pairs": counts["train_pairs"], "test pairs": counts["test_pairs"]}
        reports.save(spark, config, ctx.run_id, report_files(rows, config, ctx, sizes))
        train.unpersist()
        test.unpersist()


main = step_main(STEP)


if __name__ == "__main__":
    raise SystemExit(main())
