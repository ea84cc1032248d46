"""shelf evaluate: offline ranking metrics of the published lists, the baselines and ALS on a held-out split.

The model that matters is `published`: `pipelines.core.holdout` writes the training part of silver.interactions
under the holdout namespace, the publishing steps (train, similarities, candidates, rerank) run unchanged on it
(`pipelines.runner` does that before this step), and this step scores the lists they wrote to
holdout_gold.recommendations as they were written. The baselines learn from the same training part; `als` is the
holdout's own trained model (no second fit).

Reads the holdout tables. The split, by `evaluate.protocol` (the preset's when unset):

- temporal: train on events before `as_of - holdout_days`, test on the events after
- leave_last: each user's last `leave_last_n` items are the test set
- random_user / random_item: 75/25 stratified by user or item, seeded (the MovieLens protocol)
- replay: ALS trains on events before T = as_of - replay_horizon_days - replay_fresh_days; the
  fresh window [T, T + d) feeds the re-rank (`pipelines.core.reranking`, model `als_rerank`) and
  `item_knn_fresh`; the test window is [T + d, as_of). The re-rank gets the kind of candidates
  `shelf candidates` gives it: ALS's rerank.max_candidates best unseen items plus the co-occurrence
  neighbours (`pipelines.core.neighbours`, the similarities step's recipe, over the events before T + d) of each user's
  recommend.recent_items most recent items; the same neighbour lists feed its co-occurrence features.
  Items a user touched before T + d are removed from the relevant set and from every list.

The relevant items of a user are the test items they had not owned in training (consumed:
recommend.consumed_event_types, the rule the publish path follows; a viewed item the user buys later counts), or
every test item with evaluate.relevant "any"; users absent from training (cold users) are not scored. Every
baseline skips the items the user owned, as the publish path does.

The models are in `pipelines.baselines`, the replay protocol in `pipelines.replay`, the report's content in
`pipelines.evaluation_report`.

Writes gold.metrics, one row per (run_id, model, metric, k) (replaced per run id), and the run's report
(`summary.md`, `metrics_at_k.png`, `metric_vs_k.png`) as rows of ops.reports (`pipelines.core.reports`;
`shelf report` prints or exports it).
"""

from __future__ import annotations

import logging
import time

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.baselines import METRICS_COLUMNS, cutoffs, diversity_factors, recommend, to_relevant
from pipelines.core import holdout, metrics, reports, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.runs import RunContext, step_log
from pipelines.core.schemas import MODEL, RUN_ID, USER_IDX
from pipelines.evaluation_report import report_files
from pipelines.replay import run_replay

STEP = "evaluate"
log = logging.getLogger("shelf.evaluate")


def evaluate_models(
    spark: SparkSession, train: DataFrame, test: DataFrame, config: ShelfConfig, run_id: str
) -> DataFrame:
    """gold.metrics rows: one per (model, metric, k) for every configured model."""
    ks = cutoffs(config.evaluate)
    owned = holdout.read_owned(spark, config).cache() if config.relevant == "unseen" else None
    relevant = to_relevant(train, test, owned).cache()
    users = relevant.select(USER_IDX).distinct().cache()
    if users.limit(1).count() == 0:
        raise InputDataError(
            "The test split has no user with an unseen item who also appears in training; widen "
            "evaluate.holdout_days or evaluate.test_ratio, or check silver.interactions."
        )
    lists = []
    for name in config.evaluate.models:
        # Each model's lists are materialised once; all models are then scored in one metrics pass.
        excluded = owned if owned is not None else train.limit(0)
        recs = recommend(spark, name, train, users, config, max(ks), run_id, excluded)
        started = time.perf_counter()
        recs = recs.withColumn(MODEL, F.lit(name)).cache()
        rows = recs.count()
        log.info("[%s] %s: %d list rows in %.1fs", STEP, name, rows, time.perf_counter() - started)
        lists.append(recs)
    combined = lists[0]
    for recs in lists[1:]:
        combined = combined.unionByName(recs)
    factors = diversity_factors(spark, holdout.holdout_config(config), run_id)
    named = spark.createDataFrame([(m,) for m in config.evaluate.models], f"{MODEL} string")
    scored = metrics.ranking_metrics(combined, relevant, train, ks, by=[MODEL], item_factors=factors, groups=named)
    # models x metrics x ks rows: small, brought back so the caches can be released.
    started = time.perf_counter()
    table = spark.createDataFrame(scored.collect(), scored.schema)
    log.info("[%s] metrics of %d models in %.1fs", STEP, len(lists), time.perf_counter() - started)
    for recs in lists:
        recs.unpersist()
    relevant.unpersist()
    users.unpersist()
    if owned is not None:
        owned.unpersist()
    return table.withColumn(RUN_ID, F.lit(run_id)).select(*METRICS_COLUMNS)


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Split, score every configured model, write gold.metrics and the report."""
    with step_log(STEP, ctx) as counts:
        interactions = tables.read(spark, config, "silver", "interactions")
        if config.evaluate.protocol == "replay":  # its own windows, models and report notes
            run_replay(spark, interactions, config, ctx, counts)
            return
        train = holdout.read_train(spark, config).cache()
        test = holdout.read_test(spark, config, ctx.run_id).cache()
        counts["train_pairs"] = train.count()
        counts["test_pairs"] = test.count()
        table = evaluate_models(spark, train, test, config, ctx.run_id)
        tables.write(table, config, "gold", "metrics", ctx.run_id, mode="run", comment="offline ranking metrics")
        rows = [r.asDict() for r in table.collect()]  # models x metrics x ks: a few hundred rows at most
        counts["metric_rows"] = len(rows)
        sizes = {"train pairs": counts["train_pairs"], "test pairs": counts["test_pairs"]}
        reports.save(spark, config, ctx.run_id, report_files(rows, config, ctx, sizes))
        train.unpersist()
        test.unpersist()
