"""The one module that reads and writes Delta tables: writes, history and time travel (sources: `sources`).

Tables live at `<storage.root>/<layer>/<name>` locally, or as `<storage.catalog>.<layer>_<name>`
on a cluster. Every write is one Delta commit and idempotent for a run id: rerunning a step with
the same run id replaces its own rows (`replaceWhere`) or the whole snapshot, never appends twice.
A commit Delta rejects because another writer committed first is retried (3 attempts, 1 s then 2 s apart).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

from delta.exceptions import (
    ConcurrentAppendException,
    ConcurrentDeleteDeleteException,
    ConcurrentDeleteReadException,
    ConcurrentTransactionException,
    ConcurrentWriteException,
    DeltaConcurrentModificationException,
    MetadataChangedException,
    ProtocolChangedException,
)
from delta.tables import DeltaTable
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import functions as F

from pipelines.core import uris
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError, ShelfError
from pipelines.core.schemas import RUN_ID
from pipelines.core.session import parallelism, session_conf

log = logging.getLogger("shelf.tables")


class ConcurrentWriteError(ShelfError):
    """Another process kept committing to the same table: this step's write gave up after its retries."""

    exit_code = 5


WriteMode = Literal["overwrite", "run"]


def location(config: ShelfConfig, layer: str, name: str) -> str:
    """Path (local) or catalog name (cluster) of a table; storage.namespace prefixes the layer."""
    layer = f"{config.storage.namespace}{layer}"
    if config.storage.catalog:
        return f"{config.storage.catalog}.{layer}_{name}"
    return uris.join(config.storage.root, layer, name)


def _is_path(config: ShelfConfig) -> bool:
    return not config.storage.catalog


def target(config: ShelfConfig, layer: str, name: str) -> str:
    """A table as SQL names it: delta.`<uri>` (by path) or <catalog>.<layer>_<name>."""
    where = location(config, layer, name)
    return uris.sql_path(where) if _is_path(config) else where


def sql_string(value: str) -> str:
    """`value` as a Spark SQL string literal (quotes and backslashes escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def exists(spark: SparkSession, config: ShelfConfig, layer: str, name: str) -> bool:
    where = location(config, layer, name)
    if _is_path(config):
        return is_delta(spark, where)
    return bool(spark.catalog.tableExists(where))


def is_delta(spark: SparkSession, path: str) -> bool:
    """Whether `path` holds a Delta table (its schema resolves from a Delta log; no Spark job). Works on Spark Connect,
    where Delta's `isDeltaTable` needs a Delta Connect handler; cheaper than `DESCRIBE DETAIL` (40 vs 95 ms)."""
    try:
        spark.read.format("delta").load(path).schema  # noqa: B018  (Connect resolves the schema only when asked)
    except AnalysisException:  # DELTA_MISSING_DELTA_TABLE / PATH_NOT_FOUND: absent, empty, or another format
        return False
    return True


def delta_table(spark: SparkSession, config: ShelfConfig, layer: str, name: str) -> DeltaTable:
    """Delta's Python handle (classic sessions only: `merge`, which only `shelf stream` uses)."""
    where = location(config, layer, name)
    return DeltaTable.forPath(spark, where) if _is_path(config) else DeltaTable.forName(spark, where)


def detail(spark: SparkSession, config: ShelfConfig, layer: str, name: str) -> Row:
    """The table's `DESCRIBE DETAIL` row (format, location, properties, ...)."""
    row = spark.sql(f"DESCRIBE DETAIL {target(config, layer, name)}").first()
    assert row is not None  # DESCRIBE DETAIL of an existing table has exactly one row
    return row


def read(spark: SparkSession, config: ShelfConfig, layer: str, name: str, version: int | None = None) -> DataFrame:
    """Read a Delta table, optionally at a past version (time travel).

    Raises:
        InputDataError: the table does not exist yet (its step has not run).
    """
    where = location(config, layer, name)
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    try:  # one snapshot lookup, not an existence check and then the read's own; Connect resolves only when asked
        frame = reader.load(where) if _is_path(config) else reader.table(where)
        frame.schema  # noqa: B018
    except AnalysisException:
        if exists(spark, config, layer, name):
            raise  # the table is there: a bad version, a corrupt log, ... is not "run the step first"
        raise InputDataError(
            f"Table {layer}.{name} does not exist at {where}; run the step that writes it first (or 'shelf run')."
        ) from None
    return frame


def write(
    df: DataFrame,
    config: ShelfConfig,
    layer: str,
    name: str,
    run_id: str,
    mode: WriteMode = "overwrite",
    comment: str | None = None,
) -> None:
    """Write `df` as one Delta commit.

    mode "overwrite": the table becomes `df` (a snapshot per run; older runs by time travel).
    mode "run": rows of `run_id` are replaced, other runs' rows stay (idempotent accumulation).
    """
    # mergeSchema: a table written by an earlier version gains the new nullable columns (e.g. ease_score).
    replace = f"{RUN_ID} = '{run_id}'" if mode == "run" else None
    _commit(df, config, layer, name, run_id, replace_where=replace, merge_schema=True)
    if comment:
        df.sparkSession.sql(f"COMMENT ON TABLE {target(config, layer, name)} IS '{comment.replace(chr(39), '')}'")


# A commit that loses a race with another writer of the same table (Delta's optimistic concurrency) is
# retried from scratch: the write re-reads the table, so it replaces exactly what it would have replaced.
COMMIT_ATTEMPTS = 3
COMMIT_BACKOFF_SECONDS = (1.0, 2.0)  # before attempts 2 and 3: deterministic, no jitter
CONFLICTS: tuple[type[Exception], ...] = (
    DeltaConcurrentModificationException,
    ConcurrentWriteException,
    MetadataChangedException,
    ProtocolChangedException,
    ConcurrentAppendException,
    ConcurrentDeleteReadException,
    ConcurrentDeleteDeleteException,
    ConcurrentTransactionException,
)


def _commit_with_retry(commit: Callable[[], None], layer: str, name: str, run_id: str) -> None:
    """Run `commit` up to COMMIT_ATTEMPTS times while Delta reports a concurrent modification.

    Raises:
        ConcurrentWriteError: every attempt lost to another writer.
    """
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            commit()
            return
        except CONFLICTS as exc:
            if attempt == COMMIT_ATTEMPTS:
                raise ConcurrentWriteError(
                    f"Table {layer}.{name} was changed by another writer during each of {COMMIT_ATTEMPTS} commit "
                    f"attempts of run {run_id}; run one writer per table at a time, then rerun this step."
                ) from exc
            pause = COMMIT_BACKOFF_SECONDS[attempt - 1]
            log.warning(
                "commit to %s.%s (run %s) lost to a concurrent writer (%s), attempt %d of %d; retrying in %.0fs",
                layer, name, run_id, exc.__class__.__name__, attempt, COMMIT_ATTEMPTS, pause,
            )  # fmt: skip
            time.sleep(pause)


def history(spark: SparkSession, config: ShelfConfig, layer: str, name: str, limit: int | None = None) -> DataFrame:
    """The table's commits, newest first (`DESCRIBE HISTORY`, read from the Delta log: no Spark job)."""
    last = f" LIMIT {int(limit)}" if limit is not None else ""
    return spark.sql(f"DESCRIBE HISTORY {target(config, layer, name)}{last}")


def write_replacing(
    df: DataFrame,
    config: ShelfConfig,
    layer: str,
    name: str,
    run_id: str,
    keys: dict[str, str],
    absent: bool = False,
) -> None:
    """Write `df` as one Delta commit that replaces only the rows matching `keys` (column -> value).

    Used where several steps of one run share a table (quarantine.events, ops.run_metrics): keyed by
    run id and step, a rerun of one step replaces its own rows and leaves the other steps' rows alone.

    `absent=True`: the caller knows no row matches `keys` yet (a stream's micro-batch run for the first time), so
    the commit is a blind append: it reads none of the table's files (a replacing write looks up the files
    holding the keys' rows first: measured 0.9 s against 0.2 s a commit on local[2], see docs/BENCHMARKS.md).
    """
    predicate = " AND ".join(f"{col} = '{value.replace(chr(39), '')}'" for col, value in keys.items())
    _commit(df, config, layer, name, run_id, replace_where=predicate, append=absent)


def _commit(
    df: DataFrame,
    config: ShelfConfig,
    layer: str,
    name: str,
    run_id: str,
    replace_where: str | None,
    append: bool = False,
    merge_schema: bool = False,
) -> None:
    """One Delta commit of `df` tagged run_id=<run_id>, retried on conflicts: a blind append (`append`), else an
    overwrite of the rows matching `replace_where` when the table exists (`merge_schema`: gaining new nullable
    columns), else of the whole table (created, or replaced with `replace_where` None)."""
    where = location(config, layer, name)
    spark = df.sparkSession

    def commit() -> None:  # rebuilt per attempt: a concurrent writer may have created the table meanwhile
        writer = df.write.format("delta").option("userMetadata", f"run_id={run_id}")
        if append:
            writer = writer.mode("append")
        elif replace_where is not None and exists(spark, config, layer, name):
            writer = writer.mode("overwrite").option("replaceWhere", replace_where)
            if merge_schema:
                writer = writer.option("mergeSchema", "true")
        else:
            writer = writer.mode("overwrite").option("overwriteSchema", "true")
        if _is_path(config):
            writer.save(where)
        else:
            writer.saveAsTable(where)

    _commit_with_retry(commit, layer, name, run_id)


def add_columns(spark: SparkSession, config: ShelfConfig, layer: str, name: str, columns: dict[str, str]) -> None:
    """Add the nullable `columns` (name -> SQL type) a table lacks, in one metadata commit (none when all exist)."""
    present = set(read(spark, config, layer, name).columns)
    missing = {c: kind for c, kind in columns.items() if c not in present}
    if not missing:
        return
    spec = ", ".join(f"{c} {kind}" for c, kind in missing.items())
    _alter(spark, config, layer, name, f"ADD COLUMNS ({spec})", "schema")


def set_properties(spark: SparkSession, config: ShelfConfig, layer: str, name: str, properties: dict[str, str]) -> None:
    """Set Delta table properties the table does not have yet, in one commit (none when all are set)."""
    present = dict(detail(spark, config, layer, name)["properties"] or {})
    missing = {k: v for k, v in properties.items() if present.get(k) != v}
    if not missing:
        return
    spec = ", ".join(f"'{k}' = '{v}'" for k, v in missing.items())
    _alter(spark, config, layer, name, f"SET TBLPROPERTIES ({spec})", "properties")


def _alter(spark: SparkSession, config: ShelfConfig, layer: str, name: str, clause: str, what: str) -> None:
    """`ALTER TABLE <the table> <clause>` as one metadata commit, retried on a concurrent commit."""

    def commit() -> None:
        spark.sql(f"ALTER TABLE {target(config, layer, name)} {clause}")

    _commit_with_retry(commit, layer, name, what)


HISTORY_LOOKBACK = 100  # commits commits_since and last_commit_of_run read from the log first (no Spark job)
# Operations that never change a table's rows (compaction, vacuum): commits_since does not count them.
NO_DATA_CHANGE = ("OPTIMIZE", "VACUUM START", "VACUUM END")


def commits_since(
    spark: SparkSession,
    config: ShelfConfig,
    layer: str,
    name: str,
    version: int | None,
    own: str = "MERGE",
    own_metadata: str = "",
) -> tuple[int, bool]:
    """(latest version, whether a commit after `version` may have changed rows and is not one's own: an `own`
    operation whose userMetadata starts with `own_metadata`), read from the Delta log (the history of the last
    HISTORY_LOOKBACK commits: no Spark job). Compaction and vacuum commits (NO_DATA_CHANGE) do not count.
    `version` None: every commit counts."""
    rows = (
        history(spark, config, layer, name, HISTORY_LOOKBACK).select("version", "operation", "userMetadata").collect()
    )
    latest = max(int(r["version"]) for r in rows)
    if version is None or min(int(r["version"]) for r in rows) > version + 1:
        return latest, True

    def harmless(r: Row) -> bool:
        mine = r["operation"] == own and (r["userMetadata"] or "").startswith(own_metadata)
        return mine or r["operation"] in NO_DATA_CHANGE

    return latest, any(not harmless(r) for r in rows if int(r["version"]) > version)


def merge(
    spark: SparkSession, config: ShelfConfig, layer: str, name: str, run_id: str, apply: Callable[[DeltaTable], None]
) -> None:
    """Run one Delta MERGE (`apply` builds and executes it on the table) with the conflict retry of `write`.

    `apply` is called again on each attempt, so it must build its source from fresh reads.
    """

    def commit() -> None:
        apply(delta_table(spark, config, layer, name))

    _commit_with_retry(commit, layer, name, run_id)


# ------------------------------------- maintenance: every table shelf writes (what `shelf forget` scans), rollback
KNOWN_TABLES: tuple[tuple[str, str], ...] = (
    ("bronze", "events"), ("bronze", "items"), ("quarantine", "events"), ("silver", "interactions"),
    ("silver", "user_index"), ("silver", "item_index"), ("silver", "catalog"), ("gold", "user_factors"),
    ("gold", "item_factors"), ("gold", "item_similarities"), ("gold", "candidates"), ("gold", "recommendations"),
    ("bronze", "stream_events"), ("gold", "metrics"), ("gold", "tuning"), ("gold", "training_runs"),
    ("gold", "ease_neighbours"), ("gold", "rerank_tuning"), ("gold", "rerank_inputs"), ("gold", "rerank_items"),
    ("ops", "run_metrics"), ("ops", "quality_gates"), ("ops", "reports"),
)  # fmt: skip


WRITES = ("WRITE", "CREATE OR REPLACE TABLE AS SELECT", "CREATE TABLE AS SELECT", "REPLACE TABLE AS SELECT")


def last_commit_of_run(
    spark: SparkSession, config: ShelfConfig, layer: str, name: str, run_id: str, operations: tuple[str, ...] = ()
) -> Row | None:
    """The newest commit of `run_id` (one of `operations`, when given) to the table, or None. The last
    HISTORY_LOOKBACK commits are looked at first (no Spark job), the whole history only when they hold none: the
    cost does not grow with the history (a nightly adds commits every day)."""
    cols, tag = ("version", "operation", "userMetadata", "operationMetrics"), f"run_id={run_id}"

    def of_run(rows: list[Row]) -> list[Row]:
        return [r for r in rows if r["userMetadata"] == tag and (not operations or r["operation"] in operations)]

    recent = history(spark, config, layer, name, HISTORY_LOOKBACK).select(*cols).collect()
    found = of_run(recent)
    if not found and len(recent) == HISTORY_LOOKBACK:  # older than the lookback: that run's few commits, all
        found = of_run(history(spark, config, layer, name).select(*cols).filter(F.col("userMetadata") == tag).collect())
    return max(found, key=lambda r: int(r["version"]), default=None)


def version_of_run(spark: SparkSession, config: ShelfConfig, layer: str, name: str, run_id: str) -> int | None:
    """The latest version of a table written by `run_id` (its commits carry userMetadata run_id=...)."""
    found = last_commit_of_run(spark, config, layer, name, run_id, WRITES)
    return None if found is None else int(found["version"])


def latest_version(spark: SparkSession, config: ShelfConfig, layer: str, name: str) -> int:
    """The table's current version: its newest commit (one entry of the log's history, newest first)."""
    row = history(spark, config, layer, name, 1).select("version").first()
    if row is None or row[0] is None:
        raise InputDataError(f"Table {layer}.{name} has no history at {location(config, layer, name)}.")
    return int(row[0])


def restore(spark: SparkSession, config: ShelfConfig, layer: str, name: str, version: int) -> None:
    """Make `version` the table's current state again, as a new commit (Delta RESTORE)."""
    spark.sql(f"RESTORE TABLE {target(config, layer, name)} TO VERSION AS OF {int(version)}")


def delete_where(spark: SparkSession, config: ShelfConfig, layer: str, name: str, condition: str) -> None:
    """Delete the rows matching the SQL `condition` in one Delta commit (`DELETE FROM`)."""
    spark.sql(f"DELETE FROM {target(config, layer, name)} WHERE {condition}")


LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"  # VACUUM's listing tasks


def vacuum(spark: SparkSession, config: ShelfConfig, layer: str, name: str, retention_hours: float) -> None:
    """Remove data files no version younger than `retention_hours` needs (makes deletes physical).

    On a table with deletion vectors (gold.recommendations once `shelf stream` wrote it) a delete only marks
    rows, so the files holding them are rewritten first (REORG ... APPLY (PURGE)) and the old ones vacuumed.
    VACUUM's listing stage has LISTING_PARALLELISM tasks, 10,000 unless set (35 s per table on 2 cores): 2 per core.
    """
    properties = dict(detail(spark, config, layer, name)["properties"] or {})
    if properties.get("delta.enableDeletionVectors") == "true":
        spark.sql(f"REORG TABLE {target(config, layer, name)} APPLY (PURGE)")
    listing = spark.conf.get(LISTING_PARALLELISM, None) or str(2 * parallelism(spark))
    with session_conf(spark, {LISTING_PARALLELISM: listing}):
        spark.sql(f"VACUUM {target(config, layer, name)} RETAIN {retention_hours:g} HOURS")
