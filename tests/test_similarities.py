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


@pytest.mark.steps
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
    assert list(got.columns) == ["item_idx", "neighbour_idx", "score", "rank", "source", "run_id"]
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


@pytest.mark.parametrize(("method", "sources"), [("blend", {"blend"}), ("both", {"als", "cooccurrence"})])
@pytest.mark.steps
def test_method_selects_or_blends_sources(spark: SparkSession, config: ShelfConfig, method: str, sources: set) -> None:
    rng = np.random.default_rng(3)
    factors = spark.createDataFrame(
        [(i, [float(v) for v in rng.normal(size=4)], "r2") for i in range(8)],
        "item_idx int, features array<float>, run_id string",
    )
    events = interactions_df(spark, [(u, i, "view", i) for u in range(4) for i in range(0, 8, 1 + u % 2)], "r2")
    cfg = config.similarities.model_copy(
        update={"method": method, "top_n": 3, "min_support": 1, "blend_als_weight": 0.3}
    )
    got = similarities.to_item_similarities(spark, factors, events, cfg, "r2").toPandas()
    assert set(got["source"]) == sources
    for _, per_source in got.groupby("source"):
        ranks = per_source.sort_values(["item_idx", "rank"]).groupby("item_idx")["rank"].apply(list)
        assert ranks.map(lambda r: r == list(range(1, len(r) + 1))).all()
        assert per_source.groupby("item_idx").size().max() == 3
    assert not (got["item_idx"] == got["neighbour_idx"]).any()
    if method == "blend":
        # Each blended score is 0.3 * als + 0.7 * cooccurrence over the sources' own top-N, 0 when absent.
        als = similarities.to_als_neighbours(spark, factors, cfg).toPandas()
        cooc = similarities.to_cooccurrence_neighbours(events, cfg).toPandas()
        keys = ["item_idx", "neighbour_idx"]
        both = als[[*keys, "score"]].merge(cooc[[*keys, "score"]], on=keys, how="outer", suffixes=("_a", "_c"))
        both["want"] = 0.3 * both["score_a"].fillna(0.0) + 0.7 * both["score_c"].fillna(0.0)
        merged = got.merge(both, on=keys, how="left")
        assert merged["want"].notna().all()
        np.testing.assert_allclose(merged["score"].to_numpy(), merged["want"].to_numpy(), rtol=1e-9)
        assert (merged["score_a"].notna() & merged["score_c"].notna()).any()
