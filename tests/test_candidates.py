"""pipelines/candidates.py on hand-built factors, similarities and interactions."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines import candidates
from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.runs import RunContext
from pipelines.core.schemas import INTERACTIONS_SCHEMA
from tests.conftest import make_test_config
from udfs.topk import csr_from_lists, top_n_dot

AS_OF = datetime(2026, 11, 1)
RUN = "r1"


def factors_df(spark: SparkSession, key: str, ids: np.ndarray, factors: np.ndarray):
    rows = [(int(i), [float(v) for v in f], RUN) for i, f in zip(ids, factors, strict=True)]
    return spark.createDataFrame(rows, f"{key} int, features array<float>, run_id string")


@pytest.mark.steps
def test_candidates_step(spark: SparkSession, config: ShelfConfig) -> None:
    rng = np.random.default_rng(11)
    n_items, n_users, k = 40, 12, 6
    item_ids = np.arange(n_items)
    item_f = rng.normal(size=(n_items, 5)).astype(np.float32)
    warm = np.arange(n_users)  # users 0..11 have factors; 100 and 101 are cold
    user_f = rng.normal(size=(n_users, 5)).astype(np.float32)
    # Every warm user buys its 2 best-scoring items (so ALS would propose them) and views one more.
    best = np.argsort(-(user_f @ item_f.T), axis=1, kind="stable")
    events = []
    for u in warm:
        events += [
            (int(u), int(best[u, 0]), "purchase", 3),
            (int(u), int(best[u, 1]), "purchase", 2),
            (int(u), int(best[u, 5]), "view", 1),
        ]
    events += [(100, 1, "purchase", 1), (100, 2, "view", 2), (101, 3, "view", 1), (7, 1, "view", 9)]
    rows = [(u, i, t, AS_OF - timedelta(days=d), None, 1.0, 1.0, RUN, AS_OF) for u, i, t, d in events]
    tables.write(spark.createDataFrame(rows, INTERACTIONS_SCHEMA), config, "silver", "interactions", RUN)
    tables.write(factors_df(spark, "user_idx", warm, user_f), config, "gold", "user_factors", RUN)
    tables.write(factors_df(spark, "item_idx", item_ids, item_f), config, "gold", "item_factors", RUN)
    # Item 2's neighbours are 30 and 31; item 3's is 2. Cold user 100 viewed 2, and bought 1.
    sims = spark.createDataFrame(
        [(2, 30, 0.9, 1, "als", RUN), (2, 31, 0.8, 2, "als", RUN), (3, 2, 0.7, 1, "als", RUN)],
        "item_idx int, neighbour_idx int, score double, rank int, source string, run_id string",
    )
    tables.write(sims, config, "gold", "item_similarities", RUN)
    cfg = config.model_copy(
        update={
            "recommend": config.recommend.model_copy(
                update={"candidates_k": k, "popular_k": 5, "new_arrivals_k": 3, "max_candidates": 50}
            ),
            # No catalogue: an item arrives with its first event; "new" = first seen within 1.5 days.
            "rerank": config.rerank.model_copy(update={"new_arrival_days": 1.5}),
            # Several row and item blocks per Arrow batch, so the blocked path is the one tested.
            "similarities": config.similarities.model_copy(update={"block_rows": 5, "block_items": 7}),
        }
    )

    candidates.run(spark, cfg, RunContext(RUN, AS_OF))
    out = tables.read(spark, cfg, "gold", "candidates").toPandas()

    assert str(out["user_idx"].dtype) == "int32" and str(out["item_idx"].dtype) == "int32"
    owned = {(u, i) for u, i, t, _ in events if t == "purchase"}
    assert not any((u, i) in owned for u, i in zip(out["user_idx"], out["item_idx"], strict=True))
    assert not out.duplicated(["user_idx", "item_idx"]).any()

    # ALS part equals the kernel run in one process with the same exclusions.
    owned_lists = [sorted(i for u2, i in owned if u2 == u) for u in warm]
    indptr, indices = csr_from_lists(owned_lists)
    want = top_n_dot(user_f, item_f, k, item_ids, exclude_indptr=indptr, exclude_indices=indices)
    als = out[out["sources"].map(lambda s: "als" in s)]
    for row, u in enumerate(warm):
        mine = als[als["user_idx"] == u].sort_values(["als_score", "item_idx"], ascending=[False, True])
        assert mine["item_idx"].tolist() == want.ids[row].tolist()
        np.testing.assert_allclose(mine["als_score"].to_numpy(), want.scores[row], rtol=1e-5, atol=1e-5)
    assert out.loc[out["sources"].map(lambda s: "als" not in s), "als_score"].isna().all()

    # Cold users: popularity and new-arrival fallbacks, plus neighbours of their recent items.
    cold = out[out["user_idx"].isin([100, 101])]
    assert set(cold["user_idx"]) == {100, 101}
    assert cold["sources"].map(lambda s: bool({"popular", "neighbours", "new_arrival"} & set(s))).all()
    assert cold["als_score"].isna().all()
    u100 = cold[cold["user_idx"] == 100]
    assert 1 not in set(u100["item_idx"])  # bought
    assert {30, 31} <= set(u100["item_idx"])
    assert (u100["sources"].map(list).map(lambda s: "popular" in s)).sum() >= 4
    assert list(cold[(cold["user_idx"] == 101) & (cold["item_idx"] == 2)]["sources"].iloc[0]) in (
        ["neighbours"],
        ["neighbours", "popular"],
    )
    assert not out[out["user_idx"].isin(warm)]["sources"].map(lambda s: "popular" in s).any()

    # Cold users also get the 3 newest items first seen within 1.5 days of as_of (here: first event 1 day
    # before as_of, so the tie goes to the lowest item idx), minus what they own; warm users never do.
    first_seen: dict[int, int] = {}
    for _, i, _, d in events:
        first_seen[i] = max(first_seen.get(i, d), d)
    newest = sorted(i for i, d in first_seen.items() if d <= 1.5)[:3]
    assert len(newest) == 3
    tagged_new = out[out["sources"].map(lambda s: "new_arrival" in s)]
    assert set(tagged_new["user_idx"]) == {100, 101}
    for u in (100, 101):
        mine = set(tagged_new.loc[tagged_new["user_idx"] == u, "item_idx"])
        assert mine == {i for i in newest if (u, i) not in owned}


def test_new_arrivals_come_from_the_catalogue(spark: SparkSession) -> None:
    day = timedelta(days=1)
    catalog = spark.createDataFrame(
        [
            ("a", AS_OF - 2 * day, True),  # new
            ("b", AS_OF - 5 * day, None),  # new, stock unknown counts as in stock
            ("c", AS_OF - 1 * day, False),  # new but out of stock
            ("d", AS_OF - 40 * day, True),  # too old
            ("e", AS_OF + 1 * day, True),  # launched after as_of: not yet
            ("f", AS_OF - 3 * day, True),  # new but never indexed (no events): cannot be published
            ("g", AS_OF - 2 * day, True),  # new, same day as "a"
        ],
        "item_id string, launched_at timestamp, in_stock boolean",
    )
    index = spark.createDataFrame([(x, n) for n, x in enumerate("abcdeg")], "item_id string, item_idx int")
    interactions = spark.createDataFrame([(0, 0, AS_OF - 50 * day)], "user_idx int, item_idx int, event_ts timestamp")
    launches = candidates.to_launches(interactions, catalog, index)
    cold = spark.createDataFrame([(7,), (8,)], "user_idx int")
    out = candidates.to_new_arrival_candidates(launches, cold, AS_OF, 30, 2).toPandas()
    # Newest first: "a" (idx 0) and "g" (idx 5) launched on the same day, ahead of "b"; k = 2 keeps those two.
    for u in (7, 8):
        mine = out[out["user_idx"] == u].sort_values("_new_rank")
        assert mine["item_idx"].tolist() == [0, 5] and mine["_new_rank"].tolist() == [1, 2]
    wider = candidates.to_new_arrival_candidates(launches, cold, AS_OF, 30, 10).toPandas()
    assert sorted(set(wider["item_idx"])) == [0, 1, 5]


def test_cap_keeps_the_best_per_user(spark: SparkSession) -> None:
    als = spark.createDataFrame([(1, i, float(i)) for i in range(10)], "user_idx int, item_idx int, als_score double")
    neighbours = spark.createDataFrame([(1, 3, 0.5), (1, 42, 0.9)], "user_idx int, item_idx int, _sim double")
    popular = spark.createDataFrame([], "user_idx int, item_idx int, _pop_rank int")
    owned = spark.createDataFrame([(1, 9)], "user_idx int, item_idx int")
    out = candidates.to_candidates(als, neighbours, popular, owned, 3, "r").orderBy("item_idx").toPandas()
    # Item 3 is proposed by two sources, so it leads; then the best ALS scores 8 and 7 (9 is owned).
    assert out["item_idx"].tolist() == [3, 7, 8]
    assert [list(s) for s in out["sources"]] == [["als", "neighbours"], ["als"], ["als"]]


def test_an_owned_item_stays_through_buy_again_alone_in_one_shuffle(spark: SparkSession) -> None:
    """Item 5 is owned and proposed by neighbours and buy_again: it stays as buy_again only (no similarity); item 6
    is owned and proposed by neighbours alone: it goes. The merge, the owned check and the cap share one shuffle."""
    als = spark.createDataFrame([(1, 7, 0.5)], "user_idx int, item_idx int, als_score double")
    neighbours = spark.createDataFrame(
        [(1, 5, 0.9), (1, 6, 0.8), (1, 7, 0.1)], "user_idx int, item_idx int, _sim double"
    )
    popular = spark.createDataFrame([], "user_idx int, item_idx int, _pop_rank int")
    owned = spark.createDataFrame([(1, 5), (1, 6)], "user_idx int, item_idx int")
    again = spark.createDataFrame([(1, 5, 0.25)], "user_idx int, item_idx int, rebuy_score double")
    out = candidates.to_candidates(als, neighbours, popular, owned, 10, "r", buy_again=again)
    plan = out._jdf.queryExecution().executedPlan().toString()  # classic session (the suite's); before it runs
    assert plan.count("Exchange") == 1, plan
    rows = {r.item_idx: (r.als_score, r.rebuy_score, list(r.sources)) for r in out.collect()}
    assert rows == {5: (None, 0.25, ["buy_again"]), 7: (0.5, None, ["als", "neighbours"])}


@pytest.mark.parametrize(
    ("preset", "consumed", "kept"), [("movielens", "rating", "purchase"), ("synthetic", "purchase", "rating")]
)
@pytest.mark.steps
def test_consumed_items_are_never_candidates_per_preset(
    spark: SparkSession, tmp_path: Path, preset: str, consumed: str, kept: str
) -> None:
    """Each user rates its best-scoring item and buys its second best. The preset decides which of the two is
    consumed (movielens: the rated one; shops: the bought one): that one is never a candidate, the other is."""
    config = make_test_config(tmp_path, f"source.preset={preset}")
    assert config.consumed_event_types == [consumed]
    rng = np.random.default_rng(5)
    item_f = rng.normal(size=(30, 4)).astype(np.float32)
    user_f = rng.normal(size=(8, 4)).astype(np.float32)
    best = np.argsort(-(user_f @ item_f.T), axis=1, kind="stable")
    events = [(u, int(best[u, 0]), "rating", 1) for u in range(8)] + [
        (u, int(best[u, 1]), "purchase", 2) for u in range(8)
    ]
    rows = [(u, i, t, AS_OF - timedelta(days=d), None, 1.0, 1.0, RUN, AS_OF) for u, i, t, d in events]
    tables.write(spark.createDataFrame(rows, INTERACTIONS_SCHEMA), config, "silver", "interactions", RUN)
    tables.write(factors_df(spark, "user_idx", np.arange(8), user_f), config, "gold", "user_factors", RUN)
    tables.write(factors_df(spark, "item_idx", np.arange(30), item_f), config, "gold", "item_factors", RUN)
    sims = spark.createDataFrame(
        [], "item_idx int, neighbour_idx int, score double, rank int, source string, run_id string"
    )
    tables.write(sims, config, "gold", "item_similarities", RUN)
    candidates.run(spark, config, RunContext(run_id=RUN, as_of=AS_OF))
    got = {(r.user_idx, r.item_idx) for r in tables.read(spark, config, "gold", "candidates").collect()}
    by_type = {t: {(u, i) for u, i, tt, _ in events if tt == t} for t in ("rating", "purchase")}
    assert not (by_type[consumed] & got)
    assert by_type[kept] <= got


@pytest.mark.steps
def test_buy_again_offers_consumed_items_scored_by_how_often_and_how_lately(
    spark: SparkSession, tmp_path: Path
) -> None:
    """User 0 bought item 1 on three days, the last 10 days ago, and item 2 once, yesterday (and viewed item 3).
    With recommend.repeat_purchase both purchases come back as buy_again candidates, the frequent one first;
    without, neither; a view is not a purchase."""
    events = [(0, 1, "purchase", d) for d in (30, 20, 10)] + [(0, 2, "purchase", 1), (0, 3, "view", 2)]
    events += [(1, 1, "purchase", 5), (1, 4, "view", 3)]
    rows = [(u, i, t, AS_OF - timedelta(days=d), None, 1.0, 1.0, RUN, AS_OF) for u, i, t, d in events]
    scores = {}
    for repeat in (True, False):
        config = make_test_config(tmp_path / str(repeat), f"recommend.repeat_purchase={repeat}")
        tables.write(spark.createDataFrame(rows, INTERACTIONS_SCHEMA), config, "silver", "interactions", RUN)
        item_f = np.eye(5, dtype=np.float32)
        tables.write(
            factors_df(spark, "user_idx", np.arange(2), np.ones((2, 5), np.float32)),
            config,
            "gold",
            "user_factors",
            RUN,
        )
        tables.write(factors_df(spark, "item_idx", np.arange(5), item_f), config, "gold", "item_factors", RUN)
        sims = spark.createDataFrame(
            [], "item_idx int, neighbour_idx int, score double, rank int, source string, run_id string"
        )
        tables.write(sims, config, "gold", "item_similarities", RUN)
        candidates.run(spark, config, RunContext(run_id=RUN, as_of=AS_OF))
        again = tables.read(spark, config, "gold", "candidates").filter(F.array_contains("sources", "buy_again"))
        scores[repeat] = {(r.user_idx, r.item_idx): r.rebuy_score for r in again.collect()}
    assert scores[False] == {}
    assert set(scores[True]) == {(0, 1), (0, 2), (1, 1)}
    assert scores[True][(0, 1)] > scores[True][(0, 2)] > 0
    half_life = 90.0  # recommend.buy_again_half_life_days' default
    assert scores[True][(0, 1)] == pytest.approx(np.log1p(3) * 2 ** (-10 / half_life), rel=1e-6)
    assert scores[True][(1, 1)] == pytest.approx(np.log1p(1) * 2 ** (-5 / half_life), rel=1e-6)
