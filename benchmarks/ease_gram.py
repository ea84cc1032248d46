"""Benchmark: EASE's Gram matrix XᵀX in Spark, `pipelines.core.ease.gram_matrix` (a sparse product per task of
whole users, its partial's entries shipped as one binary row per band of matrix rows and summed per band) against
two baselines on the same input in the same session, all results compared:

- entry rows (the ninth round's version): the same partial products, one Spark row per entry, summed per
  (a, b) by a hash aggregate;
- the self-join on user it replaced first (one row per (user, item, item), then summed); `--without-self-join`
  skips it (about 3 minutes on 504k ratings).

Input: a MovieLens ratings.csv, its users tiled `--copies` times (new user ids, same ratings), binary values as
`train.ease.values` defaults to, through `pipelines.core.ease.to_ease_input`.

    .venv/bin/python -u -m benchmarks.ease_gram ../shared/data/ml-latest-small --copies 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from benchmarks._common import bench_session
from pipelines.core import ease
from pipelines.core.schemas import ITEM_IDX, USER_IDX


def self_join_gram(x: DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: every (user, item a, item b) row, summed per (a, b), collected whole."""
    a = x.select(USER_IDX, F.col(ITEM_IDX).alias("_a"), F.col("x").alias("_xa"))
    b = x.select(USER_IDX, F.col(ITEM_IDX).alias("_b"), F.col("x").alias("_xb"))
    pairs = a.join(b, on=USER_IDX).groupBy("_a", "_b").agg(F.sum(F.col("_xa") * F.col("_xb")).alias("_g"))
    pdf = pd.DataFrame(pairs.toPandas())
    ids = np.unique(pdf["_a"].to_numpy(dtype=np.int64))
    gram = np.zeros((ids.size, ids.size))
    gram[np.searchsorted(ids, pdf["_a"]), np.searchsorted(ids, pdf["_b"])] = pdf["_g"].to_numpy()
    return ids, gram


def entry_rows_gram(x: DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The ninth round's version: each task's partial upper triangle as (a, b, g) rows, summed per (a, b) in Spark."""
    ids = np.sort(pd.DataFrame(x.select(ITEM_IDX).distinct().toPandas())[ITEM_IDX].to_numpy(dtype=np.int64))

    def partial(batches):  # type: ignore[no-untyped-def]
        from scipy import sparse

        rows = pd.concat([f for f in batches if len(f)], ignore_index=True)
        users = pd.factorize(rows[USER_IDX])[0]
        cols = np.searchsorted(ids, rows[ITEM_IDX].to_numpy(dtype=np.int64))
        xs = sparse.csr_matrix((rows["x"].to_numpy(), (users, cols)), shape=(users.max() + 1, ids.size))
        gram = sparse.triu(xs.T.tocsr() @ xs, format="coo")
        yield pd.DataFrame({"_a": gram.row.astype(np.int32), "_b": gram.col.astype(np.int32), "_g": gram.data})

    entries = x.repartition(USER_IDX).mapInPandas(partial, "_a int, _b int, _g double")
    pdf = pd.DataFrame(entries.groupBy("_a", "_b").agg(F.sum("_g").alias("_g")).toPandas())
    gram = np.zeros((ids.size, ids.size))
    gram[pdf["_a"], pdf["_b"]] = gram[pdf["_b"], pdf["_a"]] = pdf["_g"].to_numpy()
    return ids, gram


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a MovieLens folder with ratings.csv")
    p.add_argument("--copies", type=int, default=5)
    p.add_argument("--without-self-join", action="store_true", help="skip the slowest baseline")
    args = p.parse_args()
    spark, _ = bench_session()
    ratings = pd.read_csv(args.folder / "ratings.csv")
    tiled = pd.concat([ratings.assign(userId=ratings.userId + c * 10_000_000) for c in range(args.copies)])
    events = spark.createDataFrame(
        tiled.rename(columns={"userId": USER_IDX, "movieId": ITEM_IDX})[[USER_IDX, ITEM_IDX]].astype("int32")
    )
    x = ease.to_ease_input(events, "binary").cache()
    pairs = x.count()
    degrees = tiled.groupby("userId").size().to_numpy(dtype=np.int64)
    print(f"{pairs:,} (user, item) pairs, {len(degrees):,} users; the self-join's rows: {int((degrees**2).sum()):,}")
    started = time.perf_counter()
    got = ease.gram_matrix(x, max_items=100_000)
    shelf = time.perf_counter() - started
    assert got is not None
    print(f"gram_matrix (sparse product per task): {shelf:.1f} s for {got[0].size:,} items")
    started = time.perf_counter()
    ids, gram = entry_rows_gram(x)
    rows = time.perf_counter() - started
    assert np.array_equal(ids, got[0]) and np.allclose(gram, got[1], rtol=1e-12)
    print(f"entry rows summed by a hash aggregate (the ninth round's): {rows:.1f} s; same matrix; "
          f"entry rows / gram_matrix: {rows / shelf:.1f}x")  # fmt: skip
    if args.without_self_join:
        return
    started = time.perf_counter()
    ids, gram = self_join_gram(x)
    baseline = time.perf_counter() - started
    print(f"self-join on user (the first baseline): {baseline:.1f} s")
    assert np.array_equal(ids, got[0]) and np.allclose(gram, got[1], rtol=1e-12)
    print(f"same matrix; self-join / gram_matrix: {baseline / shelf:.1f}x")


if __name__ == "__main__":
    main()
