"""The re-rank kernel's pandas side: user rows (one per user: factors, capped candidates, fresh events as
arrays) -> udfs.rerank's segment arrays -> KERNEL_SCHEMA rows, inside `mapInPandas`, in calls of bounded size.
Shared by `shelf rerank`, the replay protocol and `shelf stream`; the Spark side is pipelines.core.reranking."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import ArrayType, DoubleType, IntegerType, StringType, StructField, StructType

from pipelines.core.schemas import FEATURES, ITEM_IDX, RANK, REASONS, SCORE, USER_IDX
from udfs.rerank import ItemTable, RerankParams, UserBatch, reason_lists, rerank

CAND_ITEMS, CAND_ALS, CAND_EASE, CAND_REBUY = "cand_items", "cand_als", "cand_ease", "cand_rebuy"
EV_ITEMS, EV_WEIGHTS, EV_AGES, EV_BOUGHT = "ev_items", "ev_weights", "ev_ages", "ev_bought"
EVENT_COLUMNS = (EV_ITEMS, EV_WEIGHTS, EV_AGES, EV_BOUGHT)
KERNEL_CANDIDATES = 1 << 18  # candidates per kernel call (see kernel_chunks)

KERNEL_SCHEMA = StructType(
    [
        StructField(USER_IDX, IntegerType(), False),
        StructField(ITEM_IDX, IntegerType(), False),
        StructField(RANK, IntegerType(), False),
        StructField(SCORE, DoubleType(), False),
        StructField(REASONS, ArrayType(StringType(), False), False),
    ]
)


def segments(column: pd.Series, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(indptr (m + 1,), values) from a column of arrays (None = empty)."""
    lengths = np.fromiter((0 if v is None else len(v) for v in column), dtype=np.int64, count=len(column))
    indptr = np.zeros(len(column) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    parts: list[np.ndarray] = [np.asarray(v, dtype=dtype) for v in column if v is not None and len(v)]
    return indptr, (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))


def to_user_batch(pdf: pd.DataFrame, rank: int) -> UserBatch:
    """A pandas batch of user rows (to_user_rows' columns) as the kernel's segment arrays."""
    has = np.fromiter((v is not None for v in pdf[FEATURES]), dtype=bool, count=len(pdf))
    factors = np.zeros((len(pdf), rank), dtype=np.float32)
    if has.any():
        factors[has] = np.stack([np.asarray(v, dtype=np.float32) for v in pdf[FEATURES][has]])
    cand_ptr, cand_items = segments(pdf[CAND_ITEMS], np.int64)
    _, cand_als = segments(pdf[CAND_ALS], np.bool_)
    ev_ptr, ev_items = segments(pdf[EV_ITEMS], np.int64)
    _, ev_weights = segments(pdf[EV_WEIGHTS], np.float64)
    _, ev_ages = segments(pdf[EV_AGES], np.float64)
    _, ev_bought = segments(pdf[EV_BOUGHT], np.bool_)
    cand_ease = segments(pdf[CAND_EASE], np.float64)[1] if CAND_EASE in pdf.columns else None
    cand_rebuy = segments(pdf[CAND_REBUY], np.float64)[1] if CAND_REBUY in pdf.columns else None
    return UserBatch(
        factors,
        has,
        cand_ptr,
        cand_items,
        cand_als,
        ev_ptr,
        ev_items,
        ev_weights,
        ev_ages,
        ev_bought,
        cand_ease,
        cand_rebuy,
    )


def rerank_frame(
    pdf: pd.DataFrame,
    items: ItemTable,
    params: RerankParams,
    name_items: Callable[[np.ndarray], np.ndarray] | None = None,
) -> pd.DataFrame:
    """pandas adapter: user rows -> KERNEL_SCHEMA rows with exactly its dtypes (int32, double, lists).

    `name_items`: how a similar_to reason names its item (udfs.rerank.reason_lists; default the dense id)."""
    result = rerank(items, to_user_batch(pdf, items.factors.shape[1]), params)
    users = pdf[USER_IDX].to_numpy(dtype=np.int64)
    return pd.DataFrame(
        {
            USER_IDX: users[result.user_rows].astype(np.int32),
            ITEM_IDX: result.items.astype(np.int32),
            RANK: result.ranks.astype(np.int32),
            SCORE: result.scores.astype(np.float64),
            REASONS: pd.Series(reason_lists(result, name_items), dtype=object),
        }
    )


def rerank_batches(batches: Iterable[pd.DataFrame], table: ItemTable, params: RerankParams) -> Iterator[pd.DataFrame]:
    """mapInPandas body: one kernel call per run of at most KERNEL_CANDIDATES candidates of an Arrow batch."""
    for pdf in batches:
        for chunk in kernel_chunks(pdf):
            yield rerank_frame(chunk, table, params)


def kernel_chunks(pdf: pd.DataFrame, max_candidates: int | None = None) -> list[pd.DataFrame]:
    """`pdf` (user rows) cut into runs of whole users with at most `max_candidates` (default KERNEL_CANDIDATES)
    candidates each, a user with more standing alone; no run when `pdf` is empty.

    The kernel's memory grows with the candidates of one call (several candidates x rank float64 blocks, plus
    the candidate x fresh-item pairs), while an Arrow batch is sized in users
    (`spark.sql.execution.arrow.maxRecordsPerBatch`, 10,000 by default). At 100 candidates per user and rank
    32 one call peaks at ~1.3 GB of numpy memory for 10,000 users and ~340 MB for 262k candidates (2,621
    users), per Python worker; smaller calls cost nothing in throughput (the per-call overhead is
    O(catalogue), under a millisecond for 5k items).
    """
    cap = max_candidates or KERNEL_CANDIDATES
    sizes = np.fromiter((0 if v is None else len(v) for v in pdf[CAND_ITEMS]), dtype=np.int64, count=len(pdf))
    ends = np.cumsum(sizes)
    starts = [0]
    while starts[-1] < len(pdf):
        done = int(ends[starts[-1] - 1]) if starts[-1] else 0
        starts.append(max(int(np.searchsorted(ends, done + cap, side="right")), starts[-1] + 1))
    return [pdf.iloc[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def to_reranked(
    spark: SparkSession, user_rows: DataFrame, items: ItemTable, params: RerankParams, buckets: int
) -> DataFrame:
    """Kernel output for every user row: user_idx, item_idx, rank, score, reasons.

    The item table rides in the function's closure (pyspark broadcasts a large pickled function itself), so no
    SparkContext is needed and it runs over Spark Connect.
    """
    spread = user_rows.repartition(buckets, USER_IDX)
    return spread.mapInPandas(lambda it: rerank_batches(it, items, params), KERNEL_SCHEMA)
