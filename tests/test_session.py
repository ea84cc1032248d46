from __future__ import annotations

from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from pipelines.core import tables
from pipelines.core.config import ShelfConfig


def test_session_is_utc_with_delta(spark: SparkSession) -> None:
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"
    assert "DeltaSparkSessionExtension" in spark.conf.get("spark.sql.extensions")


@pytest.mark.steps
def test_delta_write_overwrite_and_time_travel(spark: SparkSession, config: ShelfConfig, tmp_path: Path) -> None:
    first = spark.createDataFrame([(1, "a", "r1"), (2, "b", "r1")], "id int, v string, run_id string")
    second = spark.createDataFrame([(3, "c", "r2")], "id int, v string, run_id string")
    tables.write(first, config, "gold", "probe", "r1")
    tables.write(second, config, "gold", "probe", "r2")
    assert sorted(r.id for r in tables.read(spark, config, "gold", "probe").collect()) == [3]
    assert sorted(r.id for r in tables.read(spark, config, "gold", "probe", version=0).collect()) == [1, 2]
    assert Path(tables.location(config, "gold", "probe")).parent.name == "gold"


@pytest.mark.steps
def test_run_mode_is_idempotent_per_run_id(spark: SparkSession, config: ShelfConfig) -> None:
    r1 = spark.createDataFrame([(1, "r1")], "id int, run_id string")
    r2 = spark.createDataFrame([(2, "r2"), (3, "r2")], "id int, run_id string")
    for _ in range(2):
        tables.write(r1, config, "gold", "acc", "r1", mode="run")
        tables.write(r2, config, "gold", "acc", "r2", mode="run")
    rows = sorted((r.id, r.run_id) for r in tables.read(spark, config, "gold", "acc").collect())
    assert rows == [(1, "r1"), (2, "r2"), (3, "r2")]


def test_missing_java_is_one_clear_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.core.errors import EnvironmentSetupError
    from pipelines.core.session import check_java

    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(EnvironmentSetupError, match=r"^Java was not found; install a JDK 17"):
        check_java()


def test_delta_jar_coordinates_match_installed_packages() -> None:
    import pyspark

    from pipelines.core.jars import delta_artifacts

    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    assert delta_artifacts()[0].startswith(f"io.delta:delta-spark_{spark_minor}_2.13:")


def test_background_work_yields_the_cores_to_the_main_work(spark: SparkSession) -> None:
    """The local session schedules FAIR with the pools of session._POOLS: the default pool (the main work) always
    goes first, and the stream's side writes run in the side pool."""
    from pipelines.core.session import SIDE_POOL
    from pipelines.stream.side import SideWork

    sc = spark.sparkContext
    assert sc.getConf().get("spark.scheduler.mode") == "FAIR"
    pools = sc._jsc.sc()  # type: ignore[union-attr]
    assert pools.getPoolForName("default").get().minShare() == 100000
    assert pools.getPoolForName(SIDE_POOL).get().minShare() == 0
    seen: list[str | None] = []
    SideWork(spark, lambda: seen.append(sc.getLocalProperty("spark.scheduler.pool"))).join()
    assert seen == [SIDE_POOL]
    assert sc.getLocalProperty("spark.scheduler.pool") is None  # the batch's own thread keeps the default pool


def test_delta_snapshot_partitions_follow_the_cores_unless_set(spark: SparkSession, config: ShelfConfig) -> None:
    """Every session shelf builds or joins gets Delta's snapshot partitions from its cores (one per 4, at least 1;
    Delta's own default is 50); a value the user or the platform set is kept."""
    from pipelines.core.session import SNAPSHOT_PARTITIONS, _tune, parallelism

    before = spark.conf.get(SNAPSHOT_PARTITIONS)
    try:
        spark.conf.unset(SNAPSHOT_PARTITIONS)
        _tune(spark, config)
        assert parallelism(spark) == 2 and spark.conf.get(SNAPSHOT_PARTITIONS) == "1"  # local[2]: one per 4 cores, >= 1
        spark.conf.set(SNAPSHOT_PARTITIONS, "7")
        _tune(spark, config)
        assert spark.conf.get(SNAPSHOT_PARTITIONS) == "7"
    finally:
        spark.conf.set(SNAPSHOT_PARTITIONS, before)
