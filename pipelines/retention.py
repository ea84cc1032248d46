"""`shelf prune`: keep the last N runs' rows of the tables that gain a run's rows every day, then VACUUM.

gold.candidates, gold.recommendations, gold.item_similarities, gold.metrics, ... are written per run id
(`replaceWhere run_id = ...`), so they grow by a run's rows each day. For each such table (and its holdout
twin), the runs are ordered by their latest Delta commit (each shelf commit carries `run_id=<id>` as its
userMetadata); the rows of all but the newest `keep` runs go in one `DELETE FROM`, and `VACUUM ... RETAIN
<hours> HOURS` then removes the files no version within the retention needs (Delta's default: 168 hours, the
time travel window `shelf rollback` relies on). Input records (bronze, quarantine), silver snapshots and
ops.run_metrics are not pruned. All of it is SQL, so it works on any storage root and over Spark Connect.
"""

from __future__ import annotations

import logging

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core import ease, holdout, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.schemas import RUN_ID

log = logging.getLogger("shelf.prune")

PRUNED: tuple[tuple[str, str], ...] = (
    ("gold", "item_similarities"),
    ("gold", "candidates"),
    ("gold", "recommendations"),
    ("gold", "metrics"),
    ("gold", "tuning"),
    ("gold", "training_runs"),
    ("gold", ease.TABLE),
    ("gold", "rerank_tuning"),
    ("gold", "rerank_inputs"),
    ("gold", "rerank_items"),
    ("ops", "quality_gates"),
    ("ops", "reports"),
)
DELTA_DEFAULT_RETENTION_HOURS = 168.0


def runs_newest_first(spark: SparkSession, config: ShelfConfig, layer: str, name: str) -> list[str]:
    """The run ids in the table, the one with the latest commit first (runs no commit names come last, by id)."""
    present = [
        r[0] for r in tables.read(spark, config, layer, name).select(RUN_ID).distinct().collect()
    ]  # a row per run
    commits = tables.history(spark, config, layer, name).select("version", "userMetadata").collect()  # a row per commit
    latest: dict[str, int] = {}
    for commit in commits:
        meta = commit["userMetadata"] or ""
        if meta.startswith("run_id="):
            run = meta.removeprefix("run_id=")
            latest[run] = max(latest.get(run, -1), int(commit["version"]))
    return sorted(present, key=lambda run: (-latest.get(run, -1), run))


def prune(spark: SparkSession, config: ShelfConfig, keep: int, retain_hours: float | None = None) -> dict[str, int]:
    """Delete all but the newest `keep` runs' rows of each PRUNED table, then VACUUM; returns rows deleted per table.

    Raises:
        InputDataError: `keep` is below 1 or `retain_hours` is negative.
    """
    if keep < 1:
        raise InputDataError(f"--keep must be at least 1 (the serving run), got {keep}.")
    hours = DELTA_DEFAULT_RETENTION_HOURS if retain_hours is None else retain_hours
    if hours < 0:
        raise InputDataError(f"--retain-hours must be 0 or more, got {hours:g}.")
    if hours < DELTA_DEFAULT_RETENTION_HOURS:  # asked for explicitly: Delta refuses it unless its check is off
        spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    deleted: dict[str, int] = {}
    for where in (config, holdout.holdout_config(config)):
        for layer, name in PRUNED:
            if not tables.exists(spark, where, layer, name):
                continue
            dropped = runs_newest_first(spark, where, layer, name)[keep:]
            rows = 0
            if dropped:
                condition = f"{RUN_ID} IN ({', '.join(tables.sql_string(r) for r in dropped)})"
                rows = tables.read(spark, where, layer, name).filter(F.expr(condition)).count()
                tables.delete_where(spark, where, layer, name, condition)
            tables.vacuum(spark, where, layer, name, hours)
            deleted[f"{where.storage.namespace}{layer}.{name}"] = rows
            log.info(
                "[prune] %s%s.%s: %d run(s) and %d row(s) deleted",
                where.storage.namespace,
                layer,
                name,
                len(dropped),
                rows,
            )
    return deleted
