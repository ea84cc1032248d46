"""pipelines/rerank.py on hand-built silver and gold tables: Spark vs in-process kernel, idempotent
publish, business rules and the popularity fallback."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines import rerank
from pipelines.core import kernel_frames, reranking, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.runs import RunContext
from pipelines.core.schemas import CATALOG_SCHEMA, INTERACTIONS_SCHEMA
from tests.conftest import make_test_config as make_config
from tests.conftest import write_factor_tables

AS_OF = datetime(2026, 11, 1)
RUN = "r1"
N_USERS, N_ITEMS, RANK = 6, 12, 3


def user_id(u: int) -> str:
    return f"u{u:02d}"


def item_id(i: int) -> str:
    return f"sku-{i:02d}"


# (user, item, type, days before AS_OF); user 0 bought item 1 two days ago, user 2 views category A.
EVENTS = [
    (0, 1, "purchase", 2.0),
    (0, 3, "view", 1.0),
    (0, 4, "view", 0.5),
    (1, 6, "view", 3.0),
    (1, 7, "add_to_cart", 1.0),
    (2, 0, "view", 0.2),
    (2, 2, "view", 0.3),
    (3, 8, "view", 1.5),
    (4, 5, "view", 50.0),
    (5, 5, "purchase", 1.0),
    (5, 3, "view", 4.0),
    (1, 10, "view", 2.0),
]
# Candidates: user -> items; user 3 has no factors (popular source only), user 4 has none at all.
CANDIDATES = {
    0: list(range(12)),
    1: [0, 2, 4, 6, 8, 9, 10, 11],
    2: [1, 3, 5, 7, 9, 11],
    3: [0, 1, 2, 3],
    5: [3, 5, 9, 11],
}
ALS_USERS = {0, 1, 2, 4, 5}
# gold.item_similarities: item 3's co-occurrence list holds 11 (user 0 viewed 3 a day ago); als rows are ignored.
SIMILARITIES = [(3, 11, 0.9, 1, "cooccurrence"), (3, 10, 0.4, 2, "cooccurrence"), (7, 0, 0.8, 1, "cooccurrence")]
SIMILARITIES += [(3, 4, 0.99, 1, "als")]
COOC_WEIGHT = 20.0  # makes the co-occurrence neighbour of a fresh item win


def write_world(spark: SparkSession, config: ShelfConfig, catalog: bool = True) -> None:
    rng = np.random.default_rng(11)
    user_f, item_f = rng.normal(size=(N_USERS, RANK)), rng.normal(size=(N_ITEMS, RANK))
    users = spark.createDataFrame([(user_id(u), u) for u in range(N_USERS)], "user_id string, user_idx int")
    items = spark.createDataFrame([(item_id(i), i) for i in range(N_ITEMS)], "item_id string, item_idx int")
    tables.write(users, config, "silver", "user_index", RUN)
    tables.write(items, config, "silver", "item_index", RUN)
    rows = [(u, i, t, AS_OF - timedelta(days=d), None, 1.0, 1.0, RUN, AS_OF) for u, i, t, d in EVENTS]
    tables.write(spark.createDataFrame(rows, INTERACTIONS_SCHEMA), config, "silver", "interactions", RUN)
    write_factor_tables(spark, config, RUN, {u: user_f[u] for u in ALS_USERS}, dict(enumerate(item_f)))
    cands = [
        (
            u,
            i,
            float(user_f[u] @ item_f[i]) if u in ALS_USERS else None,
            ["als"] if u in ALS_USERS else ["popular"],
            RUN,
        )
        for u, its in CANDIDATES.items()
        for i in its
    ]
    cand_schema = "user_idx int, item_idx int, als_score double, sources array<string>, run_id string"
    tables.write(spark.createDataFrame(cands, cand_schema), config, "gold", "candidates", RUN, mode="run")
    sims = spark.createDataFrame(
        [(*row, RUN) for row in SIMILARITIES],
        "item_idx int, neighbour_idx int, score double, rank int, source string, run_id string",
    )
    tables.write(sims, config, "gold", "item_similarities", RUN, mode="run")
    if catalog:
        cat_rows = [
            (
                item_id(i),
                "A" if i % 2 == 0 else "B",
                10.0,
                i != 9,
                i == 2,
                AS_OF - timedelta(days=5 if i == 5 else 400),
                f"t{i}",
            )
            for i in range(N_ITEMS)
        ]
        tables.write(spark.createDataFrame(cat_rows, CATALOG_SCHEMA), config, "silver", "catalog", RUN)


def with_rerank(config: ShelfConfig, **update: object) -> ShelfConfig:
    weights = config.rerank.weights.model_copy(update={"cooc_sum": COOC_WEIGHT})
    return config.model_copy(update={"rerank": config.rerank.model_copy(update={"weights": weights, **update})})


@pytest.fixture(scope="module")
def world(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> ShelfConfig:
    """The hand-built world, re-ranked once (Spark steps are slow on CI: one run shared by the tests)."""
    cfg = with_rerank(
        make_config(tmp_path_factory.mktemp("rerank")), top_k=4, category_cap=3, mmr_lambda=0.6, buckets=3
    )
    write_world(spark, cfg)
    rerank.run(spark, cfg, RunContext(RUN, AS_OF))
    return cfg


def published(spark: SparkSession, config: ShelfConfig) -> DataFrame:
    return tables.read(spark, config, "gold", "recommendations").filter(F.col("run_id") == RUN)


def test_spark_kernel_equals_in_process_kernel_and_rules_hold(spark: SparkSession, world: ShelfConfig) -> None:
    cfg = world
    got = published(spark, cfg)
    assert [(f.name, f.dataType) for f in got.schema.fields] == [
        (f.name, f.dataType) for f in rerank.RECOMMENDATIONS_SCHEMA.fields
    ]
    assert got.schema["rank"].metadata.get("comment")  # the contract is documented in the table
    rows = got.toPandas()

    # In process: the same inputs, one kernel call over all users at once.
    rr = cfg.rerank
    fresh = reranking.to_fresh_events(tables.read(spark, cfg, "silver", "interactions"), rr, AS_OF)
    attributes = reranking.to_item_attributes(
        tables.read(spark, cfg, "silver", "item_index"),
        tables.read(spark, cfg, "gold", "item_factors"),
        tables.read(spark, cfg, "silver", "catalog"),
        fresh,
        rr,
        AS_OF,
    )
    neighbours = rerank.read_cooccurrence(spark, cfg, RUN)
    assert neighbours is not None and neighbours.count() == 3  # the cooccurrence rows only
    items = reranking.build_item_table(attributes, neighbours)
    user_rows = reranking.to_user_rows(
        tables.read(spark, cfg, "gold", "candidates"), tables.read(spark, cfg, "gold", "user_factors"), fresh
    ).toPandas()
    local = kernel_frames.rerank_frame(user_rows, items, kernel_frames.params_from(rr))
    assert local.dtypes.astype(str).tolist()[:4] == ["int32", "int32", "int32", "float64"]

    def named(reasons: list[str]) -> tuple[str, ...]:  # published reasons name items by the source's ids
        return tuple(
            f"similar_to:{item_id(int(x.split(':')[1]))}" if x.startswith("similar_to:") else x for x in reasons
        )

    want = sorted(
        (user_id(u), item_id(i), int(r), round(s, 9), named(x)) for u, i, r, s, x in local.itertuples(index=False)
    )
    spark_rows = sorted(
        (r.user_id, r.item_id, int(r.rank), round(r.score, 9), tuple(r.reasons))
        for r in rows.itertuples(index=False)
        if "popular" not in r.reasons
    )
    assert spark_rows == want and len(want) == 4 + 4 + 3 + 4 + 2

    by_user = {u: g.sort_values("rank") for u, g in rows.groupby("user_id")}
    assert item_id(1) not in set(by_user[user_id(0)]["item_id"])  # bought two days ago
    assert len(by_user[user_id(2)]) == 3  # all its candidates are in category B: capped at 3
    assert sorted(by_user[user_id(5)]["item_id"]) == [item_id(3), item_id(11)]  # 5 bought, 9 out of stock
    assert item_id(9) not in set(rows["item_id"])  # out of stock
    for group in by_user.values():
        assert group["rank"].tolist() == list(range(1, len(group) + 1))
        assert group["score"].is_monotonic_decreasing
    assert (rows["item_id"] == item_id(2)).any() and all(
        "promo" in r for r, i in zip(rows["reasons"], rows["item_id"], strict=True) if i == item_id(2)
    )
    # User 3 has no ALS vector: folded in from its session, never an "als" reason.
    assert not any("als" in r for r in by_user[user_id(3)]["reasons"])
    # User 0 viewed item 3 a day ago and 11 is in 3's co-occurrence list: the reason names 3.
    first = by_user[user_id(0)].iloc[0]
    assert first["item_id"] == item_id(11) and list(first["reasons"])[0] == f"similar_to:{item_id(3)}"
    # User 1 carted item 7, whose list holds 0: 0 leads, although ALS alone ranks it elsewhere.
    assert by_user[user_id(1)].iloc[0]["item_id"] == item_id(0)


def test_user_without_candidates_gets_the_popularity_fallback(spark: SparkSession, world: ShelfConfig) -> None:
    rows = published(spark, world).toPandas()
    fallback = rows[rows["user_id"] == user_id(4)].sort_values("rank")
    # Distinct users per item in silver: item 5 (users 4, 5), item 3 (0, 5); then ties by item index.
    assert fallback["item_id"].tolist() == [item_id(3), item_id(5), item_id(0), item_id(1)]
    assert fallback["rank"].tolist() == [1, 2, 3, 4]
    assert all(list(r) == ["popular"] for r in fallback["reasons"])
    np.testing.assert_allclose(fallback["score"], [2 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert not any("popular" in r for r in rows[rows["user_id"] != user_id(4)]["reasons"])


def test_publish_twice_with_the_same_run_id_is_identical(spark: SparkSession, world: ShelfConfig) -> None:
    cfg = world  # already published once by the fixture
    first_version = tables.history(spark, cfg, "gold", "recommendations").agg(F.max("version")).first()[0]
    rerank.run(spark, cfg, RunContext(RUN, AS_OF))
    versions = tables.history(spark, cfg, "gold", "recommendations").agg(F.max("version")).first()[0]
    assert versions == first_version + 1  # the rerun is exactly one Delta commit
    first = tables.read(spark, cfg, "gold", "recommendations", version=first_version)
    second = tables.read(spark, cfg, "gold", "recommendations")
    assert first.count() > N_USERS
    assert_df_equality(first, second, ignore_row_order=True, ignore_nullable=True)


@pytest.mark.steps
def test_rerank_without_a_catalog_applies_no_business_rule(spark: SparkSession, tmp_path: Path) -> None:
    cfg = with_rerank(make_config(tmp_path), top_k=4, category_cap=1, mmr_lambda=1.0, buckets=2)
    write_world(spark, cfg, catalog=False)
    assert not tables.exists(spark, cfg, "silver", "catalog")
    rerank.run(spark, cfg, RunContext(RUN, AS_OF))
    rows = published(spark, cfg).toPandas()
    by_user = {u: g.sort_values("rank") for u, g in rows.groupby("user_id")}
    assert set(by_user) == {user_id(u) for u in range(N_USERS)}  # user 4 still gets the fallback
    # No stock flags: item 9 (out of stock in the catalog) is back; item 5 stays out (bought by user 5).
    assert sorted(by_user[user_id(5)]["item_id"]) == [item_id(3), item_id(9), item_id(11)]
    # No categories, so no cap of 1 per category: user 2 gets a full list of 4.
    assert len(by_user[user_id(2)]) == 4
    assert item_id(1) not in set(by_user[user_id(0)]["item_id"])  # bought two days ago: still a rule
    reasons = {r for rs in rows["reasons"] for r in rs}
    assert not reasons & {"promo", "new_arrival"}


def test_published_reasons_name_the_source_item_ids(spark: SparkSession) -> None:
    ranked = spark.createDataFrame(
        [(0, 1, 1, 0.9, ["similar_to:2", "als"]), (0, 2, 2, 0.5, ["promo"])],
        "user_idx int, item_idx int, rank int, score double, reasons array<string>",
    )
    users = spark.createDataFrame([("alice", 0)], "user_id string, user_idx int")
    items = spark.createDataFrame([("sku-A", 1), ("sku-B", 2)], "item_id string, item_idx int")
    out = rerank.to_recommendations(ranked, users, items, "r1", datetime(2026, 11, 1))
    got = sorted((r.user_id, r.item_id, r.rank, list(r.reasons)) for r in out.collect())
    assert got == [("alice", "sku-A", 1, ["similar_to:sku-B", "als"]), ("alice", "sku-B", 2, ["promo"])]
