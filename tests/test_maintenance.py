"""Privacy (HMAC pseudonyms in Spark, pseudonymised ingest) and `shelf rollback`."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines import cli, ingest
from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.privacy import hmac_sha256_hex, pseudonym
from pipelines.core.runs import RunContext
from tests.conftest import REPO, make_test_config

KEY_ENV = "SHELF_TEST_PSEUDONYM_KEY"


@pytest.mark.parametrize("key", [b"k", b"a-secret-key-of-typical-length", b"x" * 100])
def test_spark_hmac_equals_python_hmac(spark: SparkSession, key: bytes) -> None:
    ids = ["u1", "17850", "", "élodie@example.com", "a" * 200, None]
    df = spark.createDataFrame([(i,) for i in ids], "user_id string")
    got = [r.h for r in df.select(hmac_sha256_hex(F.col("user_id"), key).alias("h")).collect()]
    want = [None if i is None else hmac.new(key, i.encode(), hashlib.sha256).hexdigest() for i in ids]
    assert got == want


CSV = [
    "user_id,item_id,event_type,event_ts,value,session_id",
    "alice,i1,view,2026-10-01T12:00:00,,s-alice",
    "alice,i2,purchase,2026-10-02T08:30:00,2,s1",
    "bob,i1,wishlist,2026-10-01T12:00:00,,s2",  # unknown_event_type: quarantined with bob's id in its raw text
    "bob,i1,view",  # unparseable: its user field is unknown, so the raw text is redacted
    ",i1,view,2026-10-01T12:00:00,,s3",  # null_user: nothing to hide
]


@pytest.mark.steps
def test_pseudonymised_ingest_writes_no_clear_user_id(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "events" / "part.csv"
    source.parent.mkdir(parents=True)
    source.write_text("\n".join(CSV) + "\n", encoding="utf-8")
    config = make_test_config(
        tmp_path, f"source.path={source}", "privacy.pseudonymize_users=true", f"privacy.key_env={KEY_ENV}"
    )
    monkeypatch.setenv(KEY_ENV, "s3cret")
    ingest.run(spark, config, RunContext("p1", datetime(2026, 11, 1)))

    alice, bob = pseudonym("alice", b"s3cret"), pseudonym("bob", b"s3cret")
    bronze = tables.read(spark, config, "bronze", "events")
    assert sorted(r.user_id for r in bronze.collect()) == [alice, alice]
    raws = {r.reason: r.raw for r in tables.read(spark, config, "quarantine", "events").collect()}
    assert raws["unknown_event_type"] == f"{bob},i1,wishlist,2026-10-01T12:00:00,,s2"
    assert raws["unparseable_row"] == "redacted:hmac-sha256:" + pseudonym("bob,i1,view", b"s3cret")
    assert raws["null_user"] == ",i1,view,2026-10-01T12:00:00,,s3"
    # "s-alice" is a session id that merely contains the name: whole fields only are replaced.
    every_string = [
        str(v) for df in (bronze, tables.read(spark, config, "quarantine", "events")) for r in df.collect() for v in r
    ]
    assert not any(v in ("alice", "bob") or v.startswith(("alice,", "bob,")) for v in every_string)


def test_pseudonymised_ingest_without_key_says_which_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    code = cli.main([
        "ingest", "--conf", str(REPO / "conf/test.yaml"),
        "--set", f"storage.root={tmp_path / 'tables'}",
        "--set", "privacy.pseudonymize_users=true", "--set", f"privacy.key_env={KEY_ENV}",
    ])  # fmt: skip
    assert code == 7


def _recs(spark: SparkSession, run_id: str, n: int) -> DataFrame:
    rows = [(f"u{i}", f"i{i + n}", 1, float(n), ["als"], run_id) for i in range(3)]
    return spark.createDataFrame(
        rows, "user_id string, item_id string, rank int, score double, reasons array<string>, run_id string"
    )


def _rollback(config: ShelfConfig, *args: str) -> int:
    return cli.main(
        ["rollback", "--conf", str(REPO / "conf/test.yaml"), "--set", f"storage.root={config.storage.root}", *args]
    )


@pytest.mark.steps
def test_rollback_to_run_and_to_version(
    spark: SparkSession, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_test_config(tmp_path)
    first, second = _recs(spark, "night-1", 1), _recs(spark, "night-2", 2)
    tables.write(first, config, "gold", "recommendations", "night-1")  # version 0
    tables.write(second, config, "gold", "recommendations", "night-2")  # version 1

    assert _rollback(config, "--to-run", "night-1") == 0  # version 2 = version 0
    current = tables.read(spark, config, "gold", "recommendations")
    assert_df_equality(current, first, ignore_row_order=True, ignore_nullable=True)
    assert_df_equality(
        tables.read(spark, config, "gold", "recommendations", version=1),
        second,
        ignore_row_order=True,
        ignore_nullable=True,
    )

    assert _rollback(config, "--to-version", "1") == 0  # undo the rollback
    assert_df_equality(
        tables.read(spark, config, "gold", "recommendations"), second, ignore_row_order=True, ignore_nullable=True
    )

    assert _rollback(config, "--to-run", "night-9") == 7
    assert "No version of gold.recommendations was written by run night-9" in capsys.readouterr().err
    assert _rollback(config, "--to-version", "7") == 7
    assert _rollback(config, "--table", "gold.nope", "--to-version", "0") == 7


# Runs in its own process: a local session with an event log (the shared session has none).
PLAN_SCRIPT = """
import sys
from pyspark.sql import SparkSession, functions as F
from pipelines.core.privacy import with_pseudonymous_users
events, key, out = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
spark = (
    SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
    .config("spark.eventLog.enabled", "true").config("spark.eventLog.dir", events)
    .config("spark.eventLog.compress", "false").getOrCreate()
)
rows = spark.createDataFrame([("alice", "alice,i1,view"), (None, "garbled")], "user_id string, raw string")
hashed = with_pseudonymous_users(rows, key, "user_id", "raw", F.col("user_id").isNull())
hashed.explain(extended=True)
hashed.write.mode("overwrite").parquet(out)
spark.stop()
"""


@pytest.mark.steps
def test_the_key_appears_in_no_plan_and_no_event_log(spark: SparkSession, tmp_path: Path) -> None:
    key = b"k3y-that-must-not-leak"
    events = tmp_path / "events"
    events.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", PLAN_SCRIPT, str(events), key.decode(), str(tmp_path / "out")],
        env={**os.environ, "PYSPARK_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "== Physical Plan ==" in done.stdout
    logs = "".join(p.read_text(errors="replace") for p in events.rglob("*") if p.is_file())
    assert "SparkListenerSQLExecutionStart" in logs  # the plans are in the event log
    padded = key.ljust(64, b"\0")
    derived = [key.hex(), *(bytes(b ^ pad for b in padded).hex() for pad in (0x36, 0x5C))]  # HMAC's pads
    for text in (done.stdout, logs):
        lowered = text.lower()
        assert key.decode() not in text and not any(d in lowered for d in derived)
    written = {r.user_id: r.raw for r in spark.read.parquet(str(tmp_path / "out")).collect()}
    assert written == {
        pseudonym("alice", key): f"{pseudonym('alice', key)},i1,view",
        None: "redacted:hmac-sha256:" + pseudonym("garbled", key),
    }


@pytest.mark.steps
def test_prune_keeps_the_runs_written_last_and_vacuums(
    spark: SparkSession, config: ShelfConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def write(layer: str, name: str, run_id: str) -> None:
        rows = spark.createDataFrame([(run_id, i) for i in range(3)], "run_id string, x int")
        tables.write(rows, config, layer, name, run_id, mode="run")

    for run_id in ("r1", "r2", "r1"):  # r1 rewritten last: the newest run is r1, although r2 came after it
        write("gold", "metrics", run_id)
    for run_id in ("r1", "r2"):
        write("ops", "run_metrics", run_id)  # not a per-day output table: never pruned
    args = ["prune", "--conf", str(REPO / "conf/test.yaml"), "--set", f"storage.root={config.storage.root}"]
    assert cli.main([*args, "--keep", "0"]) == 7
    assert "--keep must be at least 1" in capsys.readouterr().err
    assert cli.main([*args, "--keep", "1", "--retain-hours", "0"]) == 0

    def runs(layer: str, name: str) -> list[tuple[str, int]]:
        return sorted(tuple(r) for r in tables.read(spark, config, layer, name).groupBy("run_id").count().collect())

    assert runs("gold", "metrics") == [("r1", 3)]
    assert runs("ops", "run_metrics") == [("r1", 3), ("r2", 3)]
    # VACUUM with zero retention: only the files of the current version are left on disk.
    folder = Path(tables.location(config, "gold", "metrics"))
    on_disk = {p.name for p in folder.glob("*.parquet")}
    live = {Path(f).name for f in spark.read.format("delta").load(str(folder)).inputFiles()}
    assert on_disk == live


def test_last_commit_of_run_looks_past_the_lookback_and_latest_version_is_the_newest(
    spark: SparkSession, config: ShelfConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's last commit is found in the recent history, or in the whole history when more commits followed it
    than the lookback holds (a stream MERGEs often); a run that never wrote the table has none."""
    monkeypatch.setattr(tables, "HISTORY_LOOKBACK", 2)
    for run, rows in (("a", 1), ("a", 2), ("b", 3), ("c", 4), ("d", 5)):  # versions 0 .. 4
        frame = spark.range(rows).withColumn("run_id", F.lit(run))
        tables.write(frame, config, "gold", "metrics", run, mode="run")
    found = {run: tables.last_commit_of_run(spark, config, "gold", "metrics", run) for run in "abcdz"}
    assert {run: None if c is None else int(c["version"]) for run, c in found.items()} == {
        "a": 1, "b": 2, "c": 3, "d": 4, "z": None,
    }  # fmt: skip
    assert found["a"] is not None and found["a"]["operationMetrics"]["numOutputRows"] == "2"
    assert tables.version_of_run(spark, config, "gold", "metrics", "a") == 1
    assert tables.latest_version(spark, config, "gold", "metrics") == 4
