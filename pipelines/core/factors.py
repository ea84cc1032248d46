"""Helpers shared by the steps that read ALS factor tables (similarities, candidates).

Reads gold.*_factors frames (id, features array<float>, run_id) handed in by the caller; writes nothing.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.core.errors import InputDataError
from pipelines.core.schemas import ITEM_IDX, RUN_ID

FEATURES = "features"


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
    """Collect item factors to (ids (n,) int64 ascending, matrix (n, d) float32) on the driver, for broadcast.

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
