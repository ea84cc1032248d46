"""A run's evaluation report (summary.md and its PNG plots) kept in the Delta table ops.reports.

The report lives beside the tables, wherever `storage.root` is (a laptop folder, s3a://, abfss://, dbfs:/), and
is written by Spark: nothing stays on the driver's disk, where a job cluster would lose it. One row per file:
(run_id, name, media_type, content binary); a rerun of the run replaces its rows. `shelf report` and the
notebook API read it back; `storage.report_dir` (optional) also gets a copy as plain files for people who want
them on a mounted folder.
"""

from __future__ import annotations

from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.schemas import RUN_ID

TABLE = ("ops", "reports")
SCHEMA = f"{RUN_ID} string, name string, media_type string, content binary"
SUMMARY = "summary.md"
MEDIA_TYPES = {".md": "text/markdown", ".png": "image/png"}


def save(spark: SparkSession, config: ShelfConfig, run_id: str, files: dict[str, bytes]) -> str:
    """Keep `files` (name -> bytes) as the run's rows of ops.reports, one Delta commit; returns where they are.

    With storage.report_dir set, the files are also written to <report_dir>/<run_id>/ (a local or mounted folder).
    """
    rows = [(run_id, name, MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream"), data) for name, data in files.items()]  # fmt: skip
    tables.write(spark.createDataFrame(rows, SCHEMA), config, *TABLE, run_id, mode="run", comment=None)
    if config.storage.report_dir:
        export(files, Path(config.storage.report_dir) / run_id)
    return f"{'.'.join(TABLE)} at {tables.location(config, *TABLE)} (run_id {run_id})"


def read(spark: SparkSession, config: ShelfConfig, run_id: str) -> dict[str, bytes]:
    """The run's report files (name -> bytes), in name order; a few small files per run, never per user.

    Raises:
        InputDataError: the run has no report (its evaluate step has not run).
    """
    found = []
    if tables.exists(spark, config, *TABLE):
        found = tables.read(spark, config, *TABLE).filter(F.col(RUN_ID) == run_id).orderBy("name").collect()
    if not found:
        raise InputDataError(
            f"Run {run_id} has no evaluation report in {'.'.join(TABLE)}; run 'shelf evaluate --run-id {run_id}' first."
        )
    return {row["name"]: bytes(row["content"]) for row in found}


def export(files: dict[str, bytes], folder: str | Path) -> list[Path]:
    """Write report files into a local `folder` (created when missing); returns their paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return [out / name for name in files]
