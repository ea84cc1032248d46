"""shelf evaluate: offline ranking metrics of the baselines and ALS on a held-out split.

Reads silver.interactions. Splits it by `evaluate.protocol`:

- temporal: train on events before `as_of - holdout_days`, test on the events after
- leave_last: each user's last `leave_last_n` items are the test set
- random_user / random_item: 75/25 stratified by user or item, seeded (the MovieLens protocol)

The relevant items of a user are the test items they had not interacted with in training; users
absent from training (cold users) are not scored. Every model ranks unseen items only.

Writes gold.metrics, one row per (run_id, model, metric, k) (replaced per run id), and a report
folder `<report_dir>/<run_id>/` with `summary.md`, `metrics_at_k.png` and `metric_vs_k.png`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.core import metrics, tables
from pipelines.core.cli import step_main
from pipelines.core.config import EvaluateConfig, ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.runs import RunContext, step_log
from pipelines.core.schemas import EVENT_TS, ITEM_IDX, RUN_ID, USER_IDX
from pipelines.core.splits import leave_last_n_split, random_stratified_split, temporal_split

# ALS fitting is shared with the train step; it belongs in pipelines/core/ once the lead moves it there.
from pipelines.train import AlsParams, als_recommend, fit_als, to_pairs

STEP = "evaluate"
MODEL = "model"
POPULARITY = "popularity"
RECENT_POPULARITY = "recent_popularity"
ITEM_KNN = "item_knn"
ALS_MODEL = "als"
NEIGHBOUR = "neighbour"
SIMILARITY = "similarity"
METRICS_COLUMNS = (RUN_ID, MODEL, metrics.METRIC, metrics.K, metrics.METRIC_VALUE)
# Popularity lists are drawn from this many extra items beyond k, to survive seen-item removal.
POPULAR_POOL_MARGIN = 1000


def split_pairs(
    interactions: DataFrame, evaluate: EvaluateConfig, ctx: RunContext
) -> tuple[DataFrame, DataFrame]:
    """(train, test) at the (user, item) grain (strength, latest event time) for the configured protocol."""
    if evaluate.protocol == "temporal":
        cut = ctx.as_of - timedelta(days=evaluate.holdout_days)
        before, after = temporal_split(interactions, cut)
        return to_pairs(before), to_pairs(after)
    pairs = to_pairs(interactions)
    if evaluate.protocol == "leave_last":
        return leave_last_n_split(pairs, n=evaluate.leave_last_n)
    by = "user" if evaluate.protocol == "random_user" else "item"
    return random_stratified_split(pairs, ratio=1.0 - evaluate.test_ratio, seed=evaluate.seed, by=by)


def to_relevant(train: DataFrame, test: DataFrame) -> DataFrame:
    """Test (user, item) pairs of users seen in training, minus items they already had in training."""
    warm = train.select(USER_IDX).distinct()
    return (
        metrics.remove_seen(test.select(USER_IDX, ITEM_IDX).distinct(), train)
        .join(warm, on=USER_IDX, how="inner")
        .select(USER_IDX, ITEM_IDX)
    )


def _max_seen(train: DataFrame, users: DataFrame) -> int:
    own = train.select(USER_IDX, ITEM_IDX).distinct().join(users, on=USER_IDX, how="inner")
    return int(own.groupBy(USER_IDX).count().agg(F.max("count")).first()[0] or 0)


def recommend_popular(item_scores: DataFrame, users: DataFrame, train: DataFrame, k: int) -> DataFrame:
    """The k highest-scoring items each user has not seen: (user, item, score, rank).

    Only the top `k + most items any user saw` items can make a list, so the cross join with users is
    bounded by that pool, not by the catalog.
    """
    targets = users.select(USER_IDX).distinct()
    pool = min(k + _max_seen(train, targets), k + POPULAR_POOL_MARGIN)
    top = item_scores.orderBy(F.col(metrics.SCORE).desc(), F.col(ITEM_IDX).asc()).limit(pool)
    candidates = targets.crossJoin(F.broadcast(top))
    return metrics.top_k(metrics.remove_seen(candidates, train), k)


def popularity_scores(train: DataFrame) -> DataFrame:
    """(item, score): the number of training users who interacted with the item."""
    return train.groupBy(ITEM_IDX).agg(F.countDistinct(USER_IDX).cast("double").alias(metrics.SCORE))


def recent_popularity_scores(train: DataFrame, recent_days: float) -> DataFrame:
    """Popularity over the pairs whose latest event falls in the last `recent_days` of the training data."""
    latest = train.agg(F.max(EVENT_TS).alias("_latest"))
    window_seconds = F.lit(recent_days * 86400.0)
    recent = train.crossJoin(F.broadcast(latest)).filter(
        F.unix_timestamp(EVENT_TS) >= F.unix_timestamp("_latest") - window_seconds
    )
    return popularity_scores(recent)


def recent_items(train: DataFrame, per_user: int) -> DataFrame:
    """Each user's `per_user` most recent items (ties on time: higher item id first)."""
    latest_first = Window.partitionBy(USER_IDX).orderBy(F.col(EVENT_TS).desc(), F.col(ITEM_IDX).desc())
    return (
        train.withColumn("_pos", F.row_number().over(latest_first))
        .filter(F.col("_pos") <= per_user)
        .select(USER_IDX, ITEM_IDX)
    )


def item_neighbours(recent: DataFrame, neighbours: int) -> DataFrame:
    """Cosine co-occurrence neighbours: (item, neighbour, similarity), the top `neighbours` per item.

    The self-join runs on each user's recent items only, so a user adds at most N^2 pairs.
    """
    item_users = recent.groupBy(ITEM_IDX).agg(F.count(F.lit(1)).alias("_users"))
    left = recent.select(USER_IDX, ITEM_IDX)
    right = recent.select(USER_IDX, F.col(ITEM_IDX).alias(NEIGHBOUR))
    co = (
        left.join(right, on=USER_IDX, how="inner")
        .filter(F.col(ITEM_IDX) != F.col(NEIGHBOUR))
        .groupBy(ITEM_IDX, NEIGHBOUR)
        .agg(F.count(F.lit(1)).alias("_co"))
    )
    own = item_users.select(ITEM_IDX, F.col("_users").alias("_n_item"))
    other = item_users.select(F.col(ITEM_IDX).alias(NEIGHBOUR), F.col("_users").alias("_n_neighbour"))
    best = Window.partitionBy(ITEM_IDX).orderBy(F.col(SIMILARITY).desc(), F.col(NEIGHBOUR).asc())
    return (
        co.join(own, on=ITEM_IDX, how="inner")
        .join(other, on=NEIGHBOUR, how="inner")
        .withColumn(SIMILARITY, F.col("_co") / F.sqrt(F.col("_n_item") * F.col("_n_neighbour")))
        .withColumn("_pos", F.row_number().over(best))
        .filter(F.col("_pos") <= neighbours)
        .select(ITEM_IDX, NEIGHBOUR, SIMILARITY)
    )


def recommend_item_knn(train: DataFrame, users: DataFrame, evaluate: EvaluateConfig, k: int) -> DataFrame:
    """Item-kNN: score = summed similarity of an item to the user's recent items; unseen items only."""
    recent = recent_items(train, evaluate.knn_recent_items)
    neighbours = item_neighbours(recent, evaluate.knn_neighbours)
    scores = (
        recent.join(users.select(USER_IDX).distinct(), on=USER_IDX, how="inner")
        .join(neighbours, on=ITEM_IDX, how="inner")
        .groupBy(USER_IDX, F.col(NEIGHBOUR).alias(ITEM_IDX))
        .agg(F.sum(SIMILARITY).alias(metrics.SCORE))
    )
    return metrics.top_k(metrics.remove_seen(scores, train), k)


def recommend(
    spark: SparkSession, name: str, train: DataFrame, users: DataFrame, config: ShelfConfig, k: int
) -> DataFrame:
    """Top-k lists of one model for `users`, trained on `train` only."""
    if name == POPULARITY:
        return recommend_popular(popularity_scores(train), users, train, k)
    if name == RECENT_POPULARITY:
        return recommend_popular(
            recent_popularity_scores(train, config.evaluate.recent_days), users, train, k
        )
    if name == ITEM_KNN:
        return recommend_item_knn(train, users, config.evaluate, k)
    model = fit_als(spark, train, AlsParams.from_config(config.train), config.train)
    return als_recommend(model, users, train, k)


def cutoffs(evaluate: EvaluateConfig) -> list[int]:
    return sorted({evaluate.k, *evaluate.ks})


def evaluate_models(
    spark: SparkSession, train: DataFrame, test: DataFrame, config: ShelfConfig, run_id: str
) -> DataFrame:
    """gold.metrics rows: one per (model, metric, k) for every configured model."""
    ks = cutoffs(config.evaluate)
    relevant = to_relevant(train, test).cache()
    users = relevant.select(USER_IDX).distinct().cache()
    if users.limit(1).count() == 0:
        raise InputDataError(
            "The test split has no user with an unseen item who also appears in training; widen "
            "evaluate.holdout_days or evaluate.test_ratio, or check silver.interactions."
        )
    lists = []
    for name in config.evaluate.models:
        # Each model's lists are materialised once; all models are then scored in one metrics pass.
        recs = recommend(spark, name, train, users, config, max(ks)).withColumn(MODEL, F.lit(name)).cache()
        recs.count()
        lists.append(recs)
    combined = lists[0]
    for recs in lists[1:]:
        combined = combined.unionByName(recs)
    scored = metrics.ranking_metrics(combined, relevant, train, ks, by=[MODEL])
    # models x metrics x ks rows: small, brought back so the caches can be released.
    table = spark.createDataFrame(scored.collect(), scored.schema)
    for recs in lists:
        recs.unpersist()
    relevant.unpersist()
    users.unpersist()
    return table.withColumn(RUN_ID, F.lit(run_id)).select(*METRICS_COLUMNS)


def report_dir(config: ShelfConfig, run_id: str) -> Path:
    base = (
        Path(config.storage.report_dir)
        if config.storage.report_dir
        else Path(config.storage.root).parent / "reports"
    )
    return base / run_id


def write_report(
    rows: list[dict[str, object]], config: ShelfConfig, ctx: RunContext, sizes: dict[str, float]
) -> Path:
    """Markdown summary + PNG plots (metrics per model at k, metric vs k) from the gold.metrics rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = report_dir(config, ctx.run_id)
    folder.mkdir(parents=True, exist_ok=True)
    k = config.evaluate.k
    present = {str(r[MODEL]) for r in rows}
    models = [m for m in config.evaluate.models if m in present]
    names = [*metrics.PER_USER_METRICS, *metrics.CATALOG_METRICS]
    value = {
        (str(r[MODEL]), str(r[metrics.METRIC]), int(r[metrics.K])): float(r[metrics.METRIC_VALUE])
        for r in rows
    }  # type: ignore[arg-type]

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [value.get((model, m, k), 0.0) for m in names], width=width, label=model)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_title(f"metrics at k={k} ({config.evaluate.protocol} split, run {ctx.run_id})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "metrics_at_k.png", dpi=100)
    plt.close(fig)

    ks = cutoffs(config.evaluate)
    shown = ("precision", "recall", "ndcg", "map")
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.5))
    for ax, metric in zip(axes, shown, strict=True):
        for model in models:
            ax.plot(ks, [value.get((model, metric, kk), 0.0) for kk in ks], marker="o", label=model)
        ax.set_title(f"{metric} vs k")
        ax.set_xlabel("k")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(folder / "metric_vs_k.png", dpi=100)
    plt.close(fig)

    header = "| model | " + " | ".join(names) + " |"
    lines = [
        f"# shelf evaluation, run {ctx.run_id}",
        "",
        f"- as of: {ctx.as_of.isoformat()}",
        f"- protocol: {config.evaluate.protocol}, k = {k}, seen items removed, cold users not scored",
        *[f"- {name}: {int(v)}" for name, v in sizes.items()],
        "",
        f"## Metrics at k = {k}",
        "",
        header,
        "|" + "---|" * (len(names) + 1),
        *[
            f"| {model} | " + " | ".join(f"{value.get((model, m, k), 0.0):.4f}" for m in names) + " |"
            for model in models
        ],
        "",
        "MAP divides by min(k, relevant); MAP_rel divides by the number of relevant items.",
        "",
        "![metrics at k](metrics_at_k.png)",
        "",
        "![metric vs k](metric_vs_k.png)",
        "",
    ]
    (folder / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    return folder


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Split, score every configured model, write gold.metrics and the report."""
    with step_log(STEP, ctx) as counts:
        interactions = tables.read(spark, config, "silver", "interactions")
        train, test = split_pairs(interactions, config.evaluate, ctx)
        train = train.cache()
        test = test.cache()
        counts["train_pairs"] = train.count()
        counts["test_pairs"] = test.count()
        table = evaluate_models(spark, train, test, config, ctx.run_id)
        tables.write(
            table, config, "gold", "metrics", ctx.run_id, mode="run", comment="offline ranking metrics"
        )
        rows = [r.asDict() for r in table.collect()]  # models x metrics x ks: a few hundred rows at most
        counts["metric_rows"] = len(rows)
        write_report(
            rows, config, ctx, {"train pairs": counts["train_pairs"], "test pairs": counts["test_pairs"]}
        )
        train.unpersist()
        test.unpersist()


main = step_main(STEP)


if __name__ == "__main__":
    raise SystemExit(main())
