"""Row validation shared by batch ingest and the stream: canonical string rows -> typed rows with a reason code.

Reads nothing and writes nothing: pure DataFrame transforms. `classify` types the canonical string columns
(`to_canonical` / `to_canonical_from_table` map a source's columns onto them) and sets `reason` to the first
rule a row breaks (null: accepted); `to_bronze` and `to_quarantine` shape the accepted and rejected rows into
BRONZE_EVENTS_SCHEMA and QUARANTINE_SCHEMA (one row per source row). The reason codes and their order are
listed in `pipelines/ingest.py`'s docstring, each preset's own in `pipelines/source_presets.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from pipelines.core.config import ShelfConfig, SourceConfig
from pipelines.core.quality import ts_lit, window
from pipelines.core.schemas import (
    AS_OF,
    BAD_ENCODING,
    BAD_ID,
    BAD_TIMESTAMP,
    BAD_VALUE,
    BRONZE_EVENTS_SCHEMA,
    CANCELLED,
    EVENT_TS,
    EVENT_TYPE,
    FUTURE_TIMESTAMP,
    ITEM_ID,
    NEGATIVE_VALUE,
    NETTED_OUT,
    NULL_ITEM,
    NULL_USER,
    QUARANTINE_SCHEMA,
    RAW,
    REASON,
    RUN_ID,
    SESSION_ID,
    SOURCE_FILE,
    STALE_TIMESTAMP,
    STEP,
    UNKNOWN_EVENT_TYPE,
    UNPARSEABLE_ROW,
    USER_ID,
    VALUE,
)

EPOCH_SECONDS = "epoch_seconds"

# Working columns between parsing and validation (strings as read, before typing).
_CORRUPT = "_corrupt"
_EVENT_TYPE_RAW = "_event_type_raw"
_EVENT_TS_RAW = "_event_ts_raw"
_VALUE_RAW = "_value_raw"
_PRESET_REASON = "_preset_reason"
_CANCEL_QTY = "_cancel_qty"
# Item attributes some presets carry on every event row (Online Retail: Description, UnitPrice).
_TITLE_RAW = "_title_raw"
_CONTROL = r"[\x00-\x1f\x7f]"  # control characters have no place in an id
_PRICE_RAW = "_price_raw"


@dataclass(frozen=True)
class Rules:
    """Row-level acceptance rules for one run."""

    event_types: dict[str, str]
    timestamp_format: str | None
    earliest: datetime
    latest: datetime
    max_value: float


def rules_for(config: ShelfConfig, as_of: datetime) -> Rules:
    earliest, latest = window(as_of, config.clean.window_days, config.clean.future_tolerance_hours)
    source = config.source
    fmt = source.timestamp_format
    if source.preset == "movielens":
        return Rules({"rating": "rating"}, EPOCH_SECONDS, earliest, latest, config.clean.max_value)
    if source.preset == "online_retail":
        return Rules({"purchase": "purchase"}, fmt or "yyyy-MM-dd HH:mm:ss", earliest, latest, config.clean.max_value)
    return Rules(dict(source.event_types), fmt, earliest, latest, config.clean.max_value)


def _blank_to_null(col: Column) -> Column:
    trimmed = F.trim(col)
    return F.when(trimmed == "", None).otherwise(trimmed)


def to_canonical(parsed: DataFrame, source: SourceConfig) -> DataFrame:
    """Map the source's columns (`source.columns`) onto the canonical string columns; a mapped column the source
    lacks (only session_id may be: the others are checked before) is null."""
    mapping = source.columns
    present = set(parsed.schema["fields"].dataType.fieldNames())  # type: ignore[attr-defined]

    def field(name: str | None) -> Column:
        if name is None or name not in present:
            return F.lit(None).cast("string")
        return _blank_to_null(F.col(f"fields.`{name}`"))

    return parsed.select(
        RAW,
        SOURCE_FILE,
        _CORRUPT,
        field(mapping.user_id).alias(USER_ID),
        field(mapping.item_id).alias(ITEM_ID),
        field(mapping.event_type).alias(_EVENT_TYPE_RAW),
        field(mapping.event_ts).alias(_EVENT_TS_RAW),
        field(mapping.value).alias(_VALUE_RAW),
        field(mapping.session_id).alias(SESSION_ID),
        F.lit(None).cast("string").alias(_PRESET_REASON),
        F.lit(None).cast("double").alias(_CANCEL_QTY),
        F.lit(None).cast("string").alias(_TITLE_RAW),
        F.lit(None).cast("string").alias(_PRICE_RAW),
    )


def to_canonical_from_table(df: DataFrame, source: SourceConfig) -> DataFrame:
    """Parquet / Delta rows: typed already; raw text is the row as JSON, every mapped column as a string."""
    data_columns = [c for c in df.columns if c != "_source_file"]
    lines = df.select(
        F.to_json(F.struct(*[F.col(f"`{c}`") for c in data_columns])).alias(RAW),
        F.col("_source_file").alias(SOURCE_FILE),
        F.struct(*[F.col(f"`{c}`").cast("string").alias(c) for c in data_columns]).alias("fields"),
    )
    return lines.withColumn(_CORRUPT, F.lit(False)).transform(lambda d: to_canonical(d, source))


# ---------------------------------------------------------------- typing and validation


def _parse_timestamp(raw: Column, fmt: str | None) -> Column:
    if fmt == EPOCH_SECONDS:
        seconds = raw.try_cast("double")
        return F.when(F.abs(seconds) < 1e11, F.timestamp_seconds(seconds.cast("long")))
    if fmt:
        return F.try_to_timestamp(raw, F.lit(fmt))
    return F.try_to_timestamp(raw)


def with_typed_columns(df: DataFrame, rules: Rules) -> DataFrame:
    """Add typed event_type (mapped), event_ts and value; unparseable values become null."""
    mapping = F.create_map(*[F.lit(x) for pair in sorted(rules.event_types.items()) for x in pair])
    return (
        df.withColumn(EVENT_TYPE, mapping[F.col(_EVENT_TYPE_RAW)])
        .withColumn(EVENT_TS, _parse_timestamp(F.col(_EVENT_TS_RAW), rules.timestamp_format))
        .withColumn(VALUE, F.col(_VALUE_RAW).try_cast("double"))
    )


def with_reason(df: DataFrame, rules: Rules) -> DataFrame:
    """The first rule a row breaks, as a reason code; null for an accepted row."""
    value = F.col(VALUE)
    bad_value = (F.col(_VALUE_RAW).isNotNull() & value.isNull()) | F.isnan(value) | (F.abs(value) > rules.max_value)
    reason = (
        F.when(F.col(_CORRUPT), F.lit(UNPARSEABLE_ROW))
        .when(F.col(RAW).contains("\ufffd"), F.lit(BAD_ENCODING))
        .when(F.col(USER_ID).isNull(), F.lit(NULL_USER))
        .when(F.col(ITEM_ID).isNull(), F.lit(NULL_ITEM))
        .when(F.col(USER_ID).rlike(_CONTROL) | F.col(ITEM_ID).rlike(_CONTROL), F.lit(BAD_ID))
        .when(F.col(_PRESET_REASON).isNotNull(), F.col(_PRESET_REASON))
        .when(F.col(EVENT_TYPE).isNull(), F.lit(UNKNOWN_EVENT_TYPE))
        .when(F.col(EVENT_TS).isNull(), F.lit(BAD_TIMESTAMP))
        .when(F.col(EVENT_TS) > ts_lit(rules.latest), F.lit(FUTURE_TIMESTAMP))
        .when(F.col(EVENT_TS) < ts_lit(rules.earliest), F.lit(STALE_TIMESTAMP))
        .when(F.coalesce(bad_value, F.lit(False)), F.lit(BAD_VALUE))
        .when(F.coalesce(value < 0, F.lit(False)), F.lit(NEGATIVE_VALUE))
    )
    return df.withColumn(REASON, reason)


def with_cancellations_netted(df: DataFrame) -> DataFrame:
    """Net cancelled quantities out of the same (user, item)'s accepted purchases, most recent first.

    A purchase whose whole quantity is cancelled gets reason netted_out; a partly cancelled one keeps
    the rest as its value. Only cancellations with a valid customer and product code take part.
    """
    key = [USER_ID, ITEM_ID]
    cancels = (
        df.filter(F.col(REASON) == CANCELLED)
        .groupBy(*key)
        .agg(F.sum(F.coalesce(F.col(_CANCEL_QTY), F.lit(0.0))).alias("_cancelled"))
    )
    latest_first = (
        Window.partitionBy(*key)
        .orderBy(F.col(EVENT_TS).desc(), F.col(SESSION_ID).desc(), F.col(RAW).desc())
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    )
    accepted = F.col(REASON).isNull()
    cumulative = F.sum(F.when(accepted, F.col(VALUE)).otherwise(0.0)).over(latest_first)
    remaining = F.col("_cum") - F.col("_cancelled")
    return (
        df.join(cancels, on=key, how="left")
        .withColumn("_cancelled", F.coalesce(F.col("_cancelled"), F.lit(0.0)))
        .withColumn("_cum", cumulative)
        .withColumn(
            REASON,
            F.when(accepted & (F.col("_cancelled") > 0) & (remaining <= 0), F.lit(NETTED_OUT)).otherwise(F.col(REASON)),
        )
        .withColumn(
            VALUE,
            F.when(
                accepted & (F.col("_cancelled") > 0) & (remaining > 0) & (remaining < F.col(VALUE)), remaining
            ).otherwise(F.col(VALUE)),
        )
        .drop("_cancelled", "_cum")
    )


def classify(canonical: DataFrame, rules: Rules, net_cancellations: bool = False) -> DataFrame:
    """Canonical string rows -> typed rows with a `reason` (null: accepted). Pure transform."""
    typed = canonical.transform(lambda d: with_typed_columns(d, rules)).transform(lambda d: with_reason(d, rules))
    if net_cancellations:
        typed = typed.transform(with_cancellations_netted)
    return typed.select(
        RAW, SOURCE_FILE, USER_ID, ITEM_ID, EVENT_TYPE, EVENT_TS, VALUE, SESSION_ID, REASON, _TITLE_RAW, _PRICE_RAW
    )


def to_bronze(classified: DataFrame, run_id: str, as_of: datetime) -> DataFrame:
    return (
        classified.filter(F.col(REASON).isNull())
        .withColumn(RUN_ID, F.lit(run_id))
        .withColumn(AS_OF, ts_lit(as_of))
        .select(*[F.col(f.name).cast(f.dataType) for f in BRONZE_EVENTS_SCHEMA.fields])
    )


def to_quarantine(classified: DataFrame, step: str, run_id: str, as_of: datetime) -> DataFrame:
    return (
        classified.filter(F.col(REASON).isNotNull())
        .withColumn(STEP, F.lit(step))
        .withColumn(RUN_ID, F.lit(run_id))
        .withColumn(AS_OF, ts_lit(as_of))
        .select(*[F.col(f.name).cast(f.dataType) for f in QUARANTINE_SCHEMA.fields])
    )
