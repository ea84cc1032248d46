"""shelf_daily: the whole shelf pipeline once a day, one SparkSubmitOperator per step in dependency order.

Reads nothing itself: each task runs `spark-submit <entry> <step> --conf <file> --run-id daily-<date>
--as-of <logical date>`, and the step reads and writes its own tables (README, "What runs"). The run id
and `as_of` come from the run's logical date, so a rerun or a retry of a day replaces that day's rows.

Configured in Airflow, not in this file (Variables; a run's `conf_file` param overrides the Variable):
- connection `shelf_spark` (type spark): the master (`yarn`, `k8s://...`, `local[2]`) and, in its extra,
  `deploy-mode`; spark-submit must be the real pyspark/Spark one on the worker's PATH (not the
  `pyspark-client` that the Spark provider installs into Airflow's own environment);
- `shelf_entry`: path of `pipelines/submit.py` (it ships inside the wheel);
- `shelf_wheel`: path or URL of the shelf wheel, shipped with `--py-files`;
- `shelf_conf_file`: the overlay config (default conf/cluster.yaml; base.yaml must sit next to it);
- `shelf_jars`: comma-separated Delta jars for `--jars` (empty when the cluster provides Delta).

This file needs only Airflow 3 and apache-airflow-providers-apache-spark: shelf itself is not imported.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Param, chain

DAG_ID = "shelf_daily"
SPARK_CONN_ID = "shelf_spark"
# Pipeline order (pipelines/core/cli.py STEPS): each step reads what the previous ones wrote.
STEPS = ("ingest", "clean", "train", "similarities", "candidates", "rerank", "evaluate")

DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
CONF_FILE = "{{ params.conf_file or var.value.get('shelf_conf_file', 'conf/cluster.yaml') }}"
RUN_ID = "daily-{{ ds_nodash }}"
AS_OF = "{{ ts }}"  # the logical date, ISO-8601 with its UTC offset

DEFAULT_ARGS = {
    "owner": "shelf",
    "retries": 2,
    "retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(hours=4),
}


def step_task(step: str) -> SparkSubmitOperator:
    """The spark-submit task of one step; every templated value is rendered per run."""
    return SparkSubmitOperator(
        task_id=step,
        conn_id=SPARK_CONN_ID,
        application="{{ var.value.get('shelf_entry', 'pipelines/submit.py') }}",
        py_files="{{ var.value.get('shelf_wheel', 'dist/shelf-0.1.0-py3-none-any.whl') }}",
        jars="{{ var.value.get('shelf_jars', '') }}",
        conf=DELTA_CONF,
        name=f"shelf-{step}",
        application_args=[step, "--conf", CONF_FILE, "--run-id", RUN_ID, "--as-of", AS_OF],
    )


with DAG(
    dag_id=DAG_ID,
    description="shelf: ingest -> clean -> train -> similarities -> candidates -> rerank -> evaluate",
    schedule="0 3 * * *",  # 03:00 UTC daily, after the nightly event export
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={"conf_file": Param(None, type=["null", "string"], description="overlay config file for this run")},
    tags=["shelf", "spark"],
) as dag:
    chain(*[step_task(step) for step in STEPS])
