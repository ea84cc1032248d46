"""pipelines/stream (`shelf stream`) on a hand-built nightly run: `availableNow` micro-batches re-rank the users with new
events and MERGE their lists into gold.recommendations.

The world: 16 items, sku-00..07 in category A (factors along e1), sku-08..15 in category B (along e2); six
users whose ALS vectors favour B. The nightly publish (`pipelines.rerank.run`) lists B items for all of
them. Then the tracker appends two commits to the landing table (one micro-batch each):
- batch 0: u01 views three A items; u02 buys two of its five candidates; two users first seen today
  (new-a views A items, new-b views B items); five bad rows, one per reason code;
- batch 1: u03 views one A item.
u00, u04, u05 do nothing: their rows must stay exactly as the nightly wrote them.

Crash and restart: the same landing commits run again on a copy of the nightly tables, with a failure
injected into the batch function of batch 1 after its quarantine and stream-event writes and before its
MERGE (the query dies with the exception); a new query restarts from the checkpoint, Spark replays batch 1,
and every table the stream writes must equal the uninterrupted run's.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from pipelines import cli, rerank
from pipelines.core import publishing, sources, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.runs import RunContext
from pipelines.core.schemas import CATALOG_SCHEMA, INTERACTIONS_SCHEMA, RUN_ID, STEP
from pipelines.stream.job import StreamJob, start
from pipelines.stream.merge import GateState, MergeOptions, prepare_recommendations, publish
from pipelines.stream.recent import checkpoint_rdd
from pipelines.stream.serving import SOURCE_KEY, batch_tag, checkpoint_path, landing_path, serving_run
from tests.conftest import REPO, make_test_config, write_factor_tables

AS_OF = datetime(2026, 11, 1)
RUN = "night-1"
N_USERS, N_ITEMS, RANK = 6, 16, 4
A_ITEMS, B_ITEMS = range(0, 8), range(8, 16)
TOP_K = 5
# The re-rank's weights are pinned (not the tuned defaults of conf/base.yaml): the session-vector features
# carry the fresh behaviour here, so the expectations below follow from the factors alone.
OVERRIDES = (
    f"rerank.top_k={TOP_K}",
    "rerank.category_cap=null",
    "rerank.mmr_lambda=1.0",
    "rerank.fresh_days=7",
    "rerank.alpha=0.5",
    "rerank.weights={als: 1.0, session: 1.0, max_cosine: 0.5, mean_cosine: 0.25, popularity: 0.2, promo: 0.1, "
    "new_arrival: 0.1, price_fit: 0.1, cooc_sum: 0.0, cooc_max: 0.0}",
    "stream.max_files_per_trigger=1",
)
LANDING = "user_id string, item_id string, event_type string, event_ts string, value string, session_id string"


def user_id(u: int) -> str:
    return f"u{u:02d}"


def item_id(i: int) -> str:
    return f"sku-{i:02d}"


def category(item: str) -> str:
    return "A" if int(item.split("-")[1]) in A_ITEMS else "B"


def at(hours: float) -> str:
    return (AS_OF + timedelta(hours=hours)).strftime("%Y-%m-%d %H:%M:%S")


BATCH_0 = [
    (user_id(1), item_id(0), "view", at(1.0), "1", "s1"),
    (user_id(1), item_id(1), "view", at(1.01), "1", "s1"),
    (user_id(1), item_id(2), "view", at(1.02), "1", "s1"),
    (user_id(2), item_id(8), "purchase", at(1.0), "1", "s2"),
    (user_id(2), item_id(9), "purchase", at(1.0), "1", "s2"),
    ("new-a", item_id(3), "view", at(1.5), "1", "s3"),
    ("new-a", item_id(4), "view", at(1.6), "1", "s3"),
    ("new-b", item_id(12), "view", at(1.5), "1", "s4"),
    ("new-b", item_id(13), "view", at(1.6), "1", "s4"),
    # Bad rows, one per reason code.
    (None, item_id(1), "view", at(1.0), "1", "bad"),
    (user_id(4), item_id(1), "click", at(1.0), "1", "bad"),
    (user_id(4), item_id(1), "view", "not-a-time", "1", "bad"),
    (user_id(4), item_id(1), "view", at(100.0), "1", "bad"),
    (user_id(4), item_id(1), "view", at(1.0), "-1", "bad"),
]
BAD_REASONS = {"null_user", "unknown_event_type", "bad_timestamp", "future_timestamp", "negative_value"}
BATCH_1 = [(user_id(3), item_id(5), "add_to_cart", at(2.0), "1", "s5")]
AFFECTED = {user_id(1), user_id(2), user_id(3), "new-a", "new-b"}
UNTOUCHED = {user_id(0), user_id(4), user_id(5)}


def write_nightly(spark: SparkSession, config: ShelfConfig) -> None:
    """Silver and gold tables of one nightly run, then its publish (the real `shelf rerank`)."""
    rng = np.random.default_rng(5)
    item_f = np.zeros((N_ITEMS, RANK))
    item_f[list(A_ITEMS), 0], item_f[list(B_ITEMS), 1] = 1.0, 1.0
    item_f += rng.normal(scale=0.1, size=item_f.shape)
    user_f = np.tile([0.1, 1.0, 0.0, 0.0], (N_USERS, 1)) + rng.normal(scale=0.05, size=(N_USERS, RANK))
    users = spark.createDataFrame([(user_id(u), u) for u in range(N_USERS)], "user_id string, user_idx int")
    items = spark.createDataFrame([(item_id(i), i) for i in range(N_ITEMS)], "item_id string, item_idx int")
    tables.write(users, config, "silver", "user_index", RUN)
    tables.write(items, config, "silver", "item_index", RUN)
    # Old views (outside the 7-day session): every user three B items, u05 every A item (so all are popular).
    old = [(u, 8 + (u + k) % 8, 10.0) for u in range(N_USERS) for k in range(3)] + [(5, i, 20.0) for i in A_ITEMS]
    rows = [(u, i, "view", AS_OF - timedelta(days=d), 1.0, 1.0, 1.0, RUN, AS_OF) for u, i, d in old]
    tables.write(spark.createDataFrame(rows, INTERACTIONS_SCHEMA), config, "silver", "interactions", RUN)
    write_factor_tables(spark, config, RUN, dict(enumerate(user_f)), dict(enumerate(item_f)))
    per_user = {u: list(range(N_ITEMS)) for u in range(N_USERS)}
    per_user[2] = [8, 9, 10, 11, 12]  # exactly a list's length: buying two shortens its list
    cands = [(u, i, float(user_f[u] @ item_f[i]), ["als"], RUN) for u, its in per_user.items() for i in its]
    cand_schema = "user_idx int, item_idx int, als_score double, sources array<string>, run_id string"
    tables.write(spark.createDataFrame(cands, cand_schema), config, "gold", "candidates", RUN, mode="run")
    unit = item_f / np.linalg.norm(item_f, axis=1, keepdims=True)
    cos = unit @ unit.T
    group = np.array([0] * 8 + [1] * 5 + [2] * 3)  # neighbours stay inside A, sku-08..12, sku-13..15
    cos[(group[:, None] != group[None, :]) | np.eye(N_ITEMS, dtype=bool)] = -np.inf
    sims = []
    for i in range(N_ITEMS):
        order = [int(j) for j in np.argsort(-cos[i]) if np.isfinite(cos[i, j])][:4]
        sims += [(i, j, float(cos[i, j]), r + 1, "als", RUN) for r, j in enumerate(order)]
    sim_schema = "item_idx int, neighbour_idx int, score double, rank int, source string, run_id string"
    tables.write(spark.createDataFrame(sims, sim_schema), config, "gold", "item_similarities", RUN)
    catalog = [(item_id(i), category(item_id(i)), 10.0, True, False, None, f"t{i}") for i in range(N_ITEMS)]
    tables.write(spark.createDataFrame(catalog, CATALOG_SCHEMA), config, "silver", "catalog", RUN)
    rerank.run(spark, config, RunContext(RUN, AS_OF))


def append_landing(spark: SparkSession, config: ShelfConfig, rows: Sequence[tuple[str | None, ...]]) -> None:
    """One tracker commit to the landing table (one file: one micro-batch with maxFilesPerTrigger 1)."""
    frame = spark.createDataFrame(rows, LANDING).coalesce(1)
    frame.write.format("delta").mode("append").save(landing_path(config))


def run_stream(spark: SparkSession, config: ShelfConfig, job: StreamJob) -> None:
    query = start(spark, config, job, available_now=True)
    try:
        query.awaitTermination()
    finally:
        job.close()


def rows_of(frame: DataFrame) -> list[tuple[object, ...]]:
    columns = sorted(frame.columns)
    return sorted(tuple(str(r[c]) for c in columns) for r in frame.select(*columns).collect())


@pytest.fixture(scope="module")
def nightly(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream_nightly")
    write_nightly(spark, make_test_config(root, *OVERRIDES))
    return root


@pytest.fixture(scope="module")
def streamed(spark: SparkSession, nightly: Path, tmp_path_factory: pytest.TempPathFactory) -> ShelfConfig:
    """A copy of the nightly tables after both micro-batches ran uninterrupted."""
    root = tmp_path_factory.mktemp("stream_run")
    shutil.copytree(nightly / "tables", root / "tables")
    config = make_test_config(root, *OVERRIDES)
    append_landing(spark, config, BATCH_0)
    append_landing(spark, config, BATCH_1)
    run_stream(spark, config, StreamJob(spark, config))
    return config


def lists(spark: SparkSession, config: ShelfConfig, version: int | None = None) -> dict[str, list[str]]:
    frame = tables.read(spark, config, "gold", "recommendations", version=version).filter(F.col(RUN_ID) == RUN)
    found: dict[str, list[tuple[int, str]]] = {}
    for r in frame.select("user_id", "rank", "item_id").collect():
        found.setdefault(r["user_id"], []).append((r["rank"], r["item_id"]))
    return {u: [i for _, i in sorted(v)] for u, v in found.items()}


def test_affected_lists_follow_the_new_events(spark: SparkSession, nightly: Path, streamed: ShelfConfig) -> None:
    before = lists(spark, make_test_config(nightly, *OVERRIDES))
    after = lists(spark, streamed)
    # Nightly: every known user's list is category B (their ALS vectors favour it).
    assert all(category(i) == "B" for u in range(N_USERS) for i in before[user_id(u)])
    # u01 viewed three A items: A now leads its list (its session vector moved towards A).
    assert category(after[user_id(1)][0]) == "A"
    assert sum(category(i) == "A" for i in after[user_id(1)]) >= 3
    # u02 bought sku-08 and sku-09 of its five candidates (whose neighbours are the same five): a list of
    # three, and the nightly's ranks 4 and 5 are deleted.
    assert sorted(before[user_id(2)]) == [item_id(i) for i in range(8, 13)]
    assert sorted(after[user_id(2)]) == [item_id(i) for i in range(10, 13)]
    # u03 put sku-05 in its cart in the second batch: A items enter its list.
    assert any(category(i) == "A" for i in after[user_id(3)])
    rows = tables.read(spark, streamed, "gold", "recommendations").filter(F.col("user_id").isin(*AFFECTED))
    tags = {(r["user_id"], r["stream_batch"]) for r in rows.select("user_id", "stream_batch").distinct().collect()}
    assert tags == {(u, 0) for u in AFFECTED - {user_id(3)}} | {(user_id(3), 1)}
    times = {r[0] for r in rows.filter(F.col("user_id") == user_id(3)).select("event_time").distinct().collect()}
    assert times == {AS_OF + timedelta(hours=2)}  # the batch's latest event, not the wall clock


def test_users_without_events_keep_their_exact_rows(spark: SparkSession, nightly: Path, streamed: ShelfConfig) -> None:
    nightly_rows = tables.read(spark, make_test_config(nightly, *OVERRIDES), "gold", "recommendations")
    after = tables.read(spark, streamed, "gold", "recommendations")
    assert set(after.columns) == set(nightly_rows.columns) | {"stream_batch", "event_time"}
    untouched_after = after.filter(F.col("user_id").isin(*UNTOUCHED))
    assert untouched_after.filter(F.col("stream_batch").isNotNull() | F.col("event_time").isNotNull()).count() == 0
    want = rows_of(nightly_rows.filter(F.col("user_id").isin(*UNTOUCHED)))
    assert len(want) == len(UNTOUCHED) * TOP_K
    assert rows_of(untouched_after.select(*nightly_rows.columns)) == want  # same ids, ranks, scores, reasons


def test_users_first_seen_today_get_lists_from_their_session(spark: SparkSession, streamed: ShelfConfig) -> None:
    after = lists(spark, streamed)
    assert tables.read(spark, streamed, "silver", "user_index").filter(F.col("user_id") == "new-a").count() == 0
    assert len(after["new-a"]) == TOP_K and len(after["new-b"]) == TOP_K
    assert all(category(i) == "A" for i in after["new-a"])  # folded in from views of A items
    assert all(category(i) == "B" for i in after["new-b"])
    reasons = tables.read(spark, streamed, "gold", "recommendations").filter(F.col("user_id") == "new-a")
    assert not any("als" in r[0] for r in reasons.select("reasons").collect())  # no ALS vector to speak of


def test_bad_rows_are_quarantined_and_counts_reconcile(spark: SparkSession, streamed: ShelfConfig) -> None:
    tag = batch_tag(streamed, 0)
    quarantined = tables.read(spark, streamed, "quarantine", "events").filter(
        (F.col(RUN_ID) == tag) & (F.col(STEP) == "stream")
    )
    assert sorted(r["reason"] for r in quarantined.collect()) == sorted(BAD_REASONS)
    assert all('"session_id":"bad"' in r["raw"] for r in quarantined.collect())
    accepted = tables.read(spark, streamed, "bronze", "stream_events").filter(F.col(RUN_ID) == tag).count()
    metrics = {
        r["metric"]: r["value"]
        for r in tables.read(spark, streamed, "ops", "run_metrics").filter(F.col(RUN_ID) == tag).collect()
    }
    assert metrics["input_rows"] == len(BATCH_0) == accepted + quarantined.count()
    assert (metrics["accepted"], metrics["quarantined"]) == (accepted, len(BAD_REASONS))
    assert metrics["cold_users"] == 2


def test_replaying_a_batch_id_changes_nothing(
    spark: SparkSession, streamed: ShelfConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replayed batch leaves gold.recommendations as it was; and of the local checkpoints it made (the batch's
    users, its lists, the gate's read, the recent events), only the recent events still hold blocks after it."""
    before = rows_of(tables.read(spark, streamed, "gold", "recommendations"))
    landing = sources.read_source(spark, landing_path(streamed), "delta", SOURCE_KEY)
    first_commit = landing.filter(F.col("session_id") != "s5").drop("_source_file")
    made: list[DataFrame] = []
    classic = type(first_commit)  # the session's DataFrame class (pyspark.sql.DataFrame only dispatches to it)
    checkpoint = classic.localCheckpoint

    def recording(self: DataFrame, *args: Any, **kwargs: Any) -> DataFrame:
        made.append(checkpoint(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(classic, "localCheckpoint", recording)
    job = StreamJob(spark, streamed)
    try:
        job(first_commit, 0)  # what Spark does after a crash between the MERGE and the checkpoint commit
        made_ids = {checkpoint_rdd(f).id() for f in made}
        kept = {checkpoint_rdd(s.frame).id() for s in job.recent.slices}
        assert len(made_ids) == len(kept) + 3 and kept < made_ids  # users, lists, gate (a fresh job reads it)
        deadline = time.monotonic() + 30  # blocks are removed asynchronously
        while (held := made_ids & {i.id() for i in spark.sparkContext._jsc.sc().getRDDStorageInfo()}) != kept:
            assert time.monotonic() < deadline, f"local checkpoints still held: {sorted(held - kept)}"
            time.sleep(0.2)
    finally:
        monkeypatch.undo()
        job.close()
    assert rows_of(tables.read(spark, streamed, "gold", "recommendations")) == before


STREAM_TABLES = (("gold", "recommendations"), ("quarantine", "events"), ("bronze", "stream_events"))


def stream_cli(config: ShelfConfig, pause_after: str, *extra: str) -> list[str]:
    """`shelf stream` as a subprocess command line on `config`'s tables (conf/test.yaml: available_now; `extra`
    overrides after OVERRIDES), stopping at batch N's after_batch_writes hook (`pause_after` = "N:<marker file>";
    tests/stream_child.py)."""
    sets = [f"storage.root={config.storage.root}", f"spark.jars_dir={REPO / '.jars'}", *OVERRIDES, *extra]
    command = [sys.executable, "-m", "tests.stream_child", "--conf", str(REPO / "conf" / "test.yaml")]
    return [*command, *[arg for value in sets for arg in ("--set", value)], "--pause-after", pause_after]


def kill_at_marker(command: list[str], marker: Path, log: Path) -> None:
    """Run `command` (tests/stream_child.py) until it writes `marker`, then SIGKILL its process group (its JVM too)."""
    with log.open("wb") as err:
        proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=err, stderr=err)
        try:
            deadline = time.monotonic() + 900  # a loaded 2-core machine: minutes to start a JVM and serve
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert marker.exists(), f"shelf stream never reached the marked batch's writes: {log.read_text()[-2000:]}"


@pytest.mark.slow
def test_sigkill_after_the_merge_then_restart_from_checkpoint_equals_uninterrupted_run(
    spark: SparkSession, nightly: Path, streamed: ShelfConfig, tmp_path: Path
) -> None:
    shutil.copytree(nightly / "tables", tmp_path / "tables")
    config = make_test_config(tmp_path, *OVERRIDES)
    append_landing(spark, config, BATCH_0)
    append_landing(spark, config, BATCH_1)
    marker = tmp_path / "merged-1"
    # StreamJob's after_batch_writes hook (tests/stream_child.py): batch 1 writes the marker once its MERGE and its
    # side writes (quarantine, bronze.stream_events, run metrics: blind appends, batch 1 runs for the first time)
    # are done, then waits before it ends; the process (and its JVM: its own process group) is killed there.
    kill_at_marker(stream_cli(config, f"1:{marker}"), marker, tmp_path / "stream.log")
    # Killed after batch 1's writes, before the batch ended: u03's new list is readable, batch 1's events are in
    # bronze.stream_events, and the checkpoint has batch 1's offsets but not its commit, so Spark replays it.
    assert lists(spark, config)[user_id(3)] == lists(spark, streamed)[user_id(3)]
    bronze = tables.read(spark, config, "bronze", "stream_events").filter(F.col(RUN_ID) == "stream-1")
    assert (
        bronze.count()
        == tables.read(spark, streamed, "bronze", "stream_events").filter(F.col(RUN_ID) == "stream-1").count()
    )
    checkpoint = Path(checkpoint_path(config))
    assert (checkpoint / "offsets" / "1").exists() and not (checkpoint / "commits" / "1").exists()
    # Restart from the same checkpoint (in this process): Spark replays batch 1; its MERGE changes nothing (its
    # own rows are there), its side writes replace the rows its first run appended (no duplicates below).
    run_stream(spark, config, StreamJob(spark, config))
    for layer, name in STREAM_TABLES:
        got = tables.read(spark, config, layer, name)
        want = tables.read(spark, streamed, layer, name)
        assert rows_of(got.drop("source_file")) == rows_of(want.drop("source_file")), f"{layer}.{name} differs"
    metrics = tables.read(spark, config, "ops", "run_metrics").filter(F.col(RUN_ID).startswith("stream-"))
    want_metrics = tables.read(spark, streamed, "ops", "run_metrics").filter(F.col(RUN_ID).startswith("stream-"))
    assert rows_of(metrics.select(RUN_ID, "metric", "value")) == rows_of(want_metrics.select(RUN_ID, "metric", "value"))


def gated_rows(batches: Iterable[pd.DataFrame], gate: str) -> Iterator[pd.DataFrame]:
    """A pass-through of the MERGE's source that, until `<gate>/released` exists, writes `<gate>/entered` and waits for
    it (at most 120 s). The MERGE reads its source inside its transaction, so the test can commit to
    gold.recommendations between the MERGE's read and its commit."""
    for pdf in batches:
        if not (Path(gate) / "released").exists():
            (Path(gate) / "entered").touch()
            deadline = time.monotonic() + 120
            while not (Path(gate) / "released").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        yield pdf


class NightlyCommitsMidMerge(StreamJob):
    """Forces the race deterministically: the first MERGE attempt's source (evaluated inside the MERGE's
    transaction, after it chose its snapshot) waits at a gate while another thread republishes the serving run
    with the real `shelf rerank`; then the MERGE tries to commit."""

    def __init__(self, spark: SparkSession, config: ShelfConfig, gate: Path) -> None:
        super().__init__(spark, config)
        self.gate_dir = str(gate)
        self.attempts: list[int] = []

    def before_merge_attempt(self, attempt: int) -> None:
        self.attempts.append(attempt)

    def merge_source(self, source: DataFrame) -> DataFrame:
        # One task waits; the other core stays free for the concurrent nightly.
        gate = self.gate_dir
        return source.coalesce(1).mapInPandas(lambda it: gated_rows(it, gate), source.schema)


def republish_while_the_merge_waits(spark: SparkSession, config: ShelfConfig, gate: Path, errors: list[str]) -> None:
    try:
        deadline = time.monotonic() + 600
        while not (gate / "entered").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (gate / "nightly-started").touch()
        rerank.run(spark, config, RunContext(RUN, AS_OF))
        (gate / "nightly-done").touch()
    except Exception as exc:  # noqa: BLE001 - reported by the test thread
        errors.append(repr(exc))
    finally:
        (gate / "released").touch()


def test_stream_merge_racing_the_nightly_publish_retries_and_newer_information_wins(
    spark: SparkSession, nightly: Path, streamed: ShelfConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(Path(streamed.storage.root), tmp_path / "tables")
    config = make_test_config(tmp_path, *OVERRIDES)
    start_version = tables.latest_version(spark, config, "gold", "recommendations")
    # Batch 2: u00 puts an A item in its cart after the nightly's as_of, while the nightly republishes its run.
    append_landing(spark, config, [(user_id(0), item_id(7), "add_to_cart", at(3.0), "1", "s7")])
    gate, errors = tmp_path / "gate", list[str]()
    gate.mkdir()
    job = NightlyCommitsMidMerge(spark, config, gate)
    nightly_thread = threading.Thread(target=republish_while_the_merge_waits, args=(spark, config, gate, errors))
    nightly_thread.start()
    with caplog.at_level(logging.WARNING, logger="shelf.tables"):
        run_stream(spark, config, job)
    nightly_thread.join()
    assert not errors
    # The MERGE lost to the nightly's commit once and was retried; no commit is lost: both are in the history.
    assert job.attempts == [1, 2]
    assert any("lost to a concurrent writer" in r.getMessage() for r in caplog.records)
    history = tables.history(spark, config, "gold", "recommendations").filter(F.col("version") > start_version)
    ops = [r["operation"] for r in history.orderBy("version").collect()]
    assert ops == ["WRITE", "MERGE"], ops
    # Newer information wins per user: u00's stream list (an event after as_of) over the republished nightly list;
    # every other user has the republished list (the rerun rewrote its run from its as_of, the stream rows too).
    republished = lists(spark, config, version=start_version + 1)
    assert republished == lists(spark, make_test_config(nightly, *OVERRIDES))
    after = lists(spark, config)
    assert any(category(i) == "A" for i in after[user_id(0)])
    assert {u: v for u, v in after.items() if u != user_id(0)} == {
        u: v for u, v in republished.items() if u != user_id(0)
    }
    tagged = tables.read(spark, config, "gold", "recommendations").filter(F.col("stream_batch").isNotNull())
    assert {
        (r["user_id"], r["stream_batch"]) for r in tagged.select("user_id", "stream_batch").distinct().collect()
    } == {(user_id(0), 2)}


def test_shelf_stream_without_a_landing_table_says_what_to_do(
    spark: SparkSession, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        ["stream", "--conf", str(REPO / "conf" / "test.yaml"), "--set", f"storage.root={tmp_path / 'tables'}"]
    )
    assert code == 7
    err = capsys.readouterr().err
    assert "is not a Delta table; point stream.source_path at the table the tracker appends to" in err


def test_next_nightly_takes_over_and_the_newer_information_wins(
    spark: SparkSession, streamed: ShelfConfig, tmp_path: Path
) -> None:
    shutil.copytree(Path(streamed.storage.root), tmp_path / "tables")
    config = make_test_config(tmp_path, *OVERRIDES)
    night_2 = AS_OF + timedelta(days=1)
    candidates = tables.read(spark, config, "gold", "candidates").withColumn(RUN_ID, F.lit("night-2"))
    tables.write(candidates, config, "gold", "candidates", "night-2", mode="run")
    rerank.run(spark, config, RunContext("night-2", night_2))  # the batch publish still works on the wider table
    assert serving_run(spark, config) == ("night-2", night_2)
    night_1_rows = rows_of(tables.read(spark, config, "gold", "recommendations").filter(F.col(RUN_ID) == RUN))
    published = tables.read(spark, config, "gold", "recommendations").filter(F.col(RUN_ID) == "night-2")
    assert published.filter(F.col("stream_batch").isNotNull()).count() == 0
    before = {u: items for u, items in lists_of_run(spark, config, "night-2").items()}
    # Batch 2: u01 again, with an event older than night-2's as_of (night-2 knows better); u00 after it.
    append_landing(spark, config, [(user_id(1), item_id(6), "view", at(3.0), "1", "s6")])
    append_landing(spark, config, [(user_id(0), item_id(7), "add_to_cart", at(25.0), "1", "s7")])
    run_stream(spark, config, StreamJob(spark, config))
    after = lists_of_run(spark, config, "night-2")
    assert after[user_id(1)] == before[user_id(1)]  # older information than the nightly: ignored
    assert after[user_id(0)] != before[user_id(0)] and any(category(i) == "A" for i in after[user_id(0)])
    assert rows_of(tables.read(spark, config, "gold", "recommendations").filter(F.col(RUN_ID) == RUN)) == night_1_rows


def lists_of_run(spark: SparkSession, config: ShelfConfig, run_id: str) -> dict[str, list[str]]:
    frame = tables.read(spark, config, "gold", "recommendations").filter(F.col(RUN_ID) == run_id)
    found: dict[str, list[tuple[int, str]]] = {}
    for r in frame.select("user_id", "rank", "item_id").collect():
        found.setdefault(r["user_id"], []).append((r["rank"], r["item_id"]))
    return {u: [i for _, i in sorted(v)] for u, v in found.items()}


def test_vacuum_after_a_delete_removes_rows_physically_despite_deletion_vectors(
    spark: SparkSession, streamed: ShelfConfig, tmp_path: Path
) -> None:
    """`shelf forget --vacuum` (tables.delete_where + tables.vacuum) on gold.recommendations once the stream turned
    deletion vectors on: the forgotten user's rows must leave the data files, not only be marked deleted."""
    shutil.copytree(Path(streamed.storage.root), tmp_path / "tables")
    config = make_test_config(tmp_path, *OVERRIDES)
    props = tables.detail(spark, config, "gold", "recommendations")
    assert props["properties"].get("delta.enableDeletionVectors") == "true"
    tables.delete_where(spark, config, "gold", "recommendations", f"user_id = {tables.sql_string(user_id(1))}")
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    try:
        tables.vacuum(spark, config, "gold", "recommendations", 0.0)
    finally:
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
    files = spark.read.parquet(tables.location(config, "gold", "recommendations"))  # every row in the data files
    assert files.filter(F.col("user_id") == user_id(1)).count() == 0
    # Other users keep exactly their live rows (u02's list is three long after its purchases).
    assert files.filter(F.col("user_id") == user_id(2)).count() == len(lists(spark, config)[user_id(2)]) == 3


ListRow = tuple[str, int, str, int | None, datetime | None]  # user_id, rank, item_id, stream_batch, event_time


def recommendation_rows(spark: SparkSession, rows: list[ListRow]) -> DataFrame:
    """gold.recommendations rows of RUN (with the stream's columns) from (user, rank, item, batch, event time)."""
    schema = (
        StructType([*publishing.RECOMMENDATIONS_SCHEMA.fields])
        .add("stream_batch", "long")
        .add("event_time", "timestamp")
    )
    return spark.createDataFrame([(u, i, r, 1.0 / r, ["als"], RUN, AS_OF, b, t) for u, r, i, b, t in rows], schema)


def nightly_list(user: str, length: int) -> list[ListRow]:
    return [(user, r, f"{user}-night-{r}", None, None) for r in range(1, length + 1)]


@pytest.mark.steps
def test_a_commit_between_the_gate_read_and_the_merge_cannot_make_older_lists_win(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish reads gold.recommendations for its newer-wins gate before the MERGE starts. Here the gate reads
    a stale version (a rerun of the nightly and a newer stream batch committed after it): the MERGE's own row
    conditions must keep u-b's newer rows, and the MERGE must remove the tail ranks of u-a's longer rerun list,
    which the gate never saw, so each user ends with one whole list, never a mix."""
    config = make_test_config(tmp_path, f"rerank.top_k={TOP_K}")

    def frame(rows: list[ListRow]) -> DataFrame:
        return recommendation_rows(spark, rows)

    tables.write(frame(nightly_list("u-a", 2) + nightly_list("u-b", 2)), config, "gold", "recommendations", RUN)
    prepare_recommendations(spark, config)
    stale = tables.latest_version(spark, config, "gold", "recommendations")
    # After the gate's read: the nightly reruns (u-a's list is now 4 long) and a later stream batch (9, event time
    # 3 h after as_of) rewrote u-b's list.
    newer_b = [("u-b", r, f"u-b-batch9-{r}", 9, AS_OF + timedelta(hours=3)) for r in (1, 2)]
    tables.write(frame(nightly_list("u-a", 4) + newer_b), config, "gold", "recommendations", RUN)
    read = tables.read

    def stale_read(spark_: SparkSession, config_: ShelfConfig, layer: str, name: str, version: int | None = None):  # type: ignore[no-untyped-def]
        if (layer, name) == ("gold", "recommendations") and version is None:
            version = stale
        return read(spark_, config_, layer, name, version)

    monkeypatch.setattr(tables, "read", stale_read)
    batch_5 = AS_OF + timedelta(hours=2)
    new = [(u, r, f"{u}-batch5-{r}", 5, batch_5) for u in ("u-a", "u-b") for r in (1, 2)]
    publish(spark, config, frame(new), RUN, 5, batch_5)
    monkeypatch.undo()
    after = lists(spark, config)
    assert after == {"u-a": ["u-a-batch5-1", "u-a-batch5-2"], "u-b": ["u-b-batch9-1", "u-b-batch9-2"]}


def publish_counting_reads(
    spark: SparkSession,
    config: ShelfConfig,
    state: GateState,
    batch_id: int,
    reads: list[int | None],
    monkeypatch: pytest.MonkeyPatch,
    length: int = 2,
) -> None:
    """publish of batch `batch_id`: u-a's new `length`-long list, event time `batch_id` hours after AS_OF;
    each read of gold.recommendations it makes (the gate's) is appended to `reads`."""
    read = tables.read

    def counting_read(spark_: SparkSession, config_: ShelfConfig, layer: str, name: str, version: int | None = None):  # type: ignore[no-untyped-def]
        if (layer, name) == ("gold", "recommendations"):
            reads.append(version)
        return read(spark_, config_, layer, name, version)

    time_ = AS_OF + timedelta(hours=batch_id)
    rows = [("u-a", r, f"u-a-batch{batch_id}-{r}", batch_id, time_) for r in range(1, length + 1)]
    monkeypatch.setattr(tables, "read", counting_read)
    try:
        options = MergeOptions(state=state, as_of=AS_OF)
        publish(spark, config, recommendation_rows(spark, rows), RUN, batch_id, time_, options)
    finally:
        monkeypatch.undo()


@pytest.mark.steps
def test_the_gate_reads_the_table_only_after_another_writer_committed(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish with the stream's GateState: after one full read of gold.recommendations, the stream's next MERGE
    reads only the Delta log (its own commit is the only one since). A commit by another writer (a rerun of the
    nightly, u-a's list now longer than rerank.top_k) makes the next MERGE read the table again, so the rerun's
    tail ranks are deleted too and u-a ends with one whole list, not the new list plus the rerun's tail."""
    config = make_test_config(tmp_path, f"rerank.top_k={TOP_K}")
    nightly = nightly_list("u-a", 2) + nightly_list("u-b", 2)
    tables.write(recommendation_rows(spark, nightly), config, "gold", "recommendations", RUN)
    prepare_recommendations(spark, config)
    state, reads = GateState(), list[int | None]()
    publish_counting_reads(spark, config, state, 5, reads, monkeypatch)
    publish_counting_reads(spark, config, state, 6, reads, monkeypatch)
    assert len(reads) == 1, reads  # batch 6: only the stream's own MERGE since the read
    assert lists(spark, config) == {"u-a": ["u-a-batch6-1", "u-a-batch6-2"], "u-b": ["u-b-night-1", "u-b-night-2"]}
    rerun = nightly_list("u-a", TOP_K + 2) + nightly_list("u-b", 2)
    tables.write(recommendation_rows(spark, rerun), config, "gold", "recommendations", RUN)
    publish_counting_reads(spark, config, state, 7, reads, monkeypatch)
    assert len(reads) == 2, reads
    assert lists(spark, config) == {"u-a": ["u-a-batch7-1", "u-a-batch7-2"], "u-b": ["u-b-night-1", "u-b-night-2"]}


@pytest.mark.parametrize("merge_broadcast_mb", [0, 10])
@pytest.mark.steps
def test_a_shorter_list_deletes_the_whole_tail_of_a_longer_one_without_a_gate_read(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, merge_broadcast_mb: int
) -> None:
    """The MERGE deletes every rank past the new list's length, whatever the old list's length: here the stream's own
    earlier batch wrote a list longer than rerank.top_k (say top_k was larger before a restart), and the next batch,
    which skips the gate's read (only the stream's own MERGEs since), replaces it with a 2-long list. With broadcast
    joins off as in a micro-batch, and the MERGE's own broadcast (stream.merge_broadcast_mb) off or on."""
    config = make_test_config(tmp_path, f"rerank.top_k={TOP_K}", f"stream.merge_broadcast_mb={merge_broadcast_mb}")
    nightly = nightly_list("u-a", 2) + nightly_list("u-b", 2)
    tables.write(recommendation_rows(spark, nightly), config, "gold", "recommendations", RUN)
    prepare_recommendations(spark, config)
    state, reads = GateState(), list[int | None]()
    spark.conf.set("spark.sql.autoBroadcastJoinThreshold", "-1")  # a micro-batch's setting (stream.broadcast_joins)
    try:
        publish_counting_reads(spark, config, state, 5, reads, monkeypatch, length=TOP_K + 3)
        assert len(lists(spark, config)["u-a"]) == TOP_K + 3
        publish_counting_reads(spark, config, state, 6, reads, monkeypatch)
    finally:
        spark.conf.unset("spark.sql.autoBroadcastJoinThreshold")
    assert len(reads) == 1, reads
    assert lists(spark, config) == {"u-a": ["u-a-batch6-1", "u-a-batch6-2"], "u-b": ["u-b-night-1", "u-b-night-2"]}


@pytest.mark.steps
def test_auto_compaction_keeps_the_stream_files_few_without_forcing_gate_reads(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream turns on Delta's auto compaction for gold.recommendations: after enough small files (a low
    threshold here) a write is followed by an OPTIMIZE commit. The OPTIMIZE changes no rows, so the gate still
    skips its read, and the lists are those of the last batch."""
    config = make_test_config(tmp_path, f"rerank.top_k={TOP_K}")
    tables.write(
        recommendation_rows(spark, nightly_list("u-a", 2) + nightly_list("u-b", 2)),
        config,
        "gold",
        "recommendations",
        RUN,
    )
    prepare_recommendations(spark, config)
    state, reads = GateState(), list[int | None]()
    spark.conf.set("spark.databricks.delta.autoCompact.minNumFiles", "3")
    try:
        for batch_id in range(5, 11):
            publish_counting_reads(spark, config, state, batch_id, reads, monkeypatch)
    finally:
        spark.conf.unset("spark.databricks.delta.autoCompact.minNumFiles")
    ops = [r["operation"] for r in tables.history(spark, config, "gold", "recommendations").collect()]
    assert ops.count("MERGE") == 6 and "OPTIMIZE" in ops, ops
    assert len(reads) == 1, reads
    assert lists(spark, config) == {"u-a": ["u-a-batch10-1", "u-a-batch10-2"], "u-b": ["u-b-night-1", "u-b-night-2"]}
