"""`shelf ingest`: source events -> bronze.events (typed rows) + quarantine.events (rejected rows).

Reads `source.path` with the preset's layout and writes
- bronze.events: one row per accepted source row (BRONZE_EVENTS_SCHEMA), a snapshot per run;
- quarantine.events: one row per rejected source row with its raw text and a reason code, keyed by
  (run_id, step) so a rerun replaces its own rows;
- ops.run_metrics: input, accepted and quarantined counts per reason, keyed by (run_id, step);
- bronze.items (CATALOG_SCHEMA + run_id): one row per item, for presets whose files describe items
  (online_retail: title, price, first sale; movielens: title and first genre from the movies file
  beside the ratings file); a snapshot per run. clean turns it into silver.catalog when no catalog
  input is configured.
Input rows must equal accepted + quarantined (ingest removes no duplicates), else ReconciliationError.
With source.include_stream_events, bronze.events also gets the events `shelf stream` accepted
(bronze.stream_events) inside this run's window, already validated by the stream, counted as `stream_events`
(for a tracker that publishes to Kafka only; docs/STREAMING.md, "Kafka").

Text sources (csv and json lines) are read as lines and parsed with `from_csv` / `from_json`, so
every row keeps its raw text and a line with the wrong number of fields is quarantined as
`unparseable_row` instead of being silently padded or truncated (Spark's PERMISSIVE parser puts such
lines in the corrupt-record column). Quoted fields spanning lines are not supported. Parquet and
Delta rows are typed already; their raw text is the row as JSON.

Reason codes, first match wins: unparseable_row, bad_encoding (bytes that are not UTF-8), null_user,
null_item, bad_id (control characters in an id), (preset rules), unknown_event_type,
bad_timestamp, future_timestamp (after as_of + clean.future_tolerance_hours), stale_timestamp
(before as_of - clean.window_days), bad_value (not a number, NaN, infinite or above clean.max_value),
negative_value.

With privacy.pseudonymize_users, user ids (and their occurrences in the raw text) are replaced by
HMAC-SHA256 pseudonyms before anything is written (pipelines.core.privacy).

Presets: how each one's files are laid out and mapped onto the canonical columns, its own reason codes
(online_retail) and the items its files describe are in `pipelines/source_presets.py`.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import sources, tables
from pipelines.core.config import ShelfConfig, SourceConfig
from pipelines.core.errors import InputDataError
from pipelines.core.events import classify, rules_for, to_bronze, to_canonical, to_canonical_from_table, to_quarantine
from pipelines.core.privacy import key_from_env, with_pseudonymous_users
from pipelines.core.quality import reconcile, ts_lit, window, write_run_metrics
from pipelines.core.runs import RunContext, step_log
from pipelines.core.schemas import (
    AS_OF,
    BRONZE_EVENTS_SCHEMA,
    EVENT_TS,
    FUTURE_TIMESTAMP,
    RAW,
    REASON,
    RUN_ID,
    SOURCE_FILE,
    STEP,
    UNPARSEABLE_ROW,
    USER_ID,
)
from pipelines.source_presets import (
    PATH_KEY,
    filter_header_lines,
    mapped_columns,
    require_columns,
    text_layout,
    to_movielens_canonical,
    to_retail_canonical,
    to_source_items,
    with_corrupt_flag,
    with_csv_fields,
    with_json_fields,
)
from pipelines.stream.serving import STREAM_EVENTS

log = logging.getLogger("shelf.ingest")

STEP_NAME = "ingest"
TABLE_KEY = "source.table"


def read_canonical(spark: SparkSession, source: SourceConfig) -> DataFrame:
    """Read `source.path` (or the catalog table `source.table`) with its preset's layout into canonical string
    columns (see module docstring)."""
    if source.table:
        df = sources.read_source_table(spark, source.table, TABLE_KEY)
        require_columns(tuple(df.columns), mapped_columns(source, optional=False), source.table, "source.columns")
        return to_canonical_from_table(df, source)
    if source.preset in ("generic", "synthetic") and source.format in ("parquet", "delta"):
        df = sources.read_source(spark, source.path, source.format, PATH_KEY)
        require_columns(tuple(df.columns), mapped_columns(source, optional=False), source.path, "source.columns")
        return to_canonical_from_table(df, source)
    lines = sources.read_source(spark, source.path, "text", PATH_KEY).select(
        # A UTF-8 byte-order mark would glue itself to the first header name.
        F.regexp_replace(F.col("value"), "^\ufeff", "").alias(RAW),
        F.col("_source_file").alias(SOURCE_FILE),
    )
    if source.preset in ("generic", "synthetic") and source.format == "json":
        columns = mapped_columns(source)
        parsed = lines.transform(lambda d: with_json_fields(d, columns))
        return parsed.transform(with_corrupt_flag).transform(lambda d: to_canonical(d, source))
    layout = text_layout(spark, source)
    parsed = (
        lines.transform(lambda d: with_csv_fields(d, layout))
        .transform(lambda d: filter_header_lines(d, layout))
        .transform(with_corrupt_flag)
    )
    if source.preset == "online_retail":
        return to_retail_canonical(parsed)
    if source.preset == "movielens":
        return to_movielens_canonical(parsed)
    return to_canonical(parsed, source)


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Read the source, classify every row, check reconciliation, write bronze, quarantine and metrics."""
    with step_log(STEP_NAME, ctx) as counts:
        canonical = read_canonical(spark, config.source)
        rules = rules_for(config, ctx.as_of)
        classified = classify(canonical, rules, net_cancellations=config.source.preset == "online_retail")
        if config.privacy.pseudonymize_users:
            classified = with_pseudonymous_users(
                classified, key_from_env(config.privacy), USER_ID, RAW, F.col(REASON) == UNPARSEABLE_ROW
            )
        classified = classified.persist()
        try:
            by_reason = {
                (row[REASON] or "accepted"): int(row["count"])
                for row in classified.groupBy(REASON).count().collect()  # one row per reason code
            }
            input_rows = sum(by_reason.values())
            if input_rows == 0:
                raise InputDataError(
                    f"Source {config.source.table or config.source.path} has no data rows; "
                    f"check {TABLE_KEY if config.source.table else PATH_KEY}."
                )
            accepted = by_reason.pop("accepted", 0)
            quarantined = sum(by_reason.values())
            counts.update(
                {
                    "input_rows": input_rows,
                    "accepted": accepted,
                    "quarantined": quarantined,
                    "duplicates_removed": 0,
                }
            )
            counts.update({f"quarantined.{reason}": n for reason, n in by_reason.items()})
            reconcile(STEP_NAME, input_rows, accepted, quarantined, 0)
            bronze = to_bronze(classified, ctx.run_id, ctx.as_of)
            if config.source.include_stream_events:
                bronze = bronze.unionByName(stream_events(spark, config, ctx, counts))
            tables.write(bronze, config, "bronze", "events", ctx.run_id)
            items = to_source_items(spark, config.source, classified)
            if items is not None:
                tables.write(items.withColumn(RUN_ID, F.lit(ctx.run_id)), config, "bronze", "items", ctx.run_id)
            tables.write_replacing(
                to_quarantine(classified, STEP_NAME, ctx.run_id, ctx.as_of),
                config,
                "quarantine",
                "events",
                ctx.run_id,
                {RUN_ID: ctx.run_id, STEP: STEP_NAME},
            )
            write_run_metrics(spark, config, ctx.run_id, STEP_NAME, counts)
            if accepted == 0:
                raise all_quarantined(config.source.table or config.source.path, ctx.run_id, by_reason)
        finally:
            classified.unpersist()


def stream_events(spark: SparkSession, config: ShelfConfig, ctx: RunContext, counts: dict[str, float]) -> DataFrame:
    """The events `shelf stream` accepted (bronze.stream_events) in this run's window, as this run's bronze rows
    (source.include_stream_events). They were validated by the stream; counted as `stream_events` (one job)."""
    earliest, latest = window(ctx.as_of, config.clean.window_days, config.clean.future_tolerance_hours)
    if not tables.exists(spark, config, *STREAM_EVENTS):
        counts["stream_events"] = 0
        return spark.createDataFrame([], BRONZE_EVENTS_SCHEMA)
    rows = (
        tables.read(spark, config, *STREAM_EVENTS)
        .filter((F.col(EVENT_TS) >= ts_lit(earliest)) & (F.col(EVENT_TS) <= ts_lit(latest)))
        .withColumn(RUN_ID, F.lit(ctx.run_id))
        .withColumn(AS_OF, ts_lit(ctx.as_of))
        .select(*[F.col(f.name).cast(f.dataType) for f in BRONZE_EVENTS_SCHEMA.fields])
    )
    counts["stream_events"] = rows.count()
    return rows


def all_quarantined(source: str, run_id: str, by_reason: dict[str, int]) -> InputDataError:
    """The error when no row of the source was accepted (the quarantine and metrics are written first)."""
    top = sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in top)
    hint = (
        "an --as-of before the events makes them future timestamps: pass a later --as-of"
        if top[0][0] == FUTURE_TIMESTAMP
        else "fix the source or source.columns / source.event_types"
    )
    return InputDataError(
        f"All {sum(by_reason.values()):,} rows of {source} were quarantined ({reasons}; quarantine.events, run id "
        f"{run_id}); {hint}."
    )
