"""`shelf rollback` and `shelf forget`: put a table back to an earlier run; erase one user everywhere.

rollback: `--table layer.name` (default gold.recommendations) is restored with Delta RESTORE to
`--to-version N` or to the latest version written by `--to-run RUN_ID` (each shelf commit carries
`run_id=<id>` as its userMetadata). The restore is itself a new version, so it can be undone too.

forget: deletes every row of the given users from every table shelf writes, in one Delta DELETE per
table: rows whose `user_id` is the id (its pseudonym when privacy.pseudonymize_users is on), rows
whose `user_idx` is the user's dense id (looked up in silver.user_index first), and quarantine rows
whose raw text holds the id as a whole field. The saved ALS models' user factors are rewritten
without the user. Deleted rows stay in older Delta versions until VACUUM removes those files:
`--vacuum` runs it with zero retention (this also ends time travel to earlier versions; see
docs/RELIABILITY.md). The source files themselves belong to the shop and must be purged there.
"""

from __future__ import annotations

import logging

from pyspark.errors import AnalysisException
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core import holdout, tables, uris
from pipelines.core.als import model_path
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.privacy import key_from_env, pseudonym
from pipelines.core.schemas import RAW, RUN_ID, USER_ID, USER_IDX

log = logging.getLogger("shelf.maintenance")

DEFAULT_TABLE = "gold.recommendations"
MODELS = "models"
USER_FACTORS = "userFactors"


def split_table_name(table: str) -> tuple[str, str]:
    """'gold.recommendations' -> ('gold', 'recommendations').

    Raises:
        InputDataError: not one of the tables shelf writes.
    """
    layer, _, name = table.partition(".")
    if (layer, name) not in tables.KNOWN_TABLES:
        known = ", ".join(f"{a}.{b}" for a, b in tables.KNOWN_TABLES)
        raise InputDataError(f"Unknown table '{table}'; --table takes one of {known}.")
    return layer, name


def rollback(spark: SparkSession, config: ShelfConfig, table: str, to_version: int | None, to_run: str | None) -> int:
    """Restore `table` to a version or to a run's version; returns the version restored.

    Raises:
        InputDataError: the table is absent, neither or both targets are given, or the target does not exist.
    """
    layer, name = split_table_name(table)
    if (to_version is None) == (to_run is None):
        raise InputDataError("Give exactly one of --to-version N or --to-run RUN_ID.")
    if not tables.exists(spark, config, layer, name):
        raise InputDataError(
            f"Table {table} does not exist at {tables.location(config, layer, name)}; nothing to roll back."
        )
    latest = tables.latest_version(spark, config, layer, name)
    if to_run is not None:
        found = tables.version_of_run(spark, config, layer, name, to_run)
        if found is None:
            raise InputDataError(f"No version of {table} was written by run {to_run}; see its history for run ids.")
        to_version = found
    assert to_version is not None
    if not 0 <= to_version <= latest:
        raise InputDataError(f"{table} has versions 0..{latest}; --to-version {to_version} is not one of them.")
    tables.restore(spark, config, layer, name, to_version)
    log.info("[rollback] %s restored to version %d (was %d) as version %d", table, to_version, latest, latest + 1)
    return to_version


def _stored_ids(config: ShelfConfig, user_ids: list[str]) -> list[str]:
    if not config.privacy.pseudonymize_users:
        return user_ids
    key = key_from_env(config.privacy)
    return [pseudonym(u, key) for u in user_ids]


def _raw_holds(ids: list[str]) -> list[str]:
    """SQL conditions: raw text holding one of `ids` as a whole field (same field rule as pseudonymisation)."""
    terms = []
    for user in ids:
        quoted = "\\Q" + user.replace("\\E", "\\E\\\\E\\Q") + "\\E"
        pattern = f"(^|[^A-Za-z0-9_.-]){quoted}($|[^A-Za-z0-9_.-])"
        terms.append(f"{RAW} RLIKE {tables.sql_string(pattern)}")
    return terms


def _forget_in_models(spark: SparkSession, config: ShelfConfig, indexes: list[int]) -> int:
    """Rewrite the userFactors of each saved ALS model that holds one of the users; returns how many changed.

    The models are found through gold.training_runs (one row per train run) and read and written by Spark
    alone, so this works on any storage root (S3, HDFS, DBFS, local). The kept rows are materialised on the
    executors (a local checkpoint) before the model's folder is overwritten with them.
    """
    if not tables.exists(spark, config, "gold", "training_runs"):
        return 0
    runs = sorted(r[0] for r in tables.read(spark, config, "gold", "training_runs").select(RUN_ID).distinct().collect())
    changed = 0
    for run_id in runs:  # one row per train run
        factors = uris.join(model_path(config, run_id), USER_FACTORS)
        try:
            frame = spark.read.parquet(factors)
        except AnalysisException:  # the run's model folder is gone (e.g. pruned): nothing to forget there
            continue
        if frame.filter(F.col("id").isin(indexes)).limit(1).count() == 0:
            continue
        kept = frame.filter(~F.col("id").isin(indexes)).localCheckpoint(eager=True)
        kept.write.mode("overwrite").parquet(factors)
        changed += 1
    return changed


def forget(spark: SparkSession, config: ShelfConfig, user_ids: list[str], vacuum: bool = False) -> dict[str, int]:
    """Delete `user_ids` from every table and saved model; returns rows deleted per table.

    Raises:
        InputDataError: no user id was given.
    """
    if not user_ids or any(not u.strip() for u in user_ids):
        raise InputDataError("Give at least one non-empty --user ID to forget.")
    ids = _stored_ids(config, user_ids)
    indexes: list[int] = []
    if tables.exists(spark, config, "silver", "user_index"):
        index = tables.read(spark, config, "silver", "user_index").filter(F.col(USER_ID).isin(ids))
        indexes = sorted(int(r[USER_IDX]) for r in index.select(USER_IDX).collect())  # one row per forgotten user
    deleted: dict[str, int] = {}
    for where in (config, holdout.holdout_config(config)):  # the real tables, then the evaluation's holdout
        deleted.update(_forget_in_tables(spark, where, ids, indexes, vacuum))
        if indexes:
            models = _forget_in_models(spark, where, indexes)
            deleted[f"{where.storage.namespace}{MODELS}"] = models
    deleted.setdefault(MODELS, 0)
    log.info("[forget] %d user(s): rows deleted per table %s", len(ids), deleted)
    return deleted


def _forget_in_tables(
    spark: SparkSession, config: ShelfConfig, ids: list[str], indexes: list[int], vacuum: bool
) -> dict[str, int]:
    """Delete the users' rows from every known table of config's namespace; returns rows deleted per table."""
    deleted: dict[str, int] = {}
    for layer, name in (*tables.KNOWN_TABLES, ("gold", holdout.TEST_TABLE)):
        if not tables.exists(spark, config, layer, name):
            continue
        columns = set(tables.read(spark, config, layer, name).columns)
        terms = []
        if USER_ID in columns:
            terms.append(f"{USER_ID} IN ({', '.join(tables.sql_string(u) for u in ids)})")
        if USER_IDX in columns and indexes:
            terms.append(f"{USER_IDX} IN ({', '.join(str(int(i)) for i in indexes)})")
        if RAW in columns:
            terms.extend(_raw_holds(ids))
        if not terms:
            continue
        condition = " OR ".join(f"({t})" for t in terms)  # SQL: DELETE FROM takes it over Spark Connect too
        matching = tables.read(spark, config, layer, name).filter(F.expr(condition)).count()
        if matching:
            tables.delete_where(spark, config, layer, name, condition)
            if vacuum:
                spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
                tables.vacuum(spark, config, layer, name, 0.0)
        deleted[f"{config.storage.namespace}{layer}.{name}"] = matching
    return deleted
