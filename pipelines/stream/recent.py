"""The stream's own recent events, kept in executor memory between micro-batches, and the release of local
checkpoints (a batch's materialised frames) once nothing reads them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import reduce
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.quality import ts_lit
from pipelines.core.schemas import EVENT_TS, EVENT_TYPE, ITEM_ID, RUN_ID, USER_ID
from pipelines.stream.serving import STREAM_EVENTS


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
