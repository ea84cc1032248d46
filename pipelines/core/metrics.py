"""Ranking metrics at k, in the DataFrame API (no RDD, no row UDF, no collect of per-user rows; the factor
cosines of intra-list diversity are computed per list in numpy, `udfs.diversity` inside `mapInPandas`).

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
- diversity (intra-list diversity) = per user, the mean of (1 - cosine similarity) over the pairs of
  items within the user's top-k list (k(k-1)/2 pairs per user, never item x item over the catalogue),
  then averaged over users whose list has two items or more (0 when none has, e.g. at k = 1). The
  cosine is between the items' ALS factor vectors when item factors are given, else the co-occurrence
  cosine |U_i & U_j| / sqrt(|U_i| |U_j|) of the items' training users U. Pairs with an item that has
  no factor vector (or no training user) are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StructField, StructType

from pipelines.core.schemas import FEATURES, ITEM_IDX, RANK, SCORE, USER_IDX
from udfs.diversity import list_diversity

METRIC = "metric"
K = "k"
METRIC_VALUE = "value"

PER_USER_METRICS = ("precision", "recall", "ndcg", "map", "map_rel", "hit_rate")
# Metrics of the lists as a whole (one value per model and k, not averaged from relevance per user).
CATALOG_METRICS = ("coverage", "novelty", "diversity")


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
    return candidates.join(seen.select(user_col, item_col).distinct(), on=[user_col, item_col], how="left_anti")


def _groups(recs: DataFrame, by: Sequence[str], groups: DataFrame | None) -> DataFrame:
    """The `by` groups to score: `groups` when given (a group with no list at all then scores 0), else those in `recs`."""
    return F.broadcast((groups if groups is not None else recs).select(*by).distinct())


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
    groups: DataFrame | None = None,
) -> DataFrame:
    """One row per (user, k) for each user with a relevant item: precision, recall, ndcg, map, map_rel,
    hit_rate.

    Args:
        recs: (user, item, rank) with ranks 1, 2, ... per user and no repeated item.
        relevant: (user, item); duplicates are ignored.
        ks: the cut-offs.
        by: extra columns of `recs` that name separate lists (e.g. the model), scored in one pass;
            every group present in `recs` (or in `groups`) is scored against every user of `relevant`.
        groups: the `by` groups to score, when some may have no recommendation at all (they score 0).
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
        base = base.crossJoin(_groups(recs, by, groups))
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
    groups: DataFrame | None = None,
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
    base = cutoffs.crossJoin(_groups(recs, by, groups)) if by else cutoffs
    return base.join(per_k, on=[*by, K], how="left").select(
        *by,
        K,
        F.coalesce("coverage", F.lit(0.0)).alias("coverage"),
        F.coalesce("novelty", F.lit(0.0)).alias("novelty"),
    )


def _cutoffs(recs: DataFrame, ks: Sequence[int]) -> DataFrame:
    spark = recs.sparkSession
    return F.broadcast(spark.createDataFrame([(int(k),) for k in sorted(set(ks))], f"{K} int"))


def _list_pairs(recs: DataFrame, ks: Sequence[int], user_col: str, item_col: str, by: Sequence[str]) -> DataFrame:
    """(by, user, k, _a, _b): each unordered pair of items within a user's top-k list, for every k."""
    left = recs.select(*by, user_col, F.col(item_col).alias("_a"), F.col(RANK).alias("_rank_a"))
    right = recs.select(*by, user_col, F.col(item_col).alias("_b"), F.col(RANK).alias("_rank_b"))
    return (
        left.join(right, on=[*by, user_col], how="inner")
        .filter(F.col("_rank_a") < F.col("_rank_b"))
        .crossJoin(_cutoffs(recs, ks))
        .filter(F.col("_rank_b") <= F.col(K))
        .select(*by, user_col, K, "_a", "_b")
    )


def _unit(vector: Column) -> Column:
    """The vector (array<float>) scaled to length 1; null for a zero vector."""
    norm = F.sqrt(F.aggregate(vector, F.lit(0.0), lambda acc, x: acc + x * x))
    return F.when(norm > 0, F.transform(vector, lambda x: x / norm))


def _diversity_batches(keys: list[str], ks: list[int]) -> Callable[[Iterable[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas: lists (`keys`, _ranks, _units) -> (`keys`, k, _diversity) for each list with a pair within k."""

    def run(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            if batch.empty:
                continue
            lengths = batch["_ranks"].map(len).to_numpy(dtype=np.int64)
            indptr = np.concatenate([[0], np.cumsum(lengths)])
            ranks = np.concatenate(batch["_ranks"].to_list()).astype(np.int64)
            units = np.stack(np.concatenate(batch["_units"].to_list())).astype(np.float64)
            values = list_diversity(indptr, ranks, units, ks).ravel()
            frame = pd.DataFrame({key: np.repeat(batch[key].to_numpy(), len(ks)) for key in keys})
            frame[K] = np.tile(np.asarray(ks, dtype=np.int32), len(batch))
            frame["_diversity"] = values
            yield frame[~np.isnan(values)]

    return run


def _factor_diversity(
    recs: DataFrame, ks: Sequence[int], item_factors: DataFrame, user_col: str, item_col: str, by: Sequence[str]
) -> DataFrame:
    """(by, user, k, _diversity) per list with a pair within k, by the cosine of the items' factor vectors (items
    without one left out): one shuffle by list, then each list's pairs in numpy, never a row per pair."""
    units = item_factors.select(F.col(item_col), _unit(F.col(FEATURES)).alias("_unit")).filter(
        F.col("_unit").isNotNull()
    )
    keys = [*by, user_col]
    lists = (
        recs.filter(F.col(RANK) <= max(ks))
        .select(*keys, item_col, RANK)
        .join(units, on=item_col, how="inner")
        .groupBy(*keys)
        .agg(F.collect_list(RANK).alias("_ranks"), F.collect_list("_unit").alias("_units"))
    )
    fields = [StructField(c, recs.schema[c].dataType) for c in keys]
    schema = StructType([*fields, StructField(K, IntegerType()), StructField("_diversity", DoubleType())])
    return lists.mapInPandas(_diversity_batches(keys, sorted(set(ks))), schema)


def _cooccurrence_cosine(pairs: DataFrame, train: DataFrame, user_col: str, item_col: str) -> DataFrame:
    """`pairs` (_a, _b) with `_cosine` = users in common / sqrt(users of a * users of b), from `train`.

    Each item's training users are gathered into one sorted array, so only the listed pairs are compared.
    """
    users = (
        train.select(user_col, item_col)
        .distinct()
        .groupBy(item_col)
        .agg(F.array_sort(F.collect_list(user_col)).alias("_u"))
    )
    side_a = users.select(F.col(item_col).alias("_a"), F.col("_u").alias("_ua"))
    side_b = users.select(F.col(item_col).alias("_b"), F.col("_u").alias("_ub"))
    common = F.size(F.array_intersect("_ua", "_ub"))
    cosine = common / F.sqrt(F.size("_ua").cast("double") * F.size("_ub").cast("double"))
    distinct_pairs = pairs.select("_a", "_b").distinct()
    similarity = (
        distinct_pairs.join(side_a, on="_a", how="inner")
        .join(side_b, on="_b", how="inner")
        .select("_a", "_b", cosine.alias("_cosine"))
    )
    return pairs.join(similarity, on=["_a", "_b"], how="inner")


def intra_list_diversity(
    recs: DataFrame,
    ks: Sequence[int],
    item_factors: DataFrame | None = None,
    train: DataFrame | None = None,
    user_col: str = USER_IDX,
    item_col: str = ITEM_IDX,
    by: Sequence[str] = (),
    groups: DataFrame | None = None,
) -> DataFrame:
    """One row per k (and `by` group): mean over users of the mean (1 - cosine) within their top-k list.

    Args:
        recs: (user, item, rank) lists.
        item_factors: (item, features array) of the run; their cosine is the similarity when given.
        train: (user, item) training pairs; their co-occurrence cosine is used when no factors are given.

    Raises:
        ValueError: neither item factors nor training pairs were given.
    """
    if item_factors is not None:
        per_user = _factor_diversity(recs, ks, item_factors, user_col, item_col, by)
    elif train is not None:
        pairs = _cooccurrence_cosine(_list_pairs(recs, ks, user_col, item_col, by), train, user_col, item_col)
        per_user = pairs.groupBy(*by, user_col, K).agg(F.avg(F.lit(1.0) - F.col("_cosine")).alias("_diversity"))
    else:
        raise ValueError("intra_list_diversity needs item_factors or train to measure item similarity.")
    per_k = per_user.groupBy(*by, K).agg(F.avg("_diversity").alias("diversity"))
    cutoffs = _cutoffs(recs, ks)
    base = cutoffs.crossJoin(_groups(recs, by, groups)) if by else cutoffs
    return base.join(per_k, on=[*by, K], how="left").select(
        *by, K, F.coalesce("diversity", F.lit(0.0)).alias("diversity")
    )


def ranking_metrics(
    recs: DataFrame,
    relevant: DataFrame,
    train: DataFrame,
    ks: Sequence[int],
    user_col: str = USER_IDX,
    item_col: str = ITEM_IDX,
    by: Sequence[str] = (),
    item_factors: DataFrame | None = None,
    groups: DataFrame | None = None,
) -> DataFrame:
    """Every metric at every k, long: one row per (`by` group, metric, k) with its `value` (a double).

    Diversity uses the cosine of `item_factors` when given, else the co-occurrence cosine in `train`.
    `groups` (a frame with the `by` columns) names every group to score: one whose lists are all empty
    is then scored (0 for every metric) instead of missing from the result.
    """
    user_means = (
        per_user_metrics(recs, relevant, ks, user_col, item_col, by, groups)
        .groupBy(*by, K)
        .agg(*[F.avg(m).alias(m) for m in PER_USER_METRICS])
    )
    catalog = catalog_metrics(recs, train, ks, user_col, item_col, by, groups)
    diversity = intra_list_diversity(recs, ks, item_factors, train, user_col, item_col, by, groups)
    wide = user_means.join(catalog, on=[*by, K], how="inner").join(diversity, on=[*by, K], how="inner")
    names = [*PER_USER_METRICS, *CATALOG_METRICS]
    pairs = ", ".join(f"'{m}', cast({m} as double)" for m in names)
    stacked = f"stack({len(names)}, {pairs}) as ({METRIC}, {METRIC_VALUE})"
    return wide.selectExpr(*by, K, stacked).select(*by, METRIC, K, METRIC_VALUE)
