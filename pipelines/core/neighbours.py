"""Item-item neighbour lists shared by `shelf similarities`, the replay evaluation and `shelf stream`.

Co-occurrence neighbours come from a self-join on user restricted to each user's
`max_items_per_user` most recent (then heaviest) items, so work is bounded by users x M^2 and there
is no item x item cross join. Output grain: one row per (item_idx, rank) with neighbour_idx and score.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from pipelines.core.config_sections import SimilarityConfig
from pipelines.core.schemas import EVENT_TS, ITEM_IDX, NEIGHBOUR_IDX, RANK, SCORE, USER_IDX, WEIGHT


def with_recent_items(interactions: DataFrame, max_items_per_user: int, weight: str = WEIGHT) -> DataFrame:
    """One row per (user, item) among the user's `max_items_per_user` most recent, then heaviest (summed `weight`),
    items (ties: lower item_idx first): the co-occurrence baskets, the items `shelf candidates` takes neighbours
    of, and the item-kNN baseline's recent items."""
    per_item = interactions.groupBy(USER_IDX, ITEM_IDX).agg(
        F.max(EVENT_TS).alias(EVENT_TS), F.sum(weight).alias(WEIGHT)
    )
    latest = Window.partitionBy(USER_IDX).orderBy(F.col(EVENT_TS).desc(), F.col(WEIGHT).desc(), F.col(ITEM_IDX).asc())
    return (
        per_item.withColumn("_n", F.row_number().over(latest))
        .filter(F.col("_n") <= max_items_per_user)
        .select(USER_IDX, ITEM_IDX)
    )


def rank_neighbours(pairs: DataFrame, top_n: int) -> DataFrame:
    """Keep each item's top_n pairs by score desc, neighbour asc, numbered from 1."""
    order = Window.partitionBy(ITEM_IDX).orderBy(F.col(SCORE).desc(), F.col(NEIGHBOUR_IDX).asc())
    return (
        pairs.withColumn(RANK, F.row_number().over(order))
        .filter(F.col(RANK) <= top_n)
        .select(
            F.col(ITEM_IDX).cast("int"),
            F.col(NEIGHBOUR_IDX).cast("int"),
            F.col(SCORE).cast("double"),
            F.col(RANK).cast("int"),
        )
    )


def to_cooccurrence_neighbours(interactions: DataFrame, config: SimilarityConfig) -> DataFrame:
    """Top-N co-occurrence neighbours per item (binary users-in-common cosine or Jaccard)."""
    baskets = with_recent_items(interactions, config.max_items_per_user)
    return cooccurrence_neighbours(baskets, config.top_n, config.min_support, config.cooccurrence_measure)


def cooccurrence_neighbours(baskets: DataFrame, top_n: int, min_support: int = 1, measure: str = "cosine") -> DataFrame:
    """Each item's top_n neighbours by co-occurrence in `baskets` (one row per user and item): users in common
    over sqrt(users of i x users of j) (cosine) or over the union (jaccard), pairs with fewer than min_support
    users in common dropped. item_idx, neighbour_idx, score, rank."""
    support = baskets.groupBy(ITEM_IDX).agg(F.count(F.lit(1)).alias("_users"))  # baskets used twice: one exchange
    left, right = baskets.alias("a"), baskets.alias("b")
    pairs = (
        left.join(
            right,
            on=[
                F.col(f"a.{USER_IDX}") == F.col(f"b.{USER_IDX}"),
                F.col(f"a.{ITEM_IDX}") < F.col(f"b.{ITEM_IDX}"),
            ],
            how="inner",
        )
        .groupBy(F.col(f"a.{ITEM_IDX}").alias("i"), F.col(f"b.{ITEM_IDX}").alias("j"))
        .agg(F.count(F.lit(1)).alias("_both"))
        .filter(F.col("_both") >= min_support)
    )
    si, sj = support.alias("si"), support.alias("sj")
    scored = (
        pairs.join(F.broadcast(si), on=F.col("i") == F.col(f"si.{ITEM_IDX}"), how="inner")
        .join(F.broadcast(sj), on=F.col("j") == F.col(f"sj.{ITEM_IDX}"), how="inner")
        .select("i", "j", "_both", F.col("si._users").alias("_ni"), F.col("sj._users").alias("_nj"))
    )
    if measure == "jaccard":
        score = F.col("_both") / (F.col("_ni") + F.col("_nj") - F.col("_both"))
    else:
        score = F.col("_both") / F.sqrt(F.col("_ni") * F.col("_nj"))
    scored = scored.withColumn(SCORE, score.cast("double"))
    both_ways = scored.select(F.col("i").alias(ITEM_IDX), F.col("j").alias(NEIGHBOUR_IDX), SCORE).unionByName(
        scored.select(F.col("j").alias(ITEM_IDX), F.col("i").alias(NEIGHBOUR_IDX), SCORE)
    )
    return rank_neighbours(both_ways, top_n)
