"""Ranking metrics at k, in the DataFrame API (no RDD, no UDF, no collect of per-user rows).

Inputs are long tables: recommendations are one row per (user, item) with a 1-based `rank`
(`top_k` makes them from scores with a deterministic tie-break), relevant items are one row per
(user, item) the user went on to interact with. Per-user metrics are averaged over the users that
have at least one relevant item; such a user with no recommendations scores 0.

Definitions at k (hits = relevant items among the top k):

- precision = hits / k; recall = hits / relevant; hit_rate = 1 when hits > 0
- ndcg = sum over hits of 1 / log2(rank + 1), divided by the ideal DCG of min(k, relevant) hits
- map = sum over hits of precision@rank, divided by min(k, relevant) (Spark's RankingMetrics);
  map_rel divides the same sum by relevant (the "divide by all relevant" convention)
- coverage = distinct recommended items / catalog items
- novelty = mean over recommended items of -log2(share of training users who interacted with the item)
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from pipelines.core.schemas import ITEM_IDX, USER_IDX

RANK = "rank"
SCORE = "score"
METRIC = "metric"
K = "k"
METRIC_VALUE = "value"

PER_USER_METRICS = ("precision", "recall", "ndcg", "map", "map_rel", "hit_rate")
CATALOG_METRICS = ("coverage", "novelty")


def top_k(
    scores: DataFrame,
    k: int,
    user_col: str = USER_IDX,
    item_col: str = ITEM_IDX,
    score_col: str = SCORE,
) -> DataFrame:
    """The `k` best items per user, one row per (user, rank); equal scores rank the lower item id first."""
    order = Window.partitionBy(user_col).orderBy(F.col(score_col).desc(), F.col(item_col).asc())
    return (
        scores.withColumn(RANK, F.row_number().over(order))
        .filter(F.col(RANK) <= k)
        .select(user_col, item_col, score_col, RANK)
    )


def remove_seen(
    candidates: DataFrame,
    seen: DataFrame,
    user_col: str = USER_IDX,
    item_col: str = ITEM_IDX,
) -> DataFrame:
    """Drop candidate (user, item) pairs the user already interacted with."""
    return candidates.join(
        seen.select(user_col, item_col).distinct(), on=[user_col, item_col], how="left_anti"
    )


def _ideal_dcg(k_col: str, relevant_col: str) -> Column:
    """DCG of a perfect list: sum_{i=1}^{min(k, relevant)} 1 / log2(i + 1), as a higher-order SQL function."""
    positions = F.sequence(F.lit(1), F.least(F.col(k_col), F.col(relevant_col)))
    return F.aggregate(positions, F.lit(0.0), lambda acc, i: acc + F.lit(1.0) / F.log2(i + F.lit(1)))


def per_user_metrics(
    recs: DataFrame,
    relevant: DataFrame,
    ks: Sequence[int],
    user_col: str = USER_IDX,
    item_col: str = ITEM_IDX,
    by: Sequence[str] = (),
) -> DataFrame:
    """One row per (user, k) for each user with a relevant item: precision, recall, ndcg, map, map_rel,
    hit_rate.

    Args:
        recs: (user, item, rank) with ranks 1, 2, ... per user and no repeated item.
        relevant: (user, item); duplicates are ignored.
        ks: the cut-offs.
        by: extra columns of `recs` that name separate lists (e.g. the model), scored in one pass;
            every group present in `recs` is scored against every user of `relevant`.
    """
    spark = recs.sparkSession
    cutoffs = F.broadcast(spark.createDataFrame([(int(k),) for k in sorted(set(ks))], f"{K} int"))
    truth = relevant.select(user_col, item_col).distinct()
    n_relevant = truth.groupBy(user_col).agg(F.count(F.lit(1)).alias("_relevant"))
    keys = [*by, user_col]
    upto_rank = Window.partitionBy(*keys).orderBy(F.col(RANK)).rowsBetween(Window.unboundedPreceding, 0)
    judged = (
        recs.select(*by, user_col, item_col, RANK)
        .join(truth.withColumn("_hit", F.lit(1)), on=[user_col, item_col], how="left")
        .withColumn("_hit", F.coalesce(F.col("_hit"), F.lit(0)))
        .withColumn("_hits_so_far", F.sum("_hit").over(upto_rank))
    )
    sums = (
        judged.crossJoin(cutoffs)
        .filter(F.col(RANK) <= F.col(K))
        .groupBy(*keys, K)
        .agg(
            F.sum("_hit").alias("_hits"),
            F.sum(F.col("_hit") / F.log2(F.col(RANK) + F.lit(1))).alias("_dcg"),
            F.sum(F.col("_hit") * F.col("_hits_so_far") / F.col(RANK)).alias("_ap_sum"),
        )
    )
    hits = F.coalesce(F.col("_hits"), F.lit(0)).cast("double")
    ap_sum = F.coalesce(F.col("_ap_sum"), F.lit(0.0))
    base = n_relevant.crossJoin(cutoffs)
    if by:
        base = base.crossJoin(F.broadcast(recs.select(*by).distinct()))
    return (
        base.join(sums, on=[*keys, K], how="left")
        .withColumn("precision", hits / F.col(K))
        .withColumn("recall", hits / F.col("_relevant"))
        .withColumn("ndcg", F.coalesce(F.col("_dcg"), F.lit(0.0)) / _ideal_dcg(K, "_relevant"))
        .withColumn("map", ap_sum / F.least(F.col(K), F.col("_relevant")))
        .withColumn("map_rel", ap_sum / F.col("_relevant"))
        .withColumn("hit_rate", (hits > 0).cast("double"))
        .select(*by, user_col, K, *PER_USER_METRICS)
    )


def catalog_metrics(
    recs: DataFrame,
    train: DataFrame,
    ks: Sequence[int],
    user_col: str = USER_IDX,
    item_col: str = ITEM_IDX,
    by: Sequence[str] = (),
) -> DataFrame:
    """One row per k (and `by` group): coverage of the training catalog and novelty of the top-k lists."""
    spark = recs.sparkSession
    cutoffs = F.broadcast(spark.createDataFrame([(int(k),) for k in sorted(set(ks))], f"{K} int"))
    pairs = train.select(user_col, item_col).distinct()
    totals = pairs.agg(F.countDistinct(user_col).alias("_users"), F.countDistinct(item_col).alias("_items"))
    popularity = pairs.groupBy(item_col).agg(F.count(F.lit(1)).alias("_item_users"))
    shown = recs.select(*by, user_col, item_col, RANK).crossJoin(cutoffs).filter(F.col(RANK) <= F.col(K))
    per_k = (
        shown.join(popularity, on=item_col, how="left")
        .crossJoin(totals)
        .groupBy(*by, K)
        .agg(
            F.countDistinct(item_col).alias("_shown_items"),
            F.first("_items").alias("_items"),
            # An item nobody trained on has no defined novelty; it is left out of the mean.
            F.avg(-F.log2(F.col("_item_users") / F.col("_users"))).alias("novelty"),
        )
        .withColumn("coverage", F.col("_shown_items") / F.col("_items"))
    )
    base = cutoffs.crossJoin(F.broadcast(recs.select(*by).distinct())) if by else cutoffs
    return base.join(per_k, on=[*by, K], how="left").select(
        *by,
        K,
        F.coalesce("coverage", F.lit(0.0)).alias("coverage"),
        F.coalesce("novelty", F.lit(0.0)).alias("novelty"),
    )


def ranking_metrics(
    recs: DataFrame,
    relevant: DataFrame,
    train: DataFrame,
    ks: Sequence[int],
    user_col: str = USER_IDX,
    item_col: str = ITEM_IDX,
    by: Sequence[str] = (),
) -> DataFrame:
    """Every metric at every k, long: one row per (`by` group, metric, k) with its `value` (a double)."""
    user_means = (
        per_user_metrics(recs, relevant, ks, user_col, item_col, by)
        .groupBy(*by, K)
        .agg(*[F.avg(m).alias(m) for m in PER_USER_METRICS])
    )
    catalog = catalog_metrics(recs, train, ks, user_col, item_col, by)
    wide = user_means.join(catalog, on=[*by, K], how="inner")
    names = [*PER_USER_METRICS, *CATALOG_METRICS]
    pairs = ", ".join(f"'{m}', cast({m} as double)" for m in names)
    stacked = f"stack({len(names)}, {pairs}) as ({METRIC}, {METRIC_VALUE})"
    return wide.selectExpr(*by, K, stacked).select(*by, METRIC, K, METRIC_VALUE)
