"""Benchmark: ALS top-K candidates per user, owned items excluded (`shelf candidates`), at several sizes.

Random rank-64 factors (seed --seed), users = --users-per-item x items, 5 owned items per user.
Times, in one process and one Spark session:
- shelf: `pipelines.candidates.to_als_candidates` (owned lists grouped per user, users scored in
  blocks inside each Arrow batch of mapInPandas against the item matrix in its closure, exclusions
  inside the kernel),
- numpy: `udfs.topk.top_n_dot` with the same CSR exclusions in this one process,
- naive: user x item cross join, higher-order-function dot, anti join on owned, window
  (only up to --naive-max items),
- MLlib: `ALSModel.recommendForAllUsers(K + 5)` exploded, owned items anti-joined (MLlib cannot
  exclude; 5 spare results per user make up for at most 5 owned).
Spark variants run into the `noop` sink, so no storage I/O is timed; a tiny warm-up run of each
Spark variant comes first. Prints one line per size with ratios (other / shelf) and the targets.

    .venv/bin/python -u -m benchmarks.candidates --sizes 1000 5000 10000 20000 --users-per-item 3 \
        --naive-max 1000 --mllib-max 20000
"""

# Each lambda below is called at once by timed(), inside its own loop iteration.
# ruff: noqa: B023

from __future__ import annotations

import numpy as np
import pandas as pd
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
from pipelines import candidates
from pipelines.core.config_sections import SimilarityConfig
from pipelines.core.schemas import ALS_SCORE, ITEM_IDX, USER_IDX
from udfs.topk import csr_from_lists, top_n_dot

OWNED_PER_USER = 5
WARM_UP_ITEMS = 300


def naive_candidates(users: DataFrame, items: DataFrame, owned: DataFrame, k: int) -> DataFrame:
    """Cross join + higher-order-function dot + anti join + window: quadratic in rows."""
    pairs = (
        users.alias("u")
        .crossJoin(items.alias("i"))
        .select(
            F.col(f"u.{USER_IDX}").alias(USER_IDX),
            F.col(f"i.{ITEM_IDX}").alias(ITEM_IDX),
            F.aggregate(
                F.zip_with("u.features", "i.features", lambda x, y: x * y), F.lit(0.0), lambda s, v: s + v
            ).alias(ALS_SCORE),
        )
    )
    order = Window.partitionBy(USER_IDX).orderBy(F.col(ALS_SCORE).desc(), F.col(ITEM_IDX).asc())
    unowned = pairs.join(owned, on=[USER_IDX, ITEM_IDX], how="left_anti")
    return unowned.withColumn("_n", F.row_number().over(order)).filter(F.col("_n") <= k)


def mllib_candidates(users: DataFrame, items: DataFrame, owned: DataFrame, rank: int, k: int) -> DataFrame:
    """MLlib's top-(K + 5) per user, exploded, owned items anti-joined."""
    recs = mllib_top_k(users.sparkSession, users, items, rank, k + OWNED_PER_USER)
    long = mllib_long(recs, USER_IDX, ITEM_IDX, ALS_SCORE)
    return long.join(owned, on=[USER_IDX, ITEM_IDX], how="left_anti")


def owned_frame(spark: SparkSession, owned_np: np.ndarray) -> DataFrame:
    """Cached distinct (user_idx, item_idx) owned pairs."""
    pdf = pd.DataFrame(
        {
            USER_IDX: np.repeat(np.arange(len(owned_np)), owned_np.shape[1]).astype(np.int32),
            ITEM_IDX: owned_np.ravel().astype(np.int32),
        }
    )
    df = spark.createDataFrame(pdf).distinct().cache()
    df.count()
    return df


def run_size(
    spark: SparkSession,
    n_items: int,
    n_users: int,
    rank: int,
    k: int,
    blocks: SimilarityConfig,
    rng: np.random.Generator,
    naive: bool,
    mllib: bool,
) -> tuple[float, float, float | None, float | None]:
    """(shelf, numpy, naive or None, MLlib or None) seconds at one size."""
    item_f = rng.normal(size=(n_items, rank)).astype(np.float32)
    user_f = rng.normal(size=(n_users, rank)).astype(np.float32)
    owned_np = rng.integers(0, n_items, size=(n_users, OWNED_PER_USER))
    items = factors_frame(spark, ITEM_IDX, item_f)
    users = factors_frame(spark, USER_IDX, user_f)
    owned = owned_frame(spark, owned_np)
    indptr, indices = csr_from_lists(list(owned_np))
    t_numpy = timed(lambda: top_n_dot(user_f, item_f, k, exclude_indptr=indptr, exclude_indices=indices))
    t_shelf = timed(lambda: force(candidates.to_als_candidates(users, items, owned, k, blocks)))
    t_naive = timed(lambda: force(naive_candidates(users, items, owned, k))) if naive else None
    t_mllib = timed(lambda: force(mllib_candidates(users, items, owned, rank, k))) if mllib else None
    for df in (items, users, owned):
        df.unpersist()
    return t_shelf, t_numpy, t_naive, t_mllib


def main() -> None:
    p = parser(__doc__, sizes=[5000, 20000, 50000], naive_max=1000, mllib_max=20000)
    p.add_argument("--users-per-item", type=float, default=3.0)
    p.add_argument("--k", type=int, default=200)
    args = p.parse_args()
    spark, config = bench_session()
    blocks = config.similarities
    print(
        f"candidates: rank {args.rank}, top-{args.k}, users = {args.users_per_item:g} x items, "
        f"{OWNED_PER_USER} owned per user, {spark.sparkContext.defaultParallelism} Spark cores, "
        f"blocks {blocks.block_rows} x {blocks.block_items}, numpy threads: {blas_threads()}",
        flush=True,
    )
    rng = np.random.default_rng(args.seed)
    run_size(spark, WARM_UP_ITEMS, WARM_UP_ITEMS, args.rank, args.k, blocks, rng, naive=True, mllib=True)
    for n_items in args.sizes:
        n_users = int(n_items * args.users_per_item)
        t_shelf, t_numpy, t_naive, t_mllib = run_size(
            spark,
            n_items,
            n_users,
            args.rank,
            args.k,
            blocks,
            rng,
            n_items <= args.naive_max,
            n_items <= args.mllib_max,
        )
        report(f"{n_items:>7} items x {n_users:>7} users", t_shelf, t_numpy, t_naive, t_mllib)
    spark.stop()


if __name__ == "__main__":
    main()
