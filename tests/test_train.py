"""ALS training and evaluation on planted-structure data: users belong to one of four taste clusters
and interact almost only with their cluster's items, so a model that learns tastes must beat
popularity, which cannot tell the clusters apart."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines import api, baselines, clean, runner, train
from pipelines.core import als, holdout, reports, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.runs import RunContext
from pipelines.core.schemas import INTERACTIONS_SCHEMA

AS_OF = datetime(2026, 11, 1)
USERS, ITEMS, CLUSTERS, PER_USER = 80, 40, 4, 8


def planted_events(seed: int = 7) -> list[tuple]:
    """Each user views 8 of the 10 items of their cluster plus one random item, over 30 days."""
    rng = np.random.default_rng(seed)
    per_cluster = ITEMS // CLUSTERS
    rows = []
    for user in range(USERS):
        cluster = user % CLUSTERS
        own = rng.choice(per_cluster, size=PER_USER, replace=False) + cluster * per_cluster
        items = [*own.tolist(), int(rng.integers(ITEMS))]
        for item in items:
            ts = AS_OF - timedelta(days=30) + timedelta(seconds=int(rng.integers(30 * 86400)))
            rows.append((user, int(item), "view", ts, None, 1.0, 1.0, "clean-run", AS_OF))
    return rows


def _with(config: ShelfConfig, section: str, **values: object) -> ShelfConfig:
    updated = getattr(config, section).model_copy(update=values)
    return config.model_copy(update={section: updated})


@pytest.fixture
def planted(spark: SparkSession, config: ShelfConfig) -> ShelfConfig:
    events = spark.createDataFrame(planted_events(), INTERACTIONS_SCHEMA)
    tables.write(events, config, "silver", "interactions", "clean-run")
    return _with(config, "train", rank=8, max_iter=5)


@pytest.mark.steps
def test_train_writes_factors_that_the_saved_model_reproduces(spark: SparkSession, planted: ShelfConfig) -> None:
    ctx = RunContext(run_id="r1", as_of=AS_OF)
    train.run(spark, planted, ctx)

    users = tables.read(spark, planted, "gold", "user_factors")
    items = tables.read(spark, planted, "gold", "item_factors")
    assert users.schema.simpleString() == "struct<user_idx:int,features:array<float>,run_id:string>"
    assert items.schema.simpleString() == "struct<item_idx:int,features:array<float>,run_id:string>"
    stored = {r.user_idx: r.features for r in users.collect()}
    assert sorted(stored) == list(range(USERS))
    assert {len(f) for f in stored.values()} == {8}
    assert {r.run_id for r in items.select("run_id").distinct().collect()} == {"r1"}

    reloaded = train.load_model(planted, "r1")
    again = {r.id: r.features for r in reloaded.userFactors.collect()}
    assert again.keys() == stored.keys()
    for user, features in stored.items():
        assert np.allclose(features, again[user], atol=1e-6)

    # evaluate measures intra-list diversity with the factors of its own run id, and only those.
    factors = baselines.diversity_factors(spark, planted, "r1")
    assert factors is not None and factors.count() == ITEMS
    assert baselines.diversity_factors(spark, planted, "another-run") is None

    record = tables.read(spark, planted, "gold", "training_runs").collect()
    pairs = {(r[0], r[1]) for r in planted_events()}
    assert [(r.run_id, r.rank, r.users, r.items, r.ratings, r.tuned) for r in record] == [
        ("r1", 8, USERS, ITEMS, len(pairs), False)
    ]


@pytest.mark.steps
def test_als_beats_popularity_on_a_temporal_split(spark: SparkSession, planted: ShelfConfig, tmp_path: Path) -> None:
    models = ["popularity", "recent_popularity", "item_knn", "als"]  # baselines: the holdout rehearsal trains only
    config = _with(planted, "evaluate", k=5, ks=[5, 10], holdout_days=7.0, models=models)
    config = _with(config, "storage", report_dir=str(tmp_path / "reports"))
    # Each planted user views an item once: a view consumes it (as a rating does), so a model that offers it again
    # wastes a slot and a viewed item is no hit (evaluation follows the publish path's consumed rule since issue 19).
    config = _with(config, "recommend", consumed_event_types=["view"])
    ctx = RunContext(run_id="e1", as_of=AS_OF)
    runner.evaluate_published(spark, config, ctx)
    held = holdout.holdout_config(config)  # the rehearsal trained ALS on the training part, and did nothing else
    assert tables.exists(spark, held, "gold", "item_factors") and not tables.exists(spark, held, "gold", "candidates")

    rows = tables.read(spark, config, "gold", "metrics").collect()
    value = {(r.model, r.metric, r.k): r.value for r in rows}
    assert {m for m, _, _ in value} == set(models)
    assert len(value) == len(rows) == len(models) * 9 * 2  # 9 metrics at k = 5 and 10, no duplicates
    assert value[("als", "ndcg", 5)] > value[("popularity", "ndcg", 5)] + 0.2
    assert value[("als", "recall", 10)] > value[("popularity", "recall", 10)]
    assert value[("item_knn", "ndcg", 5)] > value[("popularity", "ndcg", 5)]
    assert all(0.0 <= value[(m, metric, k)] <= 1.0 for m, metric, k in value if metric != "novelty")

    stored = reports.read(spark, config, "e1")  # ops.reports, beside the tables
    assert sorted(stored) == ["metric_vs_k.png", "metrics_at_k.png", "summary.md"]
    assert all(stored[name].startswith(b"\x89PNG\r\n\x1a\n") for name in api.REPORT_PLOTS)
    assert all(f"| {m} |" in stored["summary.md"].decode() for m in models)
    folder = tmp_path / "reports" / "e1"  # storage.report_dir: the same files, also as plain files
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == stored
    assert api.report_plots(spark, config, "e1") == [stored[name] for name in api.REPORT_PLOTS]
    with pytest.raises(InputDataError, match="shelf evaluate --run-id nope"):
        reports.read(spark, config, "nope")


@pytest.mark.steps
def test_tuning_tries_its_points_in_the_rehearsal_and_the_publish_fits_what_it_chose(
    spark: SparkSession, planted: ShelfConfig
) -> None:
    update = {"rank": [8], "reg_param": [0.1], "alpha": [20.0], "half_life_days": [0.5, None, 30.0]}
    grid = planted.train.grid.model_copy(update=update)
    config = _with(planted, "train", tune=True, grid=grid, max_iter=3, tune_k=5, tune_points=2)
    config = _with(config, "clean", half_life_days=None)  # what planted silver holds (decay 1): tried first
    held = holdout.holdout_config(config)
    tables.write(tables.read(spark, config, "silver", "interactions"), held, "silver", "interactions", "clean-run")
    ctx = RunContext(run_id="t1", as_of=AS_OF)
    train.run(spark, held, ctx)  # the holdout rehearsal's train: it tunes

    tuning = tables.read(spark, held, "gold", "tuning").collect()
    assert sorted(r.half_life_days or 0.0 for r in tuning) == [0.0, 0.5]  # 2 of the 3 points, in grid order
    assert train.half_lives(None, [7.0, None, 30.0, 7.0]) == [None, 7.0, 30.0]  # silver's decay first, once each
    assert train.half_lives(30.0, [None, 30.0]) == [30.0, None]
    assert len({r.ndcg for r in tuning}) > 1, "the half-life must change what ALS learns"
    best = [r for r in tuning if r.best]
    assert len(best) == 1 and best[0].ndcg == max(r.ndcg for r in tuning)
    record = tables.read(spark, held, "gold", "training_runs").collect()
    assert [(r.alpha, r.half_life_days, r.tuned) for r in record] == [(best[0].alpha, best[0].half_life_days, True)]

    # The publishing train of the same run fits what the rehearsal chose (and evaluate measured): no second tuning.
    shifted = _with(config, "train", grid=grid.model_copy(update={"alpha": [1.0]}))  # would tune to alpha 1
    train.run(spark, shifted, ctx)
    assert not tables.exists(spark, config, "gold", "tuning")
    published = tables.read(spark, config, "gold", "training_runs").collect()
    assert [(r.rank, r.alpha, r.half_life_days, r.tuned) for r in published] == [
        (8, best[0].alpha, best[0].half_life_days, True)
    ]
    train.run(spark, shifted, RunContext(run_id="t2", as_of=AS_OF))  # no rehearsal of t2: it tunes itself
    assert {r.alpha for r in tables.read(spark, config, "gold", "tuning").collect()} == {1.0}


def test_a_half_life_in_train_decays_as_clean_does(spark: SparkSession) -> None:
    events = spark.createDataFrame(planted_events(), INTERACTIONS_SCHEMA)  # as_of column: AS_OF
    cleaned = clean.with_decay(events, AS_OF, 7.0).select("user_idx", "item_idx", "event_ts", "decay")
    tuned = als.with_half_life(events, 7.0).select("user_idx", "item_idx", "event_ts", F.col("decay").alias("again"))
    rows = cleaned.join(tuned, on=["user_idx", "item_idx", "event_ts"]).collect()
    assert len(rows) == events.count() and len({round(r.decay, 6) for r in rows}) > 10
    for r in rows:
        expected = 2.0 ** (-max((AS_OF - r.event_ts).total_seconds(), 0.0) / 86400.0 / 7.0)
        assert abs(r.decay - expected) <= 1e-12 and abs(r.again - expected) <= 1e-12
    assert {r.decay for r in als.with_half_life(events, None).select("decay").distinct().collect()} == {1.0}


def test_fit_als_is_deterministic_for_a_seed(spark: SparkSession, planted: ShelfConfig) -> None:
    pairs = als.to_pairs(tables.read(spark, planted, "silver", "interactions"))
    params = als.AlsParams.from_config(planted.train, planted.clean.half_life_days)

    def item_factors(data: object) -> dict[int, list[float]]:
        model = als.fit_als(spark, data, params, planted.train)  # type: ignore[arg-type]
        return {r.id: r.features for r in model.itemFactors.collect()}

    first = item_factors(pairs)
    again = item_factors(pairs.repartition(3))  # another input partitioning: same factors
    assert first.keys() == again.keys() and len(first) == ITEMS
    assert all(np.allclose(first[i], again[i], atol=1e-6) for i in first)


@pytest.mark.steps
def test_evaluate_reports_diversity_and_novelty_per_model(
    spark: SparkSession, planted: ShelfConfig, tmp_path: Path
) -> None:
    config = _with(planted, "evaluate", k=5, ks=[5], holdout_days=7.0, models=["popularity", "item_knn"])
    runner.evaluate_published(spark, config, RunContext(run_id="d1", as_of=AS_OF))  # no model: nothing trains

    value = {(r.model, r.metric): r.value for r in tables.read(spark, config, "gold", "metrics").collect()}
    # Popularity's lists are the same mainstream items for everyone: less novel than item-kNN's, which follow
    # each user's taste cluster. Diversity is measured by co-occurrence here (no train run for "d1").
    assert value[("item_knn", "novelty")] > value[("popularity", "novelty")]
    assert 0.0 < value[("popularity", "diversity")] <= 1.0
    assert 0.0 < value[("item_knn", "diversity")] <= 1.0
    summary = reports.read(spark, config, "d1")["summary.md"].decode()
    assert not (tmp_path / "reports").exists()  # no storage.report_dir: nothing on the driver's disk
    assert (
        "| model | precision | recall | ndcg | map | map_rel | hit_rate | coverage | novelty | diversity |" in summary
    )
