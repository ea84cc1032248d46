"""A micro-batch's users, their session events and candidates, and the kernel pass that ranks them.

Joins of a micro-batch against the serving run's cached frames broadcast the batch side (its users, items and
events: bounded by the micro-batch), so the serving frames (all users' candidates, history and factors) are only
streamed through a hash lookup, never shuffled or sorted per batch. Spark's automatic broadcasts stay off in a
micro-batch (stream.broadcast_joins): left to itself it broadcast the cached serving frames instead, every batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pyspark import Broadcast
from pyspark.accumulators import Accumulator
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, StructField, StructType

from pipelines.core import kernel_frames, publishing, reranking
from pipelines.core.kernel_frames import CAND_ALS, CAND_ITEMS, EVENT_COLUMNS
from pipelines.core.quality import ts_lit
from pipelines.core.schemas import (
    ALS_SCORE,
    EASE_SCORE,
    EVENT_TS,
    EVENT_TYPE,
    FEATURES,
    ITEM_ID,
    ITEM_IDX,
    NEIGHBOUR_IDX,
    NEIGHBOURS_SOURCE,
    POPULAR_SOURCE,
    RANK,
    REBUY_SCORE,
    SOURCES,
    USER_ID,
    USER_IDX,
)
from udfs.candidates import NEIGHBOURS_BIT, POPULAR_BIT, merge_candidates
from udfs.rerank import ItemTable, RerankParams

if TYPE_CHECKING:
    from pipelines.stream.serving import Serving

NEW_LEN = "_new_len"  # each user's new list length: the MERGE's condition needs it (see merge.publish)


def to_affected_users(accepted: DataFrame, user_index: DataFrame) -> DataFrame:
    """The batch's users: user_id, user_idx (silver's, else a batch-local negative id by user_id order)."""
    users = user_index.join(F.broadcast(accepted.select(USER_ID).distinct()), on=USER_ID, how="right")
    # One partition over the batch's distinct users: bounded by the micro-batch, not by all users.
    local = -F.dense_rank().over(Window.orderBy(F.col(USER_IDX).isNotNull(), F.col(USER_ID)))
    return users.select(USER_ID, F.coalesce(F.col(USER_IDX), local).cast("int").alias(USER_IDX))


def to_session_events(
    history: DataFrame, stream_events: DataFrame, users: DataFrame, item_index: DataFrame, earliest: datetime
) -> DataFrame:
    """The users' events since `earliest`, stored (silver) and streamed: user_idx, item_idx, event_type, event_ts.

    Stream events on items the model does not know are left out (no factors to fold in).
    """
    stored = history.join(F.broadcast(users.select(USER_IDX)), on=USER_IDX, how="inner").select(
        USER_IDX, ITEM_IDX, EVENT_TYPE, EVENT_TS
    )
    theirs = stream_events.filter(F.col(EVENT_TS) >= ts_lit(earliest)).join(F.broadcast(users), on=USER_ID, how="inner")
    streamed = item_index.join(F.broadcast(theirs), on=ITEM_ID, how="inner").select(
        USER_IDX, ITEM_IDX, EVENT_TYPE, EVENT_TS
    )
    return stored.unionByName(streamed).distinct()


def to_touched_items(accepted: DataFrame, users: DataFrame, item_index: DataFrame) -> DataFrame:
    """(user_idx, item_idx) of the batch's own accepted events on known items."""
    theirs = accepted.select(USER_ID, ITEM_ID).distinct().join(users, on=USER_ID, how="inner")
    return item_index.join(F.broadcast(theirs), on=ITEM_ID, how="inner").select(USER_IDX, ITEM_IDX)


_S_ITEMS, _S_ALS, _S_OTHERS, _S_KINDS = "_s_items", "_s_als", "_s_others", "_s_kinds"
_S_EASE, _S_REBUY = "_s_ease", "_s_rebuy"  # the stored candidates' EASE and buy-again scores (0: none)
_X_ITEMS, _X_KINDS, _KINDS = "_x_items", "_x_kinds", "_kinds"


def to_candidate_lists(stored: DataFrame) -> DataFrame:
    """A run's gold.candidates rows grouped per user, once per serving run (udfs.candidates merges them with a
    batch's extra candidates): user_idx, _s_items, _s_als (NaN: no ALS score), _s_others (how many of its
    sources are neither "neighbours" nor "popular"), _s_kinds (bit mask of those two), in item order."""
    has = [
        F.array_contains(SOURCES, NEIGHBOURS_SOURCE).cast("int"),
        F.array_contains(SOURCES, POPULAR_SOURCE).cast("int"),
    ]
    entry = F.struct(
        F.col(ITEM_IDX).cast("int").alias(ITEM_IDX),
        F.coalesce(F.col(ALS_SCORE).cast("double"), F.lit(float("nan"))).alias(ALS_SCORE),
        (F.size(SOURCES) - has[0] - has[1]).alias(_S_OTHERS),
        (has[0] * NEIGHBOURS_BIT + has[1] * POPULAR_BIT).alias(_S_KINDS),
        *[
            (F.coalesce(F.col(c), F.lit(0.0)) if c in stored.columns else F.lit(0.0)).cast("double").alias(alias)
            for c, alias in ((EASE_SCORE, _S_EASE), (REBUY_SCORE, _S_REBUY))
        ],
    )
    grouped = stored.groupBy(USER_IDX).agg(F.array_sort(F.collect_list(entry)).alias("_s"))
    return grouped.select(
        F.col(USER_IDX).cast("int"),
        F.col(f"_s.{ITEM_IDX}").alias(_S_ITEMS),
        F.col(f"_s.{ALS_SCORE}").alias(_S_ALS),
        F.col(f"_s.{_S_OTHERS}").alias(_S_OTHERS),
        F.col(f"_s.{_S_KINDS}").alias(_S_KINDS),
        F.col(f"_s.{_S_EASE}").alias(_S_EASE),
        F.col(f"_s.{_S_REBUY}").alias(_S_REBUY),
    )


def to_batch_user_rows(serving: Serving, users: DataFrame, touched: DataFrame, events: DataFrame) -> DataFrame:
    """One row per user of the batch with candidates: user_idx, user_id, features, the stored candidate arrays
    (to_candidate_lists), the extra ones (_x_items, _x_kinds: neighbours of the touched items, and the popular
    items for users without factors) and the kernel's event columns from `events` (capped fresh events).

    Only the batch's extra candidates and events are grouped here; the stored ones were grouped at load."""
    keys = F.broadcast(users)
    stored = serving.candidate_lists.join(keys, on=USER_IDX, how="left_semi")
    neighbours = serving.neighbours.join(F.broadcast(touched), on=ITEM_IDX, how="inner").select(
        USER_IDX, F.col(NEIGHBOUR_IDX).alias(ITEM_IDX), F.lit(NEIGHBOURS_BIT).alias(_KINDS)
    )
    warm = serving.user_factors.select(USER_IDX).join(keys, on=USER_IDX, how="left_semi")
    cold = users.select(USER_IDX).join(F.broadcast(warm), on=USER_IDX, how="left_anti")
    popular = cold.crossJoin(F.broadcast(serving.popular)).select(  # constant-size right side
        USER_IDX, ITEM_IDX, F.lit(POPULAR_BIT).alias(_KINDS)
    )
    extras = (
        neighbours.unionByName(popular)
        .groupBy(USER_IDX)
        .agg(F.collect_list(F.struct(F.col(ITEM_IDX).cast("int").alias(ITEM_IDX), _KINDS)).alias("_x"))
    )
    factors = serving.user_factors.join(keys, on=USER_IDX, how="left_semi")
    return (
        stored.join(extras, on=USER_IDX, how="full")
        .join(factors, on=USER_IDX, how="left")
        .join(reranking.to_event_lists(events), on=USER_IDX, how="left")
        .join(keys, on=USER_IDX, how="inner")
        .select(
            F.col(USER_IDX).cast("int"),
            USER_ID,
            F.col(FEATURES),
            _S_ITEMS,
            _S_ALS,
            _S_OTHERS,
            _S_KINDS,
            _S_EASE,
            _S_REBUY,
            F.col(f"_x.{ITEM_IDX}").alias(_X_ITEMS),
            F.col(f"_x.{_KINDS}").alias(_X_KINDS),
            *reranking.event_columns(),
        )
    )


def with_candidates(pdf: pd.DataFrame, max_candidates: int) -> pd.DataFrame:
    """to_batch_user_rows' pandas rows -> the kernel's user rows (cand_items, cand_als: udfs.candidates' union
    and cap of the stored and extra candidates, as reranking.to_capped_candidates does in the batch step)."""
    stored_ptr, stored_items = kernel_frames.segments(pdf[_S_ITEMS], np.int64)
    _, stored_als = kernel_frames.segments(pdf[_S_ALS], np.float64)
    _, stored_others = kernel_frames.segments(pdf[_S_OTHERS], np.int64)
    _, stored_kinds = kernel_frames.segments(pdf[_S_KINDS], np.int64)
    extra_ptr, extra_items = kernel_frames.segments(pdf[_X_ITEMS], np.int64)
    _, extra_kinds = kernel_frames.segments(pdf[_X_KINDS], np.int64)
    merged = merge_candidates(
        stored_ptr,
        stored_items,
        stored_als,
        stored_others,
        stored_kinds,
        extra_ptr,
        extra_items,
        extra_kinds,
        max_candidates,
    )
    cuts = merged.indptr[1:-1]
    out = pdf[[USER_IDX, FEATURES, *EVENT_COLUMNS]].copy()
    out[CAND_ITEMS] = np.split(merged.items, cuts)
    out[CAND_ALS] = np.split(merged.als, cuts)
    for column, target in ((_S_EASE, kernel_frames.CAND_EASE), (_S_REBUY, kernel_frames.CAND_REBUY)):
        _, stored_scores = kernel_frames.segments(pdf[column], np.float64)
        scores = stored_score_of(stored_ptr, stored_items, stored_scores, merged.indptr, merged.items)
        out[target] = np.split(scores, cuts)
    return out


def stored_score_of(
    stored_ptr: np.ndarray, stored_items: np.ndarray, stored: np.ndarray, indptr: np.ndarray, items: np.ndarray
) -> np.ndarray:
    """Each merged candidate's score among the user's stored candidates (0 for an extra one): both sides are
    per-user segments in item order, so (row, item) keys are sorted and one searchsorted finds them."""
    width = int(max(stored_items.max(initial=-1), items.max(initial=-1))) + 1
    stored_keys = np.repeat(np.arange(stored_ptr.size - 1), np.diff(stored_ptr)) * width + stored_items
    keys = np.repeat(np.arange(indptr.size - 1), np.diff(indptr)) * width + items
    pos = np.minimum(np.searchsorted(stored_keys, keys), max(stored_keys.size - 1, 0))
    found = (stored_keys.size > 0) & (stored_keys[pos] == keys) if stored_keys.size else np.zeros(keys.size, bool)
    return np.where(found, stored[pos] if stored.size else 0.0, 0.0).astype(np.float64)


@dataclass(frozen=True)
class KernelMeter:
    """Accumulators the kernel adds to (measurements and counts for logs and metrics, never a result)."""

    seconds: Accumulator[float]
    users: Accumulator[int]
    cold_users: Accumulator[int]
    rows: Accumulator[int]

    @classmethod
    def create(cls, spark: SparkSession) -> KernelMeter:
        sc = spark.sparkContext
        return cls(sc.accumulator(0.0), sc.accumulator(0), sc.accumulator(0), sc.accumulator(0))


# The kernel pass's output: gold.recommendations' own columns up to reasons, then each user's list length (the
# MERGE's condition needs it: see publish); run_id, as_of and the stream's columns are literals added after.
RANKED_SCHEMA = StructType([*publishing.RECOMMENDATIONS_SCHEMA.fields[:5], StructField(NEW_LEN, IntegerType(), False)])


def timed_rerank_batches(
    batches: Iterable[pd.DataFrame],
    items: Broadcast[ItemTable],
    item_ids: Broadcast[kernel_frames.ItemIds],
    params: RerankParams,
    max_candidates: int,
    meter: KernelMeter,
) -> Iterator[pd.DataFrame]:
    """mapInPandas body over to_batch_user_rows -> RANKED_SCHEMA rows: the users' candidates (with_candidates),
    then `kernel_frames.rerank_frame` per run of at most KERNEL_CANDIDATES candidates (as the batch step), its rows
    mapped to the contract's ids in place (publishing.to_recommendations_pandas: no join back to the users or the
    item index) with each user's list length; adds the time of all of it, its users (cold: batch-local negative
    ids) and its output rows to `meter`."""
    table, ids = items.value, item_ids.value
    for rows in batches:
        started = time.perf_counter()
        pdf = with_candidates(rows, max_candidates)
        user_ids = pd.Series(rows[USER_ID].to_numpy(dtype=object), index=rows[USER_IDX].to_numpy())
        meter.seconds.add(time.perf_counter() - started)
        meter.users.add(len(pdf))
        meter.cold_users.add(int((pdf[USER_IDX] < 0).sum()))
        for chunk in kernel_frames.kernel_chunks(pdf):  # whole users per chunk: their list lengths are complete
            started = time.perf_counter()
            ranked = kernel_frames.rerank_frame(chunk, table, params, name_items=ids.of)
            out = publishing.to_recommendations_pandas(ranked, user_ids, ids)
            out[NEW_LEN] = ranked.groupby(USER_IDX)[RANK].transform("max").to_numpy(dtype=np.int32)
            meter.seconds.add(time.perf_counter() - started)
            meter.rows.add(len(out))
            yield out


# ---------------------------------------------------------------- publishing: MERGE with newer-wins
