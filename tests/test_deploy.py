"""spark-submit: the wheel built from this repo runs ingest and clean through pyspark's real spark-submit.

The run uses the cluster code path: the config leaves `spark.master` unset, so the step uses the
session spark-submit built (`--master local[2]`, Delta from `--jars`). The helpers here are shared
with tests/test_airflow.py.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core import tables
from pipelines.core.config import ShelfConfig, load_config
from pipelines.core.jars import delta_jars
from pipelines.core.runs import make_context
from pipelines.core.schemas import EVENT_TYPE, ITEM_ID, RUN_ID, SESSION_ID, STEP, USER_ID, USER_IDX
from tests.conftest import REPO

VENV_BIN = Path(sys.executable).parent
SPARK_SUBMIT = VENV_BIN / "spark-submit"
DELTA_CONF = [
    "--conf",
    "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
    "--conf",
    "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
    "--conf",
    "spark.ui.enabled=false",
]
SUBMIT_TIMEOUT_S = 1500  # a step takes about a minute on 2 idle cores; far more when they are shared


def build_wheel(out_dir: Path) -> Path:
    """`pip wheel --no-deps` of this repo into `out_dir`; returns the wheel."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out_dir), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = out_dir.glob("shelf-*.whl")
    return wheel


def extract_entry(wheel: Path, out_dir: Path) -> Path:
    """The spark-submit entry file, taken out of the wheel (that is where a cluster gets it)."""
    with zipfile.ZipFile(wheel) as archive:
        target = out_dir / "submit.py"
        target.write_bytes(archive.read("pipelines/submit.py"))
    return target


def write_run_config(tmp_path: Path, **sections: dict[str, object]) -> Path:
    """conf/test.yaml with data and tables under `tmp_path` and no master (spark-submit sets it).

    base.yaml is copied next to the overlay, as a deployment ships both.
    """
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "base.yaml").write_text((REPO / "conf" / "base.yaml").read_text())
    overlay = yaml.safe_load((REPO / "conf" / "test.yaml").read_text())
    overlay["spark"] = {**overlay.get("spark", {}), "master": None, "jars_dir": str(REPO / ".jars")}
    overlay["storage"] = {**overlay.get("storage", {}), "root": str(tmp_path / "tables")}
    overlay["source"] = {
        **overlay.get("source", {}),
        "path": str(tmp_path / "demo" / "events"),
        "catalog_path": str(tmp_path / "demo" / "catalog"),
    }
    for key, values in sections.items():
        overlay[key] = {**overlay.get(key, {}), **values}
    path = conf_dir / "run.yaml"
    path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    return path


def generate_demo(config: ShelfConfig) -> None:
    """Write the tiny demo shop (no Spark) where the config's source points."""
    from pipelines.generate import run as generate

    generate(None, config, make_context(None, None, config.generate.end))


def delta_jar_list() -> str:
    jars = delta_jars(REPO / ".jars")
    if not jars:
        pytest.fail(f"The Delta jars are missing in {REPO / '.jars'}; run 'make setup' to fetch them.")
    return ",".join(str(p) for p in jars)


def submit_env() -> dict[str, str]:
    """spark-submit's driver and workers must run this venv's python (pyarrow, numpy, the deps)."""
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}


def spark_submit(wheel: Path, entry: Path, step: str, conf: Path, run_id: str, as_of: str, cwd: Path) -> str:
    """Run one step through spark-submit on local[2]; returns its output (fails the test on error).

    spark-submit's PythonRunner pipes the driver's stderr into its own stdout, so both are returned.
    """
    cmd = [
        str(SPARK_SUBMIT),
        "--master",
        "local[2]",
        "--driver-memory",
        "1g",
        "--jars",
        delta_jar_list(),
        *DELTA_CONF,
        "--py-files",
        str(wheel),
        str(entry),
        step,
        "--conf",
        str(conf),
        "--run-id",
        run_id,
        "--as-of",
        as_of,
    ]
    done = subprocess.run(cmd, cwd=cwd, env=submit_env(), capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"spark-submit {step} failed ({done.returncode}):\n{output[-4000:]}"
    return output


def source_rows(config: ShelfConfig) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for part in sorted(Path(config.source.path).glob("*.csv")):
        with part.open(newline="") as handle:
            rows.extend(csv.DictReader(handle))
    return rows


@pytest.fixture(scope="module")
def submitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[ShelfConfig, Path, str, str]:
    """generate (in process) then ingest and clean through spark-submit with the built wheel."""
    tmp_path = tmp_path_factory.mktemp("deploy")
    wheel = build_wheel(tmp_path / "dist")
    entry = extract_entry(wheel, tmp_path)
    conf = write_run_config(tmp_path)
    config = load_config(conf)
    generate_demo(config)
    logs = ""
    for step in ("ingest", "clean"):
        logs += spark_submit(wheel, entry, step, conf, "submit-1", "2026-11-01", cwd=tmp_path)
    return config, wheel, logs, "submit-1"


@pytest.mark.slow
def test_the_steps_ran_from_the_wheel(submitted: tuple[ShelfConfig, Path, str, str]) -> None:
    _, wheel, logs, _ = submitted
    assert f"shelf package from {wheel}/pipelines/__init__.py" in logs
    assert "[ingest] done" in logs and "[clean] done" in logs


@pytest.mark.slow
def test_bronze_holds_the_source_rows_that_were_not_quarantined(
    spark: SparkSession, submitted: tuple[ShelfConfig, Path, str, str]
) -> None:
    config, _, _, run_id = submitted
    source = source_rows(config)
    bronze = tables.read(spark, config, "bronze", "events").filter(F.col(RUN_ID) == run_id)
    quarantined = (
        tables.read(spark, config, "quarantine", "events")
        .filter(F.col(RUN_ID) == run_id)
        .filter(F.col(STEP) == "ingest")  # clean quarantines rows of its own (bots), from bronze
    )
    columns = [USER_ID, ITEM_ID, EVENT_TYPE, SESSION_ID]
    bronze_keys = [tuple(r) for r in bronze.select(*columns).collect()]
    source_keys = {tuple(row[c] for c in columns) for row in source}

    assert len(bronze_keys) + quarantined.count() == len(source)
    assert set(bronze_keys) <= source_keys
    # Rows the generator made dirty never reach bronze: no user id, or an event type outside the mapping.
    assert all(user for user, *_ in bronze_keys)
    assert {event for _, _, event, _ in bronze_keys} <= {"view", "add_to_cart", "purchase", "rating"}
    dirty = [r for r in source if not r[USER_ID] or r[EVENT_TYPE] not in {"view", "add_to_cart", "purchase", "rating"}]
    assert dirty, "the demo generator should have produced dirty rows"
    assert quarantined.count() >= len(dirty)


@pytest.mark.slow
def test_clean_wrote_silver_for_the_submitted_run(
    spark: SparkSession, submitted: tuple[ShelfConfig, Path, str, str]
) -> None:
    config, _, _, run_id = submitted
    interactions = tables.read(spark, config, "silver", "interactions")
    assert {r[RUN_ID] for r in interactions.select(RUN_ID).distinct().collect()} == {run_id}
    users = interactions.agg(F.countDistinct(USER_IDX)).first()[0]
    generated_users = {r[USER_ID] for r in source_rows(config) if r[USER_ID]}
    assert 0 < users <= len(generated_users)
