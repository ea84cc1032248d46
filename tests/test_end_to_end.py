"""`shelf run` on generated demo data: every table written, counts reconcile, each user gets at most top_k
ranked items; the same run id again, refused by the publish gate, leaves the served lists as they were; the
publishing steps again with the same run id write the same lists; `shelf forget` removes one user."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines import api, baselines, candidates, cli, rerank, runner, similarities, train
from pipelines.core import ease, holdout, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import load_config
from pipelines.core.runs import RunContext
from pipelines.core.schemas import RUN_ID, USER_ID, USER_IDX
from pipelines.steps import PUBLISHING
from tests.conftest import COMPARED_TABLES, DEMO_AS_OF, DEMO_RUN_ID, REPO, DemoRun, demo_run_args, make_test_config
from tests.remote_checks import delta_tables, holds_user, operations, read_delta, user_factor_ids, write_remote_config
from tests.servers import S3

pytestmark = pytest.mark.slow


def printed_lists(text: str) -> dict[str, list[str]]:
    """user -> item ids in rank order, read from the summary's or `shelf show`'s list lines."""
    lists: dict[str, list[str]] = {}
    user = None
    for line in text.splitlines():
        if header := re.match(r"^  user (\S+)$", line) or re.match(r"^User (\S+), run ", line):
            user = header.group(1)
            lists[user] = []
        elif user is not None and (entry := re.match(r"^\s+\d+\. (\S+)", line)):
            lists[user].append(entry.group(1))
        elif not line.startswith(" ") and not line.startswith("List"):
            user = None
    return lists


def served_list(spark: SparkSession, demo_run: DemoRun, user: str) -> list[str]:
    recs = demo_run.read(spark, "gold", "recommendations").filter(
        (F.col(RUN_ID) == DEMO_RUN_ID) & (F.col(USER_ID) == user)
    )
    return [r.item_id for r in recs.orderBy("rank").collect()]


def test_a_run_ends_with_its_summary_and_shelf_tables_and_show_explain_it(
    spark: SparkSession, demo_run: DemoRun, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs first in this file, on the run as written: the summary's counts, figures and lists are the tables'."""
    config, printed = demo_run.config, demo_run.printed
    recs = demo_run.read(spark, "gold", "recommendations").filter(F.col(RUN_ID) == DEMO_RUN_ID)
    interactions = demo_run.read(spark, "silver", "interactions").filter(F.col(RUN_ID) == DEMO_RUN_ID)
    assert re.search(rf"^  gold\.recommendations +{recs.count():,} ", printed, re.M), printed
    assert re.search(rf"^  silver\.interactions +{interactions.count():,} ", printed, re.M), printed
    assert f"shelf report --run-id {DEMO_RUN_ID}" in printed
    figures = runner.gate_figures(spark, config, DEMO_RUN_ID)
    ratio = figures["published"] / figures["popularity"]
    assert f"published {figures['published']:.4f} ({ratio:.2f}x popularity)" in printed
    assert f"als {figures['als']:.4f}" in printed and f"popularity {figures['popularity']:.4f}" in printed
    shown = printed_lists(printed)
    assert len(shown) == 3 and all(items == served_list(spark, demo_run, u) for u, items in shown.items()), shown

    base = ["--conf", str(REPO / "conf/test.yaml"), "--set", f"storage.root={demo_run.root / 'tables'}"]
    assert cli.main(["tables", *base]) == 0
    listing = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    recs_line = listing["gold.recommendations"]
    assert int(recs_line[1]) == tables.latest_version(spark, config, "gold", "recommendations")
    assert (
        recs_line[2] == DEMO_RUN_ID
        and int(recs_line[5]) == tables.read(spark, config, "gold", "recommendations").count()
    )
    assert set(listing) == {
        f"{layer}.{name}" for layer, name in tables.KNOWN_TABLES if tables.exists(spark, config, layer, name)
    }

    user = next(iter(shown))
    assert cli.main(["show", "--user", user, *base]) == 0  # no --run-id: the serving run
    explained = capsys.readouterr().out
    assert f"User {user}, run {DEMO_RUN_ID} " in explained and printed_lists(explained)[user] == shown[user]
    found = api.explain_user(spark, config, api.context(config, DEMO_RUN_ID, DEMO_AS_OF), user)
    candidate_lines = explained.split("proposed them:\n", 1)[1].splitlines()[1:]
    sources = {r.item_id: r.sources for r in found.candidates.collect()}
    for line in candidate_lines:  # each candidate shown with the sources gold.candidates holds for it
        item = line.split()[0]
        assert all(source in line for source in sources[item]), line
    assert cli.main(["show", "--user", "nobody", *base]) == 7
    assert "is not in silver.user_index" in capsys.readouterr().err


def readme_commands() -> list[list[str]]:
    """The `shelf` command lines of the README's bash blocks (continuations joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("#", 1)[0].rstrip().removesuffix("&"))  # `cmd &`: in the background
            if words and words[0].endswith("shelf"):
                commands.append(words[1:])
    return commands


def test_the_readme_commands_parse_load_their_config_and_the_look_around_ones_run(
    spark: SparkSession, demo_run: DemoRun, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every `shelf` line of the README is a valid command with a valid config; those that only read (tables,
    show, report) run against the test run's tables and exit 0."""
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"run", "tables", "show", "report"}, commands
    base = ["--conf", str(REPO / "conf/test.yaml"), "--set", f"storage.root={demo_run.root / 'tables'}"]
    for words in commands:
        args = cli.build_parser().parse_args(words)
        conf = None if args.conf is None else REPO / args.conf
        load_config(conf, args.overrides)  # every --set key exists and has the right type
        if args.command in ("tables", "show", "report"):
            extra = ["--run-id", DEMO_RUN_ID] if args.command == "report" else []
            assert cli.main([*words, *base, *extra]) == 0, words
            assert capsys.readouterr().out.strip()


def test_shelf_serve_answers_the_published_lists_and_re_ranks_with_fresh_events(
    spark: SparkSession, demo_run: DemoRun
) -> None:
    """The service loads the serving run with delta-rs; every list it would re-rank at as_of is the published one;
    with a page's events it answers what the batch kernel gives for the same events and time; the HTTP contract;
    bad requests are 4xx with one sentence; accepted events reach the landing table."""
    from deltalake import DeltaTable
    from fastapi.testclient import TestClient

    from pipelines.serve.app import Service, create_app
    from pipelines.serve.main import flusher, landing_uri
    from pipelines.serve.ranking import horizon_days, recommend
    from pipelines.serve.state import load_state
    from tests import serve_checks

    config = demo_run.config
    state = load_state(config)
    assert state.run_id == DEMO_RUN_ID
    assert serve_checks.assert_every_list_is_the_kernel_on_the_stored_inputs(state, config) == len(state.input_users)
    user = str(state.input_users[0])
    now = state.as_of + timedelta(hours=2)
    events = serve_checks.session_events(state, user, now)
    served = recommend(state, config, user, events, 10, now)
    assert served.source == "reranked"
    expected = serve_checks.batch_kernel_list(spark, state, config, user, events, now)
    assert [i["item_id"] for i in served.items] == expected
    published = state.published(user)
    assert published is not None  # the events changed the scores (the kernel ran, not a copy of the list)
    assert [round(i["score"], 9) for i in served.items] != [round(x, 9) for x in published.column("score").to_pylist()]

    serve_checks.check_batches_answer_as_single_requests(state, config, now)
    service = Service(config, state, clock=lambda: now)
    flush = flusher(service)
    with TestClient(create_app(service, flush)) as client:
        serve_checks.check_http_contract(client, state, user, now)
        serve_checks.check_bad_requests(client)
        assert client.post("/v1/flush").json() == {"appended": 3}
        serve_checks.check_no_request_makes_it_answer_500(client)
    landed = DeltaTable(landing_uri(config)).to_pandas()
    assert sorted(landed["item_id"])[:3] == sorted(e.item_id for e in events)

    # A run that holds a posted event: the swap forgets it (it would count twice), not the later one; past the
    # fresh horizon the later one goes too, and the user with it.
    stored_user, held, later = serve_checks.stored_and_new_event(state, now)
    kept = [*service.posted.of(stored_user), later]  # with what the contract check posted for them
    service.posted.add([held, later])
    service.swap(state)
    assert service.posted.of(stored_user) == kept
    service.prune(now + timedelta(days=horizon_days(config) - 1))
    assert service.posted.of(stored_user) == kept
    service.prune(now + timedelta(days=horizon_days(config) + 1))
    assert service.posted.of(stored_user) == []


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
    assert cli.main([*report_args, "--run-id", "never-ran"]) == 7
    assert "has no evaluation report" in capsys.readouterr().err
    # The publishing steps again with the same run id and as_of write the same lists (ALS and EASE seeded, no wall
    # clock): the runs over Spark Connect (tests/test_clusters.py) and the Airflow DAG's steps on a standalone
    # cluster (tests/test_airflow.py) are that run again in other processes and must equal it; tests/test_faults.py
    # reruns the publish on the same tables.

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
    scored = baselines.published_lists(spark, config, "e2e", users, k=1000)
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


def test_shelf_gate_alone_passes_refuses_with_exit_6_and_needs_an_evaluated_run(
    spark: SparkSession, demo_run: DemoRun, capsys: pytest.CaptureFixture[str]
) -> None:
    """`shelf gate`, the task an orchestrator runs between evaluate and the publishing steps: it reads the run's
    gold.metrics, passes the demo run, refuses it when the margin asks for 100x popularity, and says in one
    sentence that a run without evaluation must be evaluated first. Nothing is written."""
    args = ["gate", "--conf", str(REPO / "conf/test.yaml"), "--set", f"storage.root={demo_run.root / 'tables'}"]
    versions = {t: tables.latest_version(spark, demo_run.config, *t) for t in (("gold", "metrics"), *COMPARED_TABLES)}
    assert cli.main([*args, "--run-id", DEMO_RUN_ID, "--as-of", DEMO_AS_OF]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--set", "evaluate.gate_margin=99", "--run-id", DEMO_RUN_ID, "--as-of", DEMO_AS_OF]) == 6
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"shelf gate: error: Run {DEMO_RUN_ID} was not published: its lists scored NDCG@10")
    assert cli.main([*args, "--run-id", "never-evaluated", "--as-of", DEMO_AS_OF]) == 7
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "shelf gate: error: gold.metrics has no NDCG@10 row of run never-evaluated; run 'shelf evaluate --run-id "
        "never-evaluated' before 'shelf gate' (same --run-id and --as-of)."
    )
    assert versions == {t: tables.latest_version(spark, demo_run.config, *t) for t in versions}


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


def test_a_run_on_an_s3_root_equals_the_local_run_and_the_admin_commands_work_there(
    spark: SparkSession, demo_run: DemoRun, s3: S3, tmp_path: Path
) -> None:
    """`shelf run` with the source and storage.root in a bucket of a real S3 API (moto's server on 127.0.0.1),
    then rollback, forget, prune and the notebook API's report reader (tests/remote_session.py, its own process
    in a scratch folder). delta-rs and pyarrow read the bucket back: the tables equal the local run's, the
    forgotten user is in no table and no model, and the scratch folder holds no output."""
    bucket = "shelf-e2e"
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    for part in sorted((demo_run.root / "demo").rglob("*.csv")):  # the local run's source, uploaded
        client.upload_file(str(part), bucket, f"demo/{part.relative_to(demo_run.root / 'demo')}")
    conf = write_remote_config(tmp_path / "conf", s3, bucket)
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.remote_session", str(conf), DEMO_RUN_ID, DEMO_AS_OF],
        cwd=scratch, env=env, capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"S3 session seconds: {result['seconds']}")
    assert result["codes"] == {"rollback": 0, "forget": 0, "prune": 0}, done.stderr[-4000:]
    assert result["plots"] == len(api.REPORT_PLOTS) and result["png"]
    victim, index = str(result["victim"]), int(result["index"])
    written = [str(p.relative_to(scratch)) for p in scratch.rglob("*") if p.is_file()]
    assert written == [".shelf/_spark/fairscheduler.xml"], f"the run wrote to the driver's disk: {written}"

    for layer, name in COMPARED_TABLES:  # equal to the local run's, but for the forgotten user
        local = demo_run.read(spark, layer, name).filter(F.col(RUN_ID) == DEMO_RUN_ID)
        kept = local.filter(~F.col(USER_ID).eqNullSafe(victim)) if USER_ID in local.columns else local
        kept = kept.filter(F.col(USER_IDX) != index) if USER_IDX in kept.columns else kept
        assert kept.count() < local.count(), f"{layer}.{name}: the victim had no rows to forget"
        kept = spark.createDataFrame(kept.toArrow())  # through Arrow as the remote side is: the same nested types
        remote = read_delta(spark, s3, bucket, f"shelf/{layer}/{name}").filter(F.col(RUN_ID) == DEMO_RUN_ID)
        remote = remote.select([F.col(f.name).cast(f.dataType) for f in kept.schema])
        assert_approx_df_equality(kept, remote, 1e-6, ignore_nullable=True, ignore_row_order=True)
    found = delta_tables(s3, bucket)
    assert {"shelf/ops/reports", "shelf/ops/quality_gates", "shelf/gold/recommendations"} <= set(found)
    for prefix in found:
        assert holds_user(read_delta(spark, s3, bucket, prefix), victim, index) == 0, f"{prefix} holds {victim}"
    models = user_factor_ids(s3, bucket)
    assert "shelf/models/e2e/als" in models, sorted(models)
    assert all(index not in ids and ids for ids in models.values()), f"a model still holds user index {index}"
    assert "RESTORE" in operations(s3, bucket, "shelf/gold/recommendations")
    metrics = read_delta(spark, s3, bucket, "shelf/gold/metrics")  # prune --keep 1: the only run's rows stay
    local_metrics = demo_run.read(spark, "gold", "metrics").filter(F.col(RUN_ID) == DEMO_RUN_ID)
    local_metrics = local_metrics.filter(F.col("model").isin("popularity", "als"))  # what the S3 run evaluates
    assert metrics.filter(F.col(RUN_ID) == DEMO_RUN_ID).count() == local_metrics.count() > 0

    # shelf serve on the s3a:// root: delta-rs finds the tables from the same S3A settings, serves the local run's
    # lists (but for the forgotten user) and appends posted events to the bucket's landing table.
    from tests import serve_checks

    local = demo_run.read(spark, "gold", "recommendations").filter(F.col(RUN_ID) == DEMO_RUN_ID)
    serve_checks.check_serves_the_lists_from_a_bucket(load_config(conf, []), local, victim, s3, bucket)


def test_shelf_serve_workers_stop_when_the_serve_process_is_killed(demo_run: DemoRun, tmp_path: Path) -> None:
    """`shelf serve --workers 2` killed with SIGKILL (no shutdown of its own): its two workers notice they lost their
    parent and shut down, instead of serving on the port forever, and the last one removes the temporary folder.
    The config (secrets included) reaches the workers in a file of that folder, not in their environment."""
    import json
    import re
    import signal

    from pipelines.serve.main import WORKER_ENV
    from tests import serve_checks
    from tests.servers import free_port

    def children(pid: int) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError):
                continue
        return found

    port, log = free_port(), tmp_path / "serve.log"
    sets = ("serve.workers=2", f"stream.source_path={tmp_path / 'landing'}")
    with serve_checks.running_server(demo_run.root / "tables", port, log, *sets) as server:
        deadline = time.monotonic() + 60
        while len(workers := [w for w in children(server.pid) if "spawn_main" in _cmdline(w)]) < 2:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        environ = dict(
            v.split(b"=", 1) for v in Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0") if b"=" in v
        )
        assert set(json.loads(environ[WORKER_ENV.encode()])) == {"folder", "parent"}
        folder = Path(json.loads(environ[WORKER_ENV.encode()])["folder"])
        assert folder.is_dir() and (folder / "config.json").stat().st_mode & 0o077 == 0
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        deadline = time.monotonic() + 60
        while alive := [w for w in workers if Path(f"/proc/{w}").exists() and "spawn_main" in _cmdline(w)]:
            assert time.monotonic() < deadline, (alive, log.read_text()[-3000:])
            time.sleep(0.2)
    assert log.read_text().count("is gone; this worker shuts down") == 2
    assert not folder.exists() and len(re.findall(r"removed .*shelf-serve-.*: the last worker", log.read_text())) == 1


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_shelf_serve_swaps_to_a_new_run_under_load_and_flushes_on_sigterm(
    spark: SparkSession, demo_run: DemoRun, tmp_path: Path
) -> None:
    """`shelf serve` in its own process with two workers, on a copy of the run's tables: GETs running while a new run
    is published all succeed and move from the old run to the new one; events posted to one worker count in every
    GET, /metrics sums both workers, and the events posted before a SIGTERM reach the landing table."""
    import shutil
    import signal
    import threading

    import httpx
    from deltalake import DeltaTable

    from tests import serve_checks
    from tests.servers import free_port

    shutil.copytree(demo_run.root / "tables", tmp_path / "tables")
    shutil.rmtree(tmp_path / "tables" / "landing", ignore_errors=True)  # the other serve test's events
    config = make_test_config(tmp_path)
    port = free_port()
    log = tmp_path / "serve.log"
    sets = ("serve.reload_every_seconds=0.5", "serve.flush_every_seconds=600", "serve.workers=2")
    with serve_checks.running_server(tmp_path / "tables", port, log, *sets) as server:
        base = f"http://127.0.0.1:{port}"
        user = httpx.get(f"{base}/v1/users/u000001/recommendations").json()["user_id"]
        answers: list[tuple[int, str]] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=base, timeout=10) as client:
                while not stop.is_set():
                    got = client.get(f"/v1/users/{user}/recommendations", params={"k": 5})
                    answers.append((got.status_code, got.json().get("run_id", "")))

        loader = threading.Thread(target=load)
        loader.start()
        try:
            runner.run_steps(spark, config, RunContext("e2e-next", datetime(2026, 11, 2)), PUBLISHING)
            deadline = time.monotonic() + 60
            while httpx.get(f"{base}/healthz").json()["run_id"] != "e2e-next":
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            time.sleep(0.5)
        finally:
            stop.set()
            loader.join()
        assert answers and all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:3]
        runs = [run for _, run in answers]
        assert runs[0] == DEMO_RUN_ID and runs[-1] == "e2e-next" and set(runs) == {DEMO_RUN_ID, "e2e-next"}
        events = [
            {"user_id": user, "item_id": f"i0000{n}", "event_type": "view", "event_ts": "2026-11-02T00:00:00"}
            for n in (1, 2, 3)
        ]
        assert httpx.post(f"{base}/v1/events", json={"events": events}).json()["accepted"] == 3
        # Every GET reflects the posted events, whichever of the two workers takes its connection (a new one each).
        after = [httpx.get(f"{base}/v1/users/{user}/recommendations").json()["source"] for _ in range(12)]
        assert after == ["reranked"] * 12
        time.sleep(1.5)  # each worker stores its metrics every second; /metrics sums them
        shown = httpx.get(f"{base}/metrics").text.splitlines()
        assert "shelf_workers 2" in shown and 'shelf_events_total{outcome="accepted"} 3' in shown
        served = sum(int(line.rsplit(" ", 1)[1]) for line in shown if line.startswith("shelf_requests_total"))
        assert served == len(answers) + 13, (served, len(answers))  # the load, the first GET, and the 12 above
        server.send_signal(signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal: exit -15 or 0
        assert server.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()[-3000:]
        shut = re.findall(r"shut down: (\d+) buffered events appended", log.read_text())
        assert sorted(shut) == ["0", "3"], shut  # each worker flushes what it accepted
    landed = DeltaTable(str(tmp_path / "tables" / "landing" / "events")).to_pandas()
    assert sorted(landed["item_id"]) == ["i00001", "i00002", "i00003"] and set(landed["user_id"]) == {user}
