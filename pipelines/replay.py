"""The temporal replay protocol (`evaluate.protocol: replay`): ALS fitted at T, the re-rank fed the fresh
window [T, T + d), every model scored on what users went on to touch in [T + d, as_of).

Items a user touched before T + d are removed from the relevant set and from every list.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pyspark.ml.recommendation import ALSModel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.baselines import (
    HOLDOUT_MODELS,
    METRICS_COLUMNS,
    REPLAY_EXTRA_MODELS,
    cutoffs,
    popularity_scores,
    published_lists,
    recent_popularity_scores,
    recommend_ease,
    recommend_item_knn,
    recommend_popular,
)
from pipelines.core import ease, metrics, reports, tables
from pipelines.core.als import AlsParams, als_recommend, fit_als, to_pairs
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import EvaluateConfig, RecommendConfig, RerankConfig
from pipelines.core.errors import InputDataError
from pipelines.core.neighbours import to_cooccurrence_neighbours, with_recent_items
from pipelines.core.quality import ts_lit
from pipelines.core.reranking import Reranked, read_catalog, rerank_candidates
from pipelines.core.runs import RunContext
from pipelines.core.schemas import (
    ALS_MODEL,
    ALS_RERANK,
    ALS_SCORE,
    EASE,
    EASE_SCORE,
    EASE_SOURCE,
    EVENT_TS,
    FEATURES,
    ITEM_IDX,
    ITEM_KNN,
    ITEM_KNN_FRESH,
    MODEL,
    NEIGHBOUR_IDX,
    NEIGHBOURS_SOURCE,
    POPULARITY,
    PUBLISHED,
    RANK,
    RECENT_POPULARITY,
    RUN_ID,
    SCORE,
    SOURCES,
    USER_IDX,
)
from pipelines.evaluation_report import report_files


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
    # EASE fitted at T (`prepare_replay(with_ease=True)`): its candidates, user_idx, item_idx, ease_score; None: none
    ease: DataFrame | None = None

    def release(self) -> None:
        for frame in (self.train, self.seen, self.relevant, self.users, self.neighbours, self.ease):
            if frame is not None:
                frame.unpersist()


def replay_cuts(evaluate: EvaluateConfig, as_of: datetime) -> tuple[datetime, datetime]:
    """(T, T + d): the test window is [T + d, as_of) with T + d = as_of - replay_horizon_days."""
    fresh_end = as_of - timedelta(days=evaluate.replay_horizon_days)
    return fresh_end - timedelta(days=evaluate.replay_fresh_days), fresh_end


def prepare_replay(
    spark: SparkSession, interactions: DataFrame, config: ShelfConfig, as_of: datetime, with_ease: bool = False
) -> ReplayWindow:
    """Split silver.interactions at T and T + d, fit ALS on the events before T (and EASE, `with_ease`: see
    `replay_ease`).

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
    before = interactions.filter(ts < ts_lit(cut))
    ease_rows = replay_ease(before, users, seen, config) if with_ease else None
    return ReplayWindow(cut, fresh_end, train, history, seen, relevant, users, model, neighbours.cache(), ease_rows)


def replay_ease(before: DataFrame, users: DataFrame, seen: DataFrame, config: ShelfConfig) -> DataFrame | None:
    """EASE fitted at T as `shelf train` fits it (train.ease), and its recommend.candidates_k best items per scored
    user as `shelf candidates` proposes them (x_u B over the user's events before T; nothing seen before T + d),
    cached; None when EASE is disabled or the catalogue is over train.ease.max_items."""
    settings = config.train.ease
    if not settings.enabled:
        return None
    x = ease.to_ease_input(before, settings.values).cache()
    try:
        model = ease.fit(x, settings.l2, settings.max_items, settings.top_n, settings.precision)
        if model is None:
            return None
        neighbours = ease.to_neighbour_frame(before.sparkSession, model, "replay")
        scored = x.join(users, on=USER_IDX, how="inner")
        rows = ease.ease_candidates(scored, neighbours, seen, config.recommend.candidates_k).cache()
        rows.count()
        return rows
    finally:
        x.unpersist()


def replay_baseline(name: str, window: ReplayWindow, evaluate: EvaluateConfig, k: int) -> DataFrame:
    """Top-k lists (user, item, score, rank) of a model that does not re-rank."""
    if name == POPULARITY:
        return recommend_popular(popularity_scores(window.train), window.users, window.seen, k)
    if name == RECENT_POPULARITY:
        scores = recent_popularity_scores(window.train, evaluate.recent_days)
        return recommend_popular(scores, window.users, window.seen, k)
    if name == ITEM_KNN:
        return recommend_item_knn(window.train, window.users, evaluate, k, window.seen)
    if name == ITEM_KNN_FRESH:
        return recommend_item_knn(to_pairs(window.history), window.users, evaluate, k, window.seen)
    return als_recommend(window.model, window.users, window.seen, k)


def replay_candidates(
    window: ReplayWindow, rerank_config: RerankConfig, recommend: RecommendConfig | None = None
) -> DataFrame:
    """The re-rank's candidates (user_idx, item_idx, als_score, ease_score, sources) for the scored users, as `shelf
    candidates` builds them: ALS's rerank.max_candidates best unseen items, the window's EASE candidates (when it
    has them) and the top recommend.neighbours_per_item co-occurrence neighbours of each user's
    recommend.recent_items most recent items before T + d; nothing seen before T + d."""
    rc = recommend or RecommendConfig()
    none = F.lit(None).cast("double")
    pool = als_recommend(window.model, window.users, window.seen, rerank_config.max_candidates)
    als = pool.select(
        USER_IDX, ITEM_IDX, F.col(SCORE).alias(ALS_SCORE), none.alias(EASE_SCORE), F.lit(ALS_MODEL).alias("_source")
    )
    if window.ease is not None:
        als = als.unionByName(
            window.ease.select(
                USER_IDX, ITEM_IDX, none.alias(ALS_SCORE), EASE_SCORE, F.lit(EASE_SOURCE).alias("_source")
            )
        )
    best = Window.partitionBy(ITEM_IDX).orderBy(F.col(SCORE).desc(), F.col(NEIGHBOUR_IDX).asc())
    lists = window.neighbours.withColumn("_r", F.row_number().over(best)).filter(F.col("_r") <= rc.neighbours_per_item)
    recent = with_recent_items(window.history, rc.recent_items).join(window.users, on=USER_IDX, how="inner")
    near = (
        recent.join(lists, on=ITEM_IDX, how="inner")
        .select(USER_IDX, F.col(NEIGHBOUR_IDX).alias(ITEM_IDX))
        .distinct()
        .join(window.seen, on=[USER_IDX, ITEM_IDX], how="left_anti")
        .select(
            USER_IDX, ITEM_IDX, none.alias(ALS_SCORE), none.alias(EASE_SCORE), F.lit(NEIGHBOURS_SOURCE).alias("_source")
        )
    )
    return (
        als.unionByName(near)
        .groupBy(USER_IDX, ITEM_IDX)
        .agg(
            F.max(ALS_SCORE).alias(ALS_SCORE),
            F.max(EASE_SCORE).alias(EASE_SCORE),
            F.array_sort(F.collect_set("_source")).alias(SOURCES),
        )
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
            recs = done.rows.select(USER_IDX, ITEM_IDX, F.col(SCORE).alias(SCORE), RANK)
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
