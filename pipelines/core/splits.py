"""Train/test splitters for offline evaluation and tuning.

Every splitter takes the column names as parameters (defaults: the pipeline's dense ids and event
time), returns `(train, test)` with the input's columns unchanged, and is deterministic: ties in time
break on the item id, and "random" draws are a seeded hash of (user, item), so the split does not
depend on how Spark partitioned the data.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Literal

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from pipelines.core.errors import ConfigError
from pipelines.core.schemas import EVENT_TS, ITEM_IDX, USER_IDX

Split = tuple[DataFrame, DataFrame]


def temporal_split(df: DataFrame, cut: datetime, ts_col: str = EVENT_TS) -> Split:
    """Global temporal cut: rows before `cut` train, rows at or after it test (nothing leaks back in time)."""
    before = F.col(ts_col) < F.lit(cut)
    return df.filter(before), df.filter(~before)


def leave_last_n_split(
    df: DataFrame,
    n: int = 1,
    user_col: str = USER_IDX,
    item_col: str = ITEM_IDX,
    ts_col: str = EVENT_TS,
) -> Split:
    """Per-user temporal split: each user's `n` latest rows test, the rest train.

    A user with `n` rows or fewer stays wholly in train (there would be nothing to learn them from).
    Ties in time break on the item id (higher id counts as later), so the split is reproducible.
    """
    if n < 1:
        raise ConfigError(f"leave-last-N needs n >= 1, got {n}; set evaluate.leave_last_n or train.validation_last_n.")
    latest_first = Window.partitionBy(user_col).orderBy(F.col(ts_col).desc(), F.col(item_col).desc())
    per_user = Window.partitionBy(user_col)
    ranked = df.withColumn("_pos", F.row_number().over(latest_first)).withColumn(
        "_rows", F.count(F.lit(1)).over(per_user)
    )
    is_test = (F.col("_pos") <= n) & (F.col("_rows") > n)
    return ranked.filter(~is_test).drop("_pos", "_rows"), ranked.filter(is_test).drop("_pos", "_rows")


def _seeded_draw(seed: int, user_col: str, item_col: str) -> Column:
    """A uniform-looking draw in [0, 1) per (user, item) that does not depend on partitioning."""
    hashed = F.xxhash64(F.col(user_col), F.col(item_col), F.lit(seed))
    return F.pmod(hashed, F.lit(1_000_003)) / F.lit(1_000_003.0)


def random_stratified_split(
    df: DataFrame,
    ratio: float = 0.75,
    seed: int = 42,
    by: Literal["user", "item"] = "user",
    user_col: str = USER_IDX,
    item_col: str = ITEM_IDX,
) -> Split:
    """Random split stratified by user (or item): each group keeps round(ratio * rows) rows in train.

    This is the MovieLens benchmark protocol (75/25 stratified by user). Every group with two rows or
    more keeps at least one row on each side; a group with one row stays in train.
    """
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"Split ratio must be between 0 and 1, got {ratio}; set evaluate.test_ratio to e.g. 0.25.")
    group = user_col if by == "user" else item_col
    other = item_col if by == "user" else user_col
    drawn = Window.partitionBy(group).orderBy(F.col("_draw"), F.col(other))
    ranked = (
        df.withColumn("_draw", _seeded_draw(seed, user_col, item_col))
        .withColumn("_pos", F.row_number().over(drawn))
        .withColumn("_rows", F.count(F.lit(1)).over(Window.partitionBy(group)))
        .withColumn(
            "_keep",
            F.when(F.col("_rows") == 1, F.lit(1)).otherwise(
                F.least(F.greatest(F.round(F.col("_rows") * F.lit(ratio)), F.lit(1)), F.col("_rows") - 1)
            ),
        )
    )
    in_train = F.col("_pos") <= F.col("_keep")
    helper = ["_draw", "_pos", "_rows", "_keep"]
    return ranked.filter(in_train).drop(*helper), ranked.filter(~in_train).drop(*helper)


def expected_train_rows(rows: int, ratio: float) -> int:
    """Rows a group of `rows` keeps in train under `random_stratified_split` (for tests and reports)."""
    if rows == 1:
        return 1
    return int(min(max(_round_half_up(rows * ratio), 1), rows - 1))


def _round_half_up(x: float) -> int:
    # Spark's F.round rounds half up, Python's round rounds half to even.
    return math.floor(x + 0.5)
