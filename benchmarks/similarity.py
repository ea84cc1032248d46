"""Benchmark: top-N cosine neighbours per item (`shelf similarities`, ALS source) at several catalogue sizes.

Random rank-64 factors (seed --seed). Times, in one process and one Spark session:
- shelf: `pipelines.similarities.to_als_neighbours` (item matrix collected and broadcast, blocked
  GEMM + threshold top-N in mapInPandas over slices of the matrix),
- numpy: `udfs.topk.top_n_dot` in this one process (the kernel alone, the machine's practical limit),
- naive: item x item cross join, dot product with higher-order functions, window row_number
  (only up to --naive-max items: quadratic rows, shuffle and memory),
- MLlib: `ALSModel.recommendForAllUsers(N + 1)` (the same as recommendForAllItems here) on the
  normalised factors, exploded and with each item itself filtered out.
Spark variants run into the `noop` sink, so no storage I/O is timed; a tiny warm-up run of each
Spark variant comes first. Prints one line per size with ratios (other / shelf) and the targets.

    .venv/bin/python -u -m benchmarks.similarity --sizes 2000 5000 20000 50000 --naive-max 2000 --mllib-max 20000
"""

# Each lambda below is called at once by timed(), inside its own loop iteration.
# ruff: noqa: B023

from __future__ import annotations

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from benchmarks._common import (
    bench_session,
    blas_threads,
    factors_frame,
    force,
    mllib_long,
    mllib_top_k,
    parser,
    report,
    timed,
)
from pipelines import similarities
from pipelines.core.config_sections import SimilarityConfig
from pipelines.core.schemas import ITEM_IDX
from udfs.topk import normalise_rows, top_n_dot

WARM_UP_ITEMS = 300


def naive_neighbours(items: DataFrame, n: int) -> DataFrame:
    """Cross join + higher-order-function dot + window: the textbook way, quadratic in rows."""
    unit = items.select(
        ITEM_IDX,
        F.transform(
            "features", lambda x: x / F.sqrt(F.aggregate("features", F.lit(0.0), lambda a, v: a + v * v))
        ).alias("u"),
    )
    a, b = unit.alias("a"), unit.alias("b")
    pairs = (
        a.crossJoin(b)
        .filter(F.col(f"a.{ITEM_IDX}") != F.col(f"b.{ITEM_IDX}"))
        .select(
            F.col(f"a.{ITEM_IDX}").alias(ITEM_IDX),
            F.col(f"b.{ITEM_IDX}").alias(similarities.NEIGHBOUR_IDX),
            F.aggregate(F.zip_with("a.u", "b.u", lambda x, y: x * y), F.lit(0.0), lambda s, v: s + v).alias("score"),
        )
    )
    order = Window.partitionBy(ITEM_IDX).orderBy(F.col("score").desc(), F.col(similarities.NEIGHBOUR_IDX).asc())
    return pairs.withColumn("rank", F.row_number().over(order)).filter(F.col("rank") <= n)


def mllib_neighbours(unit_df: DataFrame, rank: int, n: int) -> DataFrame:
    """MLlib's top-(N + 1) over normalised factors, each item itself dropped."""
    recs = mllib_top_k(unit_df.sparkSession, unit_df, unit_df, rank, n + 1)
    long = mllib_long(recs, ITEM_IDX, similarities.NEIGHBOUR_IDX, "score")
    return long.filter(F.col(ITEM_IDX) != F.col(similarities.NEIGHBOUR_IDX))


def run_size(
    spark: SparkSession,
    n_items: int,
    rank: int,
    top_n: int,
    cfg: SimilarityConfig,
    rng: np.random.Generator,
    naive: bool,
    mllib: bool,
) -> tuple[float, float, float | None, float | None]:
    """(shelf, numpy, naive or None, MLlib or None) seconds at one catalogue size."""
    factors = rng.normal(size=(n_items, rank)).astype(np.float32)
    items = factors_frame(spark, ITEM_IDX, factors)
    unit = normalise_rows(factors)
    ids = np.arange(n_items)
    t_numpy = timed(lambda: top_n_dot(unit, unit, top_n, ids, query_ids=ids, exclude_self=True))
    t_shelf = timed(lambda: force(similarities.to_als_neighbours(spark, items, cfg)))
    t_naive = timed(lambda: force(naive_neighbours(items, top_n))) if naive else None
    t_mllib = None
    if mllib:
        unit_df = factors_frame(spark, ITEM_IDX, unit)
        t_mllib = timed(lambda: force(mllib_neighbours(unit_df, rank, top_n)))
        unit_df.unpersist()
    items.unpersist()
    return t_shelf, t_numpy, t_naive, t_mllib


def main() -> None:
    p = parser(__doc__, sizes=[5000, 20000, 50000], naive_max=2000, mllib_max=20000)
    p.add_argument("--top-n", type=int, default=50)
    args = p.parse_args()
    spark, config = bench_session()
    cfg = config.similarities.model_copy(update={"top_n": args.top_n})
    print(
        f"similarities: rank {args.rank}, top-{args.top_n}, {spark.sparkContext.defaultParallelism} Spark cores, "
        f"blocks {cfg.block_rows} x {cfg.block_items}, numpy threads: {blas_threads()}",
        flush=True,
    )
    rng = np.random.default_rng(args.seed)
    run_size(spark, WARM_UP_ITEMS, args.rank, args.top_n, cfg, rng, naive=True, mllib=True)
    for n_items in args.sizes:
        t_shelf, t_numpy, t_naive, t_mllib = run_size(
            spark, n_items, args.rank, args.top_n, cfg, rng, n_items <= args.naive_max, n_items <= args.mllib_max
        )
        report(f"{n_items:>7} items", t_shelf, t_numpy, t_naive, t_mllib)
    spark.stop()


if __name__ == "__main__":
    main()
