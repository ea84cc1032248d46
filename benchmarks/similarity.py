"""Benchmark: top-N cosine neighbours per item at three catalogue sizes.

Compares, on random rank-64 factors:
- shelf: `pipelines.similarities.to_als_neighbours` (broadcast matrix + blocked GEMM in mapInPandas),
- numpy: `udfs.topk.top_n_dot` in one process (the kernel alone),
- naive Spark: item x item cross join, dot product with higher-order functions, window row_number
  (only up to --naive-max items: it is quadratic in rows, shuffles and memory),
- MLlib-like: MLlib's own blocked top-k (`ALSModel.recommendForAllUsers`) on normalised factors,
  asking N + 1 to drop each item itself.

Spark variants are forced with the `noop` sink, so no storage I/O is timed.

    .venv/bin/python -m benchmarks.similarity --sizes 5000 20000 50000 --rank 64 --top-n 50
"""

# Each lambda below is called at once by timed(), inside its own loop iteration.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from pipelines.core.config import load_config
from pipelines.core.session import get_spark
from udfs.topk import normalise_rows, top_n_dot


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def factors_frame(spark: SparkSession, key: str, factors: np.ndarray) -> DataFrame:
    """A cached factor table (key int, features array<float>) like gold.*_factors."""
    pdf = pd.DataFrame({key: np.arange(len(factors), dtype=np.int32), "features": list(factors.astype(np.float32))})
    df = spark.createDataFrame(pdf, f"{key} int, features array<float>").withColumn("run_id", F.lit("bench")).cache()
    df.count()
    return df


def force(df: DataFrame) -> None:
    df.write.format("noop").mode("overwrite").save()


def mllib_top_k(spark: SparkSession, queries: DataFrame, items: DataFrame, rank: int, k: int) -> DataFrame:
    """MLlib's ALSModel.recommendForAllUsers on arbitrary factor tables (id int, features array<float>)."""
    from pyspark.ml.recommendation import ALSModel

    jvm = spark.sparkContext._jvm
    assert jvm is not None
    java_model = jvm.org.apache.spark.ml.recommendation.ALSModel(
        "bench_als",
        rank,
        queries.select(F.col(queries.columns[0]).alias("id"), "features")._jdf,
        items.select(F.col(items.columns[0]).alias("id"), "features")._jdf,
    )
    java_model.setUserCol("user").setItemCol("item")  # the Java model has no defaults for these
    return ALSModel(java_model).recommendForAllUsers(k)


def naive_neighbours(items: DataFrame, n: int) -> DataFrame:
    """Cross join + higher-order-function dot + window: the textbook way, quadratic in rows."""
    unit = items.select(
        "item_idx",
        F.transform(
            "features", lambda x: x / F.sqrt(F.aggregate("features", F.lit(0.0), lambda a, v: a + v * v))
        ).alias("u"),
    )
    a, b = unit.alias("a"), unit.alias("b")
    pairs = (
        a.crossJoin(b)
        .filter(F.col("a.item_idx") != F.col("b.item_idx"))
        .select(
            F.col("a.item_idx").alias("item_idx"),
            F.col("b.item_idx").alias("neighbour_idx"),
            F.aggregate(F.zip_with("a.u", "b.u", lambda x, y: x * y), F.lit(0.0), lambda s, v: s + v).alias("score"),
        )
    )
    order = Window.partitionBy("item_idx").orderBy(F.col("score").desc(), F.col("neighbour_idx").asc())
    return pairs.withColumn("rank", F.row_number().over(order)).filter(F.col("rank") <= n)


def ratio(t: float | None, base: float) -> str:
    return "n/a" if t is None else f"{t:8.2f}s ({t / base:5.1f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--top-n", type=int, default=50)
    parser.add_argument("--naive-max", type=int, default=5000)
    parser.add_argument("--mllib-max", type=int, default=50000)
    args = parser.parse_args()

    from pipelines import similarities

    root = tempfile.mkdtemp(prefix="shelf-bench-")
    config = load_config("conf/local.yaml", [f"storage.root={root}", "spark.jars_dir=.jars"])
    spark = get_spark(config)
    cores = spark.sparkContext.defaultParallelism
    print(
        f"similarities: rank {args.rank}, top-{args.top_n}, {cores} Spark cores, blocks "
        f"{config.similarities.block_rows}x{config.similarities.block_items}"
    )
    cfg = config.similarities.model_copy(update={"top_n": args.top_n})
    rng = np.random.default_rng(42)
    for n_items in args.sizes:
        factors = rng.normal(size=(n_items, args.rank)).astype(np.float32)
        items = factors_frame(spark, "item_idx", factors)
        unit = normalise_rows(factors)
        ids = np.arange(n_items)
        t_numpy = timed(lambda: top_n_dot(unit, unit, args.top_n, ids, query_ids=ids, exclude_self=True))
        t_shelf = timed(lambda: force(similarities.to_als_neighbours(spark, items, cfg)))
        t_naive = None
        if n_items <= args.naive_max:
            t_naive = timed(lambda: force(naive_neighbours(items, args.top_n)))
        t_mllib = None
        if n_items <= args.mllib_max:
            unit_df = factors_frame(spark, "item_idx", unit)
            t_mllib = timed(lambda: force(mllib_top_k(spark, unit_df, unit_df, args.rank, args.top_n + 1)))
            unit_df.unpersist()
        items.unpersist()
        print(
            f"{n_items:>7} items | numpy {t_numpy:7.2f}s | shelf {ratio(t_shelf, t_numpy)} | "
            f"naive cross join {ratio(t_naive, t_numpy)} | MLlib-like {ratio(t_mllib, t_numpy)} | "
            f"naive/shelf {'n/a' if t_naive is None else f'{t_naive / t_shelf:.1f}x'} | "
            f"MLlib/shelf {'n/a' if t_mllib is None else f'{t_mllib / t_shelf:.1f}x'}",
            flush=True,
        )
    spark.stop()


if __name__ == "__main__":
    main()
