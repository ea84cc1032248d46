"""Helpers shared by the steps that read ALS factor tables (similarities, candidates, evaluate, tuning).

Reads gold.*_factors frames (id, features array<float>, run_id) handed in by the caller; writes nothing.
`top_k_by_dot` is shelf's one ALS scorer: the item matrix (items x rank, never users) rides in the
`mapInPandas` function's closure (Spark ships a large closure as a broadcast itself), so it needs no
SparkContext and runs over Spark Connect.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.core.errors import InputDataError
from pipelines.core.schemas import FEATURES, ITEM_IDX, RUN_ID, USER_IDX
from udfs.topk import DEFAULT_BLOCK_ITEMS, DEFAULT_BLOCK_ROWS, csr_from_lists, to_long, top_n_dot

DOT_SCORE = "_dot"
_EXCLUDED = "_excluded"


def factors_of_run(factors: DataFrame, run_id: str) -> DataFrame:
    """The factor rows of `run_id` when the table holds several runs, else the table as it is.

    Raises:
        InputDataError: the table holds several runs and none is `run_id`.
    """
    runs = sorted(r[0] for r in factors.select(RUN_ID).distinct().collect())  # one row per run
    if len(runs) <= 1:
        return factors
    if run_id not in runs:
        raise InputDataError(
            f"The factor table holds runs {runs} but not {run_id}; pass --run-id of the train run to use."
        )
    return factors.filter(F.col(RUN_ID) == run_id)


def item_factor_matrix(item_factors: DataFrame) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Collect item factors to (ids (n,) int64 ascending, matrix (n, d) float32) on the driver (a closure for mapInPandas).

    Only for item factors: the catalogue's model, items x rank floats, never anything that grows with users.

    Raises:
        InputDataError: the table is empty.
    """
    pdf = pd.DataFrame(item_factors.select(ITEM_IDX, FEATURES).toPandas())  # no orderBy: a sort job for nothing
    if pdf.empty:
        raise InputDataError("gold.item_factors is empty; run 'shelf train' on non-empty interactions first.")
    ids = pdf[ITEM_IDX].to_numpy(dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    matrix = np.stack([np.asarray(v, dtype=np.float32) for v in pdf[FEATURES]])
    return ids[order], matrix[order]


def dot_batches(
    batches: Iterable[pd.DataFrame],
    catalogue: tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]],
    k: int,
    score: str,
    block_rows: int,
    block_items: int,
) -> Iterator[pd.DataFrame]:
    """pandas adapter: users' (features, excluded items) -> their top-k other items by dot product."""
    ids, matrix = catalogue
    for batch in batches:
        if batch.empty:
            continue
        users = batch[USER_IDX].to_numpy(dtype=np.int64)
        queries = np.stack([np.asarray(v, dtype=np.float32) for v in batch[FEATURES]])
        indptr, indices = csr_from_lists(list(batch[_EXCLUDED]))  # None (nothing excluded) is an empty row
        result = top_n_dot(
            queries,
            matrix,
            k,
            ids,
            exclude_indptr=indptr,
            exclude_indices=indices,
            block_rows=block_rows,
            block_items=block_items,
        )
        keys, items, scores, _ = to_long(users, result)
        yield pd.DataFrame(
            {USER_IDX: keys.astype(np.int32), ITEM_IDX: items.astype(np.int32), score: scores.astype(np.float64)}
        )


def top_k_by_dot(
    user_factors: DataFrame,
    item_factors: DataFrame,
    excluded: DataFrame,
    k: int,
    score: str = DOT_SCORE,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_items: int = DEFAULT_BLOCK_ITEMS,
) -> DataFrame:
    """Top-k items per user of `user_factors` (user_idx, features) by dot product with `item_factors`
    (item_idx, features), skipping each user's `excluded` (user_idx, item_idx) pairs: user_idx, item_idx, score.

    Users are scored in Spark, an Arrow batch at a time; only the item matrix is collected.
    """
    catalogue = item_factor_matrix(item_factors)
    lists = excluded.groupBy(USER_IDX).agg(F.collect_list(ITEM_IDX).alias(_EXCLUDED))
    users = user_factors.select(USER_IDX, FEATURES).join(lists, on=USER_IDX, how="left")
    schema = f"{USER_IDX} int, {ITEM_IDX} int, {score} double"
    return users.mapInPandas(lambda it: dot_batches(it, catalogue, k, score, block_rows, block_items), schema)
