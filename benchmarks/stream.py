"""`shelf stream` latency: from an event's append to its user's updated list being readable.

    .venv/bin/python -u -m benchmarks.stream [--rates 100 1000 10000] [--seconds 60] [--warmup 30] [--interval 1]
        [--users 2000] [--items 800] [--rank 32] [--candidates 100] [--append-with delta-rs|spark|kafka]

Set-up (in a temp dir, conf/local.yaml with local[2]): a synthetic nightly run (random ALS factors,
each user's `--candidates` best items by ALS score as gold.candidates, factor-cosine neighbours as
gold.item_similarities, two weeks of silver views) published by the real `shelf rerank`.

Per rate: a writer process appends events to a fresh landing Delta table at a steady rate, through delta-rs
(`deltalake`, no JVM: `pip install '.[bench]'`) or, with `--append-with spark`, its own Spark session
(local[1], the earlier rounds' writer: its JVM shares the two cores with the stream), one small commit every
0.5 s. With `--append-with kafka` (stream.source: kafka) the writer is a tracker publishing to Kafka instead: an
Apache Kafka broker (KRaft, the jars `make kafka` fetched) is started on 127.0.0.1 for the run, each rate gets a
topic of its own, and every 0.5 s the writer sends that chunk's events as JSON messages (confluent-kafka) and
logs the time the broker acknowledged the last of them (the "append"). The events: 90% known users, 10% users
first seen today; 80% views, 15% add-to-cart, 5% purchases; sent for `--warmup`
+ `--seconds`; this process runs the stream with a `--interval` s processingTime trigger on a fresh
checkpoint. Each commit carries its number in session_id; the writer logs the wall-clock time each commit
returned, the batch function logs the time its MERGE committed. Latency of an event = its batch's MERGE commit
- its commit's append (both time.time() on this machine), weighted by events. The split, per event (means,
event-weighted): `wait` (append -> its batch function starts: trigger interval, the previous batch still
running, the source scan), then inside the batch up to the MERGE's commit (when the list is readable):
`validate` (classify the rows and count them by reason: one Spark job), `prepare` (serving-run check from the
Delta log, the batch's users, plan building), `rank` (the one job that materialises the users' new lists:
joins and kernel; `kernel` is the seconds inside `udfs.candidates`, `udfs.rerank` and the id mapping summed
over the Python workers, so with 2 workers it can exceed the wall time / 2), `MERGE call` (the Delta log
check, the newer-wins gate's read of gold.recommendations when another writer committed, then the MERGE), of
which `Delta MERGE` is the MERGE's own executionTimeMs from DESCRIBE HISTORY; after the commit, `side writes`
(waiting for the quarantine, bronze.stream_events and run-metrics writes on their own threads: they delay the
next batch, not this one's lists); `jobs/batch`: the Spark jobs of the batch function (its job group). Per
rate it also prints Structured Streaming's own time per batch outside the batch function (the query's
progress: source offsets, offset and commit logs, planning), which is part of `wait`. Only the
events appended after the first `--warmup` seconds are scored (the stream's first micro-batch starts the
Python workers and makes one-off table changes; with 3-4 batches a minute it would otherwise weigh on every
percentile). Sustained events/s = scored events published / (last MERGE commit - first scored append).

Baseline in the same process: one user's re-rank in process (`rerank_frame` on one user row, no Spark),
the figure to hold against the literature's 300 ms per re-rank.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines import rerank
from pipelines.core import kernel_frames, reranking, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import load_config
from pipelines.core.runs import RunContext
from pipelines.core.schemas import CATALOG_SCHEMA, INTERACTIONS_SCHEMA, USER_IDX
from pipelines.core.session import get_spark
from pipelines.stream.job import BatchReport, StreamJob, start
from pipelines.stream.serving import Serving, landing_path

REPO = Path(__file__).resolve().parents[1]
AS_OF = datetime(2026, 11, 1)
RUN = "bench-night"
LANDING = "user_id string, item_id string, event_type string, event_ts string, value string, session_id string"
LANDING_NAMES = [column.split()[0] for column in LANDING.split(", ")]
COMMIT_EVERY_S = 0.5
NEW_USER_SHARE = 0.1
TYPES, TYPE_P = ["view", "add_to_cart", "purchase"], [0.8, 0.15, 0.05]


def bench_config(root: Path, *overrides: str) -> ShelfConfig:
    return load_config(
        REPO / "conf" / "local.yaml",
        [f"storage.root={root / 'tables'}", f"spark.jars_dir={REPO / '.jars'}", "spark.master=local[2]", *overrides],
    )


# ---------------------------------------------------------------- the nightly run


def write_nightly(spark: SparkSession, config: ShelfConfig, args: argparse.Namespace) -> None:
    """Synthetic silver + gold tables of one nightly run, published by the real `shelf rerank`."""
    rng = np.random.default_rng(7)
    n_users, n_items, rank, k = args.users, args.items, args.rank, args.candidates
    user_f = rng.normal(size=(n_users, rank)).astype(np.float32) / np.sqrt(rank)
    item_f = rng.normal(size=(n_items, rank)).astype(np.float32) / np.sqrt(rank)
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(n_users)], USER_IDX: np.arange(n_users, dtype=np.int32)})
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)], "item_idx": np.arange(n_items, dtype=np.int32)})
    tables.write(spark.createDataFrame(users), config, "silver", "user_index", RUN)
    tables.write(spark.createDataFrame(items), config, "silver", "item_index", RUN)
    n_events = n_users * 10
    ev_users = rng.integers(0, n_users, n_events)
    ev_items = rng.integers(0, n_items, n_events)
    ages = rng.uniform(0.01, 14.0, n_events)
    rows = [
        (int(u), int(i), "view", AS_OF - timedelta(days=float(a)), 1.0, 1.0, 1.0, RUN, AS_OF)
        for u, i, a in zip(ev_users, ev_items, ages, strict=True)
    ]
    interactions = spark.createDataFrame(rows, INTERACTIONS_SCHEMA).dropDuplicates(["user_idx", "item_idx", "event_ts"])
    tables.write(interactions, config, "silver", "interactions", RUN)
    schema = "features array<float>, run_id string"
    uf = [(u, user_f[u].tolist(), RUN) for u in range(n_users)]
    itf = [(i, item_f[i].tolist(), RUN) for i in range(n_items)]
    tables.write(spark.createDataFrame(uf, f"user_idx int, {schema}"), config, "gold", "user_factors", RUN)
    tables.write(spark.createDataFrame(itf, f"item_idx int, {schema}"), config, "gold", "item_factors", RUN)
    scores = user_f @ item_f.T
    best = np.argsort(-scores, axis=1)[:, :k]
    cands = pd.DataFrame(
        {
            USER_IDX: np.repeat(np.arange(n_users, dtype=np.int32), k),
            "item_idx": best.ravel().astype(np.int32),
            "als_score": np.take_along_axis(scores, best, axis=1).ravel().astype(np.float64),
            "run_id": RUN,
        }
    )
    frame = spark.createDataFrame(cands).withColumn("sources", F.array(F.lit("als")))
    frame = frame.select(USER_IDX, "item_idx", "als_score", "sources", "run_id")
    tables.write(frame, config, "gold", "candidates", RUN, mode="run")
    unit = item_f / np.linalg.norm(item_f, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    near = np.argsort(-cos, axis=1)[:, :20]
    sims = pd.DataFrame(
        {
            "item_idx": np.repeat(np.arange(n_items, dtype=np.int32), 20),
            "neighbour_idx": near.ravel().astype(np.int32),
            "score": np.take_along_axis(cos, near, axis=1).ravel().astype(np.float64),
            "rank": np.tile(np.arange(1, 21, dtype=np.int32), n_items),
            "source": "als",
            "run_id": RUN,
        }
    )
    tables.write(spark.createDataFrame(sims), config, "gold", "item_similarities", RUN)
    catalog = [(f"i{i}", f"c{i % 12}", float(5 + i % 50), True, bool(i % 25 == 0), None, None) for i in range(n_items)]
    tables.write(spark.createDataFrame(catalog, CATALOG_SCHEMA), config, "silver", "catalog", RUN)
    rerank.run(spark, config, RunContext(RUN, AS_OF))


# ---------------------------------------------------------------- the writer process


def writer_main(args: argparse.Namespace) -> int:
    """Append events at `args.rate` per second to the landing table for `args.seconds`; log each commit."""
    rng = np.random.default_rng(args.rate)
    log = Path(args.log)
    append = _appender(args)
    Path(args.log + ".ready").touch()  # the appender is warm: tell the parent we are ready
    started, sent, chunk = time.time(), 0, 0
    with log.open("w") as out:
        while time.time() - started < args.seconds:
            due = int(args.rate * (time.time() - started)) - sent
            if due > 0:
                n = due
                known = rng.random(n) >= NEW_USER_SHARE
                users = np.where(
                    known,
                    np.char.add("u", rng.integers(0, args.users, n).astype(str)),
                    np.char.add("new-", rng.integers(0, max(1, args.users // 10), n).astype(str)),
                )
                items = np.char.add("i", rng.integers(0, args.items, n).astype(str))
                types = rng.choice(TYPES, size=n, p=TYPE_P)
                # Event time: deterministic, after the nightly's as_of, advancing with the commits.
                ts = (AS_OF + timedelta(hours=1, seconds=chunk * COMMIT_EVERY_S)).strftime("%Y-%m-%d %H:%M:%S")
                append(
                    {
                        "user_id": users.astype(str).tolist(),
                        "item_id": items.astype(str).tolist(),
                        "event_type": types.astype(str).tolist(),
                        "event_ts": [ts] * n,
                        "value": ["1"] * n,
                        "session_id": [f"c{chunk}"] * n,
                    }
                )
                out.write(json.dumps({"chunk": chunk, "events": n, "appended": time.time()}) + "\n")
                out.flush()
                sent += n
                chunk += 1
            time.sleep(max(0.0, COMMIT_EVERY_S - (time.time() - started) % COMMIT_EVERY_S))
    return 0


def _appender(args: argparse.Namespace) -> Callable[[dict[str, list[str]]], None]:
    """One landing-table commit per call, by `--append-with`: delta-rs (`deltalake`, no JVM: what a tracker's
    ingest service would run) or a Spark session of its own (local[1]: the earlier rounds' writer, which shares
    the two cores with the stream's JVM). Warmed up with one empty commit."""
    if args.append_with == "kafka":
        return _kafka_appender(args)
    if args.append_with == "spark":
        config = bench_config(
            Path(args.root), "spark.master=local[1]", "spark.driver_memory=1g", f"stream.source_path={args.source}"
        )
        spark = get_spark(config)
        landing = landing_path(config)
        atexit.register(spark.stop)

        def append_spark(columns: dict[str, list[str]]) -> None:
            rows = list(zip(*columns.values(), strict=True))
            spark.createDataFrame(rows, LANDING).coalesce(1).write.format("delta").mode("append").save(landing)

        append_spark({name: [] for name in LANDING_NAMES})
        return append_spark
    try:
        from deltalake import write_deltalake
    except ImportError as exc:
        raise SystemExit(
            "benchmarks.stream --append-with delta-rs needs the deltalake package; "
            "install it with .venv/bin/pip install '.[bench]' or pass --append-with spark."
        ) from exc
    schema = pa.schema([(name, pa.string()) for name in LANDING_NAMES])

    def append_delta_rs(columns: dict[str, list[str]]) -> None:
        write_deltalake(args.source, pa.table(columns, schema=schema), mode="append")

    append_delta_rs({name: [] for name in LANDING_NAMES})
    return append_delta_rs


def _kafka_appender(args: argparse.Namespace) -> Callable[[dict[str, list[str]]], None]:
    """One chunk of JSON messages per call to topic `args.source`, returning when the broker acknowledged all."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 5, "enable.idempotence": True})

    def produce(columns: dict[str, list[str]]) -> None:
        for row in zip(*columns.values(), strict=True):
            producer.produce(args.source, value=json.dumps(dict(zip(columns, row, strict=True))).encode())
        if producer.flush(60) != 0:
            raise RuntimeError("Kafka did not acknowledge a chunk in 60 s")

    produce({name: [] for name in LANDING_NAMES})
    return produce


# ---------------------------------------------------------------- the stream side


@dataclass
class Batch:
    report: BatchReport
    chunks: list[int]


class RecordingJob(StreamJob):
    """The product's batch function, plus which writer commits each batch held (read from the batch's cached rows
    after the product's work, so it adds one small job at the end of a batch, after the lists are readable)."""

    def __init__(self, spark: SparkSession, config: ShelfConfig) -> None:
        self.batches: list[Batch] = []
        self.chunks: dict[int, list[int]] = {}
        super().__init__(spark, config, on_batch=self.remember)

    def remember(self, report: BatchReport) -> None:
        self.batches.append(Batch(report, self.chunks.pop(report.batch_id, [])))

    def process(  # type: ignore[no-untyped-def]
        self, classified, batch_id: int, serving: Serving, report: BatchReport
    ) -> None:
        super().process(classified, batch_id, serving, report)
        chunks = classified.select(F.regexp_extract("session_id", r"^c(\d+)$", 1).cast("int").alias("c")).distinct()
        self.chunks[batch_id] = sorted(int(r["c"]) for r in chunks.collect() if r["c"] is not None)


@dataclass(frozen=True)
class JobTiming:
    start: float  # time.time() seconds
    end: float
    job_id: int
    tasks: int
    name: str  # Spark's call-site name ("localCheckpoint at ...")
    description: str  # the job description (Delta names its MERGE phases there), else the name


def finished_jobs(spark: SparkSession, prefix: str, since: float) -> list[JobTiming]:
    """The finished Spark jobs whose job group starts with `prefix` and that started after `since`, in start order
    (from Spark's own status store: the jobs the stream's batch function ran)."""
    store = spark.sparkContext._jsc.sc().statusStore()
    found = []
    jobs = store.jobsList(None)  # a Scala Seq
    for i in range(jobs.size()):
        job = jobs.apply(i)
        group = job.jobGroup()
        if not group.isDefined() or not str(group.get()).startswith(prefix):
            continue
        if not job.submissionTime().isDefined() or not job.completionTime().isDefined():
            continue
        start = job.submissionTime().get().getTime() / 1000
        if start < since:
            continue
        name = str(job.name())
        text = str(job.description().get()) if job.description().isDefined() else name
        end = job.completionTime().get().getTime() / 1000
        found.append(JobTiming(start, end, int(job.jobId()), int(job.numTasks()), name, text))
    return sorted(found, key=lambda j: j.start)


def job_seconds_by_name(spark: SparkSession, prefix: str, since: float) -> list[tuple[str, int, float]]:
    """(job name, jobs, seconds) of finished_jobs, most seconds first: where a micro-batch's time goes."""
    found: dict[str, list[float]] = {}
    for job in finished_jobs(spark, prefix, since):
        found.setdefault(job.name.split(" at ")[0][:60], []).append(job.end - job.start)
    return sorted(((n, len(v), sum(v)) for n, v in found.items()), key=lambda t: -t[2])


def percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q * cum[-1])])


def run_rate(spark: SparkSession, root: Path, args: argparse.Namespace, rate: int) -> dict[str, float]:
    sub = root / f"rate-{rate}"
    # Each rate starts from the nightly's tables as published, in a copy of its own. On the previous rate's tables
    # the stream's batch ids (restarting with each rate's checkpoint) would stay below the stream rows already
    # there, so the gate (GateState) would read gold.recommendations every batch, which a steady stream does not.
    storage = root / f"tables-{rate}"
    shutil.copytree(root / "tables", storage)
    kafka = args.kafka_bootstrap is not None
    source = f"bench-{rate}" if kafka else str(sub / "landing")
    config = bench_config(
        root,
        *kafka_settings(args, source),
        f"storage.root={storage}",
        f"stream.source_path={sub / 'landing'}",
        f"stream.checkpoint={sub / 'checkpoint'}",
        f"stream.interval_seconds={args.interval}",
        "stream.trigger=processing_time",
        *args.set,
    )
    if not kafka:
        spark.createDataFrame([], LANDING).write.format("delta").mode("append").save(landing_path(config))
    job = RecordingJob(spark, config)
    started = time.time()
    job.serving_for()  # the model loads once per nightly run: not part of an event's latency
    query = start(spark, config, job)
    log = sub / "writer.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.stream", "--writer", "--root", str(root), "--log", str(log)]
    total = args.warmup + args.seconds
    cmd += ["--rate", str(rate), "--seconds", str(total), "--users", str(args.users), "--items", str(args.items)]
    cmd += ["--source", source, "--append-with", args.append_with, "--bootstrap", str(args.kafka_bootstrap)]
    writer = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        while not Path(str(log) + ".ready").exists():
            if writer.poll() is not None:
                raise RuntimeError("the writer process died before it was ready")
            time.sleep(0.2)
        writer.wait(timeout=total + 600)
        appended = [json.loads(line) for line in log.read_text().splitlines()]
        wanted = {a["chunk"] for a in appended}
        deadline = time.time() + 300
        while time.time() < deadline and not wanted <= {c for b in job.batches for c in b.chunks}:
            time.sleep(0.5)
    finally:
        if writer.poll() is None:
            os.killpg(writer.pid, signal.SIGKILL)
        failed = query.exception()
        if failed is not None:
            print(f"rate {rate}: the stream query failed: {str(failed)[:2000]}", flush=True)
        progress = list(query.recentProgress)
        query.stop()
        job.close()
    print_engine_overhead(rate, progress)
    jobs = job_seconds_by_name(spark, f"{config.stream.name}-", started)
    batches = max(1, len(job.batches))
    print(f"rate {rate}: Spark jobs of the batch function per batch, by job name (count, seconds):")
    for name, count, seconds in jobs[:12]:
        print(f"    {name}: {count / batches:.1f} jobs, {seconds / batches:.2f} s")
    scored_from = min(a["appended"] for a in appended) + args.warmup if appended else 0.0
    scored = [a for a in appended if a["appended"] >= scored_from]
    return summarise(rate, scored, job.batches, merge_metrics(spark, config), config.stream.name)


def kafka_settings(args: argparse.Namespace, topic: str) -> list[str]:
    """The stream's settings for `--append-with kafka` (topic `topic`, created here); [] otherwise."""
    if args.kafka_bootstrap is None:
        return []
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": args.kafka_bootstrap})
    for future in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        future.result(timeout=60)
    return [
        "stream.source=kafka",
        f"stream.kafka.bootstrap_servers={args.kafka_bootstrap}",
        f"stream.kafka.topic={topic}",
    ]


ENGINE_PHASES = ("latestOffset", "walCommit", "getBatch", "queryPlanning", "commitOffsets")


def print_engine_overhead(rate: int, progress: list[Any]) -> None:
    """Structured Streaming's own time per micro-batch outside the batch function (StreamingQueryProgress.durationMs,
    means over the batches that ran it): triggerExecution - addBatch, and its phases (the source's offsets, the
    offset and commit logs, planning). It is part of `wait`: the time between one batch function and the next."""
    runs = [p.durationMs for p in progress if p.durationMs.get("addBatch")]
    if not runs:
        return
    outside = np.mean([d.get("triggerExecution", 0) - d.get("addBatch", 0) for d in runs]) / 1000
    phases = ", ".join(f"{k} {np.mean([d.get(k, 0) for d in runs]) / 1000:.2f}" for k in ENGINE_PHASES)
    print(f"rate {rate}: Structured Streaming per batch outside the batch function: {outside:.2f} s ({phases})")


MERGE_METRICS = ("executionTimeMs", "scanTimeMs", "rewriteTimeMs")


def merge_metrics(spark: SparkSession, config: ShelfConfig) -> dict[str, dict[str, float]]:
    """Per batch tag: the Delta MERGE's own operationMetrics (ms) and the files it added / removed / marked."""
    history = tables.history(spark, config, "gold", "recommendations").filter(F.col("operation") == "MERGE")
    found: dict[str, dict[str, float]] = {}
    for r in history.select("userMetadata", "operationMetrics").collect():
        m = r["operationMetrics"] or {}
        keys = (*MERGE_METRICS, "numTargetFilesAdded", "numTargetFilesRemoved", "numTargetDeletionVectorsAdded")
        found[str(r["userMetadata"]).removeprefix("run_id=")] = {k: float(m.get(k, 0) or 0) for k in keys}
    return found


def summarise(
    rate: int, appended: list[dict[str, float]], batches: list[Batch], merges: dict[str, dict[str, float]], name: str
) -> dict[str, float]:
    """Event-weighted latency percentiles and the mean split of an event's latency (seconds)."""
    by_chunk = {int(a["chunk"]): a for a in appended}
    parts: dict[str, list[float]] = {
        k: [] for k in ("lat", "wait", "validate", "prepare", "rank", "merge", "kernel", "delta", "side", "jobs", "w")
    }
    for b in batches:
        r = b.report
        delta = merges.get(f"{name}-{r.batch_id}", {}).get("executionTimeMs", 0.0) / 1000
        for c in b.chunks:
            if c not in by_chunk or not r.published:
                continue
            a = by_chunk[c]
            values = {
                "lat": r.published - a["appended"],
                "wait": r.started - a["appended"],
                "validate": r.validate_seconds,
                "prepare": r.prepare_seconds,
                "rank": r.rank_seconds,
                "merge": r.publish_seconds,
                "kernel": r.kernel_seconds,
                "delta": delta,
                "side": r.side_seconds,
                "jobs": float(r.jobs),
                "w": float(a["events"]),
            }
            for k, v in values.items():
                parts[k].append(v)
    w = np.asarray(parts["w"], dtype=np.float64)
    if not w.size:
        return {"rate": rate, "events": 0}
    lat_a = np.asarray(parts["lat"])
    published = sum(by_chunk[c]["events"] for b in batches for c in b.chunks if c in by_chunk)
    span = max(b.report.published for b in batches) - min(a["appended"] for a in appended)
    out = {
        "rate": rate,
        "events": float(published),
        "batches": float(len([b for b in batches if any(c in by_chunk for c in b.chunks)])),
        "p50": percentile(lat_a, w, 0.5),
        "p95": percentile(lat_a, w, 0.95),
        "max": float(lat_a.max()),
        "sustained": published / span if span > 0 else 0.0,
    }
    for k in ("wait", "validate", "prepare", "rank", "merge", "kernel", "delta", "side", "jobs"):
        out[k] = float(np.average(np.asarray(parts[k]), weights=w))
    return out


def single_user_baseline(spark: SparkSession, config: ShelfConfig) -> float:
    """Median seconds of one user's re-rank in process (rerank_frame on one user row, no Spark)."""
    job = StreamJob(spark, config)
    serving = job.serving_for()
    stored = tables.read(spark, config, "gold", "candidates").filter(F.col("run_id") == serving.run_id)
    one = stored.filter(F.col(USER_IDX) == 0).select(USER_IDX, "item_idx", "als_score", "sources")
    no_events = spark.createDataFrame([], "user_idx int, item_idx int, _age double, _w double, _bought boolean")
    row = reranking.to_user_rows(one, serving.user_factors, no_events).toPandas()
    params = kernel_frames.params_from(config.rerank)
    table = serving.items.value
    times = []
    for _ in range(20):
        started = time.perf_counter()
        kernel_frames.rerank_frame(row, table, params)
        times.append(time.perf_counter() - started)
    job.close()
    return float(np.median(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of appends before the scored ones")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=800)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for the stream")
    p.add_argument(
        "--append-with",
        choices=["delta-rs", "spark", "kafka"],
        default="delta-rs",
        help="what the writer process appends with: delta-rs (no JVM), its own Spark session (earlier rounds), "
        "or Kafka (a broker started here; the stream reads the topic)",
    )
    p.add_argument("--writer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=int, help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.kafka_bootstrap = None
    if args.writer:
        return writer_main(args)
    with tempfile.TemporaryDirectory(prefix="shelf-stream-bench-") as tmp:
        root = Path(tmp)
        if args.append_with == "kafka":
            from tests.servers import start_kafka_broker

            broker = start_kafka_broker(root / "kafka", REPO / ".jars" / "kafka-broker")
            atexit.register(broker.server.stop)
            args.kafka_bootstrap = broker.bootstrap
            print(f"Kafka broker (KRaft) on {broker.bootstrap}")
        config = bench_config(root, *(["stream.source=kafka"] if args.kafka_bootstrap else []))
        spark = get_spark(config)
        started = time.perf_counter()
        write_nightly(spark, config, args)
        print(
            f"nightly run: {args.users} users x {args.items} items, rank {args.rank}, {args.candidates} candidates "
            f"per user, published in {time.perf_counter() - started:.1f}s"
        )
        baseline = single_user_baseline(spark, config)
        print(f"baseline: one user's re-rank in process (rerank_frame, no Spark): {baseline * 1000:.1f} ms")
        print()
        print(
            "| rate (events/s) | events | batches | p50 s | p95 s | max s | sustained events/s "
            "| wait s | validate s | prepare s | rank s | of it kernel s | MERGE call s | of it Delta MERGE s "
            "| side writes s | jobs/batch | p50 / in-process re-rank |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for rate in args.rates:
            r = run_rate(spark, root, args, rate)
            if not r.get("events"):
                print(f"| {rate} | 0 |" + " - |" * 15)
                continue
            print(
                f"| {rate:,} | {int(r['events']):,} | {int(r['batches'])} | {r['p50']:.2f} | {r['p95']:.2f} "
                f"| {r['max']:.2f} | {r['sustained']:,.0f} | {r['wait']:.2f} | {r['validate']:.2f} "
                f"| {r['prepare']:.2f} | {r['rank']:.2f} | {r['kernel']:.3f} | {r['merge']:.2f} | {r['delta']:.2f} "
                f"| {r['side']:.2f} "
                f"| {r['jobs']:.1f} | {r['p50'] / baseline:,.0f}x |",
                flush=True,
            )
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
