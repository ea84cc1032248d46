"""`shelf rerank`: gold.candidates of this run -> gold.recommendations, top-K per user with reasons.

Reads gold.candidates (rows of this run id), gold.user_factors / gold.item_factors, the fresh events
of silver.interactions (in [as_of - max(rerank.fresh_days, rerank.bought_window_days), as_of)),
silver.user_index / silver.item_index and, when it exists, silver.catalog (without it no business
rule applies: everything is in stock, no promotions, no categories).

Writes gold.recommendations, one row per (user, rank): user_id and item_id (the source's string
ids), rank (int, from 1), score (double, non-increasing with rank), reasons (array<string>),
run_id, as_of. Rows of this run id are replaced (`replaceWhere`), so a rerun is idempotent.

The item side (factors + catalogue attributes + popularity, bounded by the catalogue: the model) is
collected once and broadcast. Each user's candidates (capped at rerank.max_candidates, best ALS
score first) and fresh events are gathered into one row, the rows are hash-partitioned by user and
`udfs.rerank.rerank` scores whole Arrow batches of users inside `mapInPandas`. Users of
silver.user_index that get no re-ranked row (no candidates, or all filtered) get the most popular
in-stock items they have not bought, reason "popular".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import datetime

import numpy as np
import pandas as pd
from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    DoubleType,
    IntegerType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from pipelines.core import tables
from pipelines.core.cli import step_main
from pipelines.core.config import RerankConfig, ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.quality import ts_lit
from pipelines.core.runs import RunContext, step_log
from pipelines.core.schemas import (
    AS_OF,
    CATEGORY,
    EVENT_TS,
    EVENT_TYPE,
    IN_STOCK,
    ITEM_ID,
    ITEM_IDX,
    LAUNCHED_AT,
    PROMO,
    RUN_ID,
    USER_ID,
    USER_IDX,
)
from udfs.rerank import ItemTable, RerankParams, UserBatch, reason_lists, rerank

log = logging.getLogger("shelf.rerank")

STEP = "rerank"
FEATURES = "features"
ALS_SCORE = "als_score"
SOURCES = "sources"
RANK = "rank"
SCORE = "score"
REASONS = "reasons"
POPULAR = "popular"
POPULARITY = "popularity"
NEW_ARRIVAL = "new_arrival"
BLOCKED = "blocked"
CAND_ITEMS, CAND_ALS = "cand_items", "cand_als"
EV_ITEMS, EV_WEIGHTS, EV_AGES, EV_BOUGHT = "ev_items", "ev_weights", "ev_ages", "ev_bought"
_AGE, _W, _BOUGHT, _USERS = "_age", "_w", "_bought", "_users"
SECONDS_PER_DAY = 86400.0

KERNEL_SCHEMA = StructType(
    [
        StructField(USER_IDX, IntegerType(), False),
        StructField(ITEM_IDX, IntegerType(), False),
        StructField(RANK, IntegerType(), False),
        StructField(SCORE, DoubleType(), False),
        StructField(REASONS, ArrayType(StringType(), False), False),
    ]
)
RECOMMENDATIONS_SCHEMA = StructType(
    [
        StructField(USER_ID, StringType(), False),
        StructField(ITEM_ID, StringType(), False),
        StructField(RANK, IntegerType(), False),
        StructField(SCORE, DoubleType(), False),
        StructField(REASONS, ArrayType(StringType(), True), False),
        StructField(RUN_ID, StringType(), False),
        StructField(AS_OF, TimestampType(), False),
    ]
)
COLUMN_COMMENTS = {
    USER_ID: "the source's user id",
    ITEM_ID: "the source's item id",
    RANK: "1 = best; one row per (user, rank), at most rerank.top_k per user",
    SCORE: "re-ranked score (MMR value), non-increasing with rank; popularity share for fallback rows",
    REASONS: "why: similar_to:<item_idx>, als, promo, new_arrival, trending, or popular (fallback)",
    RUN_ID: "the run that wrote the row; a rerun of the same run id replaces its rows",
    AS_OF: "the run's now: fresh events, bought window and new arrivals are relative to it",
}
TABLE_COMMENT = (
    "Top-K recommendations per user and run: rank, score and reasons; string ids of the source; "
    "rows of one run id are replaced as a whole on rerun"
)


def params_from(rerank_config: RerankConfig) -> RerankParams:
    """The kernel's parameters from the rerank config section."""
    return RerankParams(
        top_k=rerank_config.top_k,
        alpha=rerank_config.alpha,
        half_life_days=rerank_config.half_life_days,
        fresh_days=rerank_config.fresh_days,
        bought_window_days=rerank_config.bought_window_days,
        category_cap=rerank_config.category_cap,
        mmr_lambda=rerank_config.mmr_lambda,
        mmr_pool=rerank_config.mmr_pool,
        trending_threshold=rerank_config.trending_threshold,
        similar_threshold=rerank_config.similar_threshold,
        weights=rerank_config.weights.model_dump(),
    )


def of_run(frame: DataFrame, run_id: str, name: str) -> DataFrame:
    """The rows of `run_id` when the table holds several runs, else the table as it is (one scalar per run).

    Raises:
        InputDataError: the table holds several runs and none is `run_id`.
    """
    runs = sorted(r[0] for r in frame.select(RUN_ID).distinct().collect())
    if len(runs) <= 1:
        return frame
    if run_id not in runs:
        raise InputDataError(f"{name} holds runs {runs} but not {run_id}; pass --run-id of the run to use.")
    return frame.filter(F.col(RUN_ID) == run_id)


def to_fresh_events(interactions: DataFrame, rerank_config: RerankConfig, as_of: datetime) -> DataFrame:
    """Events in the session / bought window before as_of: user_idx, item_idx, _age (days), _w, _bought."""
    horizon = max(rerank_config.fresh_days, rerank_config.bought_window_days)
    age = (F.unix_timestamp(ts_lit(as_of)) - F.unix_timestamp(F.col(EVENT_TS))) / SECONDS_PER_DAY
    weights = F.create_map(*[F.lit(x) for pair in sorted(rerank_config.event_weights.items()) for x in pair])
    return (
        interactions.withColumn(_AGE, age.cast("double"))
        .filter((F.col(_AGE) > 0) & (F.col(_AGE) <= horizon))
        .select(
            F.col(USER_IDX).cast("int"),
            F.col(ITEM_IDX).cast("int"),
            F.col(_AGE),
            F.coalesce(weights[F.col(EVENT_TYPE)], F.lit(0.0)).cast("double").alias(_W),
            F.col(EVENT_TYPE).isin(rerank_config.bought_event_types).alias(_BOUGHT),
        )
    )


def to_item_attributes(
    item_index: DataFrame,
    item_factors: DataFrame,
    catalog: DataFrame | None,
    fresh: DataFrame,
    rerank_config: RerankConfig,
    as_of: datetime,
) -> DataFrame:
    """One row per indexed item: item_idx, features (null without factors), category, in_stock, promo,
    new_arrival, blocked, _users (distinct users in the fresh window)."""
    fresh_users = (
        fresh.filter(F.col(_AGE) <= rerank_config.fresh_days)
        .groupBy(ITEM_IDX)
        .agg(F.countDistinct(USER_IDX).alias(_USERS))
    )
    items = item_index.select(ITEM_ID, ITEM_IDX).join(
        item_factors.select(ITEM_IDX, FEATURES), on=ITEM_IDX, how="left"
    )
    if catalog is None:
        items = items.select(
            "*",
            F.lit(None).cast("string").alias(CATEGORY),
            F.lit(None).cast("boolean").alias(IN_STOCK),
            F.lit(None).cast("boolean").alias(PROMO),
            F.lit(None).cast("timestamp").alias(LAUNCHED_AT),
        )
    else:
        items = items.join(
            catalog.select(ITEM_ID, CATEGORY, IN_STOCK, PROMO, LAUNCHED_AT), on=ITEM_ID, how="left"
        )
    launched_age = (F.unix_timestamp(ts_lit(as_of)) - F.unix_timestamp(F.col(LAUNCHED_AT))) / SECONDS_PER_DAY
    return items.join(fresh_users, on=ITEM_IDX, how="left").select(
        F.col(ITEM_IDX).cast("int"),
        F.col(FEATURES),
        F.col(CATEGORY),
        F.coalesce(F.col(IN_STOCK), F.lit(True)).alias(IN_STOCK),
        F.coalesce(F.col(PROMO), F.lit(False)).alias(PROMO),
        F.coalesce(
            (launched_age >= 0) & (launched_age <= rerank_config.new_arrival_days), F.lit(False)
        ).alias(NEW_ARRIVAL),
        F.coalesce(F.col(CATEGORY).isin(rerank_config.blocked_categories), F.lit(False)).alias(BLOCKED),
        F.coalesce(F.col(_USERS), F.lit(0)).cast("long").alias(_USERS),
    )


def build_item_table(attributes: DataFrame) -> ItemTable:
    """Collect the item attributes (bounded by the catalogue) into the kernel's ItemTable.

    Raises:
        InputDataError: no item has factors (train has not run on these items).
    """
    pdf = attributes.orderBy(ITEM_IDX).toPandas()
    with_factors = pdf[FEATURES].dropna()
    if with_factors.empty:
        raise InputDataError(
            "No item of silver.item_index has factors in gold.item_factors; run 'shelf train' first."
        )
    rank = len(with_factors.iloc[0])
    factors = np.zeros((len(pdf), rank), dtype=np.float32)
    for pos, vec in zip(with_factors.index, with_factors, strict=True):  # item-sized, driver only
        factors[pos] = np.asarray(vec, dtype=np.float32)
    codes, _ = pd.factorize(pdf[CATEGORY], sort=True)  # null -> -1; sorted: stable across runs
    users = pdf[_USERS].to_numpy(dtype=np.float64)
    top = users.max() if users.size else 0.0
    return ItemTable.plain(
        pdf[ITEM_IDX].to_numpy(dtype=np.int64),
        factors,
        popularity=users / top if top > 0 else np.zeros_like(users),
        promo=pdf[PROMO].to_numpy(dtype=bool),
        new_arrival=pdf[NEW_ARRIVAL].to_numpy(dtype=bool),
        in_stock=pdf[IN_STOCK].to_numpy(dtype=bool),
        blocked=pdf[BLOCKED].to_numpy(dtype=bool),
        category=codes.astype(np.int64),
    )


def to_capped_candidates(candidates: DataFrame, max_candidates: int) -> DataFrame:
    """At most `max_candidates` per user: highest ALS score, then more sources, then item id."""
    order = Window.partitionBy(USER_IDX).orderBy(
        F.col(ALS_SCORE).desc_nulls_last(), F.size(SOURCES).desc(), F.col(ITEM_IDX).asc()
    )
    return (
        candidates.withColumn("_n", F.row_number().over(order))
        .filter(F.col("_n") <= max_candidates)
        .select(USER_IDX, ITEM_IDX, ALS_SCORE, SOURCES)
    )


def to_user_rows(candidates: DataFrame, user_factors: DataFrame, fresh: DataFrame) -> DataFrame:
    """One row per user with candidates: user_idx, features (null without factors), cand_items,
    cand_als (candidate arrays in item order), ev_items, ev_weights, ev_ages, ev_bought (by age, item)."""
    cand = candidates.groupBy(USER_IDX).agg(
        F.array_sort(
            F.collect_list(F.struct(F.col(ITEM_IDX), (F.col(ALS_SCORE).isNotNull()).alias(CAND_ALS)))
        ).alias("_c")
    )
    events = fresh.groupBy(USER_IDX).agg(
        F.array_sort(F.collect_list(F.struct(_AGE, ITEM_IDX, _W, _BOUGHT))).alias("_e")
    )
    return (
        cand.join(user_factors.select(USER_IDX, FEATURES), on=USER_IDX, how="left")
        .join(events, on=USER_IDX, how="left")
        .select(
            F.col(USER_IDX).cast("int"),
            F.col(FEATURES),
            F.col(f"_c.{ITEM_IDX}").alias(CAND_ITEMS),
            F.col(f"_c.{CAND_ALS}").alias(CAND_ALS),
            F.col(f"_e.{ITEM_IDX}").alias(EV_ITEMS),
            F.col(f"_e.{_W}").alias(EV_WEIGHTS),
            F.col(f"_e.{_AGE}").alias(EV_AGES),
            F.col(f"_e.{_BOUGHT}").alias(EV_BOUGHT),
        )
    )


def _segments(column: pd.Series, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(indptr (m + 1,), values) from a column of arrays (None = empty)."""
    lengths = np.fromiter((0 if v is None else len(v) for v in column), dtype=np.int64, count=len(column))
    indptr = np.zeros(len(column) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    parts: list[np.ndarray] = [np.asarray(v, dtype=dtype) for v in column if v is not None and len(v)]
    return indptr, (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))


def to_user_batch(pdf: pd.DataFrame, rank: int) -> UserBatch:
    """A pandas batch of user rows (to_user_rows' columns) as the kernel's segment arrays."""
    has = np.fromiter((v is not None for v in pdf[FEATURES]), dtype=bool, count=len(pdf))
    factors = np.zeros((len(pdf), rank), dtype=np.float32)
    if has.any():
        factors[has] = np.stack([np.asarray(v, dtype=np.float32) for v in pdf[FEATURES][has]])
    cand_ptr, cand_items = _segments(pdf[CAND_ITEMS], np.int64)
    _, cand_als = _segments(pdf[CAND_ALS], np.bool_)
    ev_ptr, ev_items = _segments(pdf[EV_ITEMS], np.int64)
    _, ev_weights = _segments(pdf[EV_WEIGHTS], np.float64)
    _, ev_ages = _segments(pdf[EV_AGES], np.float64)
    _, ev_bought = _segments(pdf[EV_BOUGHT], np.bool_)
    return UserBatch(
        factors, has, cand_ptr, cand_items, cand_als, ev_ptr, ev_items, ev_weights, ev_ages, ev_bought
    )


def rerank_frame(pdf: pd.DataFrame, items: ItemTable, params: RerankParams) -> pd.DataFrame:
    """pandas adapter: user rows -> KERNEL_SCHEMA rows with exactly its dtypes (int32, double, lists)."""
    result = rerank(items, to_user_batch(pdf, items.factors.shape[1]), params)
    users = pdf[USER_IDX].to_numpy(dtype=np.int64)
    return pd.DataFrame(
        {
            USER_IDX: users[result.user_rows].astype(np.int32),
            ITEM_IDX: result.items.astype(np.int32),
            RANK: result.ranks.astype(np.int32),
            SCORE: result.scores.astype(np.float64),
            REASONS: pd.Series(reason_lists(result), dtype=object),
        }
    )


def rerank_batches(
    batches: Iterable[pd.DataFrame], items: Broadcast[ItemTable], params: RerankParams
) -> Iterator[pd.DataFrame]:
    """mapInPandas body: one kernel call per Arrow batch of users."""
    table = items.value
    for pdf in batches:
        if not pdf.empty:
            yield rerank_frame(pdf, table, params)


def to_reranked(
    spark: SparkSession, user_rows: DataFrame, items: ItemTable, params: RerankParams, buckets: int
) -> DataFrame:
    """Kernel output for every user row: user_idx, item_idx, rank, score, reasons."""
    model = spark.sparkContext.broadcast(items)
    spread = user_rows.repartition(buckets, USER_IDX)
    return spread.mapInPandas(lambda it: rerank_batches(it, model, params), KERNEL_SCHEMA)


def to_popular_fallback(
    users: DataFrame,
    reranked: DataFrame,
    interactions: DataFrame,
    attributes: DataFrame,
    fresh: DataFrame,
    top_k: int,
) -> DataFrame:
    """The most popular in-stock, unblocked items (distinct users in silver) for users without a
    re-ranked row, minus what they bought in the window: user_idx, item_idx, rank, score, reasons."""
    missing = (
        users.select(USER_IDX)
        .distinct()
        .join(reranked.select(USER_IDX).distinct(), on=USER_IDX, how="left_anti")
    )
    allowed = attributes.filter(F.col(IN_STOCK) & ~F.col(BLOCKED)).select(ITEM_IDX)
    counts = (
        interactions.groupBy(ITEM_IDX)
        .agg(F.countDistinct(USER_IDX).alias(_USERS))
        .join(allowed, on=ITEM_IDX, how="inner")
    )
    total = interactions.agg(F.countDistinct(USER_IDX).alias("_all"))
    # A global order over items is one partition, but it is item-sized and cut to a constant.
    top = Window.orderBy(F.col(_USERS).desc(), F.col(ITEM_IDX).asc())
    bought = fresh.filter(F.col(_BOUGHT)).select(USER_IDX, ITEM_IDX).distinct()
    popular = (
        counts.withColumn("_p", F.row_number().over(top))
        .filter(F.col("_p") <= 2 * top_k)
        .crossJoin(total)
        .select(ITEM_IDX, "_p", (F.col(_USERS) / F.col("_all")).cast("double").alias(SCORE))
    )
    per_user = Window.partitionBy(USER_IDX).orderBy(F.col("_p").asc())
    return (
        missing.crossJoin(F.broadcast(popular))  # constant-size right side: linear in users
        .join(bought, on=[USER_IDX, ITEM_IDX], how="left_anti")
        .withColumn(RANK, F.row_number().over(per_user))
        .filter(F.col(RANK) <= top_k)
        .select(
            F.col(USER_IDX).cast("int"),
            F.col(ITEM_IDX).cast("int"),
            F.col(RANK).cast("int"),
            F.col(SCORE),
            F.array(F.lit(POPULAR)).alias(REASONS),
        )
    )


def to_recommendations(
    ranked: DataFrame, user_index: DataFrame, item_index: DataFrame, run_id: str, as_of: datetime
) -> DataFrame:
    """Dense ids -> the source's string ids; the gold.recommendations contract with column comments."""
    joined = ranked.join(user_index.select(USER_IDX, USER_ID), on=USER_IDX, how="inner").join(
        item_index.select(ITEM_IDX, ITEM_ID), on=ITEM_IDX, how="inner"
    )
    values = {
        **{c: F.col(c) for c in (USER_ID, ITEM_ID, RANK, SCORE, REASONS)},
        RUN_ID: F.lit(run_id),
        AS_OF: ts_lit(as_of),
    }
    return joined.select(
        *[
            values[f.name].cast(f.dataType).alias(f.name, metadata={"comment": COLUMN_COMMENTS[f.name]})
            for f in RECOMMENDATIONS_SCHEMA.fields
        ]
    )


def read_catalog(spark: SparkSession, config: ShelfConfig) -> DataFrame | None:
    """silver.catalog (joined to item_index later), or None when absent: then no business rule applies."""
    if not tables.exists(spark, config, "silver", "catalog"):
        log.info("[%s] no silver.catalog: no stock, promotion, category or new-arrival rules", STEP)
        return None
    return tables.read(spark, config, "silver", "catalog")


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Re-rank this run's candidates and publish gold.recommendations."""
    rr = config.rerank
    with step_log(STEP, ctx) as counts:
        candidates = tables.read(spark, config, "gold", "candidates").filter(F.col(RUN_ID) == ctx.run_id)
        user_factors = of_run(
            tables.read(spark, config, "gold", "user_factors"), ctx.run_id, "gold.user_factors"
        )
        item_factors = of_run(
            tables.read(spark, config, "gold", "item_factors"), ctx.run_id, "gold.item_factors"
        )
        interactions = tables.read(spark, config, "silver", "interactions")
        user_index = tables.read(spark, config, "silver", "user_index")
        item_index = tables.read(spark, config, "silver", "item_index")
        catalog = read_catalog(spark, config)

        fresh = to_fresh_events(interactions, rr, ctx.as_of).cache()
        cached = [fresh]
        try:
            attributes = to_item_attributes(item_index, item_factors, catalog, fresh, rr, ctx.as_of).cache()
            cached.append(attributes)
            items = build_item_table(attributes)
            per_user = candidates.groupBy(USER_IDX).count()
            over = per_user.agg(
                F.sum(F.when(F.col("count") > rr.max_candidates, 1).otherwise(0)).alias("o")
            ).first()
            counts["candidate_cap"] = rr.max_candidates
            counts["users_over_cap"] = int(over["o"] or 0) if over else 0
            log.info(
                "[%s] candidates capped at %d per user (%d users over the cap)",
                STEP,
                rr.max_candidates,
                counts["users_over_cap"],
            )
            user_rows = to_user_rows(to_capped_candidates(candidates, rr.max_candidates), user_factors, fresh)
            buckets = rr.buckets or int(spark.conf.get("spark.sql.shuffle.partitions") or 4)
            reranked = to_reranked(spark, user_rows, items, params_from(rr), buckets).cache()
            cached.append(reranked)
            fallback = to_popular_fallback(user_index, reranked, interactions, attributes, fresh, rr.top_k)
            result = to_recommendations(
                reranked.unionByName(fallback), user_index, item_index, ctx.run_id, ctx.as_of
            )
            first_write = not tables.exists(spark, config, "gold", "recommendations")
            # COMMENT ON TABLE is its own Delta commit: only on creation, so each later run is one version.
            tables.write(
                result,
                config,
                "gold",
                "recommendations",
                ctx.run_id,
                mode="run",
                comment=TABLE_COMMENT if first_write else None,
            )
        finally:
            for frame in cached:
                frame.unpersist()
        written = tables.read(spark, config, "gold", "recommendations").filter(F.col(RUN_ID) == ctx.run_id)
        stats = written.agg(
            F.count(F.lit(1)).alias("rows"),
            F.countDistinct(USER_ID).alias("users"),
            F.countDistinct(F.when(F.array_contains(REASONS, POPULAR), F.col(USER_ID))).alias(
                "fallback_users"
            ),
        ).first()
        assert stats is not None
        counts.update(
            {"rows": stats["rows"], "users": stats["users"], "fallback_users": stats["fallback_users"]}
        )


main = step_main(STEP)

if __name__ == "__main__":
    raise SystemExit(main())
