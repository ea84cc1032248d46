"""`shelf run` over Spark Connect (no SparkContext on the client: Databricks serverless, standard access mode):
its tables, read back by this session (a second client), equal the local run's (tests/conftest.py `demo_run`:
same config, run id and as_of). The steps spark-submitted from the wheel to a standalone cluster are
tests/test_airflow.py's DAG run (one run for both: the DAG is how a cluster deployment submits them).

The Connect run is a separate client process started in a scratch working directory with relative paths, so
they must resolve on the client, not in the server's working directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core import tables
from pipelines.core.schemas import USER_ID, USER_IDX
from tests.conftest import COMPARED_TABLES, DEMO_RUN_ID, REPO, DemoRun, demo_run_args, make_test_config

# About 10 minutes on 2 idle cores (the shared demo run included). `pytest -m 'not servers'` leaves it out of a
# fast local loop.
pytestmark = [pytest.mark.slow, pytest.mark.servers]

RUN_TIMEOUT_S = 2400  # about 6 minutes on 2 idle cores; far more when they are shared


def shelf(args: list[str], cwd: Path) -> tuple[int, str]:
    """The installed `shelf` console script in its own process (the client), with its output."""
    script = Path(sys.executable).parent / "shelf"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    done = subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return done.returncode, done.stdout + done.stderr


def test_shelf_run_over_spark_connect_equals_a_local_run(
    spark: SparkSession, demo_run: DemoRun, connect_url: str, tmp_path: Path
) -> None:
    relative = [
        "run", "--conf", str(REPO / "conf" / "test.yaml"),
        "--set", "storage.root=tables",
        "--set", "source.path=demo/events",
        "--set", "source.catalog_path=demo/catalog",
        "--set", f"spark.remote={connect_url}",
        *demo_run_args(tmp_path)[-4:],  # --run-id e2e --as-of 2026-11-01
    ]  # fmt: skip
    code, out = shelf(relative, cwd=tmp_path)
    assert code == 0, out[-6000:]
    assert "[gate] passed" in out and "[rerank] done" in out  # the whole run, publish included, over Connect
    demo_run.assert_same_tables(spark, make_test_config(tmp_path), DEMO_RUN_ID)
    common = ["--conf", relative[2], "--set", "storage.root=tables", "--set", f"spark.remote={connect_url}"]
    assert_rollback_and_forget_run_over_connect(spark, common, tmp_path)


def assert_rollback_and_forget_run_over_connect(spark: SparkSession, common: list[str], root: Path) -> None:
    """`shelf rollback` (Delta RESTORE) and `shelf forget --vacuum` (DELETE, VACUUM, the models rewritten) as
    Connect clients: a new RESTORE version, then the user gone from every compared table and saved model."""
    config = make_test_config(root)
    served = tables.latest_version(spark, config, "gold", "recommendations")
    code, out = shelf(["rollback", *common, "--to-run", DEMO_RUN_ID], root)
    assert code == 0, out[-4000:]
    last = tables.history(spark, config, "gold", "recommendations", 1).first()
    assert last is not None and (last["version"], last["operation"]) == (served + 1, "RESTORE")

    victim = tables.read(spark, config, "gold", "recommendations").first()[USER_ID]
    index = tables.read(spark, config, "silver", "user_index").filter(F.col(USER_ID) == victim).first()[USER_IDX]
    code, out = shelf(["forget", *common, "--user", victim, "--vacuum"], root)
    assert code == 0, out[-4000:]
    for layer, name in COMPARED_TABLES:
        left = tables.read(spark, config, layer, name)
        hits = (F.col(USER_ID) == victim) if USER_ID in left.columns else (F.col(USER_IDX) == index)
        assert left.count() > 0 and left.filter(hits).count() == 0, f"{layer}.{name} still holds {victim}"
    models = list((root / "tables").glob("*models/*/*/userFactors"))  # <ns>models/<run>/<model>/userFactors
    assert models and all(spark.read.parquet(str(m)).filter(F.col("id") == index).count() == 0 for m in models)
