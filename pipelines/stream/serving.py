"""The stream's names and paths, and the serving run: the nightly run of gold.recommendations the stream re-ranks
against, with its model, loaded once per run and cached (see pipelines/stream/__init__.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.core import kernel_frames, publishing, reranking, tables, uris
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.factors import factors_of_run
from pipelines.core.quality import ts_lit
from pipelines.core.schemas import (
    AS_OF,
    EVENT_TS,
    EVENT_TYPE,
    FEATURES,
    ITEM_ID,
    ITEM_IDX,
    NEIGHBOUR_IDX,
    RANK,
    RUN_ID,
    USER_ID,
    USER_IDX,
)
from pipelines.stream.users import to_candidate_lists
from udfs.rerank import ItemTable

log = logging.getLogger("shelf.stream")

STEP_NAME = "stream"
SOURCE_KEY = "stream.source_path"
STREAM_BATCH = "stream_batch"
EVENT_TIME = "event_time"
STREAM_COLUMNS = {STREAM_BATCH: "BIGINT", EVENT_TIME: "TIMESTAMP"}
STREAM_EVENTS = ("bronze", "stream_events")
RECOMMENDATIONS = ("gold", "recommendations")
NOW_AFTER_LAST_EVENT = timedelta(seconds=1)  # the kernel keeps events strictly older than its now


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
    item_ids: Broadcast[kernel_frames.ItemIds]  # the kernel's rows get their item ids in the Python workers
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


def earliest_event(config: ShelfConfig, now: datetime) -> datetime:
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
    earliest = earliest_event(config, as_of)
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
        spark.sparkContext.broadcast(kernel_frames.ItemIds.collect(item_index)),
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
