"""MLlib ALS helpers shared by the train and evaluate steps (and the benchmarks).

Reads nothing and writes nothing itself: it turns silver.interactions rows (one row per event) into
(user, item) pairs, fits implicit ALS on them with a deterministic cached input, and scores top-k
unseen items per user (one row per (user, rank)).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import metrics, uris
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import TrainConfig
from pipelines.core.errors import InputDataError
from pipelines.core.factors import top_k_by_dot
from pipelines.core.schemas import AS_OF, DECAY, EVENT_TS, FEATURES, ITEM_IDX, SCORE, USER_IDX, WEIGHT
from pipelines.core.session import parallelism

RATING = "rating"
STRENGTH = "strength"
MAX_BLOCKS = 4
SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class AlsParams:
    """The ALS hyper-parameters tuning searches over."""

    rank: int
    reg_param: float
    alpha: float
    confidence: str
    half_life_days: float | None = None  # the time decay of the confidences ALS sees (None: no decay)

    @classmethod
    def from_config(cls, train: TrainConfig, half_life_days: float | None) -> AlsParams:
        """The configured parameters; `half_life_days`: clean.half_life_days, the decay silver.interactions holds."""
        return cls(train.rank, train.reg_param, train.alpha, train.confidence, half_life_days)


def time_decay(as_of: Column, half_life_days: float | None) -> Column:
    """2^(-age_days / half_life_days) of the row's event_ts seen from `as_of`; events after as_of (within the
    future tolerance) count as age 0; None: 1.0 (no decay)."""
    if half_life_days is None:
        return F.lit(1.0).cast("double")
    age_days = (F.unix_timestamp(as_of) - F.unix_timestamp(F.col(EVENT_TS))) / SECONDS_PER_DAY
    return F.pow(F.lit(2.0), -F.greatest(age_days, F.lit(0.0)) / half_life_days)


def with_half_life(interactions: DataFrame, half_life_days: float | None) -> DataFrame:
    """silver.interactions rows with their decay recomputed for another half-life (from each row's as_of)."""
    return interactions.withColumn(DECAY, time_decay(F.col(AS_OF), half_life_days))


def to_pairs(interactions: DataFrame) -> DataFrame:
    """One row per (user, item): the summed strength (weight * decay) and the latest event time."""
    return (
        interactions.groupBy(USER_IDX, ITEM_IDX)
        .agg(
            F.sum(F.col(WEIGHT) * F.col(DECAY)).alias(STRENGTH),
            F.max(EVENT_TS).alias(EVENT_TS),
        )
        .filter(F.col(STRENGTH) > 0)
        .select(USER_IDX, ITEM_IDX, STRENGTH, EVENT_TS)
    )


def to_ratings(pairs: DataFrame, confidence: str) -> DataFrame:
    """(user_idx, item_idx, rating float): the ALS confidence from a pair's strength."""
    strength = F.col(STRENGTH)
    rating = F.log1p(strength) if confidence == "log1p" else strength
    return pairs.select(
        F.col(USER_IDX).cast("int").alias(USER_IDX),
        F.col(ITEM_IDX).cast("int").alias(ITEM_IDX),
        rating.cast("float").alias(RATING),
    )


def num_blocks(spark: SparkSession, train: TrainConfig) -> int:
    """ALS user/item blocks: the configured number, else the cluster's parallelism capped at 4.

    On small clusters few blocks train several times faster than MLlib's default of 10.
    """
    return train.num_blocks or max(1, min(MAX_BLOCKS, parallelism(spark)))


def deterministic_input(ratings: DataFrame, partitions: int) -> DataFrame:
    """Ratings in a fixed partitioning and order, so a seeded ALS gives the same factors every run."""
    return ratings.repartition(partitions, USER_IDX).sortWithinPartitions(USER_IDX, ITEM_IDX)


def build_als(params: AlsParams, train: TrainConfig, blocks: int, implicit: bool = True) -> ALS:
    """An unfitted MLlib ALS with shelf's settings (`implicit=False` gives explicit-rating ALS)."""
    return ALS(
        userCol=USER_IDX,
        itemCol=ITEM_IDX,
        ratingCol=RATING,
        implicitPrefs=implicit,
        rank=params.rank,
        regParam=params.reg_param,
        alpha=params.alpha,
        maxIter=train.max_iter,
        nonnegative=train.nonnegative,
        seed=train.seed,
        checkpointInterval=train.checkpoint_interval,
        numUserBlocks=blocks,
        numItemBlocks=blocks,
        coldStartStrategy="drop",
    )


def fit_als(spark: SparkSession, pairs: DataFrame, params: AlsParams, train: TrainConfig) -> ALSModel:
    """Fit implicit ALS on (user, item, strength) pairs with a deterministic cached input.

    Raises:
        InputDataError: there is nothing to train on.
    """
    blocks = num_blocks(spark, train)
    ratings = deterministic_input(to_ratings(pairs, params.confidence), blocks).cache()
    try:
        if ratings.limit(1).count() == 0:
            raise InputDataError("No interactions to train on; check silver.interactions (run 'shelf clean' first).")
        return build_als(params, train, blocks).fit(ratings)
    finally:
        ratings.unpersist()


def als_recommend(model: ALSModel, users: DataFrame, seen: DataFrame, k: int) -> DataFrame:
    """Top-k unseen items for `users` (user_idx), one row per (user, rank) with the ALS score.

    Scored by shelf's blocked kernel (`factors.top_k_by_dot`, the one `shelf candidates` uses), seen items
    skipped inside it: MLlib's recommendForUserSubset would have to score k + the most items any user has seen.
    """
    targets = users.select(USER_IDX).distinct()
    own = seen.select(USER_IDX, ITEM_IDX).distinct().join(targets, on=USER_IDX, how="inner")
    user_factors = model.userFactors.select(F.col("id").alias(USER_IDX), FEATURES).join(targets, USER_IDX, "inner")
    item_factors = model.itemFactors.select(F.col("id").alias(ITEM_IDX), FEATURES)
    return metrics.top_k(top_k_by_dot(user_factors, item_factors, own, k, SCORE), k)


def model_path(config: ShelfConfig, run_id: str) -> str:
    """Where the train step saves a run's MLlib model: <storage.root>/<storage.namespace>models/<run_id>/als."""
    return uris.join(config.storage.root, f"{config.storage.namespace}models", run_id, "als")


def save_model(model: ALSModel, config: ShelfConfig, run_id: str) -> str:
    """Save a run's model (MLlib's own format; tables.py holds Delta I/O only) and return its path."""
    path = model_path(config, run_id)
    model.write().overwrite().save(path)
    return path


def load_model(config: ShelfConfig, run_id: str) -> ALSModel:
    return ALSModel.load(model_path(config, run_id))
