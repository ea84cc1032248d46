"""dags/shelf_daily.py under real Airflow 3 (its own venv, .venv-airflow, made by `make airflow`).

Airflow's python cannot import shelf's pyspark (its Spark provider installs pyspark-client), so the
checks run as subprocesses of .venv-airflow/bin/python and airflow; the tables the DAG wrote are
read back with this venv's Spark.

The DAG run is also the deployment test: every step goes through pyspark's real spark-submit to a standalone
cluster (master, worker and executors in their own JVMs) with the wheel built from this repo in --py-files, the
entry file taken out of the wheel and a config without `spark.master` (the cluster code path); the published
tables must equal a local `shelf run`'s, and the checks of what a submitted ingest and clean wrote read the same
run.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import load_config
from pipelines.core.schemas import EVENT_TYPE, ITEM_ID, RUN_ID, SESSION_ID, STEP, USER_ID, USER_IDX
from pipelines.steps import GATE, ORCHESTRATED
from tests.conftest import REPO, DemoRun
from tests.submitting import (
    delta_jar_list,
    extract_entry,
    generate_demo,
    source_rows,
    write_run_config,
)

AIRFLOW_BIN = REPO / ".venv-airflow" / "bin"
DAG_ID = "shelf_daily"
STEPS = list(ORCHESTRATED)  # evaluate and the gate before the publishing steps, as `shelf run` orders them
DAG_TEST_TIMEOUT_S = 2700  # about 5 minutes on 2 idle cores; far more when they are shared

# Runs under .venv-airflow's python: load the dags folder into a DagBag and print what the test checks.
DAGBAG_CHECK = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("shelf_daily")
tasks = {} if dag is None else {
    t.task_id: {
        "types": [c.__name__ for c in type(t).__mro__],
        "downstream": sorted(t.downstream_task_ids),
        "retries": t.retries,
        "conn_id": t._conn_id,
        "application_args": list(t.application_args),
    }
    for t in dag.tasks
}
print(json.dumps({
    "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dags),
    "schedule": None if dag is None else dag.timetable.expression,
    "catchup": None if dag is None else dag.catchup,
    "tasks": tasks,
}))
"""


# Runs under .venv-airflow's python: render every task of the DAG for one run with the given Variables (a
# stand-in for Airflow's Variable accessor; Jinja, the DAG's macros and the operator are Airflow's own) and
# print the spark-submit command its hook builds from the connection in AIRFLOW_CONN_SHELF_SPARK.
RENDER_CHECK = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=sys.argv[1]).dags["shelf_daily"]
variables = json.loads(sys.argv[2])

class Values:
    def get(self, key, default=None):
        return variables.get(key, default)

out = {}
for task in dag.tasks:
    context = {"params": {"conf_file": None}, "var": {"value": Values()}, "ds_nodash": "20261101",
               "ts": "2026-11-01T00:00:00+00:00"}
    task.render_template_fields(context)
    out[task.task_id] = {
        "cmd": task._get_hook()._build_spark_submit_command(task.application),
        "pool": task.pool,
        "on_failure": [type(c).__name__ for c in (task.on_failure_callback or [])],
    }
print(json.dumps(out))
"""


def airflow_bin() -> Path:
    """.venv-airflow/bin; in CI its absence is a set-up bug (make test creates it), elsewhere a skip."""
    if not (AIRFLOW_BIN / "airflow").exists():
        reason = f"{AIRFLOW_BIN / 'airflow'} is absent; run 'make airflow' to create Airflow's own venv"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return AIRFLOW_BIN


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    """A throw-away AIRFLOW_HOME with SQLite and no examples; variables and the connection come from env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
        **extra,
    )
    return env


def test_dag_loads_with_one_spark_submit_per_step_in_order(tmp_path: Path) -> None:
    bin_dir = airflow_bin()
    done = subprocess.run(
        [str(bin_dir / "python"), "-c", DAGBAG_CHECK, str(REPO / "dags")],
        env=airflow_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])

    assert found["import_errors"] == {}
    assert found["dags"] == [DAG_ID]
    assert found["schedule"] == "0 3 * * *"
    assert found["catchup"] is False
    tasks = found["tasks"]
    assert sorted(tasks) == sorted(STEPS)
    for step, after in zip(STEPS, [*STEPS[1:], None], strict=True):
        task = tasks[step]
        assert "SparkSubmitOperator" in task["types"]
        assert task["downstream"] == ([after] if after else [])
        assert task["retries"] == 0 if step == GATE else task["retries"] >= 1  # a refusal is not retried
        assert task["conn_id"] == "shelf_spark"
        args = task["application_args"]
        assert args[0] == step
        assert args[args.index("--run-id") + 1] == "daily-{{ ds_nodash }}"
        assert args[args.index("--as-of") + 1] == "{{ ts }}"
        assert "shelf_conf_file" in args[args.index("--conf") + 1]


def test_cluster_deploy_mode_ships_config_packages_and_the_python_environment(tmp_path: Path) -> None:
    """The spark-submit each task runs with a YARN connection in cluster deploy mode and the Variables of the
    DAG's docstring: the driver runs on the cluster, so the configs travel with --files and are named by file
    name, Delta comes with --packages, the packed environment with --archives and its python is used."""
    bin_dir = airflow_bin()
    variables = {
        "shelf_ship_conf": "true",
        "shelf_conf_file": "/opt/shelf/conf/cluster.yaml",
        "shelf_packages": "io.delta:delta-spark_2.13:4.4.0",
        "shelf_archives": "hdfs:///envs/shelf-env.tar.gz#environment",
        "shelf_python": "./environment/bin/python",
        "shelf_wheel": "hdfs:///shelf/shelf_recommender-0.1.0-py3-none-any.whl",
        "shelf_entry": "hdfs:///shelf/submit.py",
    }
    connection = {"conn_type": "spark", "host": "yarn", "extra": {"deploy-mode": "cluster"}}
    env = airflow_env(tmp_path, AIRFLOW_CONN_SHELF_SPARK=json.dumps(connection))
    done = subprocess.run(
        [str(bin_dir / "python"), "-c", RENDER_CHECK, str(REPO / "dags"), json.dumps(variables)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    tasks = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(tasks) == sorted(STEPS)
    for step, task in tasks.items():
        cmd = task["cmd"]

        def option(name: str, cmd: list[str] = cmd) -> str:
            return cmd[cmd.index(name) + 1]

        assert option("--master") == "yarn" and option("--deploy-mode") == "cluster"
        assert option("--files") == "/opt/shelf/conf/cluster.yaml,/opt/shelf/conf/base.yaml"
        assert option("--packages") == variables["shelf_packages"]
        assert option("--archives") == variables["shelf_archives"]
        assert option("--py-files") == variables["shelf_wheel"]
        assert "spark.pyspark.python=./environment/bin/python" in cmd
        assert "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension" in cmd
        args = cmd[cmd.index(variables["shelf_entry"]) + 1 :]
        assert args == [
            step,
            "--conf",
            "cluster.yaml",
            "--run-id",
            "daily-20261101",
            "--as-of",
            "2026-11-01T00:00:00+00:00",
        ]
        assert task["pool"] == "shelf_spark"
        assert task["on_failure"] == ["SmtpNotifier"]


def run_in_own_group(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run `cmd` in its own process group; on timeout kill the whole group (airflow and its spark-submits)."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout:.0f} s:\n{out[-6000:]}")
    return proc.returncode, out


def spark_submit_on_path(bin_dir: Path) -> Path:
    """A folder whose `spark-submit` is this venv's (the real pyspark), for the provider's PATH look-up."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "spark-submit"
    wrapper.write_text(f'#!/bin/sh\nexec "{Path(sys.executable).parent / "spark-submit"}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


@dataclass
class DagRun:
    config: ShelfConfig
    wheel: Path
    output: str  # `airflow dags test`: its log and every task's spark-submit output
    run_id: str
    master: str  # the standalone cluster's spark:// URL the steps were submitted to


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory: pytest.TempPathFactory, shelf_wheel: Path, standalone_cluster: str) -> DagRun:
    """`airflow dags test shelf_daily 2026-11-01` on the demo shop, every step spark-submitted from the wheel to a
    standalone cluster (master and worker in their own JVMs, tests/servers.py): the Airflow connection's host is
    the cluster's spark:// URL, as a deployment's would be."""
    bin_dir = airflow_bin()
    tmp_path = tmp_path_factory.mktemp("airflow")
    wheel = shelf_wheel
    entry = extract_entry(wheel, tmp_path)
    # The DAG's wiring is under test: evaluate scores the plain baselines (no holdout rehearsal, whose
    # publishing steps the DAG has already run once; tests/test_end_to_end.py covers the rehearsal).
    conf = write_run_config(tmp_path, evaluate={"models": ["popularity", "recent_popularity"]})
    config = load_config(conf)
    generate_demo(config)
    home = tmp_path / "airflow-home"
    env = airflow_env(
        home,
        AIRFLOW_CONN_SHELF_SPARK=json.dumps({"conn_type": "spark", "host": standalone_cluster}),
        AIRFLOW_VAR_SHELF_ENTRY=str(entry),
        AIRFLOW_VAR_SHELF_WHEEL=str(wheel),
        AIRFLOW_VAR_SHELF_CONF_FILE=str(conf),
        AIRFLOW_VAR_SHELF_JARS=delta_jar_list(),
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_LOCAL_IP="127.0.0.1",
        PATH=f"{spark_submit_on_path(tmp_path / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    migrate = subprocess.run(
        [str(bin_dir / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True, timeout=600
    )
    assert migrate.returncode == 0, migrate.stderr[-4000:]
    pool = subprocess.run(
        [str(bin_dir / "airflow"), "pools", "set", "shelf_spark", "1", "shelf steps"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pool.returncode == 0, pool.stderr[-4000:]
    returncode, output = run_in_own_group(
        [str(bin_dir / "airflow"), "dags", "test", DAG_ID, "2026-11-01"], env, tmp_path, DAG_TEST_TIMEOUT_S
    )
    assert returncode == 0, output[-6000:]
    listed = subprocess.run(
        [str(bin_dir / "airflow"), "dags", "list-runs", DAG_ID, "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (table,) = [line for line in listed.stdout.splitlines() if line.startswith("[{")]  # after Airflow's log lines
    runs = json.loads(table)
    assert [r["state"] for r in runs] == ["success"], output[-6000:]
    return DagRun(config, wheel, output, "daily-20261101", standalone_cluster)


@pytest.mark.slow
def test_airflow_dags_test_runs_every_step_and_writes_recommendations(spark: SparkSession, dag_run: DagRun) -> None:
    config = dag_run.config
    recommendations = tables.read(spark, config, "gold", "recommendations")
    assert {r[RUN_ID] for r in recommendations.select(RUN_ID).distinct().collect()} == {dag_run.run_id}
    per_user = recommendations.groupBy(USER_ID).agg(F.count(ITEM_ID).alias("n"), F.max("rank").alias("top"))
    stats = per_user.agg(F.count("*").alias("users"), F.max("n").alias("most"), F.min("n").alias("fewest")).first()
    assert stats is not None and stats["users"] > config.generate.users // 2
    assert stats["most"] <= config.rerank.top_k
    assert per_user.filter(F.col("top") != F.col("n")).count() == 0  # ranks run 1..n per user
    metrics = tables.read(spark, config, "gold", "metrics")
    assert {r[RUN_ID] for r in metrics.select(RUN_ID).distinct().collect()} == {dag_run.run_id}


@pytest.mark.slow
def test_the_steps_ran_from_the_wheel(dag_run: DagRun) -> None:
    logs = dag_run.output
    assert f"shelf package from {dag_run.wheel}/pipelines/__init__.py" in logs
    for step in STEPS:
        done = "[gate] skipped" if step == GATE else f"[{step}] done"  # the test's models have no `published`
        assert done in logs, f"no '{done}' in the DAG run's output"


@pytest.mark.slow
def test_the_steps_ran_on_the_cluster_and_wrote_what_a_local_run_writes(
    spark: SparkSession, dag_run: DagRun, demo_run: DemoRun
) -> None:
    """Executors in the standalone worker's JVMs (the session's log line names the cluster), and the tables equal
    the session's local `shelf run` of the same shop, as_of and config (tests/conftest.py `demo_run`) but for the
    run id: the cluster code path changes nothing that is published."""
    assert dag_run.output.count(f"master {dag_run.master},") >= len(STEPS), "a step did not run on the cluster"
    demo_run.assert_same_tables(spark, dag_run.config, dag_run.run_id)


@pytest.mark.slow
def test_bronze_holds_the_source_rows_that_were_not_quarantined(spark: SparkSession, dag_run: DagRun) -> None:
    config, run_id = dag_run.config, dag_run.run_id
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
def test_clean_wrote_silver_for_the_submitted_run(spark: SparkSession, dag_run: DagRun) -> None:
    config, run_id = dag_run.config, dag_run.run_id
    interactions = tables.read(spark, config, "silver", "interactions")
    assert {r[RUN_ID] for r in interactions.select(RUN_ID).distinct().collect()} == {run_id}
    users = interactions.agg(F.countDistinct(USER_IDX)).first()[0]
    generated_users = {r[USER_ID] for r in source_rows(config) if r[USER_ID]}
    assert 0 < users <= len(generated_users)
