"""Benchmark: intra-list diversity of evaluate's lists, `pipelines.core.metrics.intra_list_diversity` with item
factors (one shuffle by list, each list's pairs in numpy: `udfs.diversity`) against the tenth round's version in
the same session (one Spark row per pair of items per list and cut-off, its factor cosine a higher-order SQL
function), values compared.

Input: synthetic lists shaped like `shelf evaluate`'s (--models lists of --k items per user, ranks 1..k, items
drawn from --items), random rank --rank factors; cut-offs 1, 5, 10, 20 as `evaluate.ks`. Each --users size is
timed --repeats times per version, the best kept.

    .venv/bin/python -u -m benchmarks.diversity --users 3000 30000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from benchmarks._common import bench_session
from pipelines.core import metrics
from pipelines.core.metrics import _unit  # unchanged since the baseline: shared, not copied
from pipelines.core.schemas import FEATURES, ITEM_IDX, MODEL, RANK, USER_IDX

KS = [1, 5, 10, 20]


def pair_rows_diversity(recs: DataFrame, factors: DataFrame, ks: list[int]) -> DataFrame:
    """The baseline (the tenth round's): a row per pair within each cut-off, cosine by higher-order functions."""
    by = [MODEL, USER_IDX]
    left = recs.select(*by, F.col(ITEM_IDX).alias("_a"), F.col(RANK).alias("_rank_a"))
    right = recs.select(*by, F.col(ITEM_IDX).alias("_b"), F.col(RANK).alias("_rank_b"))
    cutoffs = F.broadcast(recs.sparkSession.createDataFrame([(k,) for k in ks], "k int"))
    pairs = (
        left.join(right, on=by)
        .filter(F.col("_rank_a") < F.col("_rank_b"))
        .crossJoin(cutoffs)
        .filter(F.col("_rank_b") <= F.col("k"))
    )
    units = factors.select(F.col(ITEM_IDX).alias("_item"), _unit(F.col(FEATURES)).alias("_unit"))
    side_a = units.select(F.col("_item").alias("_a"), F.col("_unit").alias("_ua"))
    side_b = units.select(F.col("_item").alias("_b"), F.col("_unit").alias("_ub"))
    dot = F.aggregate(F.zip_with("_ua", "_ub", lambda x, y: x * y), F.lit(0.0), lambda acc, v: acc + v)
    scored = pairs.join(side_a, on="_a").join(side_b, on="_b").withColumn("_cosine", dot)
    per_user = scored.groupBy(*by, "k").agg(F.avg(F.lit(1.0) - F.col("_cosine")).alias("_d"))
    return per_user.groupBy(MODEL, "k").agg(F.avg("_d").alias("diversity"))


def inputs(spark: SparkSession, args: argparse.Namespace, users: int) -> tuple[DataFrame, DataFrame]:
    """(lists, factors), cached and counted."""
    rng = np.random.default_rng(args.seed)
    factors = spark.createDataFrame(
        [(i, rng.normal(size=args.rank).astype(float).tolist()) for i in range(args.items)],
        f"{ITEM_IDX} int, {FEATURES} array<float>",
    ).cache()
    lists = (
        spark.range(users)
        .select(F.col("id").cast("int").alias(USER_IDX))
        .crossJoin(spark.createDataFrame([(f"m{m}",) for m in range(args.models)], f"{MODEL} string"))
        .crossJoin(spark.range(1, args.k + 1).select(F.col("id").cast("int").alias(RANK)))
        .withColumn(ITEM_IDX, (F.xxhash64(USER_IDX, MODEL, RANK) % args.items).cast("int"))
        .withColumn(ITEM_IDX, F.when(F.col(ITEM_IDX) < 0, -F.col(ITEM_IDX)).otherwise(F.col(ITEM_IDX)))
        .dropDuplicates([MODEL, USER_IDX, ITEM_IDX])
        .cache()
    )
    factors.count()
    lists.count()
    return lists, factors


def best_of(repeats: int, run) -> tuple[float, dict]:  # type: ignore[no-untyped-def]
    times, values = [], {}
    for _ in range(repeats):
        started = time.perf_counter()
        values = {(r[MODEL], r["k"]): r["diversity"] for r in run().collect()}
        times.append(time.perf_counter() - started)
    return min(times), values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, nargs="+", default=[3000, 30000])
    p.add_argument("--models", type=int, default=6)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--items", type=int, default=10000)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    spark, _ = bench_session()
    for users in args.users:
        lists, factors = inputs(spark, args, users)
        pairs = users * args.models * sum(k * (k - 1) // 2 for k in KS)
        base, want = best_of(args.repeats, lambda lf=lists, ff=factors: pair_rows_diversity(lf, ff, KS))
        ours, got = best_of(
            args.repeats, lambda lf=lists, ff=factors: metrics.intra_list_diversity(lf, KS, ff, by=[MODEL])
        )
        same = want.keys() <= got.keys() and max(abs(got[key] - want[key]) for key in want) < 1e-9
        print(
            f"{users:>7,} users x {args.models} models x top-{args.k} ({pairs:,} pair rows in the baseline) | "
            f"pair rows {base:.2f}s | per list in numpy {ours:.2f}s | ratio {base / ours:.2f}x | same values: {same}",
            flush=True,
        )
        lists.unpersist()
        factors.unpersist()


if __name__ == "__main__":
    main()
