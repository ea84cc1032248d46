"""shelf_daily: the whole shelf pipeline once a day, one SparkSubmitOperator per command, as `shelf run` orders them.

Reads nothing itself: each task runs `spark-submit <entry> <command> --conf <file> --run-id daily-<date>
--as-of <logical date>`, and the command reads and writes its own tables (README, "What runs"). The run id
and `as_of` come from the run's logical date, so a rerun or a retry of a day replaces that day's rows.
As in `shelf run`, the run is evaluated before it is published: ingest, clean, evaluate (its holdout
rehearsal), then `gate` (exit 6 when the lists lose to popularity: the publishing tasks do not run and the
previous run stays the serving one), then train, similarities, candidates and rerank.

Configured in Airflow, not in this file (Variables; a run's `conf_file` param overrides the Variable):
- connection `shelf_spark` (type spark): the master (`yarn`, `k8s://...`, `local[2]`) and, in its extra,
  `deploy-mode` (`client` or `cluster`); spark-submit must be the real pyspark/Spark one on the worker's
  PATH (not the `pyspark-client` that the Spark provider installs into Airflow's own environment);
- pool `shelf_spark` (`airflow pools set shelf_spark 1 "shelf steps"`): how many shelf steps run at once;
- `shelf_entry`: path of `pipelines/submit.py` (it ships inside the wheel);
- `shelf_wheel`: path or URL of the shelf wheel, shipped with `--py-files`;
- `shelf_conf_file`: the overlay config (default conf/cluster.yaml; base.yaml must sit next to it);
- `shelf_ship_conf`: `true` in cluster deploy mode: the overlay and its base.yaml are shipped with `--files`
  and the step reads them by name from the driver's working directory;
- `shelf_jars` / `shelf_packages`: Delta for a cluster that lacks it, as jar paths (`--jars`) or as Maven
  coordinates (`--packages io.delta:delta-spark_2.13:4.4.0`); both empty when the cluster provides Delta;
- `shelf_archives` and `shelf_python`: a packed Python environment for the driver and executors, e.g.
  `hdfs:///envs/shelf-env.tar.gz#environment` (venv-pack or conda-pack) and `./environment/bin/python`;
  `shelf_python` defaults to the worker's PYSPARK_PYTHON (or Spark's `python3`);
- `shelf_alert_emails`: who is mailed when a step fails for good (SMTP connection `smtp_default`).

"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.smtp.notifications.smtp import SmtpNotifier
from airflow.sdk import DAG, Param, chain

DAG_ID = "shelf_daily"
SPARK_CONN_ID = "shelf_spark"
POOL = "shelf_spark"
# pipelines/steps.py ORCHESTRATED: each command reads what the previous ones wrote; the gate before publishing.
COMMANDS = ("ingest", "clean", "evaluate", "gate", "train", "similarities", "candidates", "rerank")
GATE = "gate"  # not retried: a refusal is the answer, not a failure to try again

CONF_FILE = "(params.conf_file or var.value.get('shelf_conf_file', 'conf/cluster.yaml'))"
SHIP_CONF = "var.value.get('shelf_ship_conf', 'false')"
SPARK_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    "spark.pyspark.python": "{{ var.value.get('shelf_python', '') or worker_python() }}",
}
RUN_ID = "daily-{{ ds_nodash }}"
AS_OF = "{{ ts }}"  # the logical date, ISO-8601 with its UTC offset

DEFAULT_ARGS = {
    "owner": "shelf",
    "retries": 2,
    "retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(hours=4),
    "pool": POOL,
    "on_failure_callback": SmtpNotifier(
        to="{{ var.value.get('shelf_alert_emails', '') }}",
        subject="shelf: {{ ti.task_id }} failed in {{ dag.dag_id }} {{ run_id }}",
        html_content="Step {{ ti.task_id }} of run {{ run_id }} failed after its retries. Log: {{ ti.log_url }}",
    ),
}


def conf_arg(conf_file: str, ship: str) -> str:
    """The --conf a step gets: the file's name when it is shipped to the driver (cluster mode), else its path."""
    return conf_file.rsplit("/", 1)[-1] if ship.lower() == "true" else conf_file


def conf_files(conf_file: str, ship: str) -> str:
    """What --files ships in cluster mode: the overlay and the base.yaml next to it (nothing in client mode)."""
    if ship.lower() != "true":
        return ""
    folder = conf_file.rsplit("/", 1)[0] + "/" if "/" in conf_file else ""
    return f"{conf_file},{folder}base.yaml"


def worker_python() -> str:
    """The Python the worker gives Spark (PYSPARK_PYTHON), else Spark's own default."""
    return os.environ.get("PYSPARK_PYTHON", "python3")


class ShelfSparkSubmit(SparkSubmitOperator):
    """SparkSubmitOperator whose --archives is templated too (the provider renders files, not archives)."""

    template_fields = (*SparkSubmitOperator.template_fields, "_archives")


def step_task(step: str) -> SparkSubmitOperator:
    """The spark-submit task of one command; every templated value is rendered per run."""
    return ShelfSparkSubmit(
        task_id=step,
        retries=0 if step == GATE else DEFAULT_ARGS["retries"],
        conn_id=SPARK_CONN_ID,
        application="{{ var.value.get('shelf_entry', 'pipelines/submit.py') }}",
        py_files="{{ var.value.get('shelf_wheel', 'dist/shelf_recommender-0.1.0-py3-none-any.whl') }}",
        jars="{{ var.value.get('shelf_jars', '') }}",
        packages="{{ var.value.get('shelf_packages', '') }}",
        files=f"{{{{ conf_files({CONF_FILE}, {SHIP_CONF}) }}}}",
        archives="{{ var.value.get('shelf_archives', '') }}",
        conf=SPARK_CONF,
        name=f"shelf-{step}",
        application_args=[
            step,
            "--conf",
            f"{{{{ conf_arg({CONF_FILE}, {SHIP_CONF}) }}}}",
            "--run-id",
            RUN_ID,
            "--as-of",
            AS_OF,
        ],
    )


with DAG(
    dag_id=DAG_ID,
    description="shelf: ingest -> clean -> evaluate -> gate -> train -> similarities -> candidates -> rerank",
    schedule="0 3 * * *",  # 03:00 UTC daily, after the nightly event export
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={"conf_file": Param(None, type=["null", "string"], description="overlay config file for this run")},
    user_defined_macros={"conf_arg": conf_arg, "conf_files": conf_files, "worker_python": worker_python},
    tags=["shelf", "spark"],
) as dag:
    chain(*[step_task(step) for step in COMMANDS])
