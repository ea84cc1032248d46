"""The evaluation's holdout: the training part of silver.interactions under its own table namespace.

`shelf evaluate` measures what the publish path writes. It splits silver.interactions by
`evaluate.protocol`, writes the training part here, runs the publishing steps (train, similarities,
candidates, rerank) unchanged on it (their config's `storage.namespace` is NAMESPACE, so every table
they read and write sits beside the real ones as `holdout_<layer>`), and scores the lists they wrote to
`holdout_gold.recommendations` as the model `published` against the held-out part.

Writes (snapshots under the holdout namespace; rows of the run id where the table has a run_id):
- silver.interactions: the training part's events (one row per event, as silver.interactions)
- silver.user_index, silver.item_index, and silver.catalog when the run has one: copies (the same ids)
- gold.holdout_test: the held-out (user_idx, item_idx) pairs, one row per pair, with run_id

The training part and the rehearsal's as_of, by protocol:
- temporal: events before as_of - holdout_days; the rehearsal's as_of is that cut
- replay: events before T + d (as_of - replay_horizon_days); as_of is T + d
- random_user / random_item / leave_last: the events of the pairs the split keeps in training; as_of as given
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import tables
from pipelines.core.als import to_pairs
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import EvaluateConfig
from pipelines.core.quality import ts_lit
from pipelines.core.runs import RunContext
from pipelines.core.schemas import EVENT_TS, EVENT_TYPE, ITEM_ID, ITEM_IDX, RUN_ID, USER_ID, USER_IDX
from pipelines.core.splits import leave_last_n_split, random_stratified_split

NAMESPACE = "holdout_"
TEST_TABLE = "holdout_test"
COPIED = ("user_index", "item_index", "catalog")


def holdout_config(config: ShelfConfig) -> ShelfConfig:
    """`config` with every table (and model) in the holdout namespace."""
    return config.model_copy(update={"storage": config.storage.model_copy(update={"namespace": NAMESPACE})})


def split_events(
    interactions: DataFrame, evaluate: EvaluateConfig, as_of: datetime
) -> tuple[DataFrame, DataFrame, datetime]:
    """(training events, held-out (user_idx, item_idx) pairs, the rehearsal's as_of) for the protocol."""
    ts = F.col(EVENT_TS)
    if evaluate.protocol in ("temporal", "replay", None):
        days = evaluate.replay_horizon_days if evaluate.protocol == "replay" else evaluate.holdout_days
        cut = as_of - timedelta(days=days)
        after = interactions.filter((ts >= ts_lit(cut)) & (ts < ts_lit(as_of)))
        return interactions.filter(ts < ts_lit(cut)), after.select(USER_IDX, ITEM_IDX).distinct(), cut
    pairs = to_pairs(interactions)
    if evaluate.protocol == "leave_last":
        train, test = leave_last_n_split(pairs, n=evaluate.leave_last_n)
    else:
        by: Literal["user", "item"] = "user" if evaluate.protocol == "random_user" else "item"
        train, test = random_stratified_split(pairs, ratio=1.0 - evaluate.test_ratio, seed=evaluate.seed, by=by)
    kept = interactions.join(train.select(USER_IDX, ITEM_IDX), on=[USER_IDX, ITEM_IDX], how="left_semi")
    return kept, test.select(USER_IDX, ITEM_IDX).distinct(), as_of


def prepare(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> tuple[ShelfConfig, RunContext]:
    """Write the holdout's tables for this run; returns the config and context the publishing steps run with."""
    held = holdout_config(config)
    interactions = tables.read(spark, config, "silver", "interactions")
    train, test, as_of = split_events(interactions, config.evaluate, ctx.as_of)
    tables.write(train, held, "silver", "interactions", ctx.run_id)
    for name in COPIED:
        if tables.exists(spark, config, "silver", name):
            tables.write(tables.read(spark, config, "silver", name), held, "silver", name, ctx.run_id)
    test_rows = test.withColumn(RUN_ID, F.lit(ctx.run_id))
    tables.write(test_rows, held, "gold", TEST_TABLE, ctx.run_id, mode="run")
    return held, RunContext(run_id=ctx.run_id, as_of=as_of)


def read_test(spark: SparkSession, config: ShelfConfig, run_id: str) -> DataFrame:
    """The held-out pairs of `run_id`: user_idx, item_idx."""
    rows = tables.read(spark, holdout_config(config), "gold", TEST_TABLE)
    return rows.filter(F.col(RUN_ID) == run_id).select(USER_IDX, ITEM_IDX)


def read_train(spark: SparkSession, config: ShelfConfig) -> DataFrame:
    """The training part's (user, item) pairs (strength, latest event time): what every baseline learns from."""
    return to_pairs(tables.read(spark, holdout_config(config), "silver", "interactions"))


def read_owned(spark: SparkSession, config: ShelfConfig) -> DataFrame:
    """The training part's (user, item) pairs the user owned (consumed: recommend.consumed_event_types): what the
    publish path never recommends again, so what "unseen" relevance and the baselines leave out (a viewed item
    is not owned)."""
    interactions = tables.read(spark, holdout_config(config), "silver", "interactions")
    owned = interactions.filter(F.col(EVENT_TYPE).isin(config.consumed_event_types))
    return owned.select(USER_IDX, ITEM_IDX).distinct()


def read_published(spark: SparkSession, config: ShelfConfig, run_id: str) -> DataFrame:
    """The lists the publish path wrote on the training part (holdout gold.recommendations of `run_id`), as
    written (same items, same length, same order), in dense ids: user_idx, item_idx, score, rank."""
    held = holdout_config(config)
    lists = tables.read(spark, held, "gold", "recommendations").filter(F.col(RUN_ID) == run_id)
    users = tables.read(spark, held, "silver", "user_index").select(USER_ID, USER_IDX)
    items = tables.read(spark, held, "silver", "item_index").select(ITEM_ID, ITEM_IDX)
    return (
        lists.join(users, on=USER_ID, how="inner")
        .join(items, on=ITEM_ID, how="inner")
        .select(USER_IDX, ITEM_IDX, F.col("score").cast("double").alias("score"), F.col("rank").cast("int"))
    )
