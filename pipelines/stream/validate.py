"""A micro-batch's validation with batch ingest's own parsing and rules, and its counts by reason code."""

from __future__ import annotations

from datetime import datetime

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.core import events
from pipelines.core.config import ShelfConfig
from pipelines.core.privacy import key_from_env, with_pseudonymous_users
from pipelines.core.quality import reconcile
from pipelines.core.schemas import EVENT_TS, RAW, REASON, UNPARSEABLE_ROW, USER_ID
from pipelines.stream import kafka
from pipelines.stream.serving import STEP_NAME


def to_classified(batch: DataFrame, config: ShelfConfig, reference: datetime) -> DataFrame:
    """Raw landing rows or Kafka messages -> ingest's classified rows (typed columns and a reason, null = accepted).

    `reference` plays ingest's as_of: events after it (+ clean.future_tolerance_hours) are future_timestamp.
    """
    if config.stream.source == "kafka":
        canonical = kafka.to_canonical(batch, config)
    else:
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


def count_batch(counts: dict[str, float], by_reason: dict[str, int]) -> int:
    """The batch's counts (input, accepted, quarantined and per reason), reconciled; returns the quarantined rows."""
    input_rows = sum(by_reason.values())
    accepted_rows = by_reason.get("accepted", 0)
    rejected = {reason: n for reason, n in by_reason.items() if reason != "accepted"}
    quarantined = sum(rejected.values())
    reconcile(STEP_NAME, input_rows, accepted_rows, quarantined, 0)
    counts.update({"input_rows": input_rows, "accepted": accepted_rows, "quarantined": quarantined})
    counts.update({f"quarantined.{reason}": n for reason, n in rejected.items()})
    return quarantined
