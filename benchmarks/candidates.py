"""Benchmark: ALS top-K candidates per user, excluding owned items, at three catalogue sizes.

Random rank-64 factors with users = 2 x items and 5 owned items per user. Compares:
- shelf: `pipelines.candidates.to_als_candidates` (owned lists grouped per user, blocked GEMM in
  mapInPandas against the broadcast item matrix, exclusions inside the kernel),
- numpy: `udfs.topk.top_n_dot` with the same CSR exclusions in one process,
- naive Spark: user x item cross join, higher-order-function dot, anti join on owned, window
  (only up to --naive-max items),
- MLlib-like: `ALSModel.recommendForAllUsers(K + 5)` (MLlib cannot exclude, so it asks 5 more and
  filters owned afterwards).

    .venv/bin/python -m benchmarks.candidates --sizes 5000 20000 50000 --rank 64 --k 200
"""

# Each lambda below is called at once by timed(), inside its own loop iteration.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from benchmarks.similarity import factors_frame, force, mllib_top_k, ratio, timed
from pipelines.core.config import load_config
from pipelines.core.session import get_spark
from udfs.topk import csr_from_lists, top_n_dot

OWNED_PER_USER = 5


def naive_candidates(users: DataFrame, items: DataFrame, owned: DataFrame, k: int) -> DataFrame:
    pairs = (
        users.alias("u")
        .crossJoin(items.alias("i"))
        .select(
            F.col("u.user_idx").alias("user_idx"),
            F.col("i.item_idx").alias("item_idx"),
            F.aggregate(
                F.zip_with("u.features", "i.features", lambda x, y: x * y), F.lit(0.0), lambda s, v: s + v
            ).alias("als_score"),
        )
    )
    order = Window.partitionBy("user_idx").orderBy(F.col("als_score").desc(), F.col("item_idx").asc())
    unowned = pairs.join(owned, on=["user_idx", "item_idx"], how="left_anti")
    return unowned.withColumn("_n", F.row_number().over(order)).filter(F.col("_n") <= k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--users-per-item", type=float, default=2.0)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--naive-max", type=int, default=5000)
    parser.add_argument("--mllib-max", type=int, default=50000)
    args = parser.parse_args()

    from pipelines import candidates

    root = tempfile.mkdtemp(prefix="shelf-bench-")
    config = load_config("conf/local.yaml", [f"storage.root={root}", "spark.jars_dir=.jars"])
    spark = get_spark(config)
    print(
        f"candidates: rank {args.rank}, top-{args.k}, users = {args.users_per_item:g} x items, "
        f"{OWNED_PER_USER} owned per user, {spark.sparkContext.defaultParallelism} Spark cores"
    )
    rng = np.random.default_rng(42)
    for n_items in args.sizes:
        n_users = int(n_items * args.users_per_item)
        item_f = rng.normal(size=(n_items, args.rank)).astype(np.float32)
        user_f = rng.normal(size=(n_users, args.rank)).astype(np.float32)
        owned_np = rng.integers(0, n_items, size=(n_users, OWNED_PER_USER))
        items = factors_frame(spark, "item_idx", item_f)
        users = factors_frame(spark, "user_idx", user_f)
        owned = (
            spark.createDataFrame(
                pd.DataFrame(
                    {
                        "user_idx": np.repeat(np.arange(n_users), OWNED_PER_USER).astype(np.int32),
                        "item_idx": owned_np.ravel().astype(np.int32),
                    }
                )
            )
            .distinct()
            .cache()
        )
        owned.count()
        indptr, indices = csr_from_lists(list(owned_np))
        t_numpy = timed(lambda: top_n_dot(user_f, item_f, args.k, exclude_indptr=indptr, exclude_indices=indices))
        t_shelf = timed(
            lambda: force(candidates.to_als_candidates(spark, users, items, owned, args.k, config.similarities))
        )
        t_naive = None
        if n_items <= args.naive_max:
            t_naive = timed(lambda: force(naive_candidates(users, items, owned, args.k)))
        t_mllib = None
        if n_items <= args.mllib_max:

            def mllib() -> None:
                recs = mllib_top_k(spark, users, items, args.rank, args.k + OWNED_PER_USER)
                flat = recs.select(F.col("user").alias("user_idx"), F.explode("recommendations").alias("r")).select(
                    "user_idx", F.col("r.item").alias("item_idx"), F.col("r.rating").alias("als_score")
                )
                force(flat.join(owned, on=["user_idx", "item_idx"], how="left_anti"))

            t_mllib = timed(mllib)
        for df in (items, users, owned):
            df.unpersist()
        print(
            f"{n_items:>7} items x {n_users:>7} users | numpy {t_numpy:7.2f}s | "
            f"shelf {ratio(t_shelf, t_numpy)} | "
            f"naive cross join {ratio(t_naive, t_numpy)} | MLlib-like {ratio(t_mllib, t_numpy)} | "
            f"naive/shelf {'n/a' if t_naive is None else f'{t_naive / t_shelf:.1f}x'} | "
            f"MLlib/shelf {'n/a' if t_mllib is None else f'{t_mllib / t_shelf:.1f}x'}",
            flush=True,
        )
    spark.stop()


if __name__ == "__main__":
    main()
