"""Reading what shelf is given: source files and folders by URI, catalog tables, and the stream's landing table.

Every location may be remote (`s3a://`, `abfss://`, `hdfs://`, `/Volumes/...`): only a bare local path or
a `file:` URI is looked at with the driver's file IO; anything else is Spark's to list.
"""

from __future__ import annotations

import os

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from pipelines.core import uris
from pipelines.core.errors import InputDataError
from pipelines.core.tables import is_delta


def path_exists(spark: SparkSession, location: str) -> bool:
    """Whether a file or folder is at `location`: the driver's disk for a local one, a Spark listing otherwise."""
    if uris.is_local(location):
        return os.path.exists(uris.local_path(location))
    return listable(spark, location)


def listable(spark: SparkSession, location: str) -> bool:
    """Whether Spark finds anything at `location` (it lists the path when resolving a file source)."""
    try:
        spark.read.format("binaryFile").load(location).schema  # noqa: B018 - resolving lists the path
    except AnalysisException as exc:
        if exc.getCondition() == "PATH_NOT_FOUND":
            return False
        raise
    return True


def read_source_table(spark: SparkSession, name: str, config_key: str) -> DataFrame:
    """Read a catalog table (`cat.schema.events`, or `delta.`<uri>``) as a source; `_source_file` is its name.

    Raises:
        InputDataError: the table does not exist or cannot be read; names the config key to fix.
    """
    try:
        df = spark.read.table(name)
        df.schema  # noqa: B018 - resolves the name now, so a missing table fails here with the key to fix
    except Exception as exc:
        raise InputDataError(
            f"Source table {name} could not be read ({exc.__class__.__name__}); set {config_key} to an existing "
            "table the session can see."
        ) from exc
    return df.withColumn("_source_file", F.lit(name))


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
    if uris.local_missing(path):
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


def read_stream(spark: SparkSession, path: str, config_key: str, max_files_per_trigger: int | None = None) -> DataFrame:
    """A streaming read of the Delta table at `path` (new commits only, in commit order).

    Raises:
        InputDataError: `path` is not a Delta table; names the config key to fix.
    """
    if not is_delta(spark, path):
        raise InputDataError(
            f"Stream source {path} is not a Delta table; point {config_key} at the table the tracker appends to."
        )
    reader = spark.readStream.format("delta")
    if max_files_per_trigger is not None:
        reader = reader.option("maxFilesPerTrigger", str(max_files_per_trigger))
    return reader.load(path)
