"""Ranking metrics against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import metrics

LOG2_3 = math.log2(3)
LOG2_5 = math.log2(5)
IDCG_3 = 1 + 1 / LOG2_3 + 1 / 2  # three relevant positions


def _recs(spark: SparkSession, lists: dict[int, list[int]]) -> DataFrame:
    rows = [(u, item, rank) for u, items in lists.items() for rank, item in enumerate(items, start=1)]
    return spark.createDataFrame(rows, "user_idx int, item_idx int, rank int")


def _pairs(spark: SparkSession, sets: dict[int, list[int]]) -> DataFrame:
    rows = [(u, item) for u, items in sets.items() for item in items]
    return spark.createDataFrame(rows, "user_idx int, item_idx int")


@pytest.fixture(scope="module")
def per_user(spark: SparkSession) -> dict[tuple[int, int], dict[str, float]]:
    recs = _recs(spark, {1: [10, 11, 12, 13], 2: [21, 22, 23], 3: [31, 40, 32]})
    # user 1: 3 relevant, one never recommended; user 2: fewer relevant than k; user 3: more relevant
    # than k; user 4: relevant items but no recommendations at all. The duplicate row is ignored.
    relevant = _pairs(spark, {1: [11, 13, 99], 2: [21, 21], 3: [31, 32, 33, 34, 35], 4: [50]})
    rows = metrics.per_user_metrics(recs, relevant, ks=[3, 4]).collect()
    return {(r.user_idx, r.k): r.asDict() for r in rows}


def test_metrics_for_a_user_with_as_many_relevant_as_k(per_user: dict) -> None:
    at3, at4 = per_user[(1, 3)], per_user[(1, 4)]
    # k=3: one hit at rank 2.
    assert at3["precision"] == pytest.approx(1 / 3)
    assert at3["recall"] == pytest.approx(1 / 3)
    assert at3["ndcg"] == pytest.approx((1 / LOG2_3) / IDCG_3)
    assert at3["map"] == pytest.approx((1 / 2) / 3)
    assert at3["hit_rate"] == 1.0
    # k=4: hits at ranks 2 and 4; AP sum = 1/2 + 2/4; min(k, relevant) = 3 = relevant.
    assert at4["precision"] == pytest.approx(2 / 4)
    assert at4["recall"] == pytest.approx(2 / 3)
    assert at4["ndcg"] == pytest.approx((1 / LOG2_3 + 1 / LOG2_5) / IDCG_3)
    assert at4["map"] == pytest.approx(1.0 / 3)
    assert at4["map_rel"] == pytest.approx(1.0 / 3)


def test_metrics_for_a_user_with_fewer_relevant_than_k(per_user: dict) -> None:
    at3 = per_user[(2, 3)]
    assert at3["precision"] == pytest.approx(1 / 3)  # precision still divides by k
    assert at3["recall"] == pytest.approx(1.0)
    assert at3["ndcg"] == pytest.approx(1.0)  # the ideal list has one relevant item
    assert at3["map"] == pytest.approx(1.0)
    assert at3["map_rel"] == pytest.approx(1.0)


def test_map_normalisations_differ_when_relevant_exceeds_k(per_user: dict) -> None:
    at3 = per_user[(3, 3)]
    ap_sum = 1 / 1 + 2 / 3  # hits at ranks 1 and 3
    assert at3["map"] == pytest.approx(ap_sum / 3)  # divided by min(k=3, relevant=5)
    assert at3["map_rel"] == pytest.approx(ap_sum / 5)  # divided by relevant
    assert at3["ndcg"] == pytest.approx((1 + 1 / 2) / IDCG_3)
    assert at3["recall"] == pytest.approx(2 / 5)


def test_a_user_without_recommendations_scores_zero(per_user: dict) -> None:
    assert per_user[(4, 3)] == {
        "user_idx": 4,
        "k": 3,
        "precision": 0.0,
        "recall": 0.0,
        "ndcg": 0.0,
        "map": 0.0,
        "map_rel": 0.0,
        "hit_rate": 0.0,
    }


def test_top_k_breaks_score_ties_on_the_lower_item_id(spark: SparkSession) -> None:
    scores = spark.createDataFrame(
        [(1, 5, 0.9), (1, 3, 0.9), (1, 7, 1.0), (1, 1, 0.1), (2, 4, 0.5), (2, 2, 0.5)],
        "user_idx int, item_idx int, score double",
    )
    ranked = metrics.top_k(scores, k=3).collect()
    assert sorted((r.user_idx, r.rank, r.item_idx) for r in ranked) == [
        (1, 1, 7),
        (1, 2, 3),
        (1, 3, 5),
        (2, 1, 2),
        (2, 2, 4),
    ]


def test_remove_seen_drops_only_the_users_own_items(spark: SparkSession) -> None:
    candidates = _pairs(spark, {1: [1, 2, 3], 2: [1, 2]})
    seen = _pairs(spark, {1: [2], 2: [1, 9]})
    kept = metrics.remove_seen(candidates, seen).collect()
    assert sorted((r.user_idx, r.item_idx) for r in kept) == [(1, 1), (1, 3), (2, 2)]


def test_coverage_and_novelty(spark: SparkSession) -> None:
    # Item 1 is used by all 4 training users (share 1, novelty 0); item 2 by one (share 1/4, novelty 2).
    train = _pairs(spark, {1: [1, 2, 3], 2: [1], 3: [1, 3], 4: [1]})
    recs = _recs(spark, {1: [1, 2], 2: [1, 2]})
    rows = {r.k: r for r in metrics.catalog_metrics(recs, train, ks=[1, 2]).collect()}
    assert rows[1].coverage == pytest.approx(1 / 3)
    assert rows[1].novelty == pytest.approx(0.0)
    assert rows[2].coverage == pytest.approx(2 / 3)
    assert rows[2].novelty == pytest.approx(1.0)


@pytest.mark.steps
def test_ranking_metrics_averages_over_users_with_relevant_items(spark: SparkSession) -> None:
    recs = _recs(spark, {1: [10, 11], 2: [20, 21]})
    relevant = _pairs(spark, {1: [11], 2: [99], 3: [10]})  # user 3 got no list: counts as a zero
    train = _pairs(spark, {1: [10, 20], 2: [11, 21, 99], 3: [12]})
    table = {(r.metric, r.k): r.value for r in metrics.ranking_metrics(recs, relevant, train, ks=[2]).collect()}
    assert table[("precision", 2)] == pytest.approx((1 / 2) / 3)
    assert table[("hit_rate", 2)] == pytest.approx(1 / 3)
    assert table[("ndcg", 2)] == pytest.approx((1 / LOG2_3) / 3)
    assert table[("coverage", 2)] == pytest.approx(4 / 6)
    assert {m for m, _ in table} == {*metrics.PER_USER_METRICS, *metrics.CATALOG_METRICS}


@pytest.mark.steps
def test_ranking_metrics_scores_several_models_in_one_pass(spark: SparkSession) -> None:
    # Model "a" ranks user 1's relevant item first; model "b" second and has no list for user 2.
    recs = _recs(spark, {1: [11, 10], 2: [20, 21]}).withColumn("model", F.lit("a"))
    recs = recs.unionByName(_recs(spark, {1: [10, 11]}).withColumn("model", F.lit("b")))
    relevant = _pairs(spark, {1: [11], 2: [21]})
    train = _pairs(spark, {1: [10, 20], 2: [11, 21]})
    rows = metrics.ranking_metrics(recs, relevant, train, ks=[1, 2], by=["model"]).collect()
    table = {(r.model, r.metric, r.k): r.value for r in rows}
    assert len(table) == len(rows) == 2 * 2 * 9  # models x ks x metrics
    assert table[("a", "hit_rate", 1)] == pytest.approx(1 / 2)  # user 1 hit at rank 1, user 2 missed
    assert table[("a", "ndcg", 2)] == pytest.approx((1 + 1 / LOG2_3) / 2)
    assert table[("b", "hit_rate", 1)] == pytest.approx(0.0)
    assert table[("b", "recall", 2)] == pytest.approx(1 / 2)
    assert table[("b", "coverage", 2)] == pytest.approx(2 / 4)


@pytest.mark.steps
def test_ranking_metrics_scores_a_named_model_with_no_list_at_all_as_zero(spark: SparkSession) -> None:
    # Model "empty" returned nothing for anybody: without `groups` it would silently vanish from the table.
    recs = _recs(spark, {1: [11, 10]}).withColumn("model", F.lit("a"))
    relevant = _pairs(spark, {1: [11], 2: [21]})
    train = _pairs(spark, {1: [10, 20], 2: [11, 21]})
    models = spark.createDataFrame([("a",), ("empty",)], "model string")
    without = {r.model for r in metrics.ranking_metrics(recs, relevant, train, ks=[2], by=["model"]).collect()}
    rows = metrics.ranking_metrics(recs, relevant, train, ks=[2], by=["model"], groups=models).collect()
    table = {(r.model, r.metric): r.value for r in rows}
    assert without == {"a"}
    assert len(table) == len(rows) == 2 * 9
    assert {m: v for (model, m), v in table.items() if model == "empty"} == dict.fromkeys(
        (*metrics.PER_USER_METRICS, *metrics.CATALOG_METRICS), 0.0
    )
    assert table[("a", "hit_rate")] == pytest.approx(1 / 2)  # unchanged by the extra group
    assert table[("a", "coverage")] == pytest.approx(2 / 4)


def test_intra_list_diversity_from_item_factors(spark: SparkSession) -> None:
    # cos(1,2) = 0, cos(1,3) = cos(2,3) = 1/sqrt(2), cos(1,4) = 1 (parallel vectors of different length).
    factors = spark.createDataFrame(
        [(1, [1.0, 0.0]), (2, [0.0, 1.0]), (3, [1.0, 1.0]), (4, [2.0, 0.0])],
        "item_idx int, features array<float>",
    )
    recs = _recs(spark, {1: [1, 2, 3], 2: [1, 4], 3: [2]})  # user 3's one-item list has no pair
    rows = {r.k: r.diversity for r in metrics.intra_list_diversity(recs, [1, 2, 3], item_factors=factors).collect()}
    user_1_at_3 = (1.0 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert rows[1] == pytest.approx(0.0)  # no list has a pair at k = 1
    assert rows[2] == pytest.approx((1.0 + 0.0) / 2)  # user 1: (1,2) -> 1; user 2: (1,4) -> 0
    assert rows[3] == pytest.approx((user_1_at_3 + 0.0) / 2)


def test_an_item_without_factors_leaves_its_pairs_out_but_keeps_the_others_ranks(spark: SparkSession) -> None:
    # Item 9 has no factor vector: at k = 2 the only pair is (1, 9), left out, so no list has a pair; at k = 3
    # the pair (1, 2) counts, item 2 keeping its rank 3 (the cut-off is on the list's own ranks).
    factors = spark.createDataFrame([(1, [1.0, 0.0]), (2, [0.0, 1.0])], "item_idx int, features array<float>")
    recs = _recs(spark, {1: [1, 9, 2]}).withColumn("model", F.lit("m"))
    rows = metrics.intra_list_diversity(recs, [2, 3], item_factors=factors, by=["model"]).collect()
    assert {(r.model, r.k): r.diversity for r in rows} == {("m", 2): 0.0, ("m", 3): pytest.approx(1.0)}


def test_intra_list_diversity_falls_back_to_cooccurrence_cosine(spark: SparkSession) -> None:
    # Training users: item 1 {a,b,c}, item 2 {a,b}, item 3 {c,d} -> cos(1,2) = 2/sqrt(6), cos(1,3) = 1/sqrt(6),
    # cos(2,3) = 0. Item 9 has no training user, so user 11's only pair is left out.
    train = _pairs(spark, {100: [1, 2], 101: [1, 2], 102: [1, 3], 103: [3]})
    recs = _recs(spark, {10: [1, 2, 3], 11: [9, 1]}).withColumn("model", F.lit("m"))
    rows = metrics.intra_list_diversity(recs, [2, 3], train=train, by=["model"]).collect()
    value = {(r.model, r.k): r.diversity for r in rows}
    assert value[("m", 2)] == pytest.approx(1 - 2 / math.sqrt(6))
    assert value[("m", 3)] == pytest.approx(((1 - 2 / math.sqrt(6)) + (1 - 1 / math.sqrt(6)) + 1.0) / 3)


def test_intra_list_diversity_needs_a_similarity_source(spark: SparkSession) -> None:
    with pytest.raises(ValueError, match="item_factors or train"):
        metrics.intra_list_diversity(_recs(spark, {1: [1, 2]}), [2])


@pytest.mark.steps
def test_ranking_metrics_uses_item_factors_for_diversity_when_given(spark: SparkSession) -> None:
    recs = _recs(spark, {1: [1, 2]})
    relevant = _pairs(spark, {1: [2]})
    train = _pairs(spark, {1: [3], 2: [1, 2]})  # co-occurrence would say cos(1,2) = 1, diversity 0
    factors = spark.createDataFrame([(1, [1.0, 0.0]), (2, [0.0, 3.0])], "item_idx int, features array<float>")
    with_factors = {
        (r.metric, r.k): r.value
        for r in metrics.ranking_metrics(recs, relevant, train, ks=[2], item_factors=factors).collect()
    }
    without = {(r.metric, r.k): r.value for r in metrics.ranking_metrics(recs, relevant, train, ks=[2]).collect()}
    assert with_factors[("diversity", 2)] == pytest.approx(1.0)
    assert without[("diversity", 2)] == pytest.approx(0.0)


def test_metrics_with_tied_scores_follow_the_top_k_tie_break(spark: SparkSession) -> None:
    # Four items tie on score; top_k ranks the lower ids first, so at k=2 the list is [1, 2] and the relevant
    # item 3 is missed; at k=3 it is a hit at rank 3.
    scores = spark.createDataFrame(
        [(1, item, 0.5) for item in (4, 3, 2, 1)], "user_idx int, item_idx int, score double"
    )
    recs = metrics.top_k(scores, k=3)
    rows = {r.k: r for r in metrics.per_user_metrics(recs, _pairs(spark, {1: [3]}), ks=[2, 3]).collect()}
    assert rows[2].hit_rate == 0.0
    assert rows[3].ndcg == pytest.approx(1 / 2)  # 1 / log2(3 + 1), ideal DCG 1
    assert rows[3].map == pytest.approx(1 / 3)
