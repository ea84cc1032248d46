"""Re-rank throughput: users/s of the re-rank step in Spark vs per-user applyInPandas vs one process.

    .venv/bin/python -u -m benchmarks.rerank [--sizes 10000 50000 200000] [--per-user-max 200000]
        [--candidates 100] [--items 5000] [--rank 32] [--set rerank.mmr_lambda=0.7 ...]

Reads and writes no table: synthetic user rows (the columns of `pipelines.core.reranking.to_user_rows`)
are generated with numpy straight into an Arrow table (no per-user Python), handed to Spark with
`createDataFrame(pyarrow.Table)` and cached, so the figures measure the re-rank itself:
- step:          `to_reranked` (hash-partitioned by user into `spark.sql.shuffle.partitions` buckets,
                 `mapInPandas`, one kernel call per run of `KERNEL_CANDIDATES` candidates of an Arrow batch);
- per user (a):  the same adapter once per user via `groupBy(user_idx).applyInPandas`;
- in process (b): `rerank_frame` on the same rows (as pandas, like mapInPandas sees them) in the same
                 kernel-sized runs, no Spark, one core.
Each Spark figure forces the full output with a `noop` write. Output grain: one table row per size with
the three rates, the two ratios and whether the issue's targets (>= 20x (a), within 3x of (b)) are met.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession

from pipelines.core import kernel_frames
from pipelines.core import reranking as step
from pipelines.core.config_loading import load_config
from pipelines.core.schemas import USER_IDX
from pipelines.core.session import get_spark
from udfs.rerank import ItemTable, RerankParams

PER_USER_TARGET = 20.0  # the step's users/s over the per-user variant's, at least
IN_PROCESS_TARGET = 3.0  # the in-process users/s over the step's, at most
MAX_EVENTS = 20  # fresh events per user: 0 .. MAX_EVENTS - 1


def synthetic_items(items: int, rank: int, rng: np.random.Generator) -> ItemTable:
    """A catalogue of `items` with random factors, 20 categories, 5% promo / new, 95% in stock."""
    return ItemTable.plain(
        np.arange(items),
        rng.normal(size=(items, rank)) / np.sqrt(rank),
        popularity=rng.random(items),
        promo=rng.random(items) < 0.05,
        new_arrival=rng.random(items) < 0.05,
        in_stock=rng.random(items) < 0.95,
        category=rng.integers(0, 20, items),
    )


def _lists(values: np.ndarray, indptr: np.ndarray, null: np.ndarray | None = None) -> pa.ListArray:
    """A list column from flat values and (m + 1,) offsets; `null` (m,) marks null rows."""
    mask = pa.array(null) if null is not None else None
    return pa.ListArray.from_arrays(pa.array(indptr.astype(np.int32)), pa.array(values), mask=mask)


def synthetic_rows(users: int, candidates: int, items: int, rank: int, rng: np.random.Generator) -> pa.Table:
    """One row per user: `candidates` distinct items (ascending), 70% proposed by ALS, a factor vector, and
    0 .. MAX_EVENTS - 1 fresh events (null arrays when none, like the left join of `to_user_rows`)."""
    draws = np.sort(rng.integers(0, items - candidates + 1, (users, candidates)), axis=1)
    cands = (draws + np.arange(candidates)).astype(np.int32)  # sorted draws + 0..c-1: distinct, ascending
    cand_ptr = np.arange(users + 1, dtype=np.int64) * candidates
    n_ev = rng.integers(0, MAX_EVENTS, users)
    ev_ptr = np.r_[0, np.cumsum(n_ev)]
    total = int(ev_ptr[-1])
    ev_rows = np.repeat(np.arange(users), n_ev)
    ages = rng.random(total) * 7.0
    ages = ages[np.lexsort((ages, ev_rows))]  # each user's events by age
    no_events = n_ev == 0
    return pa.table(
        {
            USER_IDX: pa.array(np.arange(users, dtype=np.int32)),
            step.FEATURES: _lists(
                (rng.normal(size=users * rank) / np.sqrt(rank)).astype(np.float32),
                np.arange(users + 1, dtype=np.int64) * rank,
            ),
            step.CAND_ITEMS: _lists(cands.ravel(), cand_ptr),
            step.CAND_ALS: _lists(rng.random(users * candidates) < 0.7, cand_ptr),
            step.EV_ITEMS: _lists(rng.integers(0, items, total).astype(np.int32), ev_ptr, no_events),
            step.EV_WEIGHTS: _lists(rng.choice([1.0, 3.0, 5.0], total), ev_ptr, no_events),
            step.EV_AGES: _lists(ages, ev_ptr, no_events),
            step.EV_BOUGHT: _lists(rng.random(total) < 0.1, ev_ptr, no_events),
        }
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
        return kernel_frames.rerank_frame(pdf_user, model.value, params)

    return frame.groupBy(USER_IDX).applyInPandas(one, step.KERNEL_SCHEMA)


def in_process_seconds(rows: pa.Table, items: ItemTable, params: RerankParams) -> float:
    """Seconds of `rerank_frame` over all rows in kernel-sized runs, one process (pandas conversion excluded)."""
    pdf = rows.to_pandas()
    started = time.perf_counter()
    for chunk in kernel_frames.kernel_chunks(pdf):
        kernel_frames.rerank_frame(chunk, items, params)
    return time.perf_counter() - started


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--per-user-max", type=int, default=200_000, help="skip the per-user variant above this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. rerank.mmr_lambda=0.7 (repeatable)",
    )
    args = parser.parse_args()
    config = load_config("conf/local.yaml", args.overrides)
    spark = get_spark(config)
    params = step.params_from(config.rerank)
    buckets = config.rerank.buckets or int(spark.conf.get("spark.sql.shuffle.partitions") or 4)
    rng = np.random.default_rng(args.seed)
    items = synthetic_items(args.items, args.rank, rng)
    print(
        f"# {spark.sparkContext.defaultParallelism} cores, {buckets} user buckets, "
        f"arrow maxRecordsPerBatch {spark.conf.get('spark.sql.execution.arrow.maxRecordsPerBatch')}, "
        f"<= {kernel_frames.KERNEL_CANDIDATES} candidates per kernel call; {args.candidates} candidates per user, "
        f"{args.items} items, rank {args.rank}, mmr_lambda {params.mmr_lambda}, mmr_pool {params.mmr_pool}, "
        f"top_k {params.top_k}, category_cap {params.category_cap}",
        flush=True,
    )
    warm = spark.createDataFrame(synthetic_rows(200, args.candidates, args.items, args.rank, rng)).cache()
    noop_seconds(step.to_reranked(spark, warm, items, params, buckets))  # start the Python workers once
    noop_seconds(per_user_frame(spark, warm, items, params))
    warm.unpersist()
    print(
        "| users | step users/s | per-user (a) users/s | in-process (b) users/s | step / (a) | step / (b) "
        f"| >= {PER_USER_TARGET:.0f}x (a) | within {IN_PROCESS_TARGET:.0f}x of (b) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|---|", flush=True)
    for users in args.sizes:
        started = time.perf_counter()
        rows = synthetic_rows(users, args.candidates, args.items, args.rank, rng)
        frame = spark.createDataFrame(rows).cache()
        frame.count()
        setup = time.perf_counter() - started
        local = users / in_process_seconds(rows, items, params)
        batched = users / noop_seconds(step.to_reranked(spark, frame, items, params, buckets))
        per_user = float("nan")
        if users <= args.per_user_max:
            per_user = users / noop_seconds(per_user_frame(spark, frame, items, params))
        frame.unpersist()
        vs_per_user = batched / per_user
        vs_local = batched / local
        per_user_ok = "n/a" if np.isnan(per_user) else verdict(vs_per_user >= PER_USER_TARGET)
        print(
            f"| {users:,} | {batched:,.0f} | {per_user:,.0f} | {local:,.0f} | {vs_per_user:.1f}x | {vs_local:.2f}x "
            f"| {per_user_ok} | {verdict(vs_local >= 1.0 / IN_PROCESS_TARGET)} |",
            flush=True,
        )
        print(f"#   input generation + cache for {users:,} users: {setup:.1f} s", flush=True)


if __name__ == "__main__":
    main()
