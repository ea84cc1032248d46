"""pipelines/similarities.py on hand-built factor and interaction tables."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest
from pyspark.sql import SparkSession

from pipelines import similarities
from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.runs import RunContext
from pipelines.core.schemas import INTERACTIONS_SCHEMA
from udfs.topk import normalise_rows, top_n_dot

AS_OF = datetime(2026, 11, 1)


def write_item_factors(
    spark: SparkSession, config: ShelfConfig, factors: np.ndarray, ids: np.ndarray, run_id: str
) -> None:
    rows = [(int(i), [float(v) for v in f], run_id) for i, f in zip(ids, factors, strict=True)]
    df = spark.createDataFrame(rows, "item_idx int, features array<float>, run_id string")
    tables.write(df, config, "gold", "item_factors", run_id)


def interactions_df(spark: SparkSession, events: list[tuple[int, int, str, int]], run_id: str = "r1"):
    """events: (user, item, type, days before AS_OF)."""
    rows = [(u, i, t, AS_OF - timedelta(days=d), None, 1.0, 1.0, run_id, AS_OF) for u, i, t, d in events]
    return spark.createDataFrame(rows, INTERACTIONS_SCHEMA)


def test_als_neighbours_equal_the_kernel(spark: SparkSession, config: ShelfConfig) -> None:
    rng = np.random.default_rng(7)
    ids = rng.permutation(np.arange(0, 120, 2))  # 60 items, sparse ids, unordered
    factors = rng.normal(size=(60, 6)).astype(np.float32)
    write_item_factors(spark, config, factors, ids, "r1")
    tables.write(interactions_df(spark, [(1, int(ids[0]), "view", 1)]), config, "silver", "interactions", "r1")
    cfg = config.model_copy(
        update={
            "similarities": config.similarities.model_copy(
                update={"method": "als", "top_n": 7, "block_rows": 8, "block_items": 16}
            )
        }
    )
    similarities.run(spark, cfg, RunContext("r1", AS_OF))

    got = tables.read(spark, cfg, "gold", "item_similarities").toPandas()
    assert set(got["source"]) == {"als"} and set(got["run_id"]) == {"r1"}
    assert str(got["item_idx"].dtype) == "int32" and str(got["score"].dtype) == "float64"
    got = got.sort_values(["item_idx", "rank"])
    unit = normalise_rows(factors)
    want = top_n_dot(unit, unit, 7, ids, query_ids=ids, exclude_self=True)
    for row, item in enumerate(ids):
        mine = got[got["item_idx"] == item]
        assert mine["neighbour_idx"].tolist() == want.ids[row].tolist()
        assert mine["rank"].tolist() == list(range(1, 8))
        np.testing.assert_allclose(mine["score"].to_numpy(), want.scores[row], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("measure", "expected"), [("cosine", 2 / np.sqrt(2 * 3)), ("jaccard", 2 / (2 + 3 - 2))])
def test_cooccurrence_scores_and_min_support(
    spark: SparkSession, config: ShelfConfig, measure: str, expected: float
) -> None:
    # Items 10 and 11 share users 1 and 2; item 12 shares only user 3 with 11 (below min_support 2).
    events = [
        (1, 10, "view", 3),
        (1, 11, "view", 2),
        (2, 10, "purchase", 1),
        (2, 11, "view", 1),
        (3, 11, "view", 1),
        (3, 12, "view", 2),
    ]
    cfg = config.similarities.model_copy(
        update={"method": "cooccurrence", "cooccurrence_measure": measure, "min_support": 2}
    )
    out = similarities.to_cooccurrence_neighbours(interactions_df(spark, events), cfg).toPandas()
    out = out.sort_values(["item_idx", "neighbour_idx"]).reset_index(drop=True)
    assert out[["item_idx", "neighbour_idx", "rank"]].values.tolist() == [[10, 11, 1], [11, 10, 1]]
    np.testing.assert_allclose(out["score"].to_numpy(), [expected, expected])


def test_cooccurrence_is_bounded_by_each_users_recent_items(spark: SparkSession, config: ShelfConfig) -> None:
    # User 1 touched items 1..4; with max_items_per_user 2 only 3 (2 days ago) and 4 (1 day ago) pair up.
    events = [(u, i, "view", 5 - i) for u in (1, 2) for i in (1, 2, 3, 4)]
    cfg = config.similarities.model_copy(update={"max_items_per_user": 2, "min_support": 1})
    out = similarities.to_cooccurrence_neighbours(interactions_df(spark, events), cfg).toPandas()
    assert sorted(map(tuple, out[["item_idx", "neighbour_idx"]].values.tolist())) == [(3, 4), (4, 3)]


def test_blend_gives_one_ranked_source(spark: SparkSession, config: ShelfConfig) -> None:
    rng = np.random.default_rng(3)
    factors = spark.createDataFrame(
        [(i, [float(v) for v in rng.normal(size=4)], "r2") for i in range(8)],
        "item_idx int, features array<float>, run_id string",
    )
    events = [(u, i, "view", i) for u in range(4) for i in range(0, 8, 1 + u % 2)]
    cfg = config.similarities.model_copy(update={"method": "blend", "top_n": 3, "min_support": 1})
    got = similarities.to_item_similarities(spark, factors, interactions_df(spark, events, "r2"), cfg, "r2").toPandas()
    assert set(got["source"]) == {"blend"}
    assert got.groupby("item_idx")["rank"].apply(list).map(lambda r: r == list(range(1, len(r) + 1))).all()
    assert got.groupby("item_idx").size().max() == 3
    assert not (got["item_idx"] == got["neighbour_idx"]).any()
