"""Benchmark: the public MovieLens protocol, so shelf's numbers compare with published tables.

Reads a MovieLens ratings file (u.data tab-separated, ratings.dat `::`, ratings.csv with a header, or
a folder holding one of them) with the ingest step's movielens layout; writes nothing but scratch
checkpoints. Protocol: random 75/25 split stratified by item (seed 42), k = 10, items a user rated in
training removed from their lists, users absent from training not scored. Models, all trained on the
75% part only:

- popularity: most-rated items
- item_knn: evaluate's co-occurrence item-kNN baseline (evaluate.knn_* settings)
- als_explicit: MLlib ALS on the explicit ratings as published tables run it (rank 10, 15 iterations,
  regParam 0.05, implicitPrefs false)
- als_implicit: shelf's implicit ALS (rating = confidence), with the parameters chosen by the train
  step's tuning (`pipelines.train.tune`: grid over train.grid scored by NDCG@train.tune_k on a
  per-user leave-last-N validation split carved from the 75% training part, never the test part)

Prints one row per model (precision, recall, NDCG, MAP both ways, coverage, novelty, diversity at k) and
the seconds each took.

    .venv/bin/python -u -m benchmarks.movielens ../shared/data/ml-latest-small
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from benchmarks._common import blas_in_use
from pipelines import baselines
from pipelines.core import als, metrics, schemas
from pipelines.core.config import ShelfConfig, SourceConfig
from pipelines.core.config_loading import load_config
from pipelines.core.config_sections import TrainConfig
from pipelines.core.runs import RunContext
from pipelines.core.schemas import EVENT_TS, ITEM_IDX, USER_IDX
from pipelines.core.session import get_spark
from pipelines.core.sources import read_source
from pipelines.core.splits import random_stratified_split
from pipelines.source_presets import MOVIELENS_COLUMNS, text_layout
from pipelines.train import tune

REPO = Path(__file__).resolve().parents[1]
RATINGS_FILES = ("ratings.csv", "ratings.dat", "u.data")
MODEL = schemas.MODEL
SHOWN = ("precision", "recall", "ndcg", "map", "map_rel", "coverage", "novelty", "diversity")
# The explicit ALS of the published MovieLens tables (recommenders' ALS deep dive).
PUBLISHED_EXPLICIT = als.AlsParams(rank=10, reg_param=0.05, alpha=1.0, confidence="raw")
PUBLISHED_EXPLICIT_ITERATIONS = 15


def ratings_file(path: Path) -> Path:
    """`path` itself, or the first MovieLens ratings file inside the folder `path`."""
    if path.is_file():
        return path
    for name in RATINGS_FILES:
        if (path / name).exists():
            return path / name
    raise SystemExit(f"No MovieLens ratings file ({', '.join(RATINGS_FILES)}) in {path}; pass the file or its folder.")


def read_ratings(spark: SparkSession, source: SourceConfig) -> DataFrame:
    """(user_idx, item_idx, strength = the rating, event_ts): one row per rating, MovieLens ids as ints."""
    layout = text_layout(spark, source)
    options = {"sep": layout.sep, "header": str(layout.header).lower(), "inferSchema": "false"}
    raw = read_source(spark, source.path, "csv", "source.path", options=options).drop("_source_file")
    named = raw.toDF(*MOVIELENS_COLUMNS) if not layout.header else raw
    user, item, rating, ts = MOVIELENS_COLUMNS
    return named.select(
        F.col(user).cast("int").alias(USER_IDX),
        F.col(item).cast("int").alias(ITEM_IDX),
        F.col(rating).cast("double").alias(als.STRENGTH),
        F.timestamp_seconds(F.col(ts).cast("long")).alias(EVENT_TS),
    )


def explicit_als(spark: SparkSession, train: DataFrame, users: DataFrame, config: TrainConfig, k: int) -> DataFrame:
    """Published-style explicit ALS: predicted ratings ranked, training items removed."""
    settings = config.model_copy(update={"max_iter": PUBLISHED_EXPLICIT_ITERATIONS})
    blocks = als.num_blocks(spark, settings)
    ratings = als.deterministic_input(als.to_ratings(train, "raw"), blocks).cache()
    model = als.build_als(PUBLISHED_EXPLICIT, settings, blocks, implicit=False).fit(ratings)
    recs = als.als_recommend(model, users, train, k)
    ratings.unpersist()
    return recs


def implicit_als(
    spark: SparkSession, train: DataFrame, users: DataFrame, config: ShelfConfig, k: int, tuned: bool
) -> tuple[DataFrame, als.AlsParams]:
    """shelf's implicit ALS, with the train step's tuning on a validation split of `train` when `tuned`."""
    params = als.AlsParams.from_config(config.train, config.clean.half_life_days)
    if tuned:
        grid, params = tune(spark, train, config.train, RunContext(run_id="movielens", as_of=datetime(2000, 1, 1)))
        for row in grid.orderBy(F.col("ndcg").desc()).collect():
            print(
                f"  tune rank={row['rank']} reg={row.reg_param} alpha={row.alpha} conf={row.confidence}: "
                f"validation ndcg@{row.k}={row.ndcg:.4f} ({row.seconds:.1f} s)"
            )
    model = als.fit_als(spark, train, params, config.train)
    return als.als_recommend(model, users, train, k), params


def recommend(
    spark: SparkSession, name: str, train: DataFrame, users: DataFrame, config: ShelfConfig, k: int, tuned: bool
) -> DataFrame:
    if name == "popularity":
        return baselines.recommend_popular(baselines.popularity_scores(train), users, train, k)
    if name == "item_knn":
        return baselines.recommend_item_knn(train, users, config.evaluate, k, train)
    if name == "als_explicit":
        return explicit_als(spark, train, users, config.train, k)
    recs, params = implicit_als(spark, train, users, config, k, tuned)
    print(f"  als_implicit params: {params}")
    return recs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a MovieLens ratings file or the folder holding it")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ratio", type=float, default=0.75, help="share of each group's ratings in train")
    parser.add_argument("--by", choices=["item", "user"], default="item", help="stratify the split by")
    parser.add_argument("--no-tune", action="store_true", help="implicit ALS with train.* as configured")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--models", nargs="+", default=["popularity", "item_knn", "als_explicit", "als_implicit"])
    args = parser.parse_args(argv)

    scratch = tempfile.mkdtemp(prefix="shelf-movielens-")
    config = load_config(
        REPO / "conf" / "local.yaml",
        [
            f"storage.root={scratch}/tables",
            "source.preset=movielens",
            f"source.path={ratings_file(args.path.resolve())}",
            f"spark.jars_dir={REPO / '.jars'}",
            *args.overrides,
        ],
    )
    spark = get_spark(config)
    print(f"spark {spark.version}, {spark.sparkContext.defaultParallelism} cores, blas {blas_in_use(spark)}")
    print(f"ratings: {config.source.path}")

    pairs = read_ratings(spark, config.source).cache()
    train, test = random_stratified_split(pairs, ratio=args.ratio, seed=args.seed, by=args.by)
    train, test = train.cache(), test.cache()
    relevant = baselines.to_relevant(train, test, owned=train).cache()  # a rating consumes the film
    users = relevant.select(USER_IDX).distinct().cache()
    print(
        f"ratings {pairs.count():,}, train {train.count():,}, test {test.count():,}, "
        f"relevant {relevant.count():,} for {users.count():,} users; split {args.ratio:.0%} by {args.by}, "
        f"seed {args.seed}, k={args.k}"
    )

    lists, seconds = [], {}
    for name in args.models:
        started = time.perf_counter()
        recs = recommend(spark, name, train, users, config, args.k, not args.no_tune)
        recs = recs.withColumn(MODEL, F.lit(name)).cache()
        recs.count()
        seconds[name] = time.perf_counter() - started
        print(f"{name}: lists in {seconds[name]:.1f} s")
        lists.append(recs)
    combined = lists[0]
    for recs in lists[1:]:
        combined = combined.unionByName(recs)
    # Diversity with co-occurrence cosine on the training part: one similarity for every model.
    scored = metrics.ranking_metrics(combined, relevant, train, [args.k], by=[MODEL]).collect()
    value = {(r[MODEL], r[metrics.METRIC]): r[metrics.METRIC_VALUE] for r in scored}

    print()
    print(f"| model | {' | '.join(f'{m}@{args.k}' for m in SHOWN)} | seconds |")
    print("|---|" + "---:|" * (len(SHOWN) + 1))
    for name in args.models:
        cells = " | ".join(f"{value[(name, m)]:.4f}" for m in SHOWN)
        print(f"| {name} | {cells} | {seconds[name]:.1f} |")
    base = value[("popularity", "ndcg")] if "popularity" in args.models else 0.0
    if base:
        print()
        for name in args.models:
            print(f"ndcg@{args.k} {name} / popularity: {value[(name, 'ndcg')] / base:.2f}x")
    spark.stop()


if __name__ == "__main__":
    main()
