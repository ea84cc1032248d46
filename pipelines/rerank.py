"""`shelf rerank`: gold.candidates of this run -> gold.recommendations, top-K per user with reasons.

Reads gold.candidates (rows of this run id), gold.user_factors / gold.item_factors, the fresh events
of silver.interactions (in [as_of - max(rerank.fresh_days, rerank.bought_window_days), as_of)),
silver.user_index / silver.item_index and, when it exists, silver.catalog (without it no business
rule applies: everything is in stock, no promotions, no categories) and, when it exists,
gold.item_similarities (rows of this run, source "cooccurrence": the neighbour lists of the
co-occurrence features; without them those features are 0).

Writes gold.recommendations, one row per (user, rank): user_id and item_id (the source's string
ids), rank (int, from 1), score (double, non-increasing with rank), reasons (array<string>),
run_id, as_of. Rows of this run id are replaced (`replaceWhere`), so a rerun is idempotent.

`pipelines.core.reranking.rerank_candidates` does the work: the item side (factors + catalogue
attributes + popularity: the model) is broadcast, each user's candidates (capped at
rerank.max_candidates, best ALS score first) and fresh events become one row, and
`udfs.rerank.rerank` scores whole Arrow batches of users inside `mapInPandas`; `pipelines.core.publishing`
holds the gold.recommendations contract and the dense -> string id mapping (shared with `shelf stream`). Users of
silver.user_index that get no re-ranked row (no candidates, or all filtered) get the most popular
in-stock items they have not bought, reason "popular".
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.kernel_frames import _USERS, BLOCKED
from pipelines.core.publishing import RECOMMENDATIONS_SCHEMA as RECOMMENDATIONS_SCHEMA  # re-exported
from pipelines.core.publishing import TABLE_COMMENT
from pipelines.core.publishing import read_cooccurrence as read_cooccurrence  # re-exported
from pipelines.core.publishing import to_recommendations as to_recommendations  # re-exported
from pipelines.core.reranking import _BOUGHT, read_catalog, rerank_candidates
from pipelines.core.runs import RunContext, step_log
from pipelines.core.schemas import ALS_SCORE, IN_STOCK, ITEM_IDX, RANK, REASONS, RUN_ID, SCORE, USER_ID, USER_IDX

log = logging.getLogger("shelf.rerank")

STEP = "rerank"
POPULAR = "popular"


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
    missing = users.select(USER_IDX).distinct().join(reranked.select(USER_IDX).distinct(), on=USER_IDX, how="left_anti")
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


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Re-rank this run's candidates and publish gold.recommendations."""
    rr = config.rerank
    with step_log(STEP, ctx) as counts:
        candidates = tables.read(spark, config, "gold", "candidates").filter(F.col(RUN_ID) == ctx.run_id)
        user_factors = of_run(tables.read(spark, config, "gold", "user_factors"), ctx.run_id, "gold.user_factors")
        item_factors = of_run(tables.read(spark, config, "gold", "item_factors"), ctx.run_id, "gold.item_factors")
        interactions = tables.read(spark, config, "silver", "interactions")
        user_index = tables.read(spark, config, "silver", "user_index")
        item_index = tables.read(spark, config, "silver", "item_index")
        catalog = read_catalog(spark, config)

        counts.update(_cap_counts(candidates, rr.max_candidates))
        done = rerank_candidates(
            spark,
            candidates,
            user_factors,
            item_factors,
            item_index,
            catalog,
            interactions,
            rr,
            ctx.as_of,
            neighbours=read_cooccurrence(spark, config, ctx.run_id),
            consumed=config.consumed_event_types,
            keep_inputs=lambda rows, attributes: keep_kernel_inputs(rows, attributes, config, ctx.run_id),
        )
        try:
            reranked, fresh, attributes = done.rows, done.fresh, done.attributes
            fallback = to_popular_fallback(user_index, reranked, interactions, attributes, fresh, rr.top_k)
            result = to_recommendations(reranked.unionByName(fallback), user_index, item_index, ctx.run_id, ctx.as_of)
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
            done.unpersist()
        counts.update(_published_counts(spark, config, ctx.run_id))


def keep_kernel_inputs(user_rows: DataFrame, attributes: DataFrame, config: ShelfConfig, run_id: str) -> DataFrame:
    """Write what the kernel re-ranks, so a service can re-rank the same way later without Spark (`shelf serve`):
    gold.rerank_inputs (one row per user: factors, candidate arrays, fresh-event arrays, ages as of the run's
    as_of) and gold.rerank_items (one row per item: factors and the business attributes). Returns the user rows
    read back, so they are computed once."""
    tag = F.lit(run_id).alias(RUN_ID)
    tables.write(attributes.select("*", tag), config, "gold", "rerank_items", run_id, mode="run")
    tables.write(user_rows.select("*", tag), config, "gold", "rerank_inputs", run_id, mode="run")
    written = tables.read(user_rows.sparkSession, config, "gold", "rerank_inputs")
    return written.filter(F.col(RUN_ID) == run_id).drop(RUN_ID)


def _cap_counts(candidates: DataFrame, cap: int) -> dict[str, int]:
    """The candidate cap and the users over it (it applies to ALS-proposed candidates and, separately, to the other
    sources': to_capped_candidates)."""
    per_user = candidates.groupBy(USER_IDX, F.col(ALS_SCORE).isNull()).count()
    over = per_user.agg(F.countDistinct(F.when(F.col("count") > cap, F.col(USER_IDX))).alias("o")).first()
    users_over = int(over["o"] or 0) if over else 0
    log.info(
        "[%s] candidates capped at %d per user and source kind, ALS or other (%d users over the cap)",
        STEP,
        cap,
        users_over,
    )
    return {"candidate_cap": cap, "users_over_cap": users_over}


def _published_counts(spark: SparkSession, config: ShelfConfig, run_id: str) -> dict[str, int]:
    """Rows, users and popularity-fallback users of the run's gold.recommendations as written."""
    written = tables.read(spark, config, "gold", "recommendations").filter(F.col(RUN_ID) == run_id)
    stats = written.agg(
        F.count(F.lit(1)).alias("rows"),
        F.countDistinct(USER_ID).alias("users"),
        F.countDistinct(F.when(F.array_contains(REASONS, POPULAR), F.col(USER_ID))).alias("fallback_users"),
    ).first()
    assert stats is not None
    return {"rows": stats["rows"], "users": stats["users"], "fallback_users": stats["fallback_users"]}
