"""Privacy (HMAC pseudonyms in Spark, pseudonymised ingest) and `shelf rollback`."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines import ingest
from pipelines.core import cli, tables
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
    assert code == 2


def _recs(spark: SparkSession, run_id: str, n: int) -> DataFrame:
    rows = [(f"u{i}", f"i{i + n}", 1, float(n), ["als"], run_id) for i in range(3)]
    return spark.createDataFrame(
        rows, "user_id string, item_id string, rank int, score double, reasons array<string>, run_id string"
    )


def _rollback(config: ShelfConfig, *args: str) -> int:
    return cli.main(
        ["rollback", "--conf", str(REPO / "conf/test.yaml"), "--set", f"storage.root={config.storage.root}", *args]
    )


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

    assert _rollback(config, "--to-run", "night-9") == 2
    assert "No version of gold.recommendations was written by run night-9" in capsys.readouterr().err
    assert _rollback(config, "--to-version", "7") == 2
    assert _rollback(config, "--table", "gold.nope", "--to-version", "0") == 2
