"""`shelf clean`: bronze.events of this run -> silver.interactions, behind a data-quality gate.

Reads bronze.events (the rows of this run id) and, when it exists, the catalog at
`source.catalog_path`. Writes
- silver.interactions: one row per distinct (user, item, event type, timestamp) (INTERACTIONS_SCHEMA)
  with dense int ids, a weight (clean.weights by event type; a rating weighs its value) and a decay
  2^(-age_days / clean.half_life_days) relative to as_of; a snapshot per run;
- silver.user_index / silver.item_index: string id <-> dense int. Stable across runs: known ids keep
  their number, new ids get max+1.. in string order;
- silver.catalog (CATALOG_SCHEMA): one row per item, from the catalog input when it exists, else from
  bronze.items of this run (the titles/prices/genres a preset's own files carry: Online Retail,
  MovieLens movies file); not written when neither exists;
- quarantine.events: rows of bot users (more than clean.bot_max_events_per_day events per active
  day), reason bot_user, keyed by (run_id, step);
- ops.run_metrics: input, duplicates removed, quarantined, filtered by min support, accepted.

Order: duplicates are removed first (the row with the largest value wins, then session and source
file), bots are found on the deduplicated rows, then users with fewer than clean.min_user_events
and items with fewer than clean.min_item_events events among the remaining rows are filtered, in one
pass (a user can fall below the threshold after its items were filtered; the next run sees the same
rule, not a fixed point). Input = accepted + quarantined + duplicates removed + filtered, else
ReconciliationError. The gate (pipelines.core.quality) runs before any silver write: a failure
leaves the previous silver version current.
"""

from __future__ import annotations

import logging
from datetime import datetime

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.core import sources, tables, uris
from pipelines.core.als import time_decay
from pipelines.core.config import CatalogMapping, ShelfConfig
from pipelines.core.config_sections import CleanConfig
from pipelines.core.errors import InputDataError
from pipelines.core.quality import (
    GateLimits,
    check_interactions,
    gate_recorder,
    reconcile,
    ts_lit,
    window,
    write_run_metrics,
)
from pipelines.core.runs import RunContext, step_log
from pipelines.core.schemas import (
    AS_OF,
    BOT_USER,
    CATALOG_SCHEMA,
    CATEGORY,
    DECAY,
    EVENT_TS,
    EVENT_TYPE,
    IN_STOCK,
    INTERACTIONS_SCHEMA,
    ITEM_ID,
    ITEM_IDX,
    LAUNCHED_AT,
    PRICE,
    PROMO,
    QUARANTINE_SCHEMA,
    RAW,
    REASON,
    RUN_ID,
    SESSION_ID,
    SOURCE_FILE,
    STEP,
    TITLE,
    USER_ID,
    USER_IDX,
    VALUE,
    WEIGHT,
)

log = logging.getLogger("shelf.clean")

STEP_NAME = "clean"
KEY = [USER_ID, ITEM_ID, EVENT_TYPE, EVENT_TS]
SILVER_KEY = [USER_IDX, ITEM_IDX, EVENT_TYPE, EVENT_TS]
_STATUS = "_status"  # accepted | bot | rare
ACCEPTED, BOT, RARE = "accepted", "bot", "rare"


def filter_duplicates(events: DataFrame) -> DataFrame:
    """Keep one row per (user, item, event type, timestamp): the largest value, then session, source file."""
    order = Window.partitionBy(*KEY).orderBy(
        F.col(VALUE).desc_nulls_last(),
        F.col(SESSION_ID).asc_nulls_last(),
        F.col(SOURCE_FILE).asc_nulls_last(),
    )
    return events.withColumn("_n", F.row_number().over(order)).filter(F.col("_n") == 1).drop("_n")


def with_bot_flag(events: DataFrame, max_events_per_day: float | None) -> DataFrame:
    """Flag users with more than `max_events_per_day` events per day they were active (None: nobody)."""
    if max_events_per_day is None:
        return events.withColumn(_STATUS, F.lit(ACCEPTED))
    activity = events.groupBy(USER_ID).agg((F.count(F.lit(1)) / F.countDistinct(F.to_date(EVENT_TS))).alias("_per_day"))
    return (
        events.join(activity, on=USER_ID, how="left")
        .withColumn(_STATUS, F.when(F.col("_per_day") > max_events_per_day, F.lit(BOT)).otherwise(F.lit(ACCEPTED)))
        .drop("_per_day")
    )


def with_support_flag(events: DataFrame, min_user_events: int, min_item_events: int) -> DataFrame:
    """Mark non-bot rows of users / items with too few non-bot events as rare (one pass)."""
    counted = F.when(F.col(_STATUS) == ACCEPTED, 1).otherwise(0)
    by_user = F.sum(counted).over(Window.partitionBy(USER_ID))
    by_item = F.sum(counted).over(Window.partitionBy(ITEM_ID))
    rare = (F.col(_STATUS) == ACCEPTED) & ((by_user < min_user_events) | (by_item < min_item_events))
    return events.withColumn(_STATUS, F.when(rare, F.lit(RARE)).otherwise(F.col(_STATUS)))


def classify(bronze: DataFrame, clean: CleanConfig) -> DataFrame:
    """Bronze rows -> distinct rows with a `_status` of accepted, bot or rare. Pure transform.

    Partitioned by user once: the duplicate check (its key holds the user), the bot check and the per-user support
    count share that shuffle; only the per-item support count takes another."""
    return (
        bronze.repartition(USER_ID)
        .transform(filter_duplicates)
        .transform(lambda d: with_bot_flag(d, clean.bot_max_events_per_day))
        .transform(lambda d: with_support_flag(d, clean.min_user_events, clean.min_item_events))
    )


def with_weight(events: DataFrame, weights: dict[str, float]) -> DataFrame:
    """Weight by event type from clean.weights; a rating weighs its own value."""
    by_type = F.create_map(*[F.lit(x) for pair in sorted(weights.items()) for x in pair])
    weight = F.when(F.col(EVENT_TYPE) == "rating", F.col(VALUE)).otherwise(by_type[F.col(EVENT_TYPE)])
    return events.withColumn(WEIGHT, weight.cast("double"))


def with_decay(events: DataFrame, as_of: datetime, half_life_days: float | None) -> DataFrame:
    """decay = 2^(-age_days / half_life_days); events up to the future tolerance count as age 0; None: 1.0."""
    return events.withColumn(DECAY, time_decay(ts_lit(as_of), half_life_days))


def assign_index(ids: DataFrame, existing: DataFrame | None, id_col: str, idx_col: str) -> DataFrame:
    """The full index: `existing` plus the new ids of `ids`, numbered max+1.. in id order.

    The window without partition runs on one task, but only over the new ids of one run.
    """
    distinct = ids.select(id_col).distinct()
    offset = F.lit(-1)
    known = None
    if existing is None:
        new = distinct
    else:
        known = existing.select(id_col, idx_col)
        new = distinct.join(known, on=id_col, how="left_anti")
        offset_value = known.agg(F.max(idx_col).alias("m")).first()  # one scalar
        offset = F.lit(-1 if offset_value is None or offset_value["m"] is None else int(offset_value["m"]))
    numbered = new.withColumn(idx_col, (offset + F.row_number().over(Window.orderBy(id_col))).cast("int"))
    return numbered if known is None else known.unionByName(numbered)


def to_interactions(
    accepted: DataFrame,
    user_index: DataFrame,
    item_index: DataFrame,
    clean: CleanConfig,
    run_id: str,
    as_of: datetime,
) -> DataFrame:
    """Accepted rows -> silver.interactions rows (dense ids, weight, decay, run id). Pure transform."""
    return (
        accepted.transform(lambda d: with_weight(d, clean.weights))
        .transform(lambda d: with_decay(d, as_of, clean.half_life_days))
        .join(user_index, on=USER_ID, how="inner")
        .join(item_index, on=ITEM_ID, how="inner")
        .withColumn(RUN_ID, F.lit(run_id))
        .withColumn(AS_OF, ts_lit(as_of))
        .select(*[F.col(f.name).cast(f.dataType) for f in INTERACTIONS_SCHEMA.fields])
    )


def to_bot_quarantine(flagged: DataFrame, run_id: str, as_of: datetime) -> DataFrame:
    raw = F.to_json(F.struct(USER_ID, ITEM_ID, EVENT_TYPE, EVENT_TS, VALUE, SESSION_ID))
    return (
        flagged.filter(F.col(_STATUS) == BOT)
        .select(
            raw.alias(RAW),
            F.col(SOURCE_FILE),
            F.lit(STEP_NAME).alias(STEP),
            F.lit(BOT_USER).alias(REASON),
            F.lit(run_id).alias(RUN_ID),
            ts_lit(as_of).alias(AS_OF),
        )
        .select(*[F.col(f.name).cast(f.dataType) for f in QUARANTINE_SCHEMA.fields])
    )


def to_catalog(raw: DataFrame, mapping: CatalogMapping) -> DataFrame:
    """Source catalog rows -> one row per item in CATALOG_SCHEMA; unparseable values become null."""

    def text(name: str | None) -> Column:
        return F.lit(None).cast("string") if name is None else F.trim(F.col(f"`{name}`").cast("string"))

    def flag(name: str | None) -> Column:
        lowered = F.lower(text(name))
        return F.when(lowered.isin("true", "1", "yes", "y", "t"), True).when(
            lowered.isin("false", "0", "no", "n", "f"), False
        )

    typed = raw.select(
        text(mapping.item_id).alias(ITEM_ID),
        text(mapping.category).alias(CATEGORY),
        text(mapping.price).try_cast("double").alias(PRICE),
        flag(mapping.in_stock).alias(IN_STOCK),
        flag(mapping.promo).alias(PROMO),
        F.try_to_timestamp(text(mapping.launched_at)).alias(LAUNCHED_AT),
        text(mapping.title).alias(TITLE),
    ).filter(F.col(ITEM_ID).isNotNull() & (F.col(ITEM_ID) != ""))
    first = Window.partitionBy(ITEM_ID).orderBy(F.col(LAUNCHED_AT).desc_nulls_last(), F.col(TITLE).asc_nulls_last())
    return (
        typed.withColumn("_n", F.row_number().over(first))
        .filter(F.col("_n") == 1)
        .select(*[F.col(f.name).cast(f.dataType) for f in CATALOG_SCHEMA.fields])
    )


def read_catalog(spark: SparkSession, config: ShelfConfig) -> DataFrame | None:
    """The catalog input as a DataFrame, or None when `source.catalog_path` is unset or absent locally."""
    source = config.source
    path = source.catalog_path
    if path is None or uris.local_missing(path):
        log.info("[clean] no catalog at %s; silver.catalog is not written", path)
        return None
    options = {"header": str(source.header).lower(), "sep": source.delimiter} if source.catalog_format == "csv" else {}
    raw = sources.read_source(spark, path, source.catalog_format, "source.catalog_path", options=options)
    mapping = source.catalog_columns
    wanted = [n for n in mapping.model_dump().values() if n is not None]
    missing = [n for n in wanted if n not in raw.columns]
    if missing:
        raise InputDataError(
            f"Catalog {path} has no column '{missing[0]}'; fix source.catalog_columns or the catalog file."
        )
    return raw


def read_source_items(spark: SparkSession, config: ShelfConfig, run_id: str) -> DataFrame | None:
    """bronze.items of this run (the attributes a preset's own files carry), or None when ingest wrote none."""
    if not tables.exists(spark, config, "bronze", "items"):
        return None
    items = tables.read(spark, config, "bronze", "items").filter(F.col(RUN_ID) == run_id)
    if items.isEmpty():
        return None
    return items.select(*[F.col(f.name) for f in CATALOG_SCHEMA.fields])


def _existing_index(spark: SparkSession, config: ShelfConfig, name: str) -> DataFrame | None:
    return tables.read(spark, config, "silver", name) if tables.exists(spark, config, "silver", name) else None


def _ingest_quarantined(spark: SparkSession, config: ShelfConfig, run_id: str) -> int:
    if not tables.exists(spark, config, "quarantine", "events"):
        return 0
    rows = tables.read(spark, config, "quarantine", "events")
    return rows.filter((F.col(RUN_ID) == run_id) & (F.col(STEP) == "ingest")).count()


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Deduplicate, drop bots, filter rare users/items, index, weight; gate; write silver."""
    clean = config.clean
    with step_log(STEP_NAME, ctx) as counts:
        bronze = tables.read(spark, config, "bronze", "events").filter(F.col(RUN_ID) == ctx.run_id)
        catalog = read_catalog(spark, config)
        flagged = classify(bronze, clean).persist()
        cached: list[DataFrame] = [flagged]
        try:
            accepted_rows, bots = _count_statuses(bronze, flagged, ctx.run_id, counts)
            accepted = flagged.filter(F.col(_STATUS) == ACCEPTED)
            user_index = assign_index(accepted, _existing_index(spark, config, "user_index"), USER_ID, USER_IDX)
            item_index = assign_index(accepted, _existing_index(spark, config, "item_index"), ITEM_ID, ITEM_IDX)
            user_index, item_index = user_index.localCheckpoint(), item_index.localCheckpoint()
            interactions = to_interactions(accepted, user_index, item_index, clean, ctx.run_id, ctx.as_of).persist()
            cached.append(interactions)
            tables.write_replacing(
                to_bot_quarantine(flagged, ctx.run_id, ctx.as_of),
                config,
                "quarantine",
                "events",
                ctx.run_id,
                {RUN_ID: ctx.run_id, STEP: STEP_NAME},
            )
            shares = _record_shares(spark, config, ctx, interactions, counts, bots, accepted_rows)
            _gate(spark, config, ctx, interactions, shares)
            tables.write(interactions, config, "silver", "interactions", ctx.run_id)
            tables.write(user_index, config, "silver", "user_index", ctx.run_id)
            tables.write(item_index, config, "silver", "item_index", ctx.run_id)
            _write_catalog(spark, config, ctx.run_id, catalog)
        finally:
            for df in cached:
                df.unpersist()


def _count_statuses(bronze: DataFrame, flagged: DataFrame, run_id: str, counts: dict[str, float]) -> tuple[int, int]:
    """Rows by status (accepted, bot, rare; duplicates are the rest), reconciled and counted; (accepted, bots)."""
    input_rows = bronze.count()
    if input_rows == 0:
        raise InputDataError(
            f"bronze.events has no rows for run id {run_id}; run 'shelf ingest' with the same --run-id first."
        )
    by_status = {row[_STATUS]: int(row["count"]) for row in flagged.groupBy(_STATUS).count().collect()}
    accepted_rows, bots, rare = (by_status.get(s, 0) for s in (ACCEPTED, BOT, RARE))
    duplicates = input_rows - sum(by_status.values())
    counts.update(
        {
            "input_rows": input_rows,
            "duplicates_removed": duplicates,
            "quarantined": bots,
            f"quarantined.{BOT_USER}": bots,
            "filtered_min_support": rare,
            "accepted": accepted_rows,
        }
    )
    reconcile(STEP_NAME, input_rows, accepted_rows, bots, duplicates, rare)
    return accepted_rows, bots


def _record_shares(
    spark: SparkSession,
    config: ShelfConfig,
    ctx: RunContext,
    interactions: DataFrame,
    counts: dict[str, float],
    bots: int,
    accepted_rows: int,
) -> tuple[float, float]:
    """The quarantine rate (ingest's and clean's) and the largest user's share -> counts and ops.run_metrics;
    returns both, unrounded."""
    input_rows = int(counts["input_rows"])
    ingest_input = input_rows + _ingest_quarantined(spark, config, ctx.run_id)
    quarantine_rate = (ingest_input - input_rows + bots) / ingest_input
    top_user = interactions.groupBy(USER_IDX).count().agg(F.max("count").alias("m")).first()
    max_user_share = (top_user["m"] or 0) / accepted_rows if top_user and accepted_rows else 0.0
    counts.update({"quarantine_rate": round(quarantine_rate, 6), "max_user_share": round(max_user_share, 6)})
    write_run_metrics(spark, config, ctx.run_id, STEP_NAME, counts)
    return quarantine_rate, max_user_share


def _gate(
    spark: SparkSession, config: ShelfConfig, ctx: RunContext, interactions: DataFrame, shares: tuple[float, float]
) -> None:
    """The Great Expectations gate on silver.interactions before it is written (raises when it fails)."""
    clean = config.clean
    start, end = window(ctx.as_of, clean.window_days, clean.future_tolerance_hours)
    limits = GateLimits(start, end, clean.max_value, clean.max_quarantine_rate, clean.max_user_share)
    summary = spark.createDataFrame(
        [(float(shares[0]), float(shares[1]))],
        "quarantine_rate double, max_user_share double",
    )
    check_interactions(
        interactions,
        summary,
        limits,
        key=SILVER_KEY,
        ids=[USER_IDX, ITEM_IDX],
        weight=WEIGHT,
        ts=EVENT_TS,
        save=gate_recorder(spark, config, ctx.run_id, STEP_NAME),
    )


def _write_catalog(spark: SparkSession, config: ShelfConfig, run_id: str, catalog: DataFrame | None) -> None:
    """silver.catalog from the catalogue source, else from the items the source file describes (if any)."""
    if catalog is not None:
        tables.write(to_catalog(catalog, config.source.catalog_columns), config, "silver", "catalog", run_id)
    elif (items := read_source_items(spark, config, run_id)) is not None:
        tables.write(items, config, "silver", "catalog", run_id)
