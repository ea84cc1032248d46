"""shelf train: implicit-feedback ALS on silver.interactions.

Reads silver.interactions (one row per event). Writes, for the run:

- the MLlib ALS model at `<storage.root>/models/<run_id>/als`
- gold.user_factors: one row per user (user_idx, features array<float>, run_id), a snapshot per run
- gold.item_factors: one row per item (item_idx, features array<float>, run_id), a snapshot per run
- gold.training_runs: one row per run with the parameters used, the data sizes and the seconds taken
- gold.tuning (with train.tune, unless this run id's holdout rehearsal tuned: then its parameters are fitted): one row
  per grid point tried with its validation NDCG@k
- gold.ease_neighbours (train.ease.enabled and at most train.ease.max_items items): EASE's item-item weights
  B, the top train.ease.top_n positive weights per item, one row per (item_idx, neighbour_idx) of the run

The rating ALS sees is a confidence: the per-(user, item) sum of weight * decay, raw or log1p; the decay's
half-life is clean.half_life_days unless tuning chose another from train.grid.half_life_days.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType

from pipelines.core import ease, holdout, metrics, tables
from pipelines.core.als import AlsParams, als_recommend, fit_als, num_blocks, save_model, to_pairs, with_half_life
from pipelines.core.als import load_model as load_model  # re-exported
from pipelines.core.als import model_path as model_path  # re-exported
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import TrainConfig
from pipelines.core.runs import RunContext, step_log
from pipelines.core.schemas import AS_OF, FEATURES, ITEM_IDX, RUN_ID, USER_IDX
from pipelines.core.splits import leave_last_n_split

STEP = "train"
log = logging.getLogger("shelf.train")


def to_factors(frame: DataFrame, id_col: str, run_id: str) -> DataFrame:
    """MLlib's (id, features) factors as (id_col int, features array<float>, run_id)."""
    return frame.select(
        F.col("id").cast("int").alias(id_col),
        F.col(FEATURES).cast(ArrayType(FloatType(), False)).alias(FEATURES),
        F.lit(run_id).alias(RUN_ID),
    )


def validation_ndcg(
    spark: SparkSession,
    train_pairs: DataFrame,
    holdout: DataFrame,
    params: AlsParams,
    train: TrainConfig,
    k: int,
) -> float:
    """Mean NDCG@k of ALS with `params` on the held-out pairs of users it trained on."""
    model = fit_als(spark, train_pairs, params, train)
    relevant = metrics.remove_seen(holdout, train_pairs).join(
        train_pairs.select(USER_IDX).distinct(), on=USER_IDX, how="inner"
    )
    recs = als_recommend(model, relevant.select(USER_IDX), train_pairs, k)
    row = metrics.per_user_metrics(recs, relevant, [k]).agg(F.avg("ndcg")).first()
    return float(row[0] or 0.0) if row is not None else 0.0


def half_lives(cleaned: float | None, grid: list[float | None]) -> list[float | None]:
    """The half-lives tuning tries: clean.half_life_days (what silver.interactions holds) first, then the grid's."""
    return [cleaned, *[h for h in dict.fromkeys(grid) if h != cleaned]]


def to_ratings_input(interactions: DataFrame, half_life_days: float | None, cleaned: float | None) -> DataFrame:
    """ALS's pairs from silver.interactions with confidences decayed at `half_life_days` (the stored decay when it
    is clean's)."""
    return to_pairs(interactions if half_life_days == cleaned else with_half_life(interactions, half_life_days))


def tune(
    spark: SparkSession, interactions: DataFrame, config: ShelfConfig, ctx: RunContext
) -> tuple[DataFrame, AlsParams]:
    """Grid search over rank/reg_param/alpha/confidence/half-life scored by NDCG@k on a per-user leave-last-N split
    carved from the training data only, over the first train.tune_points points of the grid. Returns one row per
    point tried and the best parameters (ties: the earlier point; the half-life varies fastest, so the second
    point is the first one with the other decay)."""
    train, cleaned = config.train, config.clean.half_life_days
    grid = [
        AlsParams(rank=r, reg_param=reg, alpha=a, confidence=c, half_life_days=h)
        for r, reg, a, c, h in itertools.product(
            train.grid.rank,
            train.grid.reg_param,
            train.grid.alpha,
            train.grid.confidence,
            half_lives(cleaned, train.grid.half_life_days),
        )
    ]
    splits: dict[float | None, tuple[DataFrame, DataFrame]] = {}  # per half-life: cached train and holdout pairs
    results: list[tuple[AlsParams, float, float]] = []
    if train.tune_points < len(grid):
        log.info("[%s] tuning tries %d of the grid's %d points (train.tune_points)", STEP, train.tune_points, len(grid))
    for params in grid[: train.tune_points]:
        started = time.perf_counter()
        if params.half_life_days not in splits:
            pairs = to_ratings_input(interactions, params.half_life_days, cleaned)
            part, held = leave_last_n_split(pairs, n=train.validation_last_n)
            splits[params.half_life_days] = (part.cache(), held.cache())
        train_pairs, holdout = splits[params.half_life_days]
        score = validation_ndcg(spark, train_pairs, holdout, params, train, train.tune_k)
        results.append((params, score, round(time.perf_counter() - started, 3)))
        log.info("[%s] tune %s: validation NDCG@%d %.4f (%.1f s)", STEP, params, train.tune_k, score, results[-1][2])
    for frame in (f for pair in splits.values() for f in pair):
        frame.unpersist()
    best = max(results, key=lambda row: row[1])[0]
    log.info("[%s] tuning chose %s", STEP, best)
    rows = [(ctx.run_id, *asdict(p).values(), train.tune_k, score, seconds, p == best) for p, score, seconds in results]
    table = spark.createDataFrame(
        rows,
        f"{RUN_ID} string, rank int, reg_param double, alpha double, confidence string, half_life_days double, "
        "k int, ndcg double, seconds double, best boolean",
    )
    return table, best


def fit_ease(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> int:
    """Fit EASE and write the run's gold.ease_neighbours; returns the items it covers (0: skipped or disabled).

    Above train.ease.max_items the step logs that it skips EASE and the run is ALS-only, as before EASE existed;
    a rerun of the same run id then also removes the EASE rows an earlier attempt wrote.
    """
    settings = config.train.ease
    model = None
    if settings.enabled:
        x = ease.to_ease_input(tables.read(spark, config, "silver", "interactions"), settings.values)
        model = ease.fit(x, settings.l2, settings.max_items, settings.top_n, settings.precision)
        if model is None:
            log.info(
                "[%s] EASE skipped: the catalogue has more than train.ease.max_items=%d items", STEP, settings.max_items
            )
    if model is not None:
        frame = ease.to_neighbour_frame(spark, model, ctx.run_id)
        tables.write(frame, config, "gold", ease.TABLE, ctx.run_id, mode="run", comment=None)
        return int(model.ids.size)
    if tables.exists(spark, config, "gold", ease.TABLE):
        tables.delete_where(spark, config, "gold", ease.TABLE, f"{RUN_ID} = {tables.sql_string(ctx.run_id)}")
    return 0


def rehearsed_params(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> AlsParams | None:
    """The ALS parameters this run id's holdout rehearsal tuned (its row of the holdout's gold.training_runs), or
    None: tuning is off, this train is the rehearsal, or no rehearsal of the run id tuned."""
    if not config.train.tune or config.storage.namespace == holdout.NAMESPACE:
        return None
    held = holdout.holdout_config(config)
    if not tables.exists(spark, held, "gold", "training_runs"):
        return None
    rows = (
        tables.read(spark, held, "gold", "training_runs")
        .filter((F.col(RUN_ID) == ctx.run_id) & F.col("tuned"))
        .select("rank", "reg_param", "alpha", "confidence", "half_life_days")
        .collect()  # at most one row: mode="run" keeps one per run id
    )
    if not rows:
        return None
    r = rows[0]
    return AlsParams(
        int(r["rank"]), float(r["reg_param"]), float(r["alpha"]), str(r["confidence"]), r["half_life_days"]
    )


def choose_params(
    spark: SparkSession, interactions: DataFrame, config: ShelfConfig, ctx: RunContext, counts: dict[str, float]
) -> AlsParams:
    """The rehearsal's tuned parameters when it ran for this run id, else tuning's choice (train.tune, written to
    gold.tuning), else the configured parameters."""
    rehearsed = rehearsed_params(spark, config, ctx)
    if rehearsed is not None:
        log.info("[%s] fitting with what this run's holdout rehearsal tuned and evaluate measured: %s", STEP, rehearsed)
        counts["rehearsed_params"] = 1
        return rehearsed
    if not config.train.tune:
        return AlsParams.from_config(config.train, config.clean.half_life_days)
    tuning, params = tune(spark, interactions, config, ctx)
    tables.write(tuning, config, "gold", "tuning", ctx.run_id, mode="run")
    counts["grid_points"] = tuning.count()
    return params


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Train ALS (after tuning when train.tune) and write the model, factors and training record."""
    train = config.train
    with step_log(STEP, ctx) as counts:
        started = time.perf_counter()
        interactions = tables.read(spark, config, "silver", "interactions")
        params = choose_params(spark, interactions, config, ctx, counts)
        pairs = to_ratings_input(interactions, params.half_life_days, config.clean.half_life_days).cache()
        model = fit_als(spark, pairs, params, train)
        counts["ease_items"] = fit_ease(spark, config, ctx)
        save_model(model, config, ctx.run_id)
        user_factors = to_factors(model.userFactors, USER_IDX, ctx.run_id)
        item_factors = to_factors(model.itemFactors, ITEM_IDX, ctx.run_id)
        tables.write(user_factors, config, "gold", "user_factors", ctx.run_id, comment="ALS user factors")
        tables.write(item_factors, config, "gold", "item_factors", ctx.run_id, comment="ALS item factors")
        counts["ratings"] = pairs.count()
        counts["users"] = model.userFactors.count()
        counts["items"] = model.itemFactors.count()
        pairs.unpersist()
        seconds = round(time.perf_counter() - started, 3)
        row = (
            ctx.run_id,
            ctx.as_of,
            *asdict(params).values(),
            train.max_iter,
            train.nonnegative,
            train.seed,
            num_blocks(spark, train),
            train.tune,
            int(counts["users"]),
            int(counts["items"]),
            int(counts["ratings"]),
            seconds,
        )
        training = spark.createDataFrame(
            [row],
            f"{RUN_ID} string, {AS_OF} timestamp, rank int, reg_param double, alpha double, "
            "confidence string, half_life_days double, max_iter int, nonnegative boolean, seed long, num_blocks int, tuned boolean, "
            "users long, items long, ratings long, seconds double",
        )
        tables.write(training, config, "gold", "training_runs", ctx.run_id, mode="run")
