"""`shelf similarities`: top-N neighbours per item, from ALS item factors and from co-occurrence.

Reads gold.item_factors (item_idx, features, run_id) and silver.interactions; writes
gold.item_similarities with one row per (item_idx, source, rank): item_idx, neighbour_idx, score,
rank (1 = most similar), source ("als", "cooccurrence" or "blend"), run_id.

- als: cosine of the item factors. The factor matrix is the model (items x rank floats, not
  growing with users), so the driver collects it once, normalises it and ships the numpy
  array; item blocks are scored inside `mapInPandas` with the blocked GEMM kernel `udfs.topk`.
- cooccurrence: users in common, as cosine or Jaccard, for pairs shared by at least `min_support`
  users. There is no item x item cross join: pairs come from a self-join on user restricted to each
  user's `max_items_per_user` most recent (then heaviest) items, so work is bounded by users x M^2.
- `similarities.method` picks one source, "both" (rows of each), or "blend" (w * als + (1 - w) *
  cooccurrence over the union of both sources' pairs, a missing side counting 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StringType, StructField, StructType

from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import SimilarityConfig
from pipelines.core.factors import factors_of_run, item_factor_matrix
from pipelines.core.neighbours import rank_neighbours, to_cooccurrence_neighbours
from pipelines.core.runs import RunContext, step_log
from pipelines.core.schemas import ITEM_IDX, NEIGHBOUR_IDX, RANK, RUN_ID, SCORE
from pipelines.core.session import parallelism
from udfs.topk import normalise_rows, to_long, top_n_dot

STEP = "similarities"
SOURCE = "source"
ALS = "als"
COOCCURRENCE = "cooccurrence"
BLEND = "blend"
SLICE = "slice"

ITEM_SIMILARITIES_SCHEMA = StructType(
    [
        StructField(ITEM_IDX, IntegerType(), False),
        StructField(NEIGHBOUR_IDX, IntegerType(), False),
        StructField(SCORE, DoubleType(), False),
        StructField(RANK, IntegerType(), False),
        StructField(SOURCE, StringType(), False),
        StructField(RUN_ID, StringType(), False),
    ]
)
_NEIGHBOURS_SCHEMA = StructType(ITEM_SIMILARITIES_SCHEMA.fields[:4])


def neighbours_batches(
    batches: Iterable[pd.DataFrame],
    catalogue: tuple[np.ndarray, np.ndarray],
    slice_rows: int,
    top_n: int,
    block_rows: int,
    block_items: int,
) -> Iterator[pd.DataFrame]:
    """pandas adapter: slice numbers -> top-N cosine neighbours of the items in those slices.

    Slice s is rows [s * slice_rows, (s + 1) * slice_rows) of the catalogue (ids, unit factors);
    output dtypes match _NEIGHBOURS_SCHEMA (int32, int32, float64, int32).
    """
    ids, unit = catalogue
    for batch in batches:
        for s in batch[SLICE].to_numpy(dtype=np.int64):
            lo, hi = int(s) * slice_rows, min((int(s) + 1) * slice_rows, len(ids))
            query_ids = ids[lo:hi]
            result = top_n_dot(
                unit[lo:hi],
                unit,
                top_n,
                ids,
                query_ids=query_ids,
                exclude_self=True,
                block_rows=block_rows,
                block_items=block_items,
            )
            keys, neighbours, scores, ranks = to_long(query_ids, result)
            yield pd.DataFrame(
                {
                    ITEM_IDX: keys.astype(np.int32),
                    NEIGHBOUR_IDX: neighbours.astype(np.int32),
                    SCORE: scores.astype(np.float64),
                    RANK: ranks.astype(np.int32),
                }
            )


def to_als_neighbours(spark: SparkSession, item_factors: DataFrame, config: SimilarityConfig) -> DataFrame:
    """Top-N cosine neighbours per item of the factor table: item_idx, neighbour_idx, score, rank.

    The queries are the matrix's own rows, cut into contiguous slices (one Spark row per
    slice, a few slices per core), so no shuffle happens before the GEMMs.
    """
    ids, matrix = item_factor_matrix(item_factors)
    catalogue = (ids, normalise_rows(matrix))  # in the mapInPandas closure: no SparkContext broadcast
    cores = parallelism(spark)
    slices = max(1, min(-(-len(ids) // config.block_rows), 4 * cores))
    slice_rows = -(-len(ids) // slices)
    slices = -(-len(ids) // slice_rows)
    top_n, block_rows, block_items = config.top_n, config.block_rows, config.block_items
    return (
        spark.range(0, slices, numPartitions=slices)
        .select(F.col("id").alias(SLICE))
        .mapInPandas(
            lambda it: neighbours_batches(it, catalogue, slice_rows, top_n, block_rows, block_items),
            _NEIGHBOURS_SCHEMA,
        )
    )


def to_blend(als: DataFrame, cooc: DataFrame, config: SimilarityConfig) -> DataFrame:
    """w * als + (1 - w) * cooccurrence over the union of both sources' pairs, re-ranked."""
    keys = [ITEM_IDX, NEIGHBOUR_IDX]
    w = config.blend_als_weight
    joined = als.select(*keys, F.col(SCORE).alias("_als")).join(
        cooc.select(*keys, F.col(SCORE).alias("_cooc")), on=keys, how="full_outer"
    )
    blended = joined.withColumn(
        SCORE,
        F.lit(w) * F.coalesce(F.col("_als"), F.lit(0.0)) + F.lit(1.0 - w) * F.coalesce(F.col("_cooc"), F.lit(0.0)),
    )
    return rank_neighbours(blended, config.top_n)


def to_item_similarities(
    spark: SparkSession,
    item_factors: DataFrame,
    interactions: DataFrame,
    config: SimilarityConfig,
    run_id: str,
) -> DataFrame:
    """The gold.item_similarities rows of one run for `config.method`."""
    parts: list[tuple[str, DataFrame]] = []
    als = to_als_neighbours(spark, item_factors, config) if config.method != COOCCURRENCE else None
    cooc = to_cooccurrence_neighbours(interactions, config) if config.method != ALS else None
    if config.method == "blend":
        assert als is not None and cooc is not None
        parts.append((BLEND, to_blend(als, cooc, config)))
    else:
        if als is not None:
            parts.append((ALS, als))
        if cooc is not None:
            parts.append((COOCCURRENCE, cooc))
    out: DataFrame | None = None
    for source, df in parts:
        tagged = df.withColumn(SOURCE, F.lit(source)).withColumn(RUN_ID, F.lit(run_id))
        out = tagged if out is None else out.unionByName(tagged)
    assert out is not None
    return out.select(*[F.col(f.name).cast(f.dataType) for f in ITEM_SIMILARITIES_SCHEMA.fields])


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Read item factors and interactions, compute neighbours, write gold.item_similarities."""
    with step_log(STEP, ctx) as counts:
        item_factors = factors_of_run(tables.read(spark, config, "gold", "item_factors"), ctx.run_id)
        interactions = tables.read(spark, config, "silver", "interactions")
        result = to_item_similarities(spark, item_factors, interactions, config.similarities, ctx.run_id)
        tables.write(
            result,
            config,
            "gold",
            "item_similarities",
            ctx.run_id,
            mode="run",
            comment="top-N neighbours per item and source",
        )
        written = tables.read(spark, config, "gold", "item_similarities").filter(F.col(RUN_ID) == ctx.run_id)
        for row in written.groupBy(SOURCE).count().collect():  # one row per source
            counts[f"rows_{row[SOURCE]}"] = row["count"]
