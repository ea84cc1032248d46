"""Re-ranking on Spark, shared by `shelf rerank` and the replay protocol of `shelf evaluate`.

Reads nothing itself: callers pass silver.interactions, silver.item_index, the optional silver.catalog,
ALS factors, candidates and optionally each item's co-occurrence neighbour list (item_idx, neighbour_idx,
score; top-N per item) as DataFrames. The item side (factors + catalogue attributes + popularity +
neighbour lists as CSR, bounded by catalogue x N: the model) is collected once and shipped in the kernel's closure. Each
user's candidates (capped: ALS's best and, separately, the other sources') and fresh events are gathered
into one row, the rows are hash-partitioned by user and `udfs.rerank.rerank` scores whole Arrow batches
of users inside `mapInPandas`.

Output grain of `rerank_candidates`: one row per (user_idx, rank) with item_idx, score and reasons.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import cast

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, IntegerType, StringType, StructField, StructType

from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import RerankConfig
from pipelines.core.errors import InputDataError
from pipelines.core.kernel_frames import (
    _USERS,
    BLOCKED,
    CAND_ALS,
    CAND_EASE,
    CAND_ITEMS,
    CAND_REBUY,
    EV_AGES,
    EV_BOUGHT,
    EV_ITEMS,
    EV_WEIGHTS,
    NEW_ARRIVAL,
    item_table_from_pandas,
    params_from,
    rerank_batches,
)
from pipelines.core.quality import ts_lit
from pipelines.core.schemas import (
    ALS_SCORE,
    CATEGORY,
    EASE_SCORE,
    EVENT_TS,
    EVENT_TYPE,
    FEATURES,
    IN_STOCK,
    ITEM_ID,
    ITEM_IDX,
    LAUNCHED_AT,
    NEIGHBOUR_IDX,
    PRICE,
    PROMO,
    RANK,
    REASONS,
    REBUY_SCORE,
    SCORE,
    SOURCES,
    USER_IDX,
)
from udfs.rerank import ItemTable, RerankParams

log = logging.getLogger("shelf.rerank")

KERNEL_SCHEMA = StructType(
    [
        StructField(USER_IDX, IntegerType(), False),
        StructField(ITEM_IDX, IntegerType(), False),
        StructField(RANK, IntegerType(), False),
        StructField(SCORE, DoubleType(), False),
        StructField(REASONS, ArrayType(StringType(), False), False),
    ]
)

OPTIONAL_SCORES = (EASE_SCORE, REBUY_SCORE)  # candidate columns of later sources: absent in older tables
_AGE, _W, _BOUGHT = "_age", "_w", "_bought"
SECONDS_PER_DAY = 86400.0


def to_fresh_events(
    interactions: DataFrame, rerank_config: RerankConfig, as_of: datetime, consumed: Sequence[str] = ("purchase",)
) -> DataFrame:
    """Events in the session / bought window before as_of: user_idx, item_idx, _age (days), _w, _bought
    (the event's type is in `consumed`, the config's consumed_event_types)."""
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
            F.col(EVENT_TYPE).isin(list(consumed)).alias(_BOUGHT),
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
    """One row per indexed item: item_idx, features (null without factors), category, price, in_stock,
    promo, new_arrival, blocked, _users (distinct users in the fresh window)."""
    fresh_users = (
        fresh.filter(F.col(_AGE) <= rerank_config.fresh_days)
        .groupBy(ITEM_IDX)
        .agg(F.countDistinct(USER_IDX).alias(_USERS))
    )
    items = item_index.select(ITEM_ID, ITEM_IDX).join(item_factors.select(ITEM_IDX, FEATURES), on=ITEM_IDX, how="left")
    if catalog is None:
        items = items.select(
            "*",
            F.lit(None).cast("string").alias(CATEGORY),
            F.lit(None).cast("double").alias(PRICE),
            F.lit(None).cast("boolean").alias(IN_STOCK),
            F.lit(None).cast("boolean").alias(PROMO),
            F.lit(None).cast("timestamp").alias(LAUNCHED_AT),
        )
    else:
        items = items.join(
            catalog.select(ITEM_ID, CATEGORY, PRICE, IN_STOCK, PROMO, LAUNCHED_AT), on=ITEM_ID, how="left"
        )
    launched_age = (F.unix_timestamp(ts_lit(as_of)) - F.unix_timestamp(F.col(LAUNCHED_AT))) / SECONDS_PER_DAY
    return items.join(fresh_users, on=ITEM_IDX, how="left").select(
        F.col(ITEM_IDX).cast("int"),
        F.col(FEATURES),
        F.col(CATEGORY),
        F.col(PRICE).cast("double").alias(PRICE),
        F.coalesce(F.col(IN_STOCK), F.lit(True)).alias(IN_STOCK),
        F.coalesce(F.col(PROMO), F.lit(False)).alias(PROMO),
        F.coalesce((launched_age >= 0) & (launched_age <= rerank_config.new_arrival_days), F.lit(False)).alias(
            NEW_ARRIVAL
        ),
        F.coalesce(F.col(CATEGORY).isin(rerank_config.blocked_categories), F.lit(False)).alias(BLOCKED),
        F.coalesce(F.col(_USERS), F.lit(0)).cast("long").alias(_USERS),
    )


def collect_neighbours(neighbours: DataFrame | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(item, neighbour, score) arrays of the neighbour lists (catalogue x top-N rows: the model), or None."""
    if neighbours is None:
        return None
    pdf = cast(pd.DataFrame, neighbours.select(ITEM_IDX, NEIGHBOUR_IDX, SCORE).toPandas())
    return (
        pdf[ITEM_IDX].to_numpy(dtype=np.int64),
        pdf[NEIGHBOUR_IDX].to_numpy(dtype=np.int64),
        pdf[SCORE].to_numpy(dtype=np.float64),
    )


def build_item_table(attributes: DataFrame, neighbours: DataFrame | None = None) -> ItemTable:
    """Collect the item attributes (bounded by the catalogue) into the kernel's ItemTable.

    Args:
        neighbours: item_idx, neighbour_idx, score: each item's bounded co-occurrence neighbour list
            (the co-occurrence features); None: no lists, those features are 0.

    Raises:
        InputDataError: no item has factors (train has not run on these items).
    """
    pdf = cast(pd.DataFrame, attributes.orderBy(ITEM_IDX).toPandas())
    return item_table_from_pandas(pdf, collect_neighbours(neighbours))


def to_capped_candidates(candidates: DataFrame, max_candidates: int) -> DataFrame:
    """At most `max_candidates` ALS-proposed candidates per user (highest ALS score, then EASE score, more
    sources, item id) plus at most `max_candidates` others (EASE's, neighbours of recent items: highest EASE
    score, then more sources, then item id), so ALS's long tail never pushes out the other sources'."""
    for name in OPTIONAL_SCORES:  # tables written before EASE / buy-again, and the stream's extra candidates
        if name not in candidates.columns:
            candidates = candidates.withColumn(name, F.lit(None).cast("double"))
    order = Window.partitionBy(USER_IDX, F.col(ALS_SCORE).isNull()).orderBy(
        F.col(ALS_SCORE).desc_nulls_last(),
        F.col(EASE_SCORE).desc_nulls_last(),
        F.size(SOURCES).desc(),
        F.col(ITEM_IDX).asc(),
    )
    # Partitioned by user once: this window and to_user_rows' lists per user then share the shuffle.
    return (
        candidates.repartition(USER_IDX)
        .withColumn("_n", F.row_number().over(order))
        .filter(F.col("_n") <= max_candidates)
        .select(USER_IDX, ITEM_IDX, ALS_SCORE, *OPTIONAL_SCORES, SOURCES)
    )


def to_capped_events(fresh: DataFrame, max_events: int) -> DataFrame:
    """At most `max_events` fresh events per user for the kernel: most recent first, then item id."""
    order = Window.partitionBy(USER_IDX).orderBy(
        F.col(_AGE).asc(), F.col(ITEM_IDX).asc(), F.col(_BOUGHT).desc(), F.col(_W).desc()
    )
    return fresh.withColumn("_n", F.row_number().over(order)).filter(F.col("_n") <= max_events).drop("_n")


def log_event_cap(fresh: DataFrame, max_events: int) -> None:
    """Log the fresh-event cap and how many users it cuts (one aggregation over the cached events)."""
    over = fresh.groupBy(USER_IDX).count().filter(F.col("count") > max_events).count()
    log.info("[rerank] fresh events capped at %d per user, most recent first (%d users over the cap)", max_events, over)


def to_event_lists(fresh: DataFrame) -> DataFrame:
    """user_idx, _e: each user's fresh events as one array of (_age, item_idx, _w, _bought), by age then item."""
    return fresh.groupBy(USER_IDX).agg(F.array_sort(F.collect_list(F.struct(_AGE, ITEM_IDX, _W, _BOUGHT))).alias("_e"))


def event_columns() -> list[Column]:
    """The kernel's event columns (ev_items, ev_weights, ev_ages, ev_bought) from to_event_lists' `_e`."""
    return [
        F.col(f"_e.{ITEM_IDX}").alias(EV_ITEMS),
        F.col(f"_e.{_W}").alias(EV_WEIGHTS),
        F.col(f"_e.{_AGE}").alias(EV_AGES),
        F.col(f"_e.{_BOUGHT}").alias(EV_BOUGHT),
    ]


def to_user_rows(candidates: DataFrame, user_factors: DataFrame, fresh: DataFrame) -> DataFrame:
    """One row per user with candidates: user_idx, features (null without factors), cand_items,
    cand_als, cand_ease, cand_rebuy (candidate arrays in item order), ev_items, ev_weights, ev_ages, ev_bought (by age, item)."""

    def score(name: str) -> Column:
        present = F.coalesce(F.col(name), F.lit(0.0)) if name in candidates.columns else F.lit(0.0)
        return present.cast("double")

    entry = F.struct(
        F.col(ITEM_IDX),
        F.col(ALS_SCORE).isNotNull().alias(CAND_ALS),
        score(EASE_SCORE).alias(CAND_EASE),
        score(REBUY_SCORE).alias(CAND_REBUY),
    )
    cand = candidates.groupBy(USER_IDX).agg(F.array_sort(F.collect_list(entry)).alias("_c"))
    return (
        cand.join(user_factors.select(USER_IDX, FEATURES), on=USER_IDX, how="left")
        .join(to_event_lists(fresh), on=USER_IDX, how="left")
        .select(
            F.col(USER_IDX).cast("int"),
            F.col(FEATURES),
            F.col(f"_c.{ITEM_IDX}").alias(CAND_ITEMS),
            F.col(f"_c.{CAND_ALS}").alias(CAND_ALS),
            F.col(f"_c.{CAND_EASE}").alias(CAND_EASE),
            F.col(f"_c.{CAND_REBUY}").alias(CAND_REBUY),
            *event_columns(),
        )
    )


def read_catalog(spark: SparkSession, config: ShelfConfig) -> DataFrame | None:
    """silver.catalog (joined to item_index later), or None when absent: then no business rule applies."""
    if not tables.exists(spark, config, "silver", "catalog"):
        log.info("no silver.catalog: no stock, promotion, category or new-arrival rules")
        return None
    return tables.read(spark, config, "silver", "catalog")


@dataclass(frozen=True)
class Reranked:
    """The kernel's rows and the cached frames they came from (release them with `unpersist`)."""

    rows: DataFrame  # user_idx, item_idx, rank, score, reasons (KERNEL_SCHEMA), cached
    fresh: DataFrame  # to_fresh_events' rows, cached
    attributes: DataFrame  # to_item_attributes' rows, cached

    def unpersist(self) -> None:
        for frame in (self.rows, self.fresh, self.attributes):
            frame.unpersist()


def rerank_candidates(
    spark: SparkSession,
    candidates: DataFrame,
    user_factors: DataFrame,
    item_factors: DataFrame,
    item_index: DataFrame,
    catalog: DataFrame | None,
    interactions: DataFrame,
    rerank_config: RerankConfig,
    as_of: datetime,
    top_k: int | None = None,
    neighbours: DataFrame | None = None,
    consumed: Sequence[str] = ("purchase",),
    keep_inputs: Callable[[DataFrame, DataFrame], DataFrame] | None = None,
) -> Reranked:
    """Re-rank `candidates` (user_idx, item_idx, als_score, sources) with the events before `as_of`.

    Args:
        top_k: list length; None takes rerank_config.top_k.
        neighbours: item_idx, neighbour_idx, score: bounded co-occurrence neighbour lists (gold.item_similarities
            rows of source cooccurrence) for the co-occurrence features; None: those features are 0.
        consumed: event types that consume an item (ShelfConfig.consumed_event_types): never re-recommended.
        keep_inputs: (user rows, item attributes) -> the user rows to re-rank: `shelf rerank` writes both
            (gold.rerank_inputs, gold.rerank_items: what `shelf serve` loads) and re-ranks the rows it wrote.

    Raises:
        InputDataError: no item of item_index has factors.
    """
    fresh = to_fresh_events(interactions, rerank_config, as_of, consumed).cache()
    attributes = to_item_attributes(item_index, item_factors, catalog, fresh, rerank_config, as_of).cache()
    try:
        items = build_item_table(attributes, neighbours)
    except InputDataError:
        fresh.unpersist()
        attributes.unpersist()
        raise
    params = params_from(rerank_config)
    if top_k is not None:
        params = replace(params, top_k=top_k)
    log_event_cap(fresh, rerank_config.max_fresh_events)
    events = to_capped_events(fresh, rerank_config.max_fresh_events)
    user_rows = to_user_rows(to_capped_candidates(candidates, rerank_config.max_candidates), user_factors, events)
    if keep_inputs is not None:
        user_rows = keep_inputs(user_rows, attributes)
    buckets = rerank_config.buckets or int(spark.conf.get("spark.sql.shuffle.partitions") or 4)
    rows = to_reranked(spark, user_rows, items, params, buckets).cache()
    return Reranked(rows, fresh, attributes)


def to_reranked(
    spark: SparkSession, user_rows: DataFrame, items: ItemTable, params: RerankParams, buckets: int
) -> DataFrame:
    """Kernel output for every user row: user_idx, item_idx, rank, score, reasons.

    The item table rides in the function's closure (pyspark broadcasts a large pickled function itself), so no
    SparkContext is needed and it runs over Spark Connect.
    """
    spread = user_rows.repartition(buckets, USER_IDX)
    return spread.mapInPandas(lambda it: rerank_batches(it, items, params), KERNEL_SCHEMA)
