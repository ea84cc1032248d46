"""Where one `shelf stream` micro-batch spends its time, Spark job by Spark job.

    .venv/bin/python -u -m benchmarks.stream_profile [--events 2000] [--batches 3] [--set KEY=VALUE ...]

Set-up as benchmarks/stream.py (the same synthetic nightly run, published by the real `shelf rerank`, in a
temp dir), then no query and no writer process: `--batches` static micro-batches of `--events` view events
each (90% known users, 10% first seen today) are handed to the product's batch function (`StreamJob`) one
after the other, as foreachBatch would. Per batch it prints the BatchReport split; for the last batch, every
Spark job of the batch function in order: its start (+s from the batch start), the gap since the previous
job ended (driver time: planning, Delta log work), its duration, tasks and description (Delta names its
MERGE phases there), and the stages of jobs over 0.5 s. Then Delta's own MERGE metrics per batch.

Use it to find the next thing to cut; the latency figures come from benchmarks/stream.py.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from pyspark.sql import SparkSession

from benchmarks import stream as bench
from pipelines.core.session import get_spark


def print_stages(spark: SparkSession, job_id: int) -> None:
    store = spark.sparkContext._jsc.sc().statusStore()
    ids = store.job(job_id).stageIds()
    rows = []
    for i in range(ids.size()):
        stage = store.lastStageAttempt(ids.apply(i))
        if not stage.submissionTime().isDefined() or not stage.completionTime().isDefined():
            continue
        start = stage.submissionTime().get().getTime() / 1000
        end = stage.completionTime().get().getTime() / 1000
        rows.append((start, end, stage))
    for start, end, stage in sorted(rows, key=lambda r: r[0]):
        print(
            f"        stage {stage.stageId()}: {end - start:5.2f} s, {stage.numTasks()} tasks, "
            f"task time {stage.executorRunTime() / 1000:.2f} s, rows in {stage.inputRecords()} "
            f"/ shuffle read {stage.shuffleReadRecords()} / shuffle write {stage.shuffleWriteRecords()}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=800)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for the stream")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="shelf-stream-profile-") as tmp:
        root = Path(tmp)
        config = bench.bench_config(root, f"stream.source_path={root / 'landing'}", *args.set)
        spark = get_spark(config)
        bench.write_nightly(spark, config, args)
        job = bench.RecordingJob(spark, config)
        job.serving_for()  # the model loads once per nightly run, as in benchmarks/stream.py
        rng = np.random.default_rng(1)
        for b in range(args.batches):
            n = args.events
            known = rng.random(n) >= bench.NEW_USER_SHARE
            users = np.where(
                known,
                np.char.add("u", rng.integers(0, args.users, n).astype(str)),
                np.char.add("new-", rng.integers(0, max(1, args.users // 10), n).astype(str)),
            )
            items = np.char.add("i", rng.integers(0, args.items, n).astype(str))
            ts = (bench.AS_OF + bench.timedelta(hours=1, seconds=b)).strftime("%Y-%m-%d %H:%M:%S")
            rows = [(str(u), str(i), "view", ts, "1", f"c{b}") for u, i in zip(users, items, strict=True)]
            path = str(root / f"batch-{b}")
            spark.createDataFrame(rows, bench.LANDING).coalesce(1).write.format("delta").save(path)
            since = time.time()
            job(spark.read.format("delta").load(path), b)
            r = job.batches[-1].report
            print(
                f"batch {b}: readable after {r.published - r.started:.2f} s (validate {r.validate_seconds:.2f}, "
                f"prepare {r.prepare_seconds:.2f}, rank {r.rank_seconds:.2f} of it kernel {r.kernel_seconds:.2f} "
                f"summed over workers, MERGE call {r.publish_seconds:.2f}), then {r.side_seconds:.2f} s more; "
                f"{r.jobs} Spark jobs; users {int(r.counts.get('users', 0))}",
                flush=True,
            )
            if b == args.batches - 1:
                previous = since
                for j in bench.finished_jobs(spark, f"{config.stream.name}-", since):
                    print(
                        f"    +{j.start - since:6.2f} s  gap {j.start - previous:5.2f}  {j.end - j.start:5.2f} s  "
                        f"{j.tasks:3d} tasks  job {j.job_id}: {j.description[:90]} | {j.name[:80]}"
                    )
                    if j.end - j.start > 0.5:
                        print_stages(spark, j.job_id)
                    previous = max(previous, j.end)
        for tag, m in bench.merge_metrics(spark, config).items():
            shown = ", ".join(f"{k} {v:.0f}" for k, v in m.items())
            print(f"Delta MERGE {tag}: {shown}")
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
