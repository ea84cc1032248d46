"""The stream's job: the foreachBatch function (StreamJob: validate, re-rank the affected users, MERGE their
lists, side writes; see pipelines/stream/__init__.py) and the query that runs it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import events, kernel_frames, reranking, sources, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import EnvironmentSetupError
from pipelines.core.quality import ts_lit, write_run_metrics
from pipelines.core.runs import RunContext
from pipelines.core.schemas import AS_OF, REASON, RUN_ID, STEP, USER_IDX
from pipelines.core.session import is_connect, parallelism, session_conf
from pipelines.stream import kafka
from pipelines.stream.merge import GateState, MergeOptions, prepare_recommendations, publish
from pipelines.stream.recent import STREAMED_COLUMNS, RecentEvents, release
from pipelines.stream.serving import (
    EVENT_TIME,
    NOW_AFTER_LAST_EVENT,
    RECOMMENDATIONS,
    SOURCE_KEY,
    STEP_NAME,
    STREAM_BATCH,
    STREAM_EVENTS,
    Serving,
    batch_tag,
    checkpoint_path,
    earliest_event,
    landing_path,
    load_serving,
    own_commits,
    serving_run,
)
from pipelines.stream.side import SideWork
from pipelines.stream.users import (
    NEW_LEN,
    RANKED_SCHEMA,
    KernelMeter,
    timed_rerank_batches,
    to_affected_users,
    to_batch_user_rows,
    to_session_events,
    to_touched_items,
)
from pipelines.stream.validate import batch_stats, count_batch, to_classified

log = logging.getLogger("shelf.stream")


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
            with session_conf(self.spark, self.batch_conf()):
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
        """Count the batch's rows by reason, re-rank and MERGE the users with accepted events, and do the side
        writes (quarantine, bronze.stream_events, recent events, run metrics) on side threads."""
        spark, tag = self.spark, batch_tag(self.config, batch_id)
        by_reason, event_time = batch_stats(classified)
        report.validate_seconds = time.time() - report.started
        if sum(by_reason.values()) == 0:
            return
        quarantined = count_batch(report.counts, by_reason)
        accepted = classified.filter(F.col(REASON).isNull())

        def write_batch_rows() -> None:
            self.write_batch_rows(classified, tag, serving.as_of, report.fresh, quarantined, event_time is not None)

        def keep_and_count() -> None:
            self.keep_and_count(accepted, event_time, tag, report)

        # Nothing but the lists stands between the batch's start and its MERGE's commit. The batch's rows go to
        # quarantine.events and bronze.stream_events on a second thread from the start; the recent-events slice
        # and the run metrics (whose counts are complete once the lists are computed) on a third while the MERGE
        # runs. The batch ends when all are done, so the next batch sees this one's events. A replayed batch's side
        # writes replace its rows (a fresh one's append: it has none yet), so a replay after a crash anywhere redoes
        # them (its MERGE changes nothing: the newer-wins gate) and every table ends as after an uninterrupted run.
        side = [SideWork(spark, write_batch_rows)]
        try:
            if event_time is not None:
                # The users' lists: readable as soon as this MERGE commits.
                self.rerank_users(
                    accepted,
                    batch_id,
                    event_time,
                    serving,
                    report,
                    lambda: side.append(SideWork(spark, keep_and_count)),
                )
            else:
                side.append(SideWork(spark, keep_and_count))
        except BaseException:
            for work in side:
                work.wait()
            raise
        side_started = time.perf_counter()
        for work in side:
            work.join()
        report.side_seconds = time.perf_counter() - side_started
        self.after_batch_writes(batch_id)

    def write_batch_rows(
        self, classified: DataFrame, tag: str, as_of: datetime, fresh: bool, quarantined: int, has_events: bool
    ) -> None:
        """The batch's rejected rows -> quarantine.events, its accepted rows -> bronze.stream_events (replacing the
        tag's rows; blind appends for a `fresh` batch id)."""
        if quarantined:
            rejected = events.to_quarantine(classified, STEP_NAME, tag, as_of)
            tables.write_replacing(
                rejected, self.config, "quarantine", "events", tag, {RUN_ID: tag, STEP: STEP_NAME}, absent=fresh
            )
        if has_events:
            bronze = events.to_bronze(classified, tag, as_of)
            tables.write_replacing(bronze, self.config, *STREAM_EVENTS, tag, {RUN_ID: tag}, absent=fresh)

    def keep_and_count(self, accepted: DataFrame, event_time: datetime | None, tag: str, report: BatchReport) -> None:
        """Keep the batch's accepted rows for the next batches' session events; its counts -> ops.run_metrics."""
        if event_time is not None:
            self.recent.add(accepted, event_time, earliest_event(self.config, event_time + NOW_AFTER_LAST_EVENT))
        write_run_metrics(self.spark, self.config, tag, STEP_NAME, report.counts, absent=report.fresh)

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
        users, recs = self.new_lists(accepted, batch_id, event_time, serving, report)
        on_ranked()
        started = time.perf_counter()
        options = MergeOptions(
            state=self.gate,
            as_of=serving.as_of,
            before_attempt=self.before_merge_attempt,
            wrap_source=self.merge_source,
        )
        try:
            report.merge_attempts = publish(
                self.spark, self.config, recs, serving.run_id, batch_id, event_time, options
            )
            report.publish_seconds = time.perf_counter() - started
            report.published = time.time()
        finally:
            release(users, recs)  # nothing reads them after the MERGE

    def new_lists(
        self, accepted: DataFrame, batch_id: int, event_time: datetime, serving: Serving, report: BatchReport
    ) -> tuple[DataFrame, DataFrame]:
        """The batch's users (a local checkpoint) and their new lists (gold.recommendations' rows with the stream's
        columns and `_new_len`, materialised in one job: joins and kernel); both to release after the MERGE."""
        config, spark = self.config, self.spark
        prepare_started = time.perf_counter()
        report.event_time = event_time
        now = event_time + NOW_AFTER_LAST_EVENT
        earliest = earliest_event(config, now)
        if not self.recent.loaded:
            self.recent.load(spark, config, earliest, batch_tag(config, batch_id))
        if not self.prepared:
            prepare_recommendations(spark, config)
            self.prepared = True
        # Materialised now (one small job): every later join broadcasts it.
        users = to_affected_users(accepted, serving.user_index).localCheckpoint(eager=True)
        streamed = self.recent.frame(spark).unionByName(accepted.select(*STREAMED_COLUMNS))
        session = to_session_events(serving.history, streamed, users, serving.item_index, earliest)
        fresh = reranking.to_fresh_events(session, config.rerank, now, config.consumed_event_types)
        capped = reranking.to_capped_events(fresh, config.rerank.max_fresh_events)
        touched = to_touched_items(accepted, users, serving.item_index)
        user_rows = to_batch_user_rows(serving, users, touched, capped)
        meter = KernelMeter.create(spark)
        params = kernel_frames.params_from(config.rerank)
        items, ids, cap = serving.items, serving.item_ids, config.rerank.max_candidates
        buckets = config.stream.kernel_buckets or parallelism(spark)
        ranked = user_rows.repartition(buckets, USER_IDX).mapInPandas(
            lambda it: timed_rerank_batches(it, items, ids, params, cap, meter), RANKED_SCHEMA
        )
        recs = ranked.select(
            *[f.name for f in RANKED_SCHEMA.fields[:5]],
            F.lit(serving.run_id).alias(RUN_ID),
            ts_lit(serving.as_of).alias(AS_OF),
            F.lit(batch_id).cast("long").alias(STREAM_BATCH),
            ts_lit(event_time).alias(EVENT_TIME),
            NEW_LEN,
        )
        report.prepare_seconds = time.perf_counter() - prepare_started
        started = time.perf_counter()
        # The MERGE's source is small and in memory; a retried MERGE reuses the lists without running the kernel.
        recs = recs.localCheckpoint(eager=True)
        report.rank_seconds = time.perf_counter() - started
        report.kernel_seconds = float(meter.seconds.value)
        report.counts.update(
            {"users": meter.users.value, "cold_users": meter.cold_users.value, "rows": meter.rows.value}
        )
        return users, recs

    # Hooks: no-ops here; tests subclass StreamJob to force a MERGE conflict, pause the MERGE's source inside its
    # transaction, or stop a batch at a named point after its writes.

    def before_merge_attempt(self, attempt: int) -> None:
        """Called at the start of each MERGE attempt."""

    def merge_source(self, source: DataFrame) -> DataFrame:
        """The MERGE's source, as the MERGE will read it (inside its transaction)."""
        return source

    def after_batch_writes(self, batch_id: int) -> None:
        """Called once a batch's MERGE and side writes are done, before the batch ends (before Spark commits it to
        the checkpoint)."""


# ---------------------------------------------------------------- the query


def start(
    spark: SparkSession, config: ShelfConfig, job: StreamJob, available_now: bool | None = None
) -> Any:  # StreamingQuery
    """Start the query: landing table or Kafka topic -> `job` per micro-batch, checkpointed; returns the
    StreamingQuery."""
    stream = config.stream
    log.info(
        "[%s] start: %s -> gold.recommendations, checkpoint %s, trigger %s",
        STEP_NAME,
        kafka.describe(config) if stream.source == "kafka" else landing_path(config),
        checkpoint_path(config),
        "available_now" if available_now else stream.trigger,
    )
    if stream.source == "kafka":
        source = kafka.read_stream(spark, config)
    else:
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
    job = StreamJob(spark, config)
    query = start(spark, config, job)
    try:
        query.awaitTermination()
    finally:
        job.close()
    log.info("[%s] stopped (run context %s ignored for data)", STEP_NAME, ctx.run_id)
