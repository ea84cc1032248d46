"""`shelf stream`: new events -> the affected users' lists in gold.recommendations, within seconds.

A Structured Streaming query reads the Delta table a tracker appends raw events to (`stream.source_path`,
default `<storage.root>/landing/events`; the columns batch ingest reads, mapped by `source.columns`), with
its checkpoint at `stream.checkpoint` and a `processing_time` (every `stream.interval_seconds`) or
`available_now` trigger. Each micro-batch (`foreachBatch`, batch id N, tag `<stream.name>-<N>`):

1. validates the rows with batch ingest's own parsing and rules (`pipelines.ingest.classify`): rejected
   rows -> quarantine.events (step "stream", run_id = the tag) with their reason codes; accepted rows ->
   bronze.stream_events (BRONZE_EVENTS_SCHEMA, run_id = the tag). Both writes replace the tag's rows,
   and input = accepted + quarantined is checked and kept in ops.run_metrics (run_id = the tag);
2. takes the serving run: the run of gold.recommendations with the latest as_of (the nightly publish),
   and its model: gold.candidates, gold.*_factors, gold.item_similarities of that run, silver indexes,
   silver.catalog; loaded once per serving run and cached;
3. the batch's event time T is its latest accepted event_ts (no wall clock anywhere); the kernel's "now"
   is T + 1 s (fresh events must be strictly older than now). Events later than the serving run's as_of +
   `stream.max_hours_ahead` are quarantined as future_timestamp;
4. for each user with accepted events: candidates = the stored gold.candidates of the serving run, plus
   the top `recommend.neighbours_per_item` neighbours of the items the batch touched, plus the
   `stream.popular_k` most popular items for users without ALS factors (users absent from
   silver.user_index get a batch-local negative user_idx: the kernel folds them in from their session);
   fresh events = silver.interactions of the serving run and bronze.stream_events (every batch so far)
   within max(rerank.fresh_days, rerank.bought_window_days) before now, for known items;
5. re-ranks them with the batch kernel (`udfs.rerank` via `pipelines.core.reranking.rerank_frame` in
   `mapInPandas`, the item table broadcast) and MERGEs each user's whole new list into the serving run's
   rows of gold.recommendations: ranks beyond the new list's length are deleted. Stream rows keep the
   run's run_id and as_of and carry `stream_batch` (N) and `event_time` (T); nightly rows have them null.

Newer information wins per user: a user's list has an information time, `event_time` for a stream list
and `as_of` for a nightly one. A micro-batch replaces the list only when T is later than that, or the
list was written by an earlier batch id (a later batch has seen every event an earlier one saw). So a
replayed batch id (after a crash) finds its own rows and changes nothing, a batch holding only events the
nightly already saw changes nothing, and a new nightly run takes over as the serving run. Users whose new
list is empty keep their list. Commits that lose to a concurrent writer are retried (tables.merge).

Output grain: gold.recommendations, one row per (run_id, user_id, rank).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from delta.tables import DeltaTable
from pyspark import Broadcast
from pyspark.accumulators import Accumulator
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines import ingest, rerank
from pipelines.core import reranking, tables
from pipelines.core.cli import step_main
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.factors import factors_of_run
from pipelines.core.privacy import key_from_env, with_pseudonymous_users
from pipelines.core.quality import reconcile, run_metrics_frame, ts_lit
from pipelines.core.reranking import ALS_SCORE, FEATURES, RANK, SOURCES
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

_OP, _UPSERT, _DELETE = "_op", "upsert", "delete"
_NEW_LEN, _OLD_LEN, _INFO, _BATCH = "_new_len", "_old_len", "_info", "_batch"
_TOUCHED = "_touched"


def landing_path(config: ShelfConfig) -> str:
    """The Delta table the stream reads: stream.source_path, else <storage.root>/landing/events."""
    return config.stream.source_path or str(Path(config.storage.root) / "landing" / "events")


def checkpoint_path(config: ShelfConfig) -> str:
    return config.stream.checkpoint or str(Path(config.storage.root) / "_checkpoints" / STEP_NAME)


def batch_tag(config: ShelfConfig, batch_id: int) -> str:
    """run_id of a micro-batch's quarantine, stream-event and run-metrics rows."""
    return f"{config.stream.name}-{batch_id}"


# ---------------------------------------------------------------- the serving run and its model


@dataclass
class Serving:
    """The nightly run the stream re-ranks against, with its model (loaded once per run, cached)."""

    run_id: str
    as_of: datetime
    items: Broadcast[ItemTable]
    rank: int
    user_index: DataFrame
    item_index: DataFrame
    user_factors: DataFrame
    candidates: DataFrame  # user_idx, item_idx, als_score, sources
    neighbours: DataFrame  # item_idx, neighbour_idx (top recommend.neighbours_per_item per item)
    popular: DataFrame  # item_idx: the stream.popular_k items with most distinct users in silver
    history: DataFrame  # silver.interactions that can still be fresh after as_of: user_idx, item_idx, type, ts
    cached: list[DataFrame] = field(default_factory=list)

    def unpersist(self) -> None:
        for frame in self.cached:
            frame.unpersist()
        self.items.unpersist()


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


def _horizon_days(config: ShelfConfig) -> float:
    return max(config.rerank.fresh_days, config.rerank.bought_window_days)


def load_serving(spark: SparkSession, config: ShelfConfig, run_id: str, as_of: datetime) -> Serving:
    """Read and cache the serving run's model; the item side is collected once and broadcast."""
    rr = config.rerank
    interactions = tables.read(spark, config, "silver", "interactions")
    item_index = tables.read(spark, config, "silver", "item_index").select(ITEM_ID, ITEM_IDX).cache()
    user_index = tables.read(spark, config, "silver", "user_index").select(USER_ID, USER_IDX).cache()
    item_factors = factors_of_run(tables.read(spark, config, "gold", "item_factors"), run_id)
    user_factors = factors_of_run(tables.read(spark, config, "gold", "user_factors"), run_id)
    user_factors = user_factors.select(USER_IDX, FEATURES).cache()
    fresh = reranking.to_fresh_events(interactions, rr, as_of)
    attributes = reranking.to_item_attributes(
        item_index, item_factors, reranking.read_catalog(spark, config), fresh, rr, as_of
    )
    table = reranking.build_item_table(attributes, rerank.read_cooccurrence(spark, config, run_id))
    candidates = (
        tables.read(spark, config, "gold", "candidates")
        .filter(F.col(RUN_ID) == run_id)
        .select(USER_IDX, ITEM_IDX, ALS_SCORE, SOURCES)
        .cache()
    )
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
    earliest = as_of - timedelta(days=_horizon_days(config))
    history = (
        interactions.filter(F.col(EVENT_TS) >= ts_lit(earliest))
        .select(USER_IDX, ITEM_IDX, EVENT_TYPE, EVENT_TS)
        .cache()
    )
    cached = [item_index, user_index, user_factors, candidates, neighbours, popular, history]
    rank = int(table.factors.shape[1])
    log.info("[%s] serving run %s (as_of %s): %d items in the model", STEP_NAME, run_id, as_of, table.ids.size)
    return Serving(
        run_id,
        as_of,
        spark.sparkContext.broadcast(table),
        rank,
        user_index,
        item_index,
        user_factors,
        candidates,
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
    canonical = ingest.to_canonical_from_table(batch.withColumn("_source_file", F.input_file_name()), config.source)
    classified = ingest.classify(canonical, ingest.rules_for(config, reference))
    if config.privacy.pseudonymize_users:
        classified = with_pseudonymous_users(
            classified, key_from_env(config.privacy), USER_ID, RAW, F.col(REASON) == UNPARSEABLE_ROW
        )
    return classified


def count_by_reason(classified: DataFrame) -> dict[str, int]:
    """Rows per reason code ("accepted" for accepted rows): one row per reason code on the driver."""
    return {(r[REASON] or "accepted"): int(r["count"]) for r in classified.groupBy(REASON).count().collect()}


# ---------------------------------------------------------------- users, events and candidates of a batch


def to_affected_users(accepted: DataFrame, user_index: DataFrame) -> DataFrame:
    """The batch's users: user_id, user_idx (silver's, else a batch-local negative id by user_id order)."""
    users = accepted.select(USER_ID).distinct().join(user_index, on=USER_ID, how="left")
    # One partition over the batch's distinct users: bounded by the micro-batch, not by all users.
    local = -F.dense_rank().over(Window.orderBy(F.col(USER_IDX).isNotNull(), F.col(USER_ID)))
    return users.select(USER_ID, F.coalesce(F.col(USER_IDX), local).cast("int").alias(USER_IDX))


def to_session_events(
    history: DataFrame, stream_events: DataFrame, users: DataFrame, item_index: DataFrame, earliest: datetime
) -> DataFrame:
    """The users' events since `earliest`, stored (silver) and streamed: user_idx, item_idx, event_type, event_ts.

    Stream events on items the model does not know are left out (no factors to fold in).
    """
    stored = history.join(users.select(USER_IDX), on=USER_IDX, how="inner").select(
        USER_IDX, ITEM_IDX, EVENT_TYPE, EVENT_TS
    )
    streamed = (
        stream_events.filter(F.col(EVENT_TS) >= ts_lit(earliest))
        .join(users, on=USER_ID, how="inner")
        .join(item_index, on=ITEM_ID, how="inner")
        .select(USER_IDX, ITEM_IDX, EVENT_TYPE, EVENT_TS)
    )
    return stored.unionByName(streamed).distinct()


def to_touched_items(accepted: DataFrame, users: DataFrame, item_index: DataFrame) -> DataFrame:
    """(user_idx, item_idx) of the batch's own accepted events on known items."""
    return (
        accepted.select(USER_ID, ITEM_ID)
        .distinct()
        .join(users, on=USER_ID, how="inner")
        .join(item_index, on=ITEM_ID, how="inner")
        .select(USER_IDX, ITEM_IDX)
    )


def to_batch_candidates(serving: Serving, users: DataFrame, touched: DataFrame) -> DataFrame:
    """Stored candidates + neighbours of the touched items + popular items for users without factors:
    user_idx, item_idx, als_score, sources (one row per user and item)."""
    stored = serving.candidates.join(users.select(USER_IDX), on=USER_IDX, how="inner")
    neighbours = touched.join(serving.neighbours, on=ITEM_IDX, how="inner").select(
        USER_IDX,
        F.col(NEIGHBOUR_IDX).alias(ITEM_IDX),
        F.lit(None).cast("double").alias(ALS_SCORE),
        F.array(F.lit(NEIGHBOURS)).alias(SOURCES),
    )
    cold = users.select(USER_IDX).join(serving.user_factors.select(USER_IDX), on=USER_IDX, how="left_anti")
    popular = cold.crossJoin(F.broadcast(serving.popular)).select(  # constant-size right side
        USER_IDX, ITEM_IDX, F.lit(None).cast("double").alias(ALS_SCORE), F.array(F.lit(POPULAR)).alias(SOURCES)
    )
    return (
        stored.unionByName(neighbours)
        .unionByName(popular)
        .groupBy(USER_IDX, ITEM_IDX)
        .agg(
            F.max(ALS_SCORE).alias(ALS_SCORE),
            F.array_sort(F.array_distinct(F.flatten(F.collect_list(SOURCES)))).alias(SOURCES),
        )
    )


def timed_rerank_batches(
    batches: Iterable[pd.DataFrame], items: Broadcast[ItemTable], params: RerankParams, seconds: Accumulator[float]
) -> Iterator[pd.DataFrame]:
    """mapInPandas body: `reranking.rerank_frame` per run of at most KERNEL_CANDIDATES candidates (as the
    batch step); adds the time spent in it to `seconds` (a measurement for the benchmark: never a result)."""
    table = items.value
    for pdf in batches:
        for chunk in reranking.kernel_chunks(pdf):
            started = time.perf_counter()
            out = reranking.rerank_frame(chunk, table, params)
            seconds.add(time.perf_counter() - started)
            yield out


# ---------------------------------------------------------------- publishing: MERGE with newer-wins


def _stream_column(frame: DataFrame, name: str) -> Column:
    return F.col(name) if name in frame.columns else F.lit(None)


def to_merge_source(recs: DataFrame, current: DataFrame, run_id: str, batch_id: int, event_time: datetime) -> DataFrame:
    """The MERGE source: the new lists of users whose information is newer (op upsert), plus one delete row
    per rank of their current list beyond the new list's length (op delete)."""
    info = F.coalesce(_stream_column(current, EVENT_TIME).cast("timestamp"), F.col(AS_OF))
    existing = (
        current.filter(F.col(RUN_ID) == run_id)
        .join(recs.select(USER_ID).distinct(), on=USER_ID, how="inner")
        .groupBy(USER_ID)
        .agg(
            F.max(RANK).alias(_OLD_LEN),
            F.max(info).alias(_INFO),
            F.max(_stream_column(current, STREAM_BATCH).cast("long")).alias(_BATCH),
        )
    )
    newer = (
        F.col(_INFO).isNull()
        | (ts_lit(event_time) > F.col(_INFO))
        | (F.col(_BATCH).isNotNull() & (F.lit(batch_id) > F.col(_BATCH)))
    )
    gate = recs.groupBy(USER_ID).agg(F.max(RANK).alias(_NEW_LEN)).join(existing, on=USER_ID, how="left").filter(newer)
    upserts = recs.join(gate.select(USER_ID), on=USER_ID, how="left_semi").withColumn(_OP, F.lit(_UPSERT))
    deletes = gate.filter(F.col(_OLD_LEN) > F.col(_NEW_LEN)).select(
        USER_ID,
        F.explode(F.sequence(F.col(_NEW_LEN) + 1, F.col(_OLD_LEN))).alias(RANK),
        F.lit(run_id).alias(RUN_ID),
        F.lit(_DELETE).alias(_OP),
    )
    return upserts.unionByName(deletes, allowMissingColumns=True)


def publish(
    spark: SparkSession, config: ShelfConfig, recs: DataFrame, run_id: str, batch_id: int, event_time: datetime
) -> None:
    """MERGE the users' new lists into the serving run's rows of gold.recommendations (one commit, retried)."""
    tables.add_columns(spark, config, *RECOMMENDATIONS, STREAM_COLUMNS)
    columns = [*[f.name for f in rerank.RECOMMENDATIONS_SCHEMA.fields], STREAM_BATCH, EVENT_TIME]
    assignments: dict[str, str | Column] = {c: F.col(f"s.{c}") for c in columns}

    def apply(target: DeltaTable) -> None:  # rebuilt per attempt: reads the table as it is now
        current = tables.read(spark, config, *RECOMMENDATIONS)
        source = to_merge_source(recs, current, run_id, batch_id, event_time)
        (
            target.alias("t")
            .merge(source.alias("s"), "t.run_id = s.run_id AND t.user_id = s.user_id AND t.rank = s.rank")
            .whenMatchedDelete(condition=F.col(f"s.{_OP}") == _DELETE)
            .whenMatchedUpdate(condition=F.col(f"s.{_OP}") == _UPSERT, set=assignments)
            .whenNotMatchedInsert(condition=F.col(f"s.{_OP}") == _UPSERT, values=assignments)
            .execute()
        )

    tables.merge(spark, config, *RECOMMENDATIONS, f"{config.stream.name}-{batch_id}", apply)


# ---------------------------------------------------------------- the micro-batch


@dataclass
class BatchReport:
    """What one micro-batch did, for logs and the benchmark (seconds are wall-clock measurements)."""

    batch_id: int
    counts: dict[str, float]
    event_time: datetime | None
    started: float  # time.time() at the start of the batch function
    kernel_seconds: float = 0.0
    publish_seconds: float = 0.0
    published: float = 0.0  # time.time() when the MERGE committed: the new lists are readable from here
    finished: float = 0.0


class StreamJob:
    """The foreachBatch function: validate, re-rank the affected users, MERGE their lists (see module doc)."""

    def __init__(self, spark: SparkSession, config: ShelfConfig, on_batch: Callable[[BatchReport], None] | None = None):
        self.spark = spark
        self.config = config
        self.on_batch = on_batch
        self.serving: Serving | None = None

    def serving_for(self) -> Serving:
        """The cached model of the current serving run, reloaded when a newer nightly run appears."""
        run_id, as_of = serving_run(self.spark, self.config)
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
        report = BatchReport(batch_id, {}, None, time.time())
        serving = self.serving_for()
        reference = serving.as_of + timedelta(hours=self.config.stream.max_hours_ahead)
        classified = to_classified(batch, self.config, reference).persist()
        try:
            self.process(classified, batch_id, serving, report)
        finally:
            classified.unpersist()
        report.finished = time.time()
        shown = ", ".join(f"{k}={int(v)}" for k, v in sorted(report.counts.items()))
        log.info(
            "[%s] batch %d event_time=%s: %s; kernel %.3fs, publish %.3fs, batch %.3fs",
            STEP_NAME,
            batch_id,
            report.event_time,
            shown,
            report.kernel_seconds,
            report.publish_seconds,
            report.finished - report.started,
        )
        if self.on_batch is not None:
            self.on_batch(report)

    def process(self, classified: DataFrame, batch_id: int, serving: Serving, report: BatchReport) -> None:
        config, spark, tag = self.config, self.spark, batch_tag(self.config, batch_id)
        by_reason = count_by_reason(classified)
        input_rows = sum(by_reason.values())
        if input_rows == 0:
            return
        accepted_rows = by_reason.pop("accepted", 0)
        quarantined = sum(by_reason.values())
        reconcile(STEP_NAME, input_rows, accepted_rows, quarantined, 0)
        counts = report.counts
        counts.update({"input_rows": input_rows, "accepted": accepted_rows, "quarantined": quarantined})
        counts.update({f"quarantined.{reason}": n for reason, n in by_reason.items()})
        if quarantined:
            tables.write_replacing(
                ingest.to_quarantine(classified, STEP_NAME, tag, serving.as_of),
                config,
                "quarantine",
                "events",
                tag,
                {RUN_ID: tag, STEP: STEP_NAME},
            )
        if accepted_rows:
            tables.write_replacing(
                ingest.to_bronze(classified, tag, serving.as_of), config, *STREAM_EVENTS, tag, {RUN_ID: tag}
            )
            self.rerank_users(classified.filter(F.col(REASON).isNull()), batch_id, serving, report)
        tables.write_replacing(
            run_metrics_frame(spark, tag, STEP_NAME, counts),
            config,
            "ops",
            "run_metrics",
            tag,
            {RUN_ID: tag, STEP: STEP_NAME},
        )

    def rerank_users(self, accepted: DataFrame, batch_id: int, serving: Serving, report: BatchReport) -> None:
        config, spark = self.config, self.spark
        latest = accepted.agg(F.max(EVENT_TS).alias("t")).first()
        assert latest is not None and latest["t"] is not None
        event_time: datetime = latest["t"]
        report.event_time = event_time
        now = event_time + NOW_AFTER_LAST_EVENT
        users = to_affected_users(accepted, serving.user_index).cache()
        try:
            stored_stream = tables.read(spark, config, *STREAM_EVENTS)
            earliest = now - timedelta(days=_horizon_days(config))
            session = to_session_events(serving.history, stored_stream, users, serving.item_index, earliest)
            fresh = reranking.to_fresh_events(session, config.rerank, now)
            events = reranking.to_capped_events(fresh, config.rerank.max_fresh_events)
            touched = to_touched_items(accepted, users, serving.item_index)
            candidates = reranking.to_capped_candidates(
                to_batch_candidates(serving, users, touched), config.rerank.max_candidates
            )
            user_rows = reranking.to_user_rows(candidates, serving.user_factors, events)
            seconds = spark.sparkContext.accumulator(0.0)
            params = reranking.params_from(config.rerank)
            items = serving.items
            buckets = config.rerank.buckets or int(spark.conf.get("spark.sql.shuffle.partitions") or 4)
            ranked = (
                user_rows.repartition(buckets, USER_IDX)
                .mapInPandas(lambda it: timed_rerank_batches(it, items, params, seconds), reranking.KERNEL_SCHEMA)
                .cache()
            )
            try:
                sizes = users.agg(
                    F.count(F.lit(1)).alias("users"), F.sum((F.col(USER_IDX) < 0).cast("int")).alias("cold")
                ).first()
                assert sizes is not None
                report.counts["users"], report.counts["cold_users"] = sizes["users"], sizes["cold"] or 0
                report.counts["rows"] = ranked.count()  # runs the kernel once; the MERGE reads the cache
                report.kernel_seconds = float(seconds.value)
                recs = rerank.to_recommendations(
                    ranked, users, serving.item_index, serving.run_id, serving.as_of
                ).select(
                    *[f.name for f in rerank.RECOMMENDATIONS_SCHEMA.fields],
                    F.lit(batch_id).cast("long").alias(STREAM_BATCH),
                    ts_lit(event_time).alias(EVENT_TIME),
                )
                started = time.perf_counter()
                publish(spark, config, recs, serving.run_id, batch_id, event_time)
                report.publish_seconds = time.perf_counter() - started
                report.published = time.time()
            finally:
                ranked.unpersist()
        finally:
            users.unpersist()


# ---------------------------------------------------------------- the query


def start(
    spark: SparkSession, config: ShelfConfig, job: StreamJob, available_now: bool | None = None
) -> Any:  # StreamingQuery
    """Start the query: landing table -> `job` per micro-batch, checkpointed; returns the StreamingQuery."""
    stream = config.stream
    source = tables.read_stream(spark, landing_path(config), SOURCE_KEY, stream.max_files_per_trigger)
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
    """
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
