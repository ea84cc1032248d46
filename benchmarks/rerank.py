"""Re-rank throughput: users/s of the batched kernel in Spark vs per-user applyInPandas vs one process.

    .venv/bin/python -m benchmarks.rerank [--sizes 500 2000 8000] [--candidates 100] [--items 5000]

Synthetic user rows (the columns of `pipelines.core.reranking.to_user_rows`) are built in memory, so the
figures measure the re-rank itself, not Delta I/O:
- spark batched:  `to_reranked` (mapInPandas, one kernel call per Arrow batch of users);
- spark per user: the same adapter once per user via `groupBy(user_idx).applyInPandas`;
- in process:     `rerank_frame` on the whole pandas frame, no Spark.
Each Spark figure forces the full output with a `noop` write.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession

from pipelines.core import reranking as step
from pipelines.core.config import load_config
from pipelines.core.session import get_spark
from udfs.rerank import ItemTable, RerankParams


def synthetic(users: int, candidates: int, items: int, rank: int, seed: int = 0) -> tuple[pd.DataFrame, ItemTable]:
    rng = np.random.default_rng(seed)
    table = ItemTable.plain(
        np.arange(items),
        rng.normal(size=(items, rank)) / np.sqrt(rank),
        popularity=rng.random(items),
        promo=rng.random(items) < 0.05,
        new_arrival=rng.random(items) < 0.05,
        in_stock=rng.random(items) < 0.95,
        category=rng.integers(0, 20, items),
    )
    rows = []
    for u in range(users):
        cands = np.sort(rng.choice(items, candidates, replace=False))
        n_ev = int(rng.integers(0, 20))
        rows.append(
            {
                step.USER_IDX: u,
                step.FEATURES: (rng.normal(size=rank) / np.sqrt(rank)).astype(np.float32).tolist(),
                step.CAND_ITEMS: cands.tolist(),
                step.CAND_ALS: (rng.random(candidates) < 0.7).tolist(),
                step.EV_ITEMS: rng.choice(items, n_ev).tolist(),
                step.EV_WEIGHTS: rng.choice([1.0, 3.0, 5.0], n_ev).tolist(),
                step.EV_AGES: np.sort(rng.random(n_ev) * 7.0).tolist(),
                step.EV_BOUGHT: (rng.random(n_ev) < 0.1).tolist(),
            }
        )
    return pd.DataFrame(rows), table


USER_ROWS_SCHEMA = (
    "user_idx int, features array<float>, cand_items array<int>, cand_als array<boolean>, "
    "ev_items array<int>, ev_weights array<double>, ev_ages array<double>, ev_bought array<boolean>"
)


def noop_seconds(frame: DataFrame) -> float:
    """Seconds to compute every row of `frame` (Spark's noop sink)."""
    started = time.perf_counter()
    frame.write.format("noop").mode("overwrite").save()
    return time.perf_counter() - started


def per_user_frame(spark: SparkSession, frame: DataFrame, items: ItemTable, params: RerankParams) -> DataFrame:
    """The same adapter, one Python call per user (groupBy user_idx + applyInPandas)."""
    model = spark.sparkContext.broadcast(items)

    def one(pdf_user: pd.DataFrame) -> pd.DataFrame:
        return step.rerank_frame(pdf_user, model.value, params)

    return frame.groupBy(step.USER_IDX).applyInPandas(one, step.KERNEL_SCHEMA)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--per-user-max", type=int, default=2000, help="skip per-user Spark above this size")
    args = parser.parse_args()
    config = load_config("conf/local.yaml")
    spark = get_spark(config)
    params = step.params_from(config.rerank)
    buckets = int(spark.conf.get("spark.sql.shuffle.partitions") or 4)
    print(
        "| users | spark batched users/s | spark per-user users/s | in-process users/s "
        "| batched / per-user | batched / in-process |"
    )
    print("|---|---|---|---|---|---|")
    for users in args.sizes:
        pdf, items = synthetic(users, args.candidates, args.items, args.rank)
        frame = spark.createDataFrame(pdf, USER_ROWS_SCHEMA).cache()
        frame.count()
        started = time.perf_counter()
        step.rerank_frame(pdf, items, params)
        local = users / (time.perf_counter() - started)
        batched = users / noop_seconds(step.to_reranked(spark, frame, items, params, buckets))
        per_user = float("nan")
        if users <= args.per_user_max:
            per_user = users / noop_seconds(per_user_frame(spark, frame, items, params))
        frame.unpersist()
        print(
            f"| {users} | {batched:,.0f} | {per_user:,.0f} | {local:,.0f} | {batched / per_user:.1f}x | "
            f"{batched / local:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
