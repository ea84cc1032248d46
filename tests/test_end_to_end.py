"""`shelf run` on generated demo data, twice with the same run id: every table written, counts
reconcile, each user gets at most top_k ranked items, and the rerun changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core import cli, tables
from tests.conftest import REPO, make_test_config

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, *extra: str) -> int:
    return cli.main([
        "run", "--conf", str(REPO / "conf/test.yaml"),
        "--set", f"storage.root={tmp_path / 'tables'}",
        "--set", f"source.path={tmp_path / 'demo' / 'events'}",
        "--set", f"source.catalog_path={tmp_path / 'demo' / 'catalog'}",
        "--run-id", "e2e", "--as-of", "2026-11-01", *extra,
    ])


def test_run_end_to_end_is_complete_and_idempotent(spark: SparkSession, tmp_path: Path) -> None:
    assert _run(tmp_path) == 0
    config = make_test_config(tmp_path)
    for layer, name in [("bronze", "events"), ("quarantine", "events"), ("silver", "interactions"),
                        ("gold", "user_factors"), ("gold", "candidates"), ("gold", "recommendations")]:
        assert tables.exists(spark, config, layer, name), f"{layer}.{name} was not written"

    metrics = {
        (r.step, r.metric): r.value
        for r in tables.read(spark, config, "ops", "run_metrics").filter(F.col("run_id") == "e2e").collect()
    }
    assert metrics[("ingest", "input_rows")] == (
        metrics[("ingest", "accepted")] + metrics[("ingest", "quarantined")] + metrics[("ingest", "duplicates_removed")]
    )
    # Every kind of dirt the generator injects was caught by its own reason code.
    reasons = {r.reason for r in tables.read(spark, config, "quarantine", "events").select("reason").distinct().collect()}
    assert {"null_user", "bad_timestamp", "future_timestamp", "unknown_event_type", "negative_value", "bot_user"} <= reasons

    recs = tables.read(spark, config, "gold", "recommendations").filter(F.col("run_id") == "e2e")
    per_user = recs.groupBy("user_id").agg(F.count("*").alias("n"), F.max("rank").alias("max_rank"))
    worst = per_user.agg(F.max("n").alias("n"), F.max("max_rank").alias("r")).first()
    assert worst is not None and worst.n <= config.recommend.top_k and worst.r <= config.recommend.top_k
    assert recs.filter(F.col("user_id").startswith("bot-")).count() == 0
    assert per_user.count() >= 0.8 * config.generate.users  # nearly every real user is served

    before = recs.orderBy("user_id", "rank").cache()
    before.count()
    assert _run(tmp_path) == 0
    after = tables.read(spark, config, "gold", "recommendations").filter(F.col("run_id") == "e2e")
    assert_df_equality(before, after.orderBy("user_id", "rank"), ignore_row_order=True, ignore_nullable=True)
