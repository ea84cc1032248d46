"""`shelf stream`: new events -> the affected users' lists in gold.recommendations, within seconds.

A Structured Streaming query reads the Delta table a tracker appends raw events to (`stream.source_path`,
default `<storage.root>/landing/events`; the columns batch ingest reads, mapped by `source.columns`), with
its checkpoint at `stream.checkpoint` and a `processing_time` (every `stream.interval_seconds`) or
`available_now` trigger. Each micro-batch (`foreachBatch`, batch id N, tag `<stream.name>-<N>`), with
`stream.shuffle_partitions` shuffle partitions:

1. validates the rows with batch ingest's own parsing and rules (`pipelines.core.events.classify`) and counts
   them by reason code, with the batch's event time T = its latest accepted event_ts, in one Spark job (no wall
   clock anywhere); input = accepted + quarantined is checked. The kernel's "now" is T + 1 s (fresh events must
   be strictly older than now). Events later than the serving run's as_of + `stream.max_hours_ahead` are
   quarantined as future_timestamp;
2. takes the serving run: the run of gold.recommendations with the latest as_of (the nightly publish),
   and its model: gold.candidates, gold.*_factors, gold.item_similarities of that run, silver indexes,
   silver.catalog; loaded once per serving run and cached (looked up again only when the table's Delta log
   shows a commit other than this stream's MERGEs);
3. for each user with accepted events: candidates = the stored gold.candidates of the serving run, plus
   the top `recommend.neighbours_per_item` neighbours of the items the batch touched, plus the
   `stream.popular_k` most popular items for users without ALS factors (users absent from
   silver.user_index get a batch-local negative user_idx: the kernel folds them in from their session);
   fresh events = silver.interactions of the serving run, the stream's earlier accepted events (kept in
   executor memory by RecentEvents, filled from bronze.stream_events on start) and this batch's rows, within
   max(rerank.fresh_days, rerank.bought_window_days) before now, for known items;
   Every join against the serving run's cached frames broadcasts the batch side (users, touched items,
   streamed events: bounded by the micro-batch), so those frames are never shuffled per batch;
4. re-ranks them with the batch kernel (`udfs.rerank` via `pipelines.core.reranking.rerank_frame` in
   `mapInPandas`, the item table broadcast), gives the rows the source's ids in the same pass (the item ids
   broadcast once per serving run: publishing.to_recommendations_pandas), materialises the new lists in one
   Spark job, and MERGEs each user's whole new list into the serving run's rows of gold.recommendations
   (deletion vectors on: a few users' rows are marked deleted, files are not rewritten): ranks beyond the new
   list's length are deleted; only inside the MERGE, broadcast joins are on (stream.merge_broadcast_mb), so
   the small source is broadcast and no pass shuffles. The batch's local checkpoints (users, lists, gate)
   are released once the MERGE is done (release). Stream rows keep the run's run_id and as_of
   and carry `stream_batch` (N) and `event_time` (T); nightly rows have them null. The lists are readable
   from this commit on;
5. the side writes, each replacing the tag's rows: rejected rows -> quarantine.events (step "stream",
   run_id = the tag) with their reason codes and accepted rows -> bronze.stream_events (BRONZE_EVENTS_SCHEMA),
   on a second thread from the batch's start; the counts -> ops.run_metrics and the batch's slice of the recent
   events, on a third thread while the MERGE runs. The batch ends when all are done. A crash anywhere is
   repaired by Spark's replay of the batch: its MERGE is a no-op (below), its side writes happen again. A batch
   id running for the first time (the one after a batch this process finished: StreamJob.next_fresh) has no
   rows to replace, so its side writes are blind appends, which read none of the table's files.

Newer information wins per user: a user's list has an information time, `event_time` for a stream list
and `as_of` for a nightly one. A micro-batch replaces the list only when T is later than that, or the
list was written by an earlier batch id (a later batch has seen every event an earlier one saw). So a
replayed batch id (after a crash) finds its own rows and changes nothing, a batch holding only events the
nightly already saw changes nothing, and a new nightly run takes over as the serving run. Users whose new
list is empty keep their list. The gate reads the table just before the MERGE (outside it: see publish), but
only when it must: the stream keeps what it knows of the serving run's rows (GateState), and while the Delta
log shows no commit but its own MERGEs since, a later batch id with T after the run's as_of is newer than
every row, so the read is skipped. The MERGE's conditions check each matched row again. Commits that lose to a
concurrent writer are retried (tables.merge): each attempt reads the log again, and the table when another
writer committed, so the gate sees the winner's rows.

Test-only hooks (tests/test_stream.py): the environment variable SHELF_STREAM_PAUSE_AFTER_WRITES =
"<batch id>:<marker file>" makes that batch write the marker once its MERGE and side writes are done and sleep
before it ends (the SIGKILL test); StreamJob.merge_gate makes the MERGE's source wait for a file (the race test).

Output grain: gold.recommendations, one row per (run_id, user_id, rank).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from delta.tables import DeltaTable
from pyspark import Broadcast, InheritableThread
from pyspark.accumulators import Accumulator
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, StructField, StructType

from pipelines.core import events, publishing, reranking, sources, tables, uris
from pipelines.core.cli import step_main
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import EnvironmentSetupError, InputDataError
from pipelines.core.factors import factors_of_run
from pipelines.core.privacy import key_from_env, with_pseudonymous_users
from pipelines.core.quality import reconcile, run_metrics_frame, ts_lit
from pipelines.core.reranking import (
    ALS_SCORE,
    CAND_ALS,
    CAND_ITEMS,
    EVENT_COLUMNS,
    FEATURES,
    RANK,
    SOURCES,
)
from pipelines.core.runs import RunContext
from pipelines.core.schemas import (
    AS_OF,
    EVENT_TS,
    EVENT_TYPE,
    ITEM_ID,
    ITEM_IDX,
    RAW,
    REASON,
    RUN_ID,
    STEP,
    UNPARSEABLE_ROW,
    USER_ID,
    USER_IDX,
)
from pipelines.core.session import SIDE_POOL, is_connect, parallelism
from udfs.candidates import NEIGHBOURS_BIT, POPULAR_BIT, merge_candidates
from udfs.rerank import ItemTable, RerankParams

log = logging.getLogger("shelf.stream")

STEP_NAME = "stream"
SOURCE_KEY = "stream.source_path"
STREAM_BATCH = "stream_batch"
EVENT_TIME = "event_time"
STREAM_COLUMNS = {STREAM_BATCH: "BIGINT", EVENT_TIME: "TIMESTAMP"}
STREAM_EVENTS = ("bronze", "stream_events")
RECOMMENDATIONS = ("gold", "recommendations")
NEIGHBOUR_IDX = "neighbour_idx"
NEIGHBOURS, POPULAR = "neighbours", "popular"
NOW_AFTER_LAST_EVENT = timedelta(seconds=1)  # the kernel keeps events strictly older than its now

_NEW_LEN, _INFO, _BATCH = "_new_len", "_info", "_batch"
_TOUCHED = "_touched"


def landing_path(config: ShelfConfig) -> str:
    """The Delta table the stream reads: stream.source_path, else <storage.root>/landing/events."""
    return config.stream.source_path or uris.join(config.storage.root, "landing", "events")


def checkpoint_path(config: ShelfConfig) -> str:
    return config.stream.checkpoint or uris.join(config.storage.root, "_checkpoints", STEP_NAME)


def batch_tag(config: ShelfConfig, batch_id: int) -> str:
    """run_id of a micro-batch's quarantine, stream-event and run-metrics rows."""
    return f"{config.stream.name}-{batch_id}"


def own_commits(config: ShelfConfig) -> str:
    """The userMetadata prefix of this stream's MERGE commits (each carries run_id=<its batch_tag>)."""
    return f"run_id={config.stream.name}-"


# ---------------------------------------------------------------- the serving run and its model


@dataclass
class Serving:
    """The nightly run the stream re-ranks against, with its model (loaded once per run, cached)."""

    run_id: str
    as_of: datetime
    items: Broadcast[ItemTable]
    item_ids: Broadcast[publishing.ItemIds]  # the kernel's rows get their item ids in the Python workers
    rank: int
    user_index: DataFrame
    item_index: DataFrame
    user_factors: DataFrame
    candidate_lists: DataFrame  # user_idx and its stored candidates as arrays (see to_candidate_lists)
    neighbours: DataFrame  # item_idx, neighbour_idx (top recommend.neighbours_per_item per item)
    popular: DataFrame  # item_idx: the stream.popular_k items with most distinct users in silver
    history: DataFrame  # silver.interactions that can still be fresh after as_of: user_idx, item_idx, type, ts
    cached: list[DataFrame] = field(default_factory=list)

    def unpersist(self) -> None:
        for frame in self.cached:
            frame.unpersist()
        self.items.unpersist()
        self.item_ids.unpersist()


def serving_run(spark: SparkSession, config: ShelfConfig) -> tuple[str, datetime]:
    """(run_id, as_of) of the gold.recommendations run with the latest as_of (ties: the larger run id).

    Raises:
        InputDataError: gold.recommendations does not exist or is empty.
    """
    if not tables.exists(spark, config, *RECOMMENDATIONS):
        raise InputDataError("gold.recommendations does not exist; run 'shelf rerank' before 'shelf stream'.")
    runs = tables.read(spark, config, *RECOMMENDATIONS).groupBy(RUN_ID).agg(F.max(AS_OF).alias(AS_OF))
    row = runs.orderBy(F.col(AS_OF).desc(), F.col(RUN_ID).desc()).first()  # one row per run
    if row is None:
        raise InputDataError("gold.recommendations is empty; run 'shelf rerank' before 'shelf stream'.")
    return str(row[RUN_ID]), row[AS_OF]


def _earliest(config: ShelfConfig, now: datetime) -> datetime:
    """The earliest event that can still count at `now`: max(rerank.fresh_days, rerank.bought_window_days) before."""
    return now - timedelta(days=max(config.rerank.fresh_days, config.rerank.bought_window_days))


def load_serving(spark: SparkSession, config: ShelfConfig, run_id: str, as_of: datetime) -> Serving:
    """Read and cache the serving run's model; the item side is collected once and broadcast."""
    rr = config.rerank
    interactions = tables.read(spark, config, "silver", "interactions")
    item_index = tables.read(spark, config, "silver", "item_index").select(ITEM_ID, ITEM_IDX).cache()
    user_index = tables.read(spark, config, "silver", "user_index").select(USER_ID, USER_IDX).cache()
    item_factors = factors_of_run(tables.read(spark, config, "gold", "item_factors"), run_id)
    user_factors = factors_of_run(tables.read(spark, config, "gold", "user_factors"), run_id)
    user_factors = user_factors.select(USER_IDX, FEATURES).cache()
    fresh = reranking.to_fresh_events(interactions, rr, as_of, config.consumed_event_types)
    attributes = reranking.to_item_attributes(
        item_index, item_factors, reranking.read_catalog(spark, config), fresh, rr, as_of
    )
    table = reranking.build_item_table(attributes, publishing.read_cooccurrence(spark, config, run_id))
    stored = tables.read(spark, config, "gold", "candidates").filter(F.col(RUN_ID) == run_id)
    candidate_lists = to_candidate_lists(stored).cache()
    if tables.exists(spark, config, "gold", "item_similarities"):
        similar = factors_of_run(tables.read(spark, config, "gold", "item_similarities"), run_id)
        neighbours = (
            similar.filter(F.col(RANK) <= config.recommend.neighbours_per_item)
            .select(ITEM_IDX, NEIGHBOUR_IDX)
            .distinct()
            .cache()
        )
    else:
        neighbours = spark.createDataFrame([], "item_idx int, neighbour_idx int")
    by_users = interactions.groupBy(ITEM_IDX).agg(F.countDistinct(USER_IDX).alias("_users"))
    top = Window.orderBy(F.col("_users").desc(), F.col(ITEM_IDX).asc())  # stream.popular_k rows: one partition
    popular = (
        by_users.withColumn("_p", F.row_number().over(top))
        .filter(F.col("_p") <= config.stream.popular_k)
        .select(ITEM_IDX)
        .cache()
    )
    earliest = _earliest(config, as_of)
    history = (
        interactions.filter(F.col(EVENT_TS) >= ts_lit(earliest))
        .select(USER_IDX, ITEM_IDX, EVENT_TYPE, EVENT_TS)
        .cache()
    )
    cached = [item_index, user_index, user_factors, candidate_lists, neighbours, popular, history]
    rank = int(table.factors.shape[1])
    log.info("[%s] serving run %s (as_of %s): %d items in the model", STEP_NAME, run_id, as_of, table.ids.size)
    return Serving(
        run_id,
        as_of,
        spark.sparkContext.broadcast(table),
        spark.sparkContext.broadcast(publishing.ItemIds.collect(item_index)),
        rank,
        user_index,
        item_index,
        user_factors,
        candidate_lists,
        neighbours,
        popular,
        history,
        cached,
    )


# ---------------------------------------------------------------- validation (batch ingest's rules)


def to_classified(batch: DataFrame, config: ShelfConfig, reference: datetime) -> DataFrame:
    """Raw landing rows -> ingest's classified rows (typed columns and a reason, null = accepted).

    `reference` plays ingest's as_of: events after it (+ clean.future_tolerance_hours) are future_timestamp.
    """
    canonical = events.to_canonical_from_table(batch.withColumn("_source_file", F.input_file_name()), config.source)
    classified = events.classify(canonical, events.rules_for(config, reference))
    if config.privacy.pseudonymize_users:
        classified = with_pseudonymous_users(
            classified, key_from_env(config.privacy), USER_ID, RAW, F.col(REASON) == UNPARSEABLE_ROW
        )
    return classified


def batch_stats(classified: DataFrame) -> tuple[dict[str, int], datetime | None]:
    """Rows per reason code ("accepted" for accepted rows) and the latest accepted event time, in one Spark job
    (one row per reason code on the driver)."""
    rows = classified.groupBy(REASON).agg(F.count(F.lit(1)).alias("n"), F.max(EVENT_TS).alias("t")).collect()
    by_reason = {(r[REASON] or "accepted"): int(r["n"]) for r in rows}
    latest = [r["t"] for r in rows if r[REASON] is None]
    return by_reason, (latest[0] if latest else None)


def count_by_reason(classified: DataFrame) -> dict[str, int]:
    """Rows per reason code ("accepted" for accepted rows): one row per reason code on the driver."""
    return batch_stats(classified)[0]


# ---------------------------------------------------------------- local checkpoints


def checkpoint_rdd(frame: DataFrame) -> Any | None:
    """The JVM RDD holding the blocks of `frame`, a DataFrame.localCheckpoint (its plan is one LogicalRDD); None for
    any other frame, or where the plan is not reachable (Spark Connect)."""
    jdf = getattr(frame, "_jdf", None)
    if jdf is None:
        return None
    plan = jdf.queryExecution().logical()
    return plan.rdd() if plan.getClass().getSimpleName() == "LogicalRDD" else None


def release(*frames: DataFrame) -> None:
    """Drop the blocks of local checkpoints now; the frames must not be used again. DataFrame.unpersist does not
    reach them, and otherwise they stay in executor memory (spilling to disk) until Spark's cleaner collects the
    RDD after a driver garbage collection, by default up to 30 minutes (spark.cleaner.periodicGC.interval): a few
    batches' lists, users and gates at a time instead of hundreds."""
    for frame in frames:
        rdd = checkpoint_rdd(frame)
        if rdd is not None:
            rdd.unpersist(False)


# ---------------------------------------------------------------- the stream's own recent events


STREAMED_COLUMNS = (USER_ID, ITEM_ID, EVENT_TYPE, EVENT_TS)
COMPACT_AFTER = 16  # batch slices kept before they are compacted into one


@dataclass
class _Slice:
    frame: DataFrame  # STREAMED_COLUMNS, local-checkpointed (materialised, no lineage back to its batch)
    latest: datetime  # its latest event_ts: the slice is dropped once that falls out of the horizon


class RecentEvents:
    """The stream's accepted events within the fresh/bought horizon, kept in executor memory between batches.

    Filled once from bronze.stream_events (a restart: every batch the previous process finished), then one
    local-checkpointed slice per micro-batch (its accepted rows, taken from the batch's cached rows), so a
    batch never re-reads bronze.stream_events. Slices older than the horizon are dropped; after
    COMPACT_AFTER slices they are merged into one. Bounded by the events of the horizon, spread over the
    executors: nothing is collected to the driver.
    """

    def __init__(self) -> None:
        self.slices: list[_Slice] = []
        self.loaded = False

    def load(self, spark: SparkSession, config: ShelfConfig, earliest: datetime, skip_tag: str) -> None:
        """Read bronze.stream_events since `earliest`, without the rows of `skip_tag` (the batch being replayed)."""
        self.loaded = True
        if not tables.exists(spark, config, *STREAM_EVENTS):
            return
        stored = tables.read(spark, config, *STREAM_EVENTS).filter(
            (F.col(EVENT_TS) >= ts_lit(earliest)) & (F.col(RUN_ID) != skip_tag)
        )
        frame = stored.select(*STREAMED_COLUMNS).localCheckpoint(eager=True)
        latest = frame.agg(F.max(EVENT_TS)).first()  # from the checkpoint: no second read of the Delta table
        if latest is not None and latest[0] is not None:
            self.slices.append(_Slice(frame, latest[0]))

    def frame(self, spark: SparkSession) -> DataFrame:
        """Every kept event (STREAMED_COLUMNS): the union of the slices."""
        empty = spark.createDataFrame([], "user_id string, item_id string, event_type string, event_ts timestamp")
        return reduce(DataFrame.unionByName, [s.frame for s in self.slices], empty)

    def add(self, accepted: DataFrame, latest: datetime, earliest: datetime) -> None:
        """Keep a batch's accepted rows (materialised now, from the batch's cached rows); drop (release) expired
        slices. A batch reads the slices only before its lists are materialised, and this runs after."""
        release(*[s.frame for s in self.slices if s.latest < earliest])
        self.slices = [s for s in self.slices if s.latest >= earliest]
        self.slices.append(_Slice(accepted.select(*STREAMED_COLUMNS).localCheckpoint(eager=True), latest))
        if len(self.slices) > COMPACT_AFTER:
            merged = reduce(DataFrame.unionByName, [s.frame for s in self.slices]).filter(
                F.col(EVENT_TS) >= ts_lit(earliest)
            )
            compacted = _Slice(merged.localCheckpoint(eager=True), max(s.latest for s in self.slices))
            release(*[s.frame for s in self.slices])
            self.slices = [compacted]


# ---------------------------------------------------------------- users, events and candidates of a batch


# Joins of a micro-batch against the serving run's cached frames broadcast the batch side (its users, items and
# events: bounded by the micro-batch), so the serving frames (all users' candidates, history and factors) are only
# streamed through a hash lookup, never shuffled or sorted per batch. Spark's automatic broadcasts stay off in a
# micro-batch (stream.broadcast_joins): left to itself it broadcast the cached serving frames instead, every batch.


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
    has = [F.array_contains(SOURCES, NEIGHBOURS).cast("int"), F.array_contains(SOURCES, POPULAR).cast("int")]
    entry = F.struct(
        F.col(ITEM_IDX).cast("int").alias(ITEM_IDX),
        F.coalesce(F.col(ALS_SCORE).cast("double"), F.lit(float("nan"))).alias(ALS_SCORE),
        (F.size(SOURCES) - has[0] - has[1]).alias(_S_OTHERS),
        (has[0] * NEIGHBOURS_BIT + has[1] * POPULAR_BIT).alias(_S_KINDS),
        *[
            (F.coalesce(F.col(c), F.lit(0.0)) if c in stored.columns else F.lit(0.0)).cast("double").alias(alias)
            for c, alias in ((reranking.EASE_SCORE, _S_EASE), (reranking.REBUY_SCORE, _S_REBUY))
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
    stored_ptr, stored_items = reranking.segments(pdf[_S_ITEMS], np.int64)
    _, stored_als = reranking.segments(pdf[_S_ALS], np.float64)
    _, stored_others = reranking.segments(pdf[_S_OTHERS], np.int64)
    _, stored_kinds = reranking.segments(pdf[_S_KINDS], np.int64)
    extra_ptr, extra_items = reranking.segments(pdf[_X_ITEMS], np.int64)
    _, extra_kinds = reranking.segments(pdf[_X_KINDS], np.int64)
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
    for column, target in ((_S_EASE, reranking.CAND_EASE), (_S_REBUY, reranking.CAND_REBUY)):
        _, stored_scores = reranking.segments(pdf[column], np.float64)
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


def gated_rows(batches: Iterable[pd.DataFrame], gate: str) -> Iterator[pd.DataFrame]:
    """Test-only hook (the race test in tests/test_stream.py): a pass-through of the MERGE's source that, until
    `<gate>/released` exists, writes `<gate>/entered` and waits for it (at most 120 s). The MERGE reads its source
    inside its transaction, so a test can commit to gold.recommendations between the MERGE's read and commit."""
    for pdf in batches:
        if not (Path(gate) / "released").exists():
            (Path(gate) / "entered").touch()
            deadline = time.monotonic() + 120
            while not (Path(gate) / "released").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        yield pdf


# The kernel pass's output: gold.recommendations' own columns up to reasons, then each user's list length (the
# MERGE's condition needs it: see publish); run_id, as_of and the stream's columns are literals added after.
RANKED_SCHEMA = StructType([*publishing.RECOMMENDATIONS_SCHEMA.fields[:5], StructField(_NEW_LEN, IntegerType(), False)])


def timed_rerank_batches(
    batches: Iterable[pd.DataFrame],
    items: Broadcast[ItemTable],
    item_ids: Broadcast[publishing.ItemIds],
    params: RerankParams,
    max_candidates: int,
    meter: KernelMeter,
) -> Iterator[pd.DataFrame]:
    """mapInPandas body over to_batch_user_rows -> RANKED_SCHEMA rows: the users' candidates (with_candidates),
    then `reranking.rerank_frame` per run of at most KERNEL_CANDIDATES candidates (as the batch step), its rows
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
        for chunk in reranking.kernel_chunks(pdf):  # whole users per chunk: their list lengths are complete
            started = time.perf_counter()
            ranked = reranking.rerank_frame(chunk, table, params, name_items=ids.of)
            out = publishing.to_recommendations_pandas(ranked, user_ids, ids)
            out[_NEW_LEN] = ranked.groupby(USER_IDX)[RANK].transform("max").to_numpy(dtype=np.int32)
            meter.seconds.add(time.perf_counter() - started)
            meter.rows.add(len(out))
            yield out


# ---------------------------------------------------------------- publishing: MERGE with newer-wins


def _stream_column(frame: DataFrame, name: str) -> Column:
    return F.col(name) if name in frame.columns else F.lit(None)


def _with_list_lengths(recs: DataFrame) -> DataFrame:
    """New lists with `_new_len`, each user's list length (its largest rank: ranks are 1..length), which the MERGE's
    condition needs (see publish). The stream's batches compute it in the kernel pass instead (RANKED_SCHEMA)."""
    return recs.withColumn(_NEW_LEN, F.max(RANK).over(Window.partitionBy(USER_ID)))


def to_merge_source(
    recs: DataFrame, current: DataFrame, run_id: str, batch_id: int, event_time: datetime
) -> tuple[DataFrame, DataFrame]:
    """The rows of `recs` (with `_new_len`) of the users whose information is newer than their rows in `current`,
    and the gate (those users: a local checkpoint, to release once the MERGE is done).

    Reads `current` now (the gate is materialised: one Spark job), not when the MERGE evaluates its source.
    """
    info = F.coalesce(_stream_column(current, EVENT_TIME).cast("timestamp"), F.col(AS_OF))
    users = recs.select(USER_ID).distinct()
    existing = (
        current.filter(F.col(RUN_ID) == run_id)
        .join(F.broadcast(users), on=USER_ID, how="inner")
        .groupBy(USER_ID)
        .agg(F.max(info).alias(_INFO), F.max(_stream_column(current, STREAM_BATCH).cast("long")).alias(_BATCH))
    )
    newer = (
        F.col(_INFO).isNull()
        | (ts_lit(event_time) > F.col(_INFO))
        | (F.col(_BATCH).isNotNull() & (F.lit(batch_id) > F.col(_BATCH)))
    )
    gate = users.join(existing, on=USER_ID, how="left").filter(newer).select(USER_ID)
    gate = gate.localCheckpoint(eager=True)  # one read of the table now (one small job)
    return recs.join(gate, on=USER_ID, how="left_semi"), gate


@dataclass
class GateState:
    """What this stream knows of the serving run's rows in gold.recommendations, so most MERGEs need no gate read.

    Set by a full gate read (publish) and by the stream's own MERGEs: `version` is the table version at the last
    look; `max_batch` is the largest stream_batch of the run's rows then (or of the stream's MERGEs since). While
    only this stream commits to the table (its Delta log says so: no Spark job), a batch with a larger id than
    `max_batch` and an event time after the run's as_of is newer than every row of the run, so every user of the
    batch passes the gate. Any other commit (a nightly rerun, `shelf forget`, a second writer) means a full read.
    """

    run_id: str | None = None
    version: int | None = None
    max_batch: int = -1

    def trusted(self, run_id: str, batch_id: int, event_time: datetime, as_of: datetime, others: bool) -> bool:
        return self.run_id == run_id and not others and batch_id > self.max_batch and event_time > as_of

    def read_run(self, current: DataFrame, run_id: str, version: int) -> None:
        """Refresh from the run's rows in `current` (one small aggregation job)."""
        row = (
            current.filter(F.col(RUN_ID) == run_id)
            .agg(F.max(_stream_column(current, STREAM_BATCH).cast("long")).alias(_BATCH))
            .first()
        )
        self.run_id, self.version = run_id, version
        self.max_batch = int(row[_BATCH]) if row is not None and row[_BATCH] is not None else -1


@dataclass
class MergeOptions:
    """What publish needs beyond the lists. `state` (the stream's GateState) with the serving run's `as_of` lets it
    skip the gate's read (see GateState); `before_attempt(n)`, run at the start of MERGE attempt n, and `gate` (see
    gated_rows), which pauses the MERGE's source, are test hooks."""

    state: GateState | None = None
    as_of: datetime | None = None
    before_attempt: Callable[[int], None] | None = None
    gate: str | None = None


RECOMMENDATIONS_PROPERTIES = {"delta.enableDeletionVectors": "true", "delta.autoOptimize.autoCompact": "true"}


def prepare_recommendations(spark: SparkSession, config: ShelfConfig) -> None:
    """Once per stream: add the stream columns to gold.recommendations and set its properties: deletion vectors,
    so a MERGE that touches a few users marks their old rows deleted instead of rewriting whole files, and Delta's
    auto compaction, so the small files every MERGE adds (a few a batch, hundreds an hour) are compacted after a
    write once enough of them gathered (spark.databricks.delta.autoCompact.minNumFiles), and the MERGEs' file
    scans stay bounded over a long-running stream."""
    tables.add_columns(spark, config, *RECOMMENDATIONS, STREAM_COLUMNS)
    tables.set_properties(spark, config, *RECOMMENDATIONS, RECOMMENDATIONS_PROPERTIES)


def publish(
    spark: SparkSession,
    config: ShelfConfig,
    recs: DataFrame,
    run_id: str,
    batch_id: int,
    event_time: datetime,
    options: MergeOptions | None = None,
) -> int:
    """MERGE the users' new lists (`recs`: gold.recommendations' rows with the stream's columns, materialised, and
    `_new_len`, each user's list length, which is added when missing) into the serving run's rows of
    gold.recommendations (one commit, retried).

    The source is the lists themselves: a target row matches its user's row of the same rank (replaced), or, past
    the new list's length, the user's last row (deleted), so every old list loses all of its tail whatever its
    length, and each target row matches one source row (lists have ranks 1..length). Ranks of the new list that
    the old one lacks are inserted.

    The newer-wins gate (to_merge_source) reads the table just before the MERGE and is materialised, so the MERGE
    plans and reads a small in-memory source (with the read inside the MERGE, Delta listed the table's files again
    each time it evaluated its source: about 6 s a batch). A commit between that read and the MERGE cannot make an
    older list win over its matched rows: the MERGE's own conditions compare each matched row's information with
    the batch's on the table as the MERGE sees it. A commit during the MERGE is a Delta conflict: the MERGE is
    retried with a fresh read.

    With `options.state` (the stream's GateState) and the serving run's `options.as_of`, the gate's read is skipped
    when the state says every user of the batch is newer (the Delta log shows no commit but the stream's own since
    its last look); the state is kept up to date here. Returns the number of attempts.
    """
    opts = options or MergeOptions()
    state, as_of = opts.state, opts.as_of
    if _NEW_LEN not in recs.columns:
        recs = _with_list_lengths(recs)
    columns = [*[f.name for f in publishing.RECOMMENDATIONS_SCHEMA.fields], STREAM_BATCH, EVENT_TIME]
    assignments: dict[str, str | Column] = {c: F.col(f"s.{c}") for c in columns}
    # The run_id literal lets Delta skip the files of other runs (min/max stats) when it looks for matches.
    on = (
        f"t.{RUN_ID} = '{run_id}' AND t.{RUN_ID} = s.{RUN_ID} AND t.{USER_ID} = s.{USER_ID} "
        f"AND (t.{RANK} = s.{RANK} OR (s.{RANK} = s.{_NEW_LEN} AND t.{RANK} > s.{RANK}))"
    )
    tail = F.col(f"t.{RANK}") > F.col(f"s.{RANK}")
    # A matched row is replaced or deleted only if the batch's information is newer than the row's (as the gate).
    held = F.coalesce(F.col(f"t.{EVENT_TIME}"), F.col(f"t.{AS_OF}"))
    newer = (held < F.col(f"s.{EVENT_TIME}")) | (
        F.col(f"t.{STREAM_BATCH}").isNotNull() & (F.col(f"t.{STREAM_BATCH}") < F.col(f"s.{STREAM_BATCH}"))
    )
    attempts = 0
    gates: list[DataFrame] = []  # each attempt's gate read, released after the MERGE

    def apply(target: DeltaTable) -> None:  # rebuilt per attempt: reads the table as it is now
        nonlocal attempts
        attempts += 1
        if opts.before_attempt is not None:
            opts.before_attempt(attempts)
        if state is None:
            current = tables.read(spark, config, *RECOMMENDATIONS)
            source, gate = to_merge_source(recs, current, run_id, batch_id, event_time)
            gates.append(gate)
        else:
            version, others = tables.commits_since(
                spark, config, *RECOMMENDATIONS, state.version, own_metadata=own_commits(config)
            )
            if as_of is not None and state.trusted(run_id, batch_id, event_time, as_of, others):
                source = recs
            else:
                current = tables.read(spark, config, *RECOMMENDATIONS, version)
                state.read_run(current, run_id, version)
                source, gate = to_merge_source(recs, current, run_id, batch_id, event_time)
                gates.append(gate)
        if opts.gate is not None:  # one task waits, the other cores stay free for the test's concurrent writer
            wait_for = opts.gate
            source = source.coalesce(1).mapInPandas(lambda it: gated_rows(it, wait_for), source.schema)
        (
            target.alias("t")
            .merge(source.alias("s"), on)
            .whenMatchedDelete(condition=tail & newer)
            .whenMatchedUpdate(condition=~tail & newer, set=assignments)
            .whenNotMatchedInsert(values=assignments)
            .execute()
        )

    tag = batch_tag(config, batch_id)
    merge_conf = {
        # The commit carries run_id=<tag> like every other write (DESCRIBE HISTORY: which batch wrote which version).
        "spark.databricks.delta.commitInfo.userMetadata": f"run_id={tag}",
        # The source is already materialised and deterministic (the lists' local checkpoint; after a gate read,
        # semi-joined with the gate's): Delta's own copy would be one more Spark job a batch.
        "spark.databricks.delta.merge.materializeSource": "none",
    }
    if config.stream.merge_broadcast_mb > 0:
        # The source (a micro-batch's lists) is small: broadcast, Delta's passes over it and the target (find the
        # touched files, write the new rows, mark the old ones deleted) need no shuffle. Measured: Delta's MERGE
        # 4.1 -> 2.8 s a batch on local[2] (benchmarks.stream_profile), for a broadcast job of its own.
        threshold = int(config.stream.merge_broadcast_mb * 1024 * 1024)
        merge_conf["spark.sql.autoBroadcastJoinThreshold"] = str(threshold)
    try:
        with _session_conf(spark, merge_conf):
            tables.merge(spark, config, *RECOMMENDATIONS, tag, apply)
    finally:
        release(*gates)
    if state is not None:
        state.max_batch = max(state.max_batch, batch_id)
    return attempts


@contextmanager
def _session_conf(spark: SparkSession, values: dict[str, str]) -> Iterator[None]:
    before: dict[str, str | None] = {k: spark.conf.get(k, None) for k in values}
    for k, v in values.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, old in before.items():
            if old is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, old)


# ---------------------------------------------------------------- the micro-batch

# Test-only hook (tests/test_stream.py, the SIGKILL test): "<batch id>:<marker file>" makes that batch write the
# marker once its MERGE and side writes are done, then sleep before the batch ends (before Spark commits it to the
# checkpoint), so a test can kill it there.
PAUSE_AFTER_WRITES_ENV = "SHELF_STREAM_PAUSE_AFTER_WRITES"


def pause_after_writes(batch_id: int) -> None:
    hook = os.environ.get(PAUSE_AFTER_WRITES_ENV)
    if not hook:
        return
    wanted, marker = hook.split(":", 1)
    if int(wanted) == batch_id:
        Path(marker).write_text(str(batch_id))
        time.sleep(600)


class _Background:
    """Run `work` on a Spark-aware thread (it inherits the job group and local properties) in the FAIR pool
    session.SIDE_POOL, so the lists' jobs and the MERGE get the cores first; join() re-raises."""

    def __init__(self, spark: SparkSession, work: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self.thread = InheritableThread(target=self._run, args=(spark, work), daemon=True)
        self.thread.start()

    def _run(self, spark: SparkSession, work: Callable[[], None]) -> None:
        try:
            spark.sparkContext.setLocalProperty("spark.scheduler.pool", SIDE_POOL)
            work()
        except BaseException as exc:  # handed to the batch's thread by join()
            self.error = exc

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            log.error("[%s] side write failed while the batch was failing: %s", STEP_NAME, self.error)

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


@dataclass
class BatchReport:
    """What one micro-batch did, for logs and the benchmark (seconds are wall-clock measurements).

    From `started`: `validate_seconds` (parse and classify the rows, counts by reason: one Spark job),
    `prepare_seconds` (serving-run check, the batch's users: one small job, then plan building), `rank_seconds`
    (the one job that computes the users' new lists: joins and kernel, whose own time is `kernel_seconds`, summed
    over the Python workers), `publish_seconds` (the MERGE call: the gate's read, Delta's MERGE, its commit), then
    `side_seconds` (after `published`: waiting for the side threads, the quarantine and bronze.stream_events writes
    from the start, the recent-events slice and the run metrics from the end of the rank job).
    """

    batch_id: int
    counts: dict[str, float]
    event_time: datetime | None
    started: float  # time.time() at the start of the batch function
    validate_seconds: float = 0.0
    prepare_seconds: float = 0.0
    kernel_seconds: float = 0.0
    rank_seconds: float = 0.0  # the job that computes the users' new lists (joins and kernel), materialised
    publish_seconds: float = 0.0  # the MERGE call: the newer-wins gate's read, then Delta's MERGE
    published: float = 0.0  # time.time() when the MERGE committed: the new lists are readable from here
    side_seconds: float = 0.0
    merge_attempts: int = 0
    jobs: int = 0  # Spark jobs the batch function ran (its job group)
    fresh: bool = False  # first run of this batch id (see StreamJob.next_fresh): its side writes are blind appends
    finished: float = 0.0


class StreamJob:
    """The foreachBatch function: validate, re-rank the affected users, MERGE their lists (see module doc)."""

    def __init__(self, spark: SparkSession, config: ShelfConfig, on_batch: Callable[[BatchReport], None] | None = None):
        self.spark = spark
        self.config = config
        self.on_batch = on_batch
        self.serving: Serving | None = None
        self.recent = RecentEvents()
        self.known_version: int | None = None  # gold.recommendations version the serving run was checked at
        self.prepared = False
        self.merge_gate: str | None = None  # test-only: see gated_rows
        self.gate = GateState()  # what the stream knows of the serving run's rows (publish keeps it)
        # The batch id that runs for the first time ever: the one after a batch this job finished. Spark starts
        # batch N+1 only once N is committed to the checkpoint, so no process has written N+1's rows; a replay
        # (a restart's first batch, or a batch after one that failed) is never fresh: its side writes replace.
        self.next_fresh: int | None = None

    def batch_conf(self) -> dict[str, str]:
        """Session settings while a micro-batch runs. A micro-batch is small: a few shuffle partitions, and no
        broadcast joins or adaptive re-planning, each of which costs a Spark job of its own (measured: ~40 of
        them per batch, most of the batch's time on 2 cores), so each action stays one job."""
        conf = {
            "spark.sql.shuffle.partitions": str(self.config.stream.shuffle_partitions),
            "spark.sql.adaptive.enabled": str(self.config.stream.adaptive).lower(),
        }
        if not self.config.stream.broadcast_joins:
            conf["spark.sql.autoBroadcastJoinThreshold"] = "-1"
        return conf

    def serving_for(self) -> Serving:
        """The cached model of the current serving run, reloaded when a newer nightly run appears.

        The serving run is looked up again only when gold.recommendations has a commit other than this
        stream's MERGEs since the last look (its history, read from the Delta log: no Spark job).
        """
        version, others = tables.commits_since(
            self.spark, self.config, *RECOMMENDATIONS, self.known_version, own_metadata=own_commits(self.config)
        )
        if self.serving is not None and not others:
            self.known_version = version
            return self.serving
        run_id, as_of = serving_run(self.spark, self.config)
        self.known_version = version
        if self.serving is None or (self.serving.run_id, self.serving.as_of) != (run_id, as_of):
            if self.serving is not None:
                self.serving.unpersist()
            self.serving = load_serving(self.spark, self.config, run_id, as_of)
        return self.serving

    def close(self) -> None:
        if self.serving is not None:
            self.serving.unpersist()
            self.serving = None

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        report = BatchReport(batch_id, {}, None, time.time(), fresh=batch_id == self.next_fresh)
        self.next_fresh = None  # until this batch has finished
        group = f"{batch_tag(self.config, batch_id)}-{report.started:.6f}"
        sc = self.spark.sparkContext
        sc.setJobGroup(group, f"shelf stream batch {batch_id}")
        try:
            with _session_conf(self.spark, self.batch_conf()):
                serving = self.serving_for()
                reference = serving.as_of + timedelta(hours=self.config.stream.max_hours_ahead)
                classified = to_classified(batch, self.config, reference).persist()
                try:
                    self.process(classified, batch_id, serving, report)
                finally:
                    classified.unpersist()
        finally:
            report.jobs = len(sc.statusTracker().getJobIdsForGroup(group))
            sc.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]
        report.finished = time.time()
        self.next_fresh = batch_id + 1
        shown = ", ".join(f"{k}={int(v)}" for k, v in sorted(report.counts.items()))
        log.info(
            "[%s] batch %d event_time=%s: %s; validate %.2fs, prepare %.2fs, rank %.2fs (kernel %.3fs), "
            "MERGE %.2fs (%d attempt(s)), "
            "readable after %.2fs; side writes %.2fs; %d Spark jobs; batch %.2fs",
            STEP_NAME,
            batch_id,
            report.event_time,
            shown,
            report.validate_seconds,
            report.prepare_seconds,
            report.rank_seconds,
            report.kernel_seconds,
            report.publish_seconds,
            report.merge_attempts,
            (report.published - report.started) if report.published else 0.0,
            report.side_seconds,
            report.jobs,
            report.finished - report.started,
        )
        if self.on_batch is not None:
            self.on_batch(report)

    def process(self, classified: DataFrame, batch_id: int, serving: Serving, report: BatchReport) -> None:
        config, spark, tag = self.config, self.spark, batch_tag(self.config, batch_id)
        by_reason, event_time = batch_stats(classified)
        report.validate_seconds = time.time() - report.started
        input_rows = sum(by_reason.values())
        if input_rows == 0:
            return
        accepted_rows = by_reason.pop("accepted", 0)
        quarantined = sum(by_reason.values())
        reconcile(STEP_NAME, input_rows, accepted_rows, quarantined, 0)
        counts = report.counts
        counts.update({"input_rows": input_rows, "accepted": accepted_rows, "quarantined": quarantined})
        counts.update({f"quarantined.{reason}": n for reason, n in by_reason.items()})
        accepted = classified.filter(F.col(REASON).isNull())

        def write_batch_rows() -> None:
            if quarantined:
                tables.write_replacing(
                    events.to_quarantine(classified, STEP_NAME, tag, serving.as_of),
                    config,
                    "quarantine",
                    "events",
                    tag,
                    {RUN_ID: tag, STEP: STEP_NAME},
                    absent=report.fresh,
                )
            if event_time is not None:
                bronze = events.to_bronze(classified, tag, serving.as_of)
                tables.write_replacing(bronze, config, *STREAM_EVENTS, tag, {RUN_ID: tag}, absent=report.fresh)

        def keep_and_count() -> None:
            if event_time is not None:  # the next batch's session events
                earliest = _earliest(config, event_time + NOW_AFTER_LAST_EVENT)
                self.recent.add(accepted, event_time, earliest)
            tables.write_replacing(
                run_metrics_frame(spark, tag, STEP_NAME, counts),
                config,
                "ops",
                "run_metrics",
                tag,
                {RUN_ID: tag, STEP: STEP_NAME},
                absent=report.fresh,
            )

        # Nothing but the lists stands between the batch's start and its MERGE's commit. The batch's rows go to
        # quarantine.events and bronze.stream_events on a second thread from the start; the recent-events slice
        # and the run metrics (whose counts are complete once the lists are computed) on a third while the MERGE
        # runs. The batch ends when all are done, so the next batch sees this one's events. A replayed batch's side
        # writes replace its rows (a fresh one's append: it has none yet), so a replay after a crash anywhere redoes
        # them (its MERGE changes nothing: the newer-wins gate) and every table ends as after an uninterrupted run.
        side = [_Background(spark, write_batch_rows)]
        try:
            if event_time is not None:
                # The users' lists: readable as soon as this MERGE commits.
                self.rerank_users(
                    accepted,
                    batch_id,
                    event_time,
                    serving,
                    report,
                    lambda: side.append(_Background(spark, keep_and_count)),
                )
            else:
                side.append(_Background(spark, keep_and_count))
        except BaseException:
            for work in side:
                work.wait()
            raise
        side_started = time.perf_counter()
        for work in side:
            work.join()
        report.side_seconds = time.perf_counter() - side_started
        pause_after_writes(batch_id)

    def rerank_users(
        self,
        accepted: DataFrame,
        batch_id: int,
        event_time: datetime,
        serving: Serving,
        report: BatchReport,
        on_ranked: Callable[[], None],
    ) -> None:
        """Compute the users' new lists (one job), call `on_ranked()`, then MERGE them (publish)."""
        config, spark = self.config, self.spark
        prepare_started = time.perf_counter()
        report.event_time = event_time
        now = event_time + NOW_AFTER_LAST_EVENT
        earliest = _earliest(config, now)
        if not self.recent.loaded:
            self.recent.load(spark, config, earliest, batch_tag(config, batch_id))
        if not self.prepared:
            prepare_recommendations(spark, config)
            self.prepared = True
        # Materialised now (one small job): every later join broadcasts it. Released, like the lists' local
        # checkpoint below, once the MERGE is done.
        users = to_affected_users(accepted, serving.user_index).localCheckpoint(eager=True)
        streamed = self.recent.frame(spark).unionByName(accepted.select(*STREAMED_COLUMNS))
        session = to_session_events(serving.history, streamed, users, serving.item_index, earliest)
        fresh = reranking.to_fresh_events(session, config.rerank, now, config.consumed_event_types)
        capped = reranking.to_capped_events(fresh, config.rerank.max_fresh_events)
        touched = to_touched_items(accepted, users, serving.item_index)
        user_rows = to_batch_user_rows(serving, users, touched, capped)
        meter = KernelMeter.create(spark)
        params = reranking.params_from(config.rerank)
        items, cap = serving.items, config.rerank.max_candidates
        buckets = config.stream.kernel_buckets or parallelism(spark)
        ids = serving.item_ids
        ranked = user_rows.repartition(buckets, USER_IDX).mapInPandas(
            lambda it: timed_rerank_batches(it, items, ids, params, cap, meter), RANKED_SCHEMA
        )
        recs = ranked.select(
            *[f.name for f in RANKED_SCHEMA.fields[:5]],
            F.lit(serving.run_id).alias(RUN_ID),
            ts_lit(serving.as_of).alias(AS_OF),
            F.lit(batch_id).cast("long").alias(STREAM_BATCH),
            ts_lit(event_time).alias(EVENT_TIME),
            _NEW_LEN,
        )
        report.prepare_seconds = time.perf_counter() - prepare_started
        started = time.perf_counter()
        # The new lists, materialised in one job (joins and kernel): the MERGE's source is small and in memory,
        # and a retried MERGE reuses the lists without running the kernel again.
        recs = recs.localCheckpoint(eager=True)
        report.rank_seconds = time.perf_counter() - started
        report.kernel_seconds = float(meter.seconds.value)
        report.counts.update(
            {"users": meter.users.value, "cold_users": meter.cold_users.value, "rows": meter.rows.value}
        )
        on_ranked()
        started = time.perf_counter()
        try:
            report.merge_attempts = publish(
                spark,
                config,
                recs,
                serving.run_id,
                batch_id,
                event_time,
                MergeOptions(
                    state=self.gate, as_of=serving.as_of, before_attempt=self.before_merge_attempt, gate=self.merge_gate
                ),
            )
            report.publish_seconds = time.perf_counter() - started
            report.published = time.time()
        finally:
            release(users, recs)  # nothing reads them after the MERGE

    def before_merge_attempt(self, attempt: int) -> None:
        """Called at the start of each MERGE attempt; nothing here (tests override it to force a conflict)."""


# ---------------------------------------------------------------- the query


def start(
    spark: SparkSession, config: ShelfConfig, job: StreamJob, available_now: bool | None = None
) -> Any:  # StreamingQuery
    """Start the query: landing table -> `job` per micro-batch, checkpointed; returns the StreamingQuery."""
    stream = config.stream
    source = sources.read_stream(spark, landing_path(config), SOURCE_KEY, stream.max_files_per_trigger)
    writer = source.writeStream.foreachBatch(job).option("checkpointLocation", checkpoint_path(config))
    once = stream.trigger == "available_now" if available_now is None else available_now
    if once:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=f"{stream.interval_seconds} seconds")
    return writer.queryName(stream.name).start()


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Run the stream until it stops (available_now: when the landing table is drained) or is killed.

    `ctx` is not used for the data: the serving run comes from gold.recommendations, the time from events.

    Raises:
        EnvironmentSetupError: the session is a Spark Connect one (the stream needs a SparkContext).
    """
    if is_connect(spark):
        raise EnvironmentSetupError(
            "shelf stream needs a classic Spark session (its micro-batches broadcast the item matrix and MERGE "
            "through Delta's Python API), so it cannot run over Spark Connect; unset spark.remote and run it "
            "with spark.master or on a classic (dedicated access mode) cluster."
        )
    log.info(
        "[%s] start: %s -> gold.recommendations, checkpoint %s, trigger %s",
        STEP_NAME,
        landing_path(config),
        checkpoint_path(config),
        config.stream.trigger,
    )
    job = StreamJob(spark, config)
    query = start(spark, config, job)
    try:
        query.awaitTermination()
    finally:
        job.close()
    log.info("[%s] stopped (run context %s ignored for data)", STEP_NAME, ctx.run_id)


main = step_main(STEP_NAME)

if __name__ == "__main__":
    raise SystemExit(main(None))
