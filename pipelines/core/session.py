"""The one place that builds a SparkSession.

On a cluster or Databricks an active session already exists and is reused as it is (its Delta
and BLAS are the platform's). Locally it configures Delta (jars from `spark.jars_dir` when the
set-up command fetched them, else `spark.jars.packages` through delta-spark's pip helper), UTC,
a checkpoint directory, shuffle partitions sized for the machine, and quiet logs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.utils import is_remote

from pipelines.core import uris
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import EnvironmentSetupError
from pipelines.core.jars import session_jars

log = logging.getLogger("shelf.session")

MIN_JAVA = 17


def java_major_version() -> int | None:
    """The major version of the `java` Spark will start, or None when there is none."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        return None
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def check_java() -> None:
    """Raise one clear sentence when Java is missing or older than Spark 4 needs."""
    major = java_major_version()
    if major is None:
        raise EnvironmentSetupError(
            "Java was not found; install a JDK 17 or 21 (Debian: apt-get install openjdk-17-jdk-headless) "
            "or set JAVA_HOME."
        )
    if major < MIN_JAVA:
        raise EnvironmentSetupError(
            f"Java {major} is too old for Spark 4; install a JDK 17 or 21 and point JAVA_HOME at it."
        )


# Background work (the stream's side writes) runs in this FAIR pool. In the local session the default pool's
# minShare exceeds any core count, so its pending tasks always go first and the side pool gets the cores the
# main work leaves idle (e.g. while the driver plans); elsewhere the pool gets the cluster's defaults.
SIDE_POOL = "shelf-side"
_POOLS = f"""<?xml version="1.0"?>
<allocations>
  <pool name="default"><schedulingMode>FIFO</schedulingMode><weight>1</weight><minShare>100000</minShare></pool>
  <pool name="{SIDE_POOL}"><schedulingMode>FIFO</schedulingMode><weight>1</weight><minShare>0</minShare></pool>
</allocations>
"""


def _pools_file(root: Path) -> str:
    """The FAIR scheduler's pool file for the local session, written under storage.root (same text each time)."""
    path = root / "_spark" / "fairscheduler.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != _POOLS:
        path.write_text(_POOLS)
    return str(path)


def active_session() -> SparkSession | None:
    """The session a notebook, job or cluster already runs: a classic one, else a Spark Connect one."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    try:
        from pyspark.sql.connect.session import SparkSession as ConnectSession
    except ImportError:  # pyspark without the connect extra: no Connect session can be active
        return None
    return ConnectSession.getActiveSession()  # type: ignore[return-value]


def is_connect(spark: SparkSession) -> bool:
    """Whether `spark` is a Spark Connect session (no SparkContext, no JVM on this side)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def get_spark(config: ShelfConfig) -> SparkSession:
    """Return the active session (cluster, Databricks, notebook), connect to spark.remote, or build a local
    Delta-enabled one."""
    active = active_session()
    if active is not None:
        return active
    if config.spark.remote:
        return _connect(config)
    if config.spark.master is None and is_remote():
        # Spark Connect mode set by the environment (Databricks serverless, SPARK_REMOTE): core settings such
        # as the checkpoint folder belong to the server and cannot be set from here.
        spark = SparkSession.builder.appName(config.spark.app_name).getOrCreate()
        _tune(spark, config)
        return spark
    if config.spark.master is None:
        # spark-submit on a cluster: the launcher configured master and packages.
        spark = (
            SparkSession.builder.appName(config.spark.app_name)
            .config("spark.log.level", config.spark.log_level)
            .config("spark.checkpoint.dir", checkpoint_dir(config))
            .getOrCreate()
        )
        _tune(spark, config)
        return spark
    return _local(config)


def _local(config: ShelfConfig) -> SparkSession:
    """A local Delta-enabled session on spark.master (jars from spark.jars_dir, else Delta's pip helper)."""
    check_java()
    # Workers must run this interpreter (the venv's), or they start the system python3 without pyarrow.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(config.spark.master or "local[*]").appName(config.spark.app_name)
    for key, value in {**_local_conf(config), **config.spark.extra}.items():
        builder = builder.config(key, value)
    jars = session_jars(config.spark.jars_dir, s3a=_uses_s3a(config), kafka=config.stream.source == "kafka")
    if jars:
        builder = builder.config("spark.jars", ",".join(str(p.resolve()) for p in jars))
    else:
        from delta import configure_spark_with_delta_pip

        builder = configure_spark_with_delta_pip(builder)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # the JVM died: almost always the Delta jars could not be resolved
        raise EnvironmentSetupError(
            "Spark could not start with Delta Lake (the Delta jars could not be resolved); run "
            f"'python -m pipelines.core.jars {config.spark.jars_dir}' to fetch them with Maven, then retry."
        ) from exc
    _tune(spark, config)
    return spark


def _local_conf(config: ShelfConfig) -> dict[str, str]:
    """The local session's settings (spark.extra is applied after them, so it can override any)."""
    driver = driver_folder(config)
    return {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.session.timeZone": "UTC",
        "spark.driver.memory": config.spark.driver_memory,
        "spark.pyspark.python": sys.executable,
        "spark.ui.showConsoleProgress": "false",
        "spark.log.level": config.spark.log_level,
        "spark.checkpoint.dir": checkpoint_dir(config),
        "spark.ui.enabled": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.warehouse.dir": uris.join(uris.qualify(config.storage.root), "_warehouse"),
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={driver}",
        "spark.scheduler.mode": "FAIR",
        "spark.scheduler.allocation.file": _pools_file(driver),
    }


def _connect(config: ShelfConfig) -> SparkSession:
    """A Spark Connect session to spark.remote (the server brings Delta; the client needs pyspark[connect]).

    Raises:
        EnvironmentSetupError: the Connect client is not installed or the server does not answer.
    """
    try:
        import pyspark.sql.connect.session  # noqa: F401  (the grpc/protobuf client of pyspark[connect])
    except ImportError as exc:
        raise EnvironmentSetupError(
            f"spark.remote is {config.spark.remote} but the Spark Connect client is not installed; "
            "run 'pip install \"pyspark[connect]>=4.1,<4.2\"' and retry."
        ) from exc
    try:
        spark = SparkSession.builder.remote(str(config.spark.remote)).getOrCreate()
        spark.conf.set("spark.sql.session.timeZone", "UTC")
    except Exception as exc:
        raise EnvironmentSetupError(
            f"The Spark Connect server at {config.spark.remote} did not answer ({exc.__class__.__name__}); "
            "start it (with Delta's jars and SQL extensions, see docs/DEPLOYMENT.md) or fix spark.remote."
        ) from exc
    _tune(spark, config)
    return spark


def _uses_s3a(config: ShelfConfig) -> bool:
    """Whether the config names an s3a:// location or S3A setting (the session then loads the S3A jars)."""
    places = (config.storage.root, config.source.path, config.source.catalog_path or "")
    return any(p.lower().startswith("s3a://") for p in places) or any("fs.s3a." in k for k in config.spark.extra)


def driver_folder(config: ShelfConfig) -> Path:
    """The session's own local files (Derby's home, the scheduler pools file): the storage root when it is on
    the driver's disk, else ./.shelf in the working directory (never a mangled remote URI)."""
    root = config.storage.root
    return Path(uris.local_path(root) if uris.is_local(root) else ".shelf").resolve()


PARALLELISM = "spark.shelf.parallelism"  # the session's task slots, measured once (see `parallelism`)


def parallelism(spark: SparkSession) -> int:
    """The session's task slots, without a SparkContext (Spark Connect has none): the partitions `spark.range`
    gets by default (Spark's leafNodeDefaultParallelism, i.e. defaultParallelism), measured by one tiny job the
    first time and kept in the session's conf."""
    known = spark.conf.get(PARALLELISM, None)
    if known:
        return int(known)
    row = spark.range(0, 1 << 16).select(F.spark_partition_id().alias("p")).agg(F.max("p")).first()
    slots = int(row[0]) + 1 if row is not None and row[0] is not None else 1
    spark.conf.set(PARALLELISM, str(slots))
    return slots


def checkpoint_dir(config: ShelfConfig) -> str:
    """Where Spark checkpoints (ALS's lineage cut): spark.checkpoint_dir, else <storage.root>/_checkpoints."""
    return config.spark.checkpoint_dir or uris.join(config.storage.root, "_checkpoints")


def _tune(spark: SparkSession, config: ShelfConfig) -> None:
    """Session-level settings that may change after start (log level and checkpoint folder are start-up confs:
    `spark.log.level` and `spark.checkpoint.dir` on the builders above)."""
    cores = parallelism(spark)
    partitions = config.spark.shuffle_partitions or max(2, 2 * cores)
    spark.conf.set("spark.sql.shuffle.partitions", str(partitions))
    _set_if_unset(spark, SNAPSHOT_PARTITIONS, str(min(50, max(1, cores // 4))))
    log.info(
        "spark %s, master %s, %d cores, %d shuffle partitions",
        spark.version,
        spark.conf.get("spark.master", "unknown"),
        cores,
        partitions,
    )


# Delta rebuilds a table's state from its log in this many partitions on every snapshot (default 50: a shelf run
# takes hundreds of snapshots, so on 2 cores a demo run over Spark Connect spent ~40% of its time there). shelf
# sets one per 4 cores, at least 1, at most 50: its tables' logs are small (checkpointed, pruned by retention),
# and on 2 cores 1 partition instead of 4 took a demo run from 192 s to 163 s (docs/BENCHMARKS.md).
SNAPSHOT_PARTITIONS = "spark.databricks.delta.snapshotPartitions"


def _set_if_unset(spark: SparkSession, key: str, value: str) -> None:
    """Set a session default the user (or the platform) has not set; a platform that forbids the key keeps its own."""
    try:
        if spark.conf.get(key, None) is None:
            spark.conf.set(key, value)
    except Exception as exc:  # e.g. Databricks serverless allows only some keys: CONFIG_NOT_AVAILABLE
        log.debug("%s left as it is: %s", key, exc)


@contextmanager
def session_conf(spark: SparkSession, values: dict[str, str]) -> Iterator[None]:
    """Set these session settings for the block, then restore each one as it was (unset if it was unset)."""
    before: dict[str, str | None] = {k: spark.conf.get(k, None) for k in values}
    for k, v in values.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, old in before.items():
            if old is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, old)
