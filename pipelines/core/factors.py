"""Helpers shared by the steps that read ALS factor tables (similarities, candidates)."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.core.errors import InputDataError
from pipelines.core.schemas import RUN_ID


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
