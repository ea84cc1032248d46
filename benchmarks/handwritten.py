"""Side by side: `shelf run` against the hand-written MLlib flow a data team would write in a notebook instead, on
the same ratings file, one after the other in the same invocation (issue 25's yardstick).

The hand-written flow: read the CSV, drop duplicate (user, item) pairs, StringIndexer on both ids, implicit ALS
(rank 64, 10 iterations, ratings as confidences), recommendForAllUsers(200), remove what each user rated, keep
the top 10, map the indices back to ids, write Parquet. No quarantine, no quality gate, no Delta, no
similarities, no re-rank, no evaluation.

shelf: `shelf run --conf conf/local.yaml` with the movielens preset under a fresh storage root, as a user runs it
(every step, the holdout evaluation and the publish gate, the end-of-run summary); then the same steps without
evaluate (and so without its holdout rehearsal and gate), through `pipelines.runner.run_steps`.

Each flow is its own process on local[*] with a 4 GB driver, timed from process start to exit (session start
included). `--copies N` tiles the file's users N times (new user ids, same ratings) to reach a larger file.

    .venv/bin/python -u -m benchmarks.handwritten ../shared/data/ml-latest-small --copies 5
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
AS_OF = "2018-10-01"  # after the last rating of ml-latest-small


def tile(folder: Path, copies: int, out: Path) -> int:
    """ratings.csv of `folder` with its users repeated `copies` times (copy c: user id + c x 10,000,000)."""
    ratings = pd.read_csv(folder / "ratings.csv")
    tiled = pd.concat([ratings.assign(userId=ratings.userId + c * 10_000_000) for c in range(copies)])
    tiled.to_csv(out, index=False)
    return len(tiled)


def handwritten(ratings: str, out: str) -> None:
    """The notebook flow (see the module doc); runs in a child process."""
    from pyspark.ml.feature import IndexToString, StringIndexer
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import SparkSession, Window
    from pyspark.sql import functions as F

    spark = SparkSession.builder.master("local[*]").config("spark.driver.memory", "4g").getOrCreate()
    rated = spark.read.csv(ratings, header=True, inferSchema=True).dropDuplicates(["userId", "movieId"])
    users = StringIndexer(inputCol="userId", outputCol="u").fit(rated)
    items = StringIndexer(inputCol="movieId", outputCol="i").fit(rated)
    indexed = items.transform(users.transform(rated)).select("u", "i", "rating").cache()
    als = ALS(rank=64, maxIter=10, regParam=0.1, alpha=1.0, implicitPrefs=True, userCol="u", itemCol="i",
              ratingCol="rating", coldStartStrategy="drop", seed=42)  # fmt: skip
    model = als.fit(indexed)
    recs = model.recommendForAllUsers(200).select("u", F.explode("recommendations").alias("r"))
    recs = recs.select("u", F.col("r.i").alias("i"), F.col("r.rating").alias("score"))
    unseen = recs.join(indexed.select("u", F.col("i").cast("int").alias("i")), ["u", "i"], "left_anti")
    top = unseen.withColumn("rank", F.row_number().over(Window.partitionBy("u").orderBy(F.desc("score"))))
    top = top.where("rank <= 10").withColumn("i", F.col("i").cast("double"))
    to_user = IndexToString(inputCol="u", outputCol="userId", labels=users.labels)
    to_item = IndexToString(inputCol="i", outputCol="movieId", labels=items.labels)
    to_item.transform(to_user.transform(top)).select("userId", "movieId", "rank", "score").write.parquet(out)
    spark.stop()


def without_evaluate(conf: list[str]) -> None:
    """`shelf run`'s steps but evaluate, in order, in one session (what `shelf run` does, minus evaluate)."""
    from pipelines import runner
    from pipelines.core.config_loading import load_config
    from pipelines.core.logs import setup_logging
    from pipelines.core.runs import make_context
    from pipelines.core.session import get_spark
    from pipelines.steps import STEPS

    setup_logging()
    config = load_config(REPO / "conf" / "local.yaml", conf)
    spark = get_spark(config)
    runner.run_steps(spark, config, make_context("handwritten", AS_OF, config.generate.end), [
        s for s in STEPS if s != "evaluate"
    ])  # fmt: skip


def timed(label: str, cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{label} failed with exit code {code}; its log: {log}")
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a MovieLens folder with ratings.csv (e.g. ml-latest-small)")
    p.add_argument("--copies", type=int, default=1, help="tile the users this many times")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # the flows' own processes
    args = p.parse_args()
    if args.child:
        handwritten(*args.child[1:]) if args.child[0] == "handwritten" else without_evaluate(args.child[1:])
        return
    work = Path(tempfile.mkdtemp(prefix="shelf-handwritten-"))
    ratings = work / "ratings.csv"
    rows = tile(args.folder, args.copies, ratings)
    print(f"{rows:,} ratings ({args.copies} x {args.folder.name}) in {ratings}")
    me = [sys.executable, "-u", "-m", "benchmarks.handwritten", str(args.folder), "--child"]
    sets = ["source.preset=movielens", f"source.path={ratings}"]
    hand = timed("hand-written MLlib flow", [*me, "handwritten", str(ratings), str(work / "hand")], work / "hand.log")
    plain = timed("shelf run without evaluate", [*me, "shelf", *sets, f"storage.root={work / 'plain'}"],
                  work / "plain.log")  # fmt: skip
    full_sets = [a for s in [*sets, f"storage.root={work / 'full'}"] for a in ("--set", s)]
    shelf = [str(Path(sys.executable).parent / "shelf"), "run", "--conf", "conf/local.yaml", "--as-of", AS_OF]
    full = timed("shelf run", [*shelf, *full_sets], work / "full.log")
    print(f"shelf run without evaluate / hand-written: {plain / hand:.2f}x (target 1.0x)")
    print(f"shelf run / hand-written: {full / hand:.2f}x (target 1.5x); logs and tables in {work}")


if __name__ == "__main__":
    main()
