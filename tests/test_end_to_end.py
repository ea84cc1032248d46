"""`shelf run` on generated demo data: every table written, counts reconcile, each user gets at most top_k
ranked items; the same run id again, refused by the publish gate, leaves the served lists as they were; the
publishing steps again with the same run id write the same lists; `shelf forget` removes one user."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines import candidates, evaluate, rerank, runner, similarities, train
from pipelines.core import cli, ease, holdout, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.runs import RunContext
from tests.conftest import REPO, DemoRun, demo_run_args, make_test_config

pytestmark = pytest.mark.slow


def _run(root: Path, *extra: str) -> int:
    return cli.main(demo_run_args(root, *extra))


def test_run_end_to_end_is_complete_and_idempotent(
    spark: SparkSession, demo_run: DemoRun, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = demo_run.root  # the session's local `shelf run` (run id e2e), also what other engines must equal
    config = demo_run.config
    for layer, name in [
        ("bronze", "events"),
        ("quarantine", "events"),
        ("silver", "interactions"),
        ("gold", "user_factors"),
        ("gold", "candidates"),
        ("gold", "recommendations"),
    ]:
        assert tables.exists(spark, config, layer, name), f"{layer}.{name} was not written"

    metrics = {
        (r.step, r.metric): r.value
        for r in tables.read(spark, config, "ops", "run_metrics").filter(F.col("run_id") == "e2e").collect()
    }
    assert metrics[("ingest", "input_rows")] == (
        metrics[("ingest", "accepted")] + metrics[("ingest", "quarantined")] + metrics[("ingest", "duplicates_removed")]
    )
    # Every kind of dirt the generator injects was caught by its own reason code.
    reasons = {
        r.reason for r in tables.read(spark, config, "quarantine", "events").select("reason").distinct().collect()
    }
    assert {
        "null_user",
        "bad_timestamp",
        "future_timestamp",
        "unknown_event_type",
        "negative_value",
        "bot_user",
    } <= reasons

    recs = tables.read(spark, config, "gold", "recommendations").filter(F.col("run_id") == "e2e")
    per_user = recs.groupBy("user_id").agg(F.count("*").alias("n"), F.max("rank").alias("max_rank"))
    worst = per_user.agg(F.max("n").alias("n"), F.max("max_rank").alias("r")).first()
    assert worst is not None and worst.n <= config.rerank.top_k and worst.r <= config.rerank.top_k
    assert recs.filter(F.col("user_id").startswith("bot-")).count() == 0
    assert per_user.count() >= 0.8 * config.generate.users  # nearly every real user is served

    assert_evaluation_scores_the_published_lists(spark, config)
    cands = tables.read(spark, config, "gold", "candidates").filter(F.col("run_id") == "e2e")
    from_ease = cands.filter(F.array_contains("sources", "ease"))
    assert from_ease.count() > 0 and from_ease.filter(F.col("ease_score").isNull()).count() == 0
    assert cands.filter(~F.array_contains("sources", "ease") & F.col("ease_score").isNotNull()).count() == 0

    # The served lists, pinned to their Delta version (later writes cannot change what `before` reads).
    served_version = tables.latest_version(spark, config, "gold", "recommendations")
    before = tables.read(spark, config, "gold", "recommendations", version=served_version)
    before = before.filter(F.col("run_id") == "e2e").orderBy("user_id", "rank").cache()
    before.count()
    assert_refused_publish_leaves_the_serving_run(spark, config, tmp_path, before)
    assert "shelf report --run-id e2e" in capsys.readouterr().err  # the refusal says where its figures are
    # The report is rows of ops.reports beside the tables: `shelf report` prints it and exports its files.
    exported = tmp_path / "report-export"
    report_args = ["report", "--conf", str(REPO / "conf/test.yaml"), "--set", f"storage.root={tmp_path / 'tables'}"]
    assert cli.main([*report_args, "--run-id", "e2e", "--out", str(exported)]) == 0
    printed = capsys.readouterr().out
    assert "# shelf evaluation, run e2e" in printed and "| published |" in printed and "| popularity |" in printed
    assert sorted(p.name for p in exported.iterdir()) == ["metric_vs_k.png", "metrics_at_k.png", "summary.md"]
    assert not (tmp_path / "reports").exists()  # nothing else on the driver's disk
    assert cli.main([*report_args, "--run-id", "never-ran"]) == 2
    assert "has no evaluation report" in capsys.readouterr().err
    # The publishing steps again, same run id and as_of: the same lists (ALS and EASE seeded, no wall clock).
    ran = runner.run_steps(spark, config, RunContext(run_id="e2e", as_of=datetime(2026, 11, 1)), runner.PUBLISHING)
    assert ran == list(runner.PUBLISHING)
    after = tables.read(spark, config, "gold", "recommendations").filter(F.col("run_id") == "e2e")
    assert_df_equality(before, after.orderBy("user_id", "rank"), ignore_row_order=True, ignore_nullable=True)

    # A feed that fails the quality gate stops the run before publish: exit 3, the failed expectation
    # named, and the served recommendations untouched (same latest version).
    served = tables.latest_version(spark, config, "gold", "recommendations")
    code = cli.main([
        "run", "--conf", str(REPO / "conf/test.yaml"),
        "--set", f"storage.root={tmp_path / 'tables'}",
        "--set", f"source.path={tmp_path / 'demo' / 'events'}",
        "--set", f"source.catalog_path={tmp_path / 'demo' / 'catalog'}",
        "--set", "clean.max_user_share=0.001",  # no user may hold 0.1% of the events: the gate must fail
        "--run-id", "gated", "--as-of", "2026-11-01",
    ])  # fmt: skip
    assert code == 3
    assert "expect_column_values_to_be_between(max_user_share)" in capsys.readouterr().err
    assert tables.latest_version(spark, config, "gold", "recommendations") == served
    assert tables.read(spark, config, "gold", "recommendations").filter(F.col("run_id") == "gated").count() == 0

    assert_a_catalogue_over_ease_max_items_gets_no_ease_candidates(spark, tmp_path)

    # shelf forget: one user disappears from every table and saved model (the holdout's too); everyone else stays.
    held = holdout.holdout_config(config)
    victim = before.first().user_id
    (victim_idx,) = [
        r.user_idx
        for r in tables.read(spark, config, "silver", "user_index").filter(F.col("user_id") == victim).collect()
    ]
    others = before.filter(F.col("user_id") != victim)
    assert cli.main([
        "forget", "--conf", str(REPO / "conf/test.yaml"), "--set", f"storage.root={tmp_path / 'tables'}", "--user", victim,
    ]) == 0  # fmt: skip
    every = [
        (c, layer, name) for c in (config, held) for layer, name in (*tables.KNOWN_TABLES, ("gold", "holdout_test"))
    ]
    for where, layer, name in every:
        if not tables.exists(spark, where, layer, name):
            continue
        df = tables.read(spark, where, layer, name)
        hits = F.lit(False)
        for field in df.schema.fields:
            if field.dataType.simpleString() == "string":
                hits = hits | (F.col(field.name) == victim)
        if "user_idx" in df.columns:
            hits = hits | (F.col("user_idx") == victim_idx)
        if "raw" in df.columns:
            hits = hits | F.col("raw").rlike(f"(^|,){victim}(,|$)")
        assert df.filter(hits).count() == 0, f"{layer}.{name} still holds {victim}"
    models = [*(tmp_path / "tables").glob("*models/*/*/userFactors")]  # the run's and the holdout run's
    assert {m.parts[-4] for m in models} == {"models", "holdout_models"}
    assert models and all(spark.read.parquet(str(m)).filter(F.col("id") == victim_idx).count() == 0 for m in models)
    left = tables.read(spark, config, "gold", "recommendations").filter(F.col("run_id") == "e2e")
    assert_df_equality(others, left.orderBy("user_id", "rank"), ignore_row_order=True, ignore_nullable=True)


def assert_evaluation_scores_the_published_lists(spark: SparkSession, config: ShelfConfig) -> None:
    """gold.metrics' `published` is about the lists the publish step wrote on the training part: evaluate reads
    them whole (every scored user's full list, nothing removed), and the rerank step run again on the same
    holdout input writes exactly those rows."""
    held = holdout.holdout_config(config)
    written = tables.read(spark, held, "gold", "recommendations").filter(F.col("run_id") == "e2e").cache()
    users = spark.createDataFrame([(u,) for u in range(10_000)], "user_idx int")
    scored = evaluate.published_lists(spark, config, "e2e", users, k=1000)
    index = tables.read(spark, held, "silver", "item_index").select("item_id", "item_idx")
    named = tables.read(spark, held, "silver", "user_index").select("user_id", "user_idx")
    as_written = written.join(named, "user_id").join(index, "item_id").select("user_idx", "item_idx", "score", "rank")
    columns = ["user_idx", "item_idx", "score", "rank"]
    rows = sorted(tuple(r) for r in scored.select(*columns).collect())
    assert rows == sorted(tuple(r) for r in as_written.select(*columns).collect())
    assert len(rows) == written.count() > 0

    as_of = written.first().as_of
    rerank.run(spark, held, RunContext(run_id="e2e", as_of=as_of))
    again = tables.read(spark, held, "gold", "recommendations").filter(F.col("run_id") == "e2e")
    assert_df_equality(written, again, ignore_row_order=True, ignore_nullable=True)
    written.unpersist()
    models = {r.model for r in tables.read(spark, config, "gold", "metrics").filter(F.col("run_id") == "e2e").collect()}
    assert {"published", "popularity", "als"} <= models


def assert_refused_publish_leaves_the_serving_run(
    spark: SparkSession, config: ShelfConfig, tmp_path: Path, served_rows: DataFrame
) -> None:
    """The same run again, whose published lists now lose to popularity (the margin asks for 100x), is refused
    with exit 6: gold.recommendations gets no commit and keeps the served rows; its metrics say why. Ingest,
    clean and the holdout rehearsal ran again with the same run id on the way (idempotent rewrites)."""
    served = tables.latest_version(spark, config, "gold", "recommendations")
    code = _run(tmp_path, "--set", "evaluate.gate_margin=99")
    assert code == 6
    assert tables.latest_version(spark, config, "gold", "recommendations") == served
    now = tables.read(spark, config, "gold", "recommendations").filter(F.col("run_id") == "e2e")
    assert_df_equality(served_rows, now.orderBy("user_id", "rank"), ignore_row_order=True, ignore_nullable=True)
    figures = tables.read(spark, config, "gold", "metrics").filter(
        (F.col("run_id") == "e2e") & (F.col("metric") == "ndcg") & (F.col("k") == 10)
    )
    assert {r.model for r in figures.collect()} >= {"published", "popularity"}


def assert_a_catalogue_over_ease_max_items_gets_no_ease_candidates(spark: SparkSession, tmp_path: Path) -> None:
    """train.ease.max_items below the catalogue: no EASE neighbours and no EASE candidate (nor score), so the
    re-rank's ease feature has nothing to act on and the lists are ALS's."""
    cfg = make_test_config(tmp_path, "train.ease.max_items=5")
    ctx = RunContext(run_id="over-cap", as_of=datetime(2026, 11, 1))
    for step in (train, similarities, candidates):
        step.run(spark, cfg, ctx)
    assert ease.neighbours_of_run(spark, cfg, "over-cap") is None
    cands = tables.read(spark, cfg, "gold", "candidates").filter(F.col("run_id") == "over-cap")
    assert cands.count() > 0
    assert cands.filter(F.array_contains("sources", "ease") | F.col("ease_score").isNotNull()).count() == 0
