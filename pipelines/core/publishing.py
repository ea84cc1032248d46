"""Publishing gold.recommendations: its contract and the step from kernel rows to it, shared by `shelf rerank`
and `shelf stream`.

Reads gold.item_similarities (`read_cooccurrence`: a run's co-occurrence neighbour lists, the model of the
co-occurrence features). `to_recommendations` maps the kernel's dense ids back to the source's string ids;
its output grain is gold.recommendations': one row per (run_id, user_id, rank), with RECOMMENDATIONS_SCHEMA's
columns and column comments. Writing is the caller's (a `replaceWhere` per run, or the stream's MERGE).
"""

from __future__ import annotations

import logging
from datetime import datetime

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, IntegerType, StringType, StructField, StructType, TimestampType

from pipelines.core import tables
from pipelines.core.columns import COOCCURRENCE, SIM_SOURCE
from pipelines.core.config import ShelfConfig
from pipelines.core.factors import factors_of_run
from pipelines.core.kernel_frames import ItemIds
from pipelines.core.quality import ts_lit
from pipelines.core.schemas import (
    AS_OF,
    ITEM_ID,
    ITEM_IDX,
    NEIGHBOUR_IDX,
    RANK,
    REASONS,
    RUN_ID,
    SCORE,
    USER_ID,
    USER_IDX,
)

log = logging.getLogger("shelf.rerank")

STEP = "rerank"

RECOMMENDATIONS_SCHEMA = StructType(
    [
        StructField(USER_ID, StringType(), False),
        StructField(ITEM_ID, StringType(), False),
        StructField(RANK, IntegerType(), False),
        StructField(SCORE, DoubleType(), False),
        StructField(REASONS, ArrayType(StringType(), True), False),
        StructField(RUN_ID, StringType(), False),
        StructField(AS_OF, TimestampType(), False),
    ]
)
COLUMN_COMMENTS = {
    USER_ID: "the source's user id",
    ITEM_ID: "the source's item id",
    RANK: "1 = best; one row per (user, rank), at most rerank.top_k per user",
    SCORE: "re-ranked score (MMR value), non-increasing with rank; popularity share for fallback rows",
    REASONS: "why: similar_to:<item_id>, als, promo, new_arrival, trending, or popular (fallback)",
    RUN_ID: "the run that wrote the row; a rerun of the same run id replaces its rows",
    AS_OF: "the run's now: fresh events, bought window and new arrivals are relative to it",
}
TABLE_COMMENT = (
    "Top-K recommendations per user and run: rank, score and reasons; string ids of the source; "
    "rows of one run id are replaced as a whole on rerun"
)


def read_cooccurrence(spark: SparkSession, config: ShelfConfig, run_id: str) -> DataFrame | None:
    """This run's co-occurrence neighbour lists (item_idx, neighbour_idx, score), or None when
    gold.item_similarities is absent or holds none (`similarities.method: als`)."""
    if not tables.exists(spark, config, "gold", "item_similarities"):
        log.info("[%s] no gold.item_similarities: the co-occurrence features are 0", STEP)
        return None
    rows = factors_of_run(tables.read(spark, config, "gold", "item_similarities"), run_id)
    cooc = rows.filter(F.col(SIM_SOURCE) == COOCCURRENCE).select(ITEM_IDX, NEIGHBOUR_IDX, SCORE)
    if cooc.limit(1).count() == 0:
        log.info("[%s] gold.item_similarities has no %s rows: the co-occurrence features are 0", STEP, COOCCURRENCE)
        return None
    return cooc


_SIMILAR_PREFIX = "similar_to:"
_SIMILAR_IDX, _SIMILAR_ID = "_similar_idx", "_similar_id"


def _similar_idx(reasons: Column) -> Column:
    """The dense item id inside a `similar_to:<item_idx>` reason (null when there is none)."""
    found = F.filter(reasons, lambda r: r.startswith(_SIMILAR_PREFIX))
    return F.substring_index(F.try_element_at(found, F.lit(1)), ":", -1).cast("int")


def to_recommendations_pandas(ranked: pd.DataFrame, user_ids: pd.Series, items: ItemIds) -> pd.DataFrame:
    """to_recommendations on a pandas batch of kernel rows, in a Python worker: user_id (from `user_ids`, indexed
    by user_idx), item_id, rank, score, reasons; the caller adds run_id and as_of.

    `ranked` comes from kernel_frames.rerank_frame(..., name_items=items.of), so its similar_to reasons already name
    the source's item ids (to_recommendations rewrites the dense ids in Spark instead)."""
    return pd.DataFrame(
        {
            USER_ID: user_ids.reindex(ranked[USER_IDX].to_numpy()).to_numpy(dtype=object),
            ITEM_ID: items.of(ranked[ITEM_IDX].to_numpy(dtype=np.int64)),
            RANK: ranked[RANK].to_numpy(),
            SCORE: ranked[SCORE].to_numpy(),
            REASONS: ranked[REASONS].to_numpy(dtype=object),
        }
    )


def to_recommendations(
    ranked: DataFrame, user_index: DataFrame, item_index: DataFrame, run_id: str, as_of: datetime
) -> DataFrame:
    """Dense ids -> the source's string ids; the gold.recommendations contract with column comments."""
    joined = (
        ranked.join(user_index.select(USER_IDX, USER_ID), on=USER_IDX, how="inner")
        .join(item_index.select(ITEM_IDX, ITEM_ID), on=ITEM_IDX, how="inner")
        .withColumn(_SIMILAR_IDX, _similar_idx(F.col(REASONS)))
        .join(
            item_index.select(F.col(ITEM_IDX).alias(_SIMILAR_IDX), F.col(ITEM_ID).alias(_SIMILAR_ID)),
            on=_SIMILAR_IDX,
            how="left",
        )
    )
    # The kernel names the recent item by its dense id; the contract speaks the source's item ids.
    reasons = F.transform(
        F.col(REASONS),
        lambda r: F.when(r.startswith(_SIMILAR_PREFIX), F.concat(F.lit(_SIMILAR_PREFIX), F.col(_SIMILAR_ID))).otherwise(
            r
        ),
    )
    values = {
        **{c: F.col(c) for c in (USER_ID, ITEM_ID, RANK, SCORE)},
        REASONS: reasons,
        RUN_ID: F.lit(run_id),
        AS_OF: ts_lit(as_of),
    }
    return joined.select(
        *[
            values[f.name].cast(f.dataType).alias(f.name, metadata={"comment": COLUMN_COMMENTS[f.name]})
            for f in RECOMMENDATIONS_SCHEMA.fields
        ]
    )
