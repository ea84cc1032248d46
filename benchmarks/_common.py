"""Set-up shared by benchmarks/similarity.py and benchmarks/candidates.py.

A throw-away Spark session (conf/local.yaml, tables in a temp dir), cached random factor tables
shaped like gold.*_factors, the `noop` sink that forces a plan without storage I/O, MLlib's
blocked top-k on arbitrary factor tables, and the lines that print ratios and the issue's targets.
Nothing is written outside the temp dir.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import load_config
from pipelines.core.session import get_spark

# Targets of issue 5, as ratios of the other variant's time to shelf's.
NUMPY_TARGET = 0.5  # shelf within 2x of single-process numpy: numpy / shelf >= 0.5
MLLIB_TARGET = 5.0
NAIVE_TARGET = 20.0


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def parser(doc: str | None, sizes: list[int], naive_max: int, mllib_max: int) -> argparse.ArgumentParser:
    """The options both benchmarks take; each adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=sizes, help="catalogue sizes (items)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--naive-max", type=int, default=naive_max, help="largest size the cross join runs at")
    p.add_argument("--mllib-max", type=int, default=mllib_max, help="largest size MLlib's top-k runs at")
    p.add_argument("--seed", type=int, default=42)
    return p


def bench_session() -> tuple[SparkSession, ShelfConfig]:
    """shelf's own session builder on conf/local.yaml, with tables in a fresh temp dir."""
    root = tempfile.mkdtemp(prefix="shelf-bench-")
    config = load_config("conf/local.yaml", [f"storage.root={root}", "spark.jars_dir=.jars"])
    return get_spark(config), config


def blas_threads() -> str:
    """The driver's BLAS thread setting (Spark's Python workers get OMP_NUM_THREADS = task cpus = 1)."""
    return os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "BLAS default (all cores)"


def factors_frame(spark: SparkSession, key: str, factors: np.ndarray) -> DataFrame:
    """A cached factor table (key int, features array<float>, run_id) like gold.*_factors."""
    pdf = pd.DataFrame({key: np.arange(len(factors), dtype=np.int32), "features": list(factors.astype(np.float32))})
    df = spark.createDataFrame(pdf, f"{key} int, features array<float>").withColumn("run_id", F.lit("bench")).cache()
    df.count()
    return df


def force(df: DataFrame) -> None:
    """Run the whole plan, writing nothing."""
    df.write.format("noop").mode("overwrite").save()


def mllib_top_k(spark: SparkSession, queries: DataFrame, items: DataFrame, rank: int, k: int) -> DataFrame:
    """MLlib's ALSModel.recommendForAllUsers(k) on arbitrary factor tables (id int, features array<float>).

    Returns MLlib's frame: user int, recommendations array<struct<item int, rating float>>.
    """
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


def mllib_long(recs: DataFrame, key: str, item: str, score: str) -> DataFrame:
    """MLlib's nested recommendations as one row per (key, item, score)."""
    return recs.select(F.col("user").alias(key), F.explode("recommendations").alias("_r")).select(
        key, F.col("_r.item").alias(item), F.col("_r.rating").alias(score)
    )


def seconds(t: float | None) -> str:
    return "skipped" if t is None else f"{t:.2f}s"


def speedup(other: float | None, shelf: float) -> str:
    """How many times shelf is faster than `other` (other / shelf)."""
    return "n/a" if other is None else f"{other / shelf:.1f}x"


def report(label: str, t_shelf: float, t_numpy: float, t_naive: float | None, t_mllib: float | None) -> None:
    """One line of times, ratios (other / shelf) and whether each of the issue's targets is met."""
    checks = [f"numpy within 2x: {'met' if t_numpy / t_shelf >= NUMPY_TARGET else 'MISSED'}"]
    if t_mllib is not None:
        checks.append(f"MLlib >= {MLLIB_TARGET:g}x: {'met' if t_mllib / t_shelf >= MLLIB_TARGET else 'MISSED'}")
    if t_naive is not None:
        checks.append(f"naive >= {NAIVE_TARGET:g}x: {'met' if t_naive / t_shelf >= NAIVE_TARGET else 'MISSED'}")
    print(
        f"{label} | shelf {seconds(t_shelf)} | numpy {seconds(t_numpy)} | naive cross join {seconds(t_naive)} | "
        f"MLlib {seconds(t_mllib)} | numpy/shelf {speedup(t_numpy, t_shelf)} | "
        f"naive/shelf {speedup(t_naive, t_shelf)} | MLlib/shelf {speedup(t_mllib, t_shelf)} | " + "; ".join(checks),
        flush=True,
    )


def blas_in_use(spark: SparkSession) -> str:
    """Name of the BLAS MLlib uses (native OpenBLAS vs the pure-JVM fallback); a classic session only."""
    try:
        jvm = spark.sparkContext._jvm
        assert jvm is not None
        return str(jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getName())
    except Exception:  # noqa: BLE001 - best effort, only for the printed line
        return "unknown"
