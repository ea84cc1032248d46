"""The re-rank kernel's pandas side: user rows (one per user: factors, capped candidates, fresh events as
arrays) -> udfs.rerank's segment arrays -> KERNEL_SCHEMA rows, inside `mapInPandas`, in calls of bounded size.
Shared by `shelf rerank`, the replay protocol and `shelf stream`; the Spark side is pipelines.core.reranking."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipelines.core.columns import (
    CATEGORY,
    FEATURES,
    IN_STOCK,
    ITEM_ID,
    ITEM_IDX,
    PRICE,
    PROMO,
    RANK,
    REASONS,
    SCORE,
    USER_IDX,
)
from pipelines.core.config_sections import RerankConfig
from pipelines.core.errors import InputDataError

if TYPE_CHECKING:  # only a type: this module imports no Spark (shelf serve uses it)
    from pyspark.sql import DataFrame

from udfs.rerank import ItemTable, RerankParams, UserBatch, reason_lists, rerank

CAND_ITEMS, CAND_ALS, CAND_EASE, CAND_REBUY = "cand_items", "cand_als", "cand_ease", "cand_rebuy"
EV_ITEMS, EV_WEIGHTS, EV_AGES, EV_BOUGHT = "ev_items", "ev_weights", "ev_ages", "ev_bought"
EVENT_COLUMNS = (EV_ITEMS, EV_WEIGHTS, EV_AGES, EV_BOUGHT)
KERNEL_CANDIDATES = 1 << 18  # candidates per kernel call (see kernel_chunks)
# gold.rerank_items' columns beside the catalogue's (to_item_attributes writes them, item_table_from_pandas reads them)
POPULARITY = "popularity"
NEW_ARRIVAL = "new_arrival"
BLOCKED = "blocked"
_USERS = "fresh_users"  # distinct users of the item in the fresh window (the popularity feature)


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


@dataclass(frozen=True)
class ItemIds:
    """A run's item_idx -> item_id, collected once (bounded by the catalogue, like the kernel's ItemTable) so that
    Python workers map the kernel's rows to the contract's ids in place: to_recommendations without its joins."""

    idx: np.ndarray  # item_idx, sorted (int64)
    ids: np.ndarray  # item_id of each, aligned (object)

    @classmethod
    def collect(cls, item_index: DataFrame) -> ItemIds:
        pdf = pd.DataFrame(item_index.select(ITEM_IDX, ITEM_ID).toPandas())
        order = np.argsort(pdf[ITEM_IDX].to_numpy(dtype=np.int64), kind="stable")
        return cls(pdf[ITEM_IDX].to_numpy(dtype=np.int64)[order], pdf[ITEM_ID].to_numpy(dtype=object)[order])

    def of(self, idx: np.ndarray) -> np.ndarray:
        """item_id of each dense id in `idx` (all must be known: the kernel only ranks items of the model)."""
        at = np.searchsorted(self.idx, idx)
        if idx.size and (at.max() >= self.idx.size or not np.array_equal(self.idx[at], idx)):
            raise ValueError("the kernel ranked an item_idx missing from silver.item_index")
        return self.ids[at]


def params_from(rerank_config: RerankConfig) -> RerankParams:
    """The kernel's parameters from the rerank config section."""
    return RerankParams(
        top_k=rerank_config.top_k,
        alpha=rerank_config.alpha,
        half_life_days=rerank_config.half_life_days,
        fresh_days=rerank_config.fresh_days,
        bought_window_days=rerank_config.bought_window_days,
        category_cap=rerank_config.category_cap,
        mmr_lambda=rerank_config.mmr_lambda,
        mmr_pool=rerank_config.mmr_pool,
        trending_threshold=rerank_config.trending_threshold,
        similar_threshold=rerank_config.similar_threshold,
        cooc_threshold=rerank_config.cooc_threshold,
        weights=rerank_config.weights.model_dump(),
    )


def item_table_from_pandas(
    pdf: pd.DataFrame, neighbours: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
) -> ItemTable:
    """The kernel's ItemTable from to_item_attributes' rows (Spark's, or gold.rerank_items read by `shelf serve`),
    sorted by item_idx; `neighbours` = (item_idx, neighbour_idx, score) arrays or None.

    Raises:
        InputDataError: no item has factors (train has not run on these items).
    """
    pdf = pdf.sort_values(ITEM_IDX, kind="stable").reset_index(drop=True)
    with_factors = pdf[FEATURES].dropna()
    if with_factors.empty:
        raise InputDataError("No item of silver.item_index has factors in gold.item_factors; run 'shelf train' first.")
    rank = len(with_factors.iloc[0])
    factors = np.zeros((len(pdf), rank), dtype=np.float32)
    for pos, vec in zip(with_factors.index, with_factors, strict=True):  # item-sized, driver only
        factors[pos] = np.asarray(vec, dtype=np.float32)
    codes, _ = pd.factorize(pdf[CATEGORY], sort=True)  # null -> -1; sorted: stable across runs
    users = pdf[_USERS].to_numpy(dtype=np.float64)
    top = users.max() if users.size else 0.0
    return ItemTable.plain(
        pdf[ITEM_IDX].to_numpy(dtype=np.int64),
        factors,
        neighbours=neighbours,
        popularity=users / top if top > 0 else np.zeros_like(users),
        promo=pdf[PROMO].to_numpy(dtype=bool),
        new_arrival=pdf[NEW_ARRIVAL].to_numpy(dtype=bool),
        in_stock=pdf[IN_STOCK].to_numpy(dtype=bool),
        blocked=pdf[BLOCKED].to_numpy(dtype=bool),
        category=codes.astype(np.int64),
        price=pdf[PRICE].to_numpy(dtype=np.float64, na_value=np.nan),
    )
