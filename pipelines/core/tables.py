"""The one module that reads and writes data: sources, Delta tables, history and time travel.

Tables live at `<storage.root>/<layer>/<name>` locally, or as `<storage.catalog>.<layer>_<name>`
on a cluster. Every write is one Delta commit and idempotent for a run id: rerunning a step with
the same run id replaces its own rows (`replaceWhere`) or the whole snapshot, never appends twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.schemas import RUN_ID

WriteMode = Literal["overwrite", "run"]


def location(config: ShelfConfig, layer: str, name: str) -> str:
    """Path (local) or catalog name (cluster) of a table."""
    if config.storage.catalog:
        return f"{config.storage.catalog}.{layer}_{name}"
    return str(Path(config.storage.root) / layer / name)


def _is_path(config: ShelfConfig) -> bool:
    return not config.storage.catalog


def exists(spark: SparkSession, config: ShelfConfig, layer: str, name: str) -> bool:
    where = location(config, layer, name)
    if _is_path(config):
        return DeltaTable.isDeltaTable(spark, where)
    return bool(spark.catalog.tableExists(where))


def delta_table(spark: SparkSession, config: ShelfConfig, layer: str, name: str) -> DeltaTable:
    where = location(config, layer, name)
    return DeltaTable.forPath(spark, where) if _is_path(config) else DeltaTable.forName(spark, where)


def read(
    spark: SparkSession,
    config: ShelfConfig,
    layer: str,
    name: str,
    version: int | None = None,
) -> DataFrame:
    """Read a Delta table, optionally at a past version (time travel).

    Raises:
        InputDataError: the table does not exist yet (its step has not run).
    """
    if not exists(spark, config, layer, name):
        raise InputDataError(
            f"Table {layer}.{name} does not exist at {location(config, layer, name)}; run the step that "
            "writes it first (or 'shelf run')."
        )
    where = location(config, layer, name)
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(where) if _is_path(config) else reader.table(where)


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
    where = location(config, layer, name)
    spark = df.sparkSession
    writer = df.write.format("delta").option("userMetadata", f"run_id={run_id}")
    if mode == "run" and exists(spark, config, layer, name):
        writer = writer.mode("overwrite").option("replaceWhere", f"{RUN_ID} = '{run_id}'")
    else:
        writer = writer.mode("overwrite").option("overwriteSchema", "true")
    if _is_path(config):
        writer.save(where)
    else:
        writer.saveAsTable(where)
    if comment:
        target = f"delta.`{Path(where).resolve()}`" if _is_path(config) else where
        spark.sql(f"COMMENT ON TABLE {target} IS '{comment.replace(chr(39), '')}'")


def history(spark: SparkSession, config: ShelfConfig, layer: str, name: str) -> DataFrame:
    return delta_table(spark, config, layer, name).history()


def read_source(
    spark: SparkSession,
    path: str,
    fmt: str,
    config_key: str,
    schema: StructType | None = None,
    options: dict[str, str] | None = None,
) -> DataFrame:
    """Read an input file or folder in csv/json/parquet/delta.

    Raises:
        InputDataError: the path does not exist or cannot be read; names the config key to fix.
    """
    if "://" not in path and not Path(path).exists():
        raise InputDataError(f"Source path {path} does not exist; set {config_key} to an existing file or folder.")
    reader = spark.read.format(fmt).options(**(options or {}))
    if schema is not None:
        reader = reader.schema(schema)
    try:
        return reader.load(path).withColumn("_source_file", F.input_file_name())
    except Exception as exc:
        raise InputDataError(
            f"Source {path} could not be read as {fmt} ({exc.__class__.__name__}); check {config_key} "
            "and the source format."
        ) from exc


def write_replacing(
    df: DataFrame,
    config: ShelfConfig,
    layer: str,
    name: str,
    run_id: str,
    keys: dict[str, str],
) -> None:
    """Write `df` as one Delta commit that replaces only the rows matching `keys` (column -> value).

    Used where several steps of one run share a table (quarantine.events, ops.run_metrics): keyed by
    run id and step, a rerun of one step replaces its own rows and leaves the other steps' rows alone.
    """
    where = location(config, layer, name)
    spark = df.sparkSession
    writer = df.write.format("delta").option("userMetadata", f"run_id={run_id}").mode("overwrite")
    if exists(spark, config, layer, name):
        predicate = " AND ".join(f"{col} = '{value.replace(chr(39), '')}'" for col, value in keys.items())
        writer = writer.option("replaceWhere", predicate)
    else:
        writer = writer.option("overwriteSchema", "true")
    if _is_path(config):
        writer.save(where)
    else:
        writer.saveAsTable(where)
