"""`shelf candidates`: per-user candidate items for re-ranking.

Reads gold.user_factors, gold.item_factors, gold.item_similarities and silver.interactions; writes
gold.candidates with one row per (user_idx, item_idx): als_score (double, null when ALS did not
propose the item), ease_score (double, null when EASE did not), rebuy_score (double, buy_again only), sources
(sorted array of "als", "buy_again", "ease", "neighbours", "popular", "new_arrival"), run_id.

- als: top `candidates_k` items by p_u . q_i, skipping items the user owns (event types in
  `recommend.consumed_event_types`, resolved from the preset). Users' factors and owned-item lists are grouped per user and
  scored in blocks inside `mapInPandas` (`factors.top_k_by_dot`) against the item factor matrix (the model:
  items x rank floats collected once on the driver, never anything that grows with users).
- neighbours: the top `neighbours_per_item` neighbours of each user's `recent_items` most recently
  touched items (from gold.item_similarities, any source).
- ease: the top `candidates_k` items by EASE score x_u B (`pipelines.core.ease`, from the run's
  gold.ease_neighbours, when the train step fitted EASE), with ease_score.
- buy_again (recommend.repeat_purchase): up to `buy_again_k` items the user consumed before, with a
  rebuy_score from how often and how lately (`to_buy_again_candidates`); the one source owned items may come from.
- popular: the `popular_k` items with most distinct users, for cold-start users (in
  silver.interactions but without factors).
- new_arrival: the `new_arrivals_k` newest items launched within `rerank.new_arrival_days` before
  as_of (silver.catalog's launched_at; without a catalog, an item's first event), also for cold-start
  users, so a shop's new products reach the users ALS knows nothing about.
Owned items never appear. Each user keeps at most `max_candidates` rows, preferring items proposed
by more sources, then higher ALS score, then higher EASE score, then higher neighbour similarity, then popularity, then newness.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, IntegerType, StringType, StructField, StructType

from pipelines.core import ease, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import EaseValues, RecommendConfig, SimilarityConfig
from pipelines.core.factors import factors_of_run, top_k_by_dot
from pipelines.core.neighbours import with_recent_items
from pipelines.core.quality import ts_lit
from pipelines.core.runs import RunContext, step_log
from pipelines.core.schemas import (
    ALS_SCORE,
    ALS_SOURCE,
    BUY_AGAIN_SOURCE,
    EASE_SCORE,
    EASE_SOURCE,
    EVENT_TS,
    EVENT_TYPE,
    IN_STOCK,
    ITEM_ID,
    ITEM_IDX,
    LAUNCHED_AT,
    NEIGHBOUR_IDX,
    NEIGHBOURS_SOURCE,
    NEW_ARRIVAL_SOURCE,
    POPULAR_SOURCE,
    REBUY_SCORE,
    RUN_ID,
    SOURCES,
    USER_IDX,
)

STEP = "candidates"
OWNED = "owned"  # the owned pairs' tag in the sources' union (never a source of a written row)
SIM_SCORE = "_sim"
POP_RANK = "_pop_rank"
NEW_RANK = "_new_rank"

CANDIDATES_SCHEMA = StructType(
    [
        StructField(USER_IDX, IntegerType(), False),
        StructField(ITEM_IDX, IntegerType(), False),
        StructField(ALS_SCORE, DoubleType(), True),
        StructField(EASE_SCORE, DoubleType(), True),
        StructField(REBUY_SCORE, DoubleType(), True),
        StructField(SOURCES, ArrayType(StringType(), False), False),
        StructField(RUN_ID, StringType(), False),
    ]
)


def to_owned(interactions: DataFrame, owned_event_types: list[str]) -> DataFrame:
    """One row per (user_idx, item_idx) the user owns (e.g. bought)."""
    return interactions.filter(F.col(EVENT_TYPE).isin(owned_event_types)).select(USER_IDX, ITEM_IDX).distinct()


def to_als_candidates(
    user_factors: DataFrame, item_factors: DataFrame, owned: DataFrame, k: int, blocks: SimilarityConfig
) -> DataFrame:
    """Top-k unowned items per user with factors: user_idx, item_idx, als_score."""
    return top_k_by_dot(user_factors, item_factors, owned, k, ALS_SCORE, blocks.block_rows, blocks.block_items)


def to_buy_again_candidates(
    interactions: DataFrame, consumed: list[str], k: int, as_of: datetime, half_life_days: float
) -> DataFrame:
    """Up to k items each user consumed before, scored by how often and how lately: user_idx, item_idx, rebuy_score.

    For a (user, item): n = the distinct days it was consumed, age = days since the last of them;
    rebuy_score = log1p(n) * 2^(-age / half_life_days): an item bought on many days, lately, first. (A repurchase
    cycle score, highest when the item's usual gap has just passed, ranked a customer's own items at NDCG@10 0.27
    against this one's 0.33 on an Online Retail validation week; docs/EVALUATION.md "Buy again".)
    """
    days = (F.unix_timestamp(ts_lit(as_of)) - F.unix_timestamp(F.col(EVENT_TS))) / 86400.0
    decay = F.pow(F.lit(2.0), -F.greatest(F.col("_age"), F.lit(0.0)) / F.lit(float(half_life_days)))
    best = Window.partitionBy(USER_IDX).orderBy(F.col(REBUY_SCORE).desc(), F.col(ITEM_IDX).asc())
    return (
        interactions.filter(F.col(EVENT_TYPE).isin(consumed))
        .withColumn("_age", days)
        .groupBy(USER_IDX, ITEM_IDX)
        .agg(F.countDistinct(F.to_date(EVENT_TS)).alias("_n"), F.min("_age").alias("_age"))
        .withColumn(REBUY_SCORE, (F.log1p(F.col("_n")) * decay).cast("double"))
        .withColumn("_r", F.row_number().over(best))
        .filter(F.col("_r") <= k)
        .select(USER_IDX, ITEM_IDX, REBUY_SCORE)
    )


def to_neighbour_candidates(recent: DataFrame, similarities: DataFrame, per_item: int) -> DataFrame:
    """Neighbours of the users' recent items: user_idx, item_idx, _sim (best similarity)."""
    neighbours = similarities.filter(F.col("rank") <= per_item).select(ITEM_IDX, NEIGHBOUR_IDX, F.col("score"))
    return (
        recent.join(neighbours, on=ITEM_IDX, how="inner")
        .groupBy(USER_IDX, F.col(NEIGHBOUR_IDX).alias(ITEM_IDX))
        .agg(F.max("score").alias(SIM_SCORE))
    )


def to_cold_users(interactions: DataFrame, user_factors: DataFrame) -> DataFrame:
    """Users in silver.interactions without ALS factors: user_idx."""
    return interactions.select(USER_IDX).distinct().join(user_factors.select(USER_IDX), on=USER_IDX, how="left_anti")


def to_popular_candidates(interactions: DataFrame, user_factors: DataFrame, popular_k: int) -> DataFrame:
    """The popular_k most-used items for every cold-start user: user_idx, item_idx, _pop_rank."""
    popularity = interactions.groupBy(ITEM_IDX).agg(F.countDistinct(USER_IDX).alias("_users"))
    top = Window.orderBy(F.col("_users").desc(), F.col(ITEM_IDX).asc())  # popular_k rows: one partition is fine
    popular = popularity.withColumn(POP_RANK, F.row_number().over(top)).filter(F.col(POP_RANK) <= popular_k)
    # A cross join with a constant-size (popular_k) broadcast table: linear in cold users.
    return to_cold_users(interactions, user_factors).crossJoin(F.broadcast(popular.select(ITEM_IDX, POP_RANK)))


def to_launches(interactions: DataFrame, catalog: DataFrame | None, item_index: DataFrame | None) -> DataFrame:
    """When each indexed item arrived: item_idx, launched_at (the catalogue's, else the item's first event)."""
    first_seen = interactions.groupBy(ITEM_IDX).agg(F.min(EVENT_TS).alias(LAUNCHED_AT))
    if catalog is None or item_index is None:
        return first_seen
    listed = (
        catalog.filter(F.col(LAUNCHED_AT).isNotNull() & F.coalesce(F.col(IN_STOCK), F.lit(True)))
        .select(ITEM_ID, LAUNCHED_AT)
        .join(item_index.select(ITEM_ID, ITEM_IDX), on=ITEM_ID, how="inner")
    )
    return listed.select(ITEM_IDX, LAUNCHED_AT)


def to_new_arrival_candidates(
    launches: DataFrame, cold_users: DataFrame, as_of: datetime, new_arrival_days: float, new_arrivals_k: int
) -> DataFrame:
    """The new_arrivals_k newest items launched in [as_of - days, as_of] for every cold user:
    user_idx, item_idx, _new_rank (1 = newest; ties by item_idx)."""
    window_start = as_of - timedelta(days=new_arrival_days)
    newest = Window.orderBy(F.col(LAUNCHED_AT).desc(), F.col(ITEM_IDX).asc())  # bounded by the window's launches
    fresh = (
        launches.filter((F.col(LAUNCHED_AT) >= ts_lit(window_start)) & (F.col(LAUNCHED_AT) <= ts_lit(as_of)))
        .withColumn(NEW_RANK, F.row_number().over(newest))
        .filter(F.col(NEW_RANK) <= new_arrivals_k)
    )
    return cold_users.crossJoin(F.broadcast(fresh.select(ITEM_IDX, NEW_RANK)))


_SCORE_KINDS = {
    ALS_SCORE: "double",
    EASE_SCORE: "double",
    REBUY_SCORE: "double",
    SIM_SCORE: "double",
    POP_RANK: "int",
    NEW_RANK: "int",
}


def _tagged(frame: DataFrame, name: str, *present: str) -> DataFrame:
    """One source's rows in the common shape: user_idx, item_idx, every score column (null unless `present`), and
    the source's name."""
    cols = [F.col(c) if c in present else F.lit(None).cast(kind).alias(c) for c, kind in _SCORE_KINDS.items()]
    return frame.select(USER_IDX, ITEM_IDX, *cols, F.lit(name).alias("_source"))


def _merged_and_capped(tagged: DataFrame, max_candidates: int) -> DataFrame:
    """One row per (user, item) with its best scores and sorted sources, the best `max_candidates` per user. An item
    the user owns (a row of the `OWNED` source) stays only through buy_again, with its rebuy score alone.

    `tagged` is partitioned by user once: the merge per (user, item), the owned check and the cap per user all run
    on that one shuffle (an anti-join on (user, item), a group-by and a window had taken three)."""
    merged = (
        tagged.repartition(USER_IDX)
        .groupBy(USER_IDX, ITEM_IDX)
        .agg(
            F.max(F.col("_source") == OWNED).alias(OWNED),
            F.max(ALS_SCORE).alias(ALS_SCORE),
            F.max(EASE_SCORE).alias(EASE_SCORE),
            F.max(REBUY_SCORE).alias(REBUY_SCORE),
            F.max(SIM_SCORE).alias(SIM_SCORE),
            F.min(POP_RANK).alias(POP_RANK),
            F.min(NEW_RANK).alias(NEW_RANK),
            F.array_sort(F.collect_set("_source")).alias(SOURCES),
        )
    )
    owned = F.col(OWNED)
    kept = merged.filter(~owned | F.col(REBUY_SCORE).isNotNull()).select(
        USER_IDX,
        ITEM_IDX,
        *[F.when(~owned, F.col(c)).alias(c) for c in _SCORE_KINDS if c != REBUY_SCORE],
        REBUY_SCORE,
        F.when(owned, F.array(F.lit(BUY_AGAIN_SOURCE))).otherwise(F.col(SOURCES)).alias(SOURCES),
    )
    order = Window.partitionBy(USER_IDX).orderBy(
        F.col(REBUY_SCORE).isNotNull().desc(),  # at most recommend.buy_again_k per user: always kept
        F.size(SOURCES).desc(),
        F.col(ALS_SCORE).desc_nulls_last(),
        F.col(EASE_SCORE).desc_nulls_last(),
        F.col(SIM_SCORE).desc_nulls_last(),
        F.col(POP_RANK).asc_nulls_last(),
        F.col(NEW_RANK).asc_nulls_last(),
        F.col(ITEM_IDX).asc(),
    )
    return kept.withColumn("_n", F.row_number().over(order)).filter(F.col("_n") <= max_candidates)


def to_candidates(
    als: DataFrame,
    neighbours: DataFrame,
    popular: DataFrame,
    owned: DataFrame,
    max_candidates: int,
    run_id: str,
    new_arrivals: DataFrame | None = None,
    ease: DataFrame | None = None,
    buy_again: DataFrame | None = None,
) -> DataFrame:
    """Union the sources and the owned pairs, merge, drop owned items (except buy_again's, which are owned by
    design), tag, cap per user."""
    tagged = (
        _tagged(als, ALS_SOURCE, ALS_SCORE)
        .unionByName(_tagged(neighbours, NEIGHBOURS_SOURCE, SIM_SCORE))
        .unionByName(_tagged(popular, POPULAR_SOURCE, POP_RANK))
        .unionByName(_tagged(owned, OWNED))
    )
    if new_arrivals is not None:
        tagged = tagged.unionByName(_tagged(new_arrivals, NEW_ARRIVAL_SOURCE, NEW_RANK))
    if ease is not None:
        tagged = tagged.unionByName(_tagged(ease, EASE_SOURCE, EASE_SCORE))
    if buy_again is not None:
        tagged = tagged.unionByName(_tagged(buy_again, BUY_AGAIN_SOURCE, REBUY_SCORE))
    capped = _merged_and_capped(tagged, max_candidates)
    return capped.select(
        F.col(USER_IDX).cast("int"),
        F.col(ITEM_IDX).cast("int"),
        F.col(ALS_SCORE).cast("double"),
        F.col(EASE_SCORE).cast("double"),
        F.col(REBUY_SCORE).cast("double"),
        F.col(SOURCES),
        F.lit(run_id).alias(RUN_ID),
    )


def build_candidates(
    spark: SparkSession,
    user_factors: DataFrame,
    item_factors: DataFrame,
    similarities: DataFrame,
    interactions: DataFrame,
    recommend: RecommendConfig,
    blocks: SimilarityConfig,
    run_id: str,
    launches: DataFrame | None = None,
    as_of: datetime | None = None,
    new_arrival_days: float = 30.0,
    consumed: list[str] | None = None,
    ease_neighbours: DataFrame | None = None,
    ease_values: EaseValues = "binary",
) -> DataFrame:
    """All candidate sources for one run, as gold.candidates rows (new arrivals need launches and as_of).

    `consumed`: the event types that make an item the user's (never a candidate again); None: purchase.
    `ease_neighbours`: the run's gold.ease_neighbours (item_idx, neighbour_idx, weight); None: no EASE source.
    """
    owned = to_owned(interactions, consumed or ["purchase"]).cache()
    ease_source = None
    if ease_neighbours is not None:
        x = ease.to_ease_input(interactions, ease_values)
        ease_source = ease.ease_candidates(x, ease_neighbours, owned, recommend.candidates_k)
    als = to_als_candidates(user_factors, item_factors, owned, recommend.candidates_k, blocks)
    recent = with_recent_items(interactions, recommend.recent_items)
    neighbours = to_neighbour_candidates(recent, similarities, recommend.neighbours_per_item)
    popular = to_popular_candidates(interactions, user_factors, recommend.popular_k)
    new_arrivals = None
    if launches is not None and as_of is not None and recommend.new_arrivals_k > 0:
        cold = to_cold_users(interactions, user_factors)
        new_arrivals = to_new_arrival_candidates(launches, cold, as_of, new_arrival_days, recommend.new_arrivals_k)
    buy_again = None
    if recommend.repeat_purchase and as_of is not None:
        buy_again = to_buy_again_candidates(
            interactions, consumed or ["purchase"], recommend.buy_again_k, as_of, recommend.buy_again_half_life_days
        )
    return to_candidates(
        als, neighbours, popular, owned, recommend.max_candidates, run_id, new_arrivals, ease_source, buy_again
    )


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Read factors, similarities and interactions; write gold.candidates."""
    with step_log(STEP, ctx) as counts:
        user_factors = factors_of_run(tables.read(spark, config, "gold", "user_factors"), ctx.run_id)
        item_factors = factors_of_run(tables.read(spark, config, "gold", "item_factors"), ctx.run_id)
        similarities = factors_of_run(tables.read(spark, config, "gold", "item_similarities"), ctx.run_id)
        interactions = tables.read(spark, config, "silver", "interactions")
        catalog = item_index = None
        if tables.exists(spark, config, "silver", "catalog"):
            catalog = tables.read(spark, config, "silver", "catalog")
            item_index = tables.read(spark, config, "silver", "item_index")
        result = build_candidates(
            spark,
            user_factors,
            item_factors,
            similarities,
            interactions,
            config.recommend,
            config.similarities,
            ctx.run_id,
            launches=to_launches(interactions, catalog, item_index),
            as_of=ctx.as_of,
            new_arrival_days=config.rerank.new_arrival_days,
            consumed=config.consumed_event_types,
            ease_neighbours=ease.neighbours_of_run(spark, config, ctx.run_id),
            ease_values=config.train.ease.values,
        )
        tables.write(
            result,
            config,
            "gold",
            "candidates",
            ctx.run_id,
            mode="run",
            comment="candidate items per user with their sources",
        )
        written = tables.read(spark, config, "gold", "candidates").filter(F.col(RUN_ID) == ctx.run_id)
        stats = written.agg(F.count(F.lit(1)).alias("rows"), F.countDistinct(USER_IDX).alias("users")).first()
        assert stats is not None
        counts["rows"] = stats["rows"]
        counts["users"] = stats["users"]
