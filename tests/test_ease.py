"""EASE: udfs/ease.py against slow references (no Spark), pipelines/core/ease.py on hand-built rows.

Kernel weights and values are small integers in the randomised tests, so every float64 sum is
exact whatever the blocking: the kernel must match the reference id for id, not only score for score.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyspark.sql import SparkSession

from pipelines.core import ease
from udfs.ease import (
    ease_csr,
    fit_ease,
    fit_ease_reference,
    prune_top_n,
    top_n_sparse,
    top_n_sparse_reference,
)
from udfs.topk import csr_from_lists, to_long

Case = tuple[np.ndarray, dict[int, list[tuple[int, float]]], list[list[tuple[int, float]]], list[set[int]], int, int]

# Items a, b always bought together; c mostly alone.
CO_OCCURRENCE = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1], [1, 1, 1]], dtype=np.float64)


def test_fit_ease_equals_reference() -> None:
    rng = np.random.default_rng(3)
    x = (rng.random((40, 9)) < 0.3).astype(np.float64) * rng.integers(1, 4, size=(40, 9))
    gram = x.T @ x
    kept = gram.copy()
    b = fit_ease(gram, 2.5)
    assert b.dtype == np.float32 and b.shape == (9, 9)
    np.testing.assert_allclose(b, fit_ease_reference(gram, 2.5), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.diagonal(b), np.zeros(9, dtype=np.float32))
    np.testing.assert_array_equal(gram, kept)  # the caller's gram is untouched without overwrite_gram
    np.testing.assert_array_equal(fit_ease(gram.copy(), 2.5, overwrite_gram=True), b)


def test_fit_ease_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="lam"):
        fit_ease(np.eye(3), 0.0)
    with pytest.raises(ValueError, match="shape"):
        fit_ease(np.ones((2, 3)), 1.0)


def test_co_occurring_item_scores_top() -> None:
    ids = np.array([10, 11, 12], dtype=np.int64)  # a, b, c
    b = fit_ease(CO_OCCURRENCE.T @ CO_OCCURRENCE, 1.0)
    assert b[0, 1] > 0 and b[0, 1] > b[0, 2]
    src, dst, weight, _ = prune_top_n(b, ids, 2)
    indptr, cols, weights = ease_csr(src, dst, weight, ids)
    result = top_n_sparse([0, 1], [10], [1.0], indptr, cols, weights, ids, 2)
    assert result.ids[0, 0] == 11  # b tops the list of a user holding only a
    assert result.scores[0, 0] == pytest.approx(float(b[0, 1]))


def test_prune_keeps_top_n_positive_with_ties_by_id() -> None:
    ids = np.array([10, 20, 30, 40, 50], dtype=np.int64)
    b = np.array(
        [
            [0.0, 0.5, 0.5, 0.2, -1.0],
            [0.3, 0.0, 0.3, 0.3, 0.9],
            [-1.0, -2.0, 0.0, -3.0, 0.1],
            [-1.0, -1.0, -1.0, 0.0, -1.0],
            [0.7, 0.1, 0.7, 0.7, 0.0],
        ],
        dtype=np.float32,
    )
    for block_cells in (1, 7, 1000):
        src, dst, weight, rank = prune_top_n(b, ids, 2, block_cells=block_cells)
        assert src.tolist() == [10, 10, 20, 20, 30, 50, 50]
        assert dst.tolist() == [20, 30, 50, 10, 50, 10, 30]
        assert weight.tolist() == pytest.approx([0.5, 0.5, 0.9, 0.3, 0.1, 0.7, 0.7])
        assert rank.tolist() == [1, 2, 1, 2, 1, 1, 2]
        assert weight.dtype == np.float32 and rank.dtype == np.int32


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 10), st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_prune_equals_full_sort(n: int, top_n: int, block_cells: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    b = rng.integers(-3, 4, size=(n, n)).astype(np.float32)
    ids = np.sort(rng.choice(100, size=n, replace=False)).astype(np.int64)
    src, dst, weight, rank = prune_top_n(b, ids, top_n, block_cells=block_cells)
    expected = []
    for j in range(n):
        pairs = sorted((-float(b[j, i]), int(ids[i])) for i in range(n) if b[j, i] > 0)[:top_n]
        expected += [(int(ids[j]), i, -w, r + 1) for r, (w, i) in enumerate(pairs)]
    got = list(zip(src.tolist(), dst.tolist(), weight.tolist(), rank.tolist(), strict=True))
    assert got == expected


def test_ease_csr_rows_follow_sorted_ids() -> None:
    indptr, cols, weights = ease_csr([30, 10, 30], [10, 20, 20], [0.5, 0.25, 0.75], [10, 20, 30])
    assert indptr.tolist() == [0, 1, 1, 3]
    assert cols.tolist() == [1, 0, 1]
    assert weights.tolist() == [0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="item_ids"):
        ease_csr([10], [99], [1.0], [10, 20])


@st.composite
def scoring_cases(draw: st.DrawFn) -> Case:
    """A random catalogue, neighbour lists, users (some empty, some outside the catalogue) and exclusions."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(0, 12))
    ids = np.sort(rng.choice(40, size=n, replace=False)).astype(np.int64)
    neighbours: dict[int, list[tuple[int, float]]] = {}
    for j in ids.tolist():
        others = [int(i) for i in ids if i != j and rng.random() < 0.5]
        neighbours[j] = [(i, float(rng.integers(-3, 4))) for i in others]
    m = draw(st.integers(0, 9))
    pool = np.arange(45)  # ids 40..44 are never in the catalogue
    users = [[(int(i), float(rng.integers(1, 4))) for i in rng.choice(pool, size=rng.integers(0, 6))] for _ in range(m)]
    excluded = [set(rng.choice(pool, size=rng.integers(0, 4)).tolist()) for _ in range(m)]
    return ids, neighbours, users, excluded, draw(st.integers(1, 7)), draw(st.integers(1, 60))


@settings(max_examples=150, deadline=None)
@given(scoring_cases())
def test_top_n_sparse_equals_reference(case: Case) -> None:
    ids, neighbours, users, excluded, k, block_cells = case
    src = [j for j, nbs in neighbours.items() for _ in nbs]
    dst = [i for nbs in neighbours.values() for i, _ in nbs]
    weight = [w for nbs in neighbours.values() for _, w in nbs]
    nb_indptr, nb_cols, nb_weights = ease_csr(src, dst, weight, ids)
    user_indptr, user_items = csr_from_lists([[i for i, _ in u] for u in users])
    values = [x for u in users for _, x in u]
    ex_indptr, ex_indices = csr_from_lists([sorted(e) for e in excluded])
    result = top_n_sparse(
        user_indptr, user_items, values, nb_indptr, nb_cols, nb_weights, ids, k, ex_indptr, ex_indices,
        block_cells=block_cells,
    )  # fmt: skip
    expected = top_n_sparse_reference(users, neighbours, k, excluded)
    assert result.ids.shape == (len(users), min(k, ids.size))
    for row, pairs in enumerate(expected):
        count = int(result.counts[row])
        assert [
            (float(s), int(i)) for s, i in zip(result.scores[row, :count], result.ids[row, :count], strict=True)
        ] == pairs
        assert (result.ids[row, count:] == -1).all()


def test_spark_gram_matrix_equals_numpy(spark: SparkSession) -> None:
    rows = [(1, 7, 1.0), (1, 3, 2.0), (2, 3, 0.5), (2, 9, 1.0), (3, 9, 3.0), (3, 7, 1.0), (3, 3, 1.0)]
    x = spark.createDataFrame(rows, "user_idx int, item_idx int, x double")
    got = ease.gram_matrix(x, max_items=3)
    assert got is not None
    ids, gram = got
    dense = np.zeros((3, 3))
    for u, i, v in rows:
        dense[u - 1, [3, 7, 9].index(i)] = v
    assert ids.tolist() == [3, 7, 9]
    np.testing.assert_array_equal(gram, dense.T @ dense)
    assert ease.gram_matrix(x, max_items=2) is None


def test_spark_gram_matrix_equals_numpy_on_random_users_spread_over_partitions(
    spark: SparkSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ease, "BAND_ENTRIES", 7 * 60)  # bands of 7 matrix rows: 9 bands, the last one short
    rng = np.random.default_rng(3)
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, 300, 4000), rng.integers(0, 60, 4000), strict=True)}
    rows = [(u, 1000 + 7 * i, float(rng.choice([1.0, 0.5, 2.25]))) for u, i in sorted(pairs)]
    x = spark.createDataFrame(rows, "user_idx int, item_idx int, x double").repartition(7)  # users split apart
    got = ease.gram_matrix(x, max_items=60)
    assert got is not None
    ids, gram = got
    dense = np.zeros((300, ids.size))
    for u, i, v in rows:
        dense[u, np.searchsorted(ids, i)] = v
    assert ids.tolist() == sorted({i for _, i, _ in rows})
    np.testing.assert_allclose(gram, dense.T @ dense, rtol=1e-12)


def test_spark_ease_input_aggregates_events(spark: SparkSession) -> None:
    events = spark.createDataFrame([(1, 5), (1, 5), (1, 5), (1, 6), (2, 5)], "user_idx int, item_idx int")
    binary = sorted(tuple(r) for r in ease.to_ease_input(events, "binary").collect())
    assert binary == [(1, 5, 1.0), (1, 6, 1.0), (2, 5, 1.0)]
    logs = sorted(tuple(r) for r in ease.to_ease_input(events, "log_count").collect())
    assert logs == [(1, 5, pytest.approx(np.log1p(3.0))), (1, 6, pytest.approx(np.log(2.0))), (2, 5, pytest.approx(np.log(2.0)))]  # fmt: skip
    with pytest.raises(ValueError, match="binary"):
        ease.to_ease_input(events, "tfidf")  # type: ignore[arg-type]


def test_spark_ease_candidates_hand_built(spark: SparkSession) -> None:
    neighbours = spark.createDataFrame(
        [(1, 2, 0.75), (1, 3, 0.5), (1, 4, 0.25), (2, 3, 0.5), (2, 1, 0.25), (5, 6, 1.0)],
        "item_idx int, neighbour_idx int, weight float",
    )
    # 100: scores 1 -> 0.5, 2 -> 0.75, 3 -> 1.5, 4 -> 0.25 before exclusions; 101 holds only unknown
    # items; 102's only candidate is excluded; 103 holds item 1 alone.
    x = spark.createDataFrame(
        [(100, 1, 1.0), (100, 2, 2.0), (101, 9, 1.0), (102, 5, 1.0), (103, 1, 1.0)],
        "user_idx int, item_idx int, x double",
    )
    exclude = spark.createDataFrame([(100, 2), (100, 3), (102, 6), (103, 4)], "user_idx int, item_idx int")
    out = ease.ease_candidates(x, neighbours, exclude, k=2)
    assert out.schema.simpleString() == "struct<user_idx:int,item_idx:int,ease_score:double>"
    got = sorted((r.user_idx, -r.ease_score, r.item_idx) for r in out.collect())
    assert got == [(100, -0.5, 1), (100, -0.25, 4), (103, -0.75, 2), (103, -0.5, 3)]


def test_spark_fit_equals_in_process(spark: SparkSession, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    dense = (rng.random((25, 8)) < 0.4).astype(np.float64)
    dense[:, 2] = dense[:, 1]  # items 21 and 22 always co-occur
    ids = np.arange(20, 28)
    rows = [(int(u), int(ids[i]), 1.0) for u, i in zip(*np.nonzero(dense), strict=True)]
    x = spark.createDataFrame(rows, "user_idx int, item_idx int, x double")
    with caplog.at_level(logging.INFO, logger="shelf.ease"):
        model = ease.fit(x, lam=3.0, max_items=8, top_n=3, precision="float64")
    assert model is not None and model.items == 8 and "8 items" in caplog.text
    expected = prune_top_n(fit_ease(dense.T @ dense, 3.0), ids, 3)
    np.testing.assert_array_equal(model.src, expected[0])
    np.testing.assert_array_equal(model.dst, expected[1])
    np.testing.assert_allclose(model.weight, expected[2], rtol=1e-6)
    assert model.dst[model.src == 21][0] == 22
    frame = ease.to_neighbour_frame(spark, model, "r1")
    assert frame.schema.simpleString() == ("struct<item_idx:int,neighbour_idx:int,weight:float,rank:int,run_id:string>")
    exclude = x.select("user_idx", "item_idx")
    got = sorted(tuple(r) for r in ease.ease_candidates(x, frame, exclude, k=2).collect())
    users = [[(int(ids[i]), 1.0) for i in np.nonzero(row)[0]] for row in dense]
    nbs: dict[int, list[tuple[int, float]]] = {}
    for s, d, w in zip(*expected[:3], strict=True):
        nbs.setdefault(int(s), []).append((int(d), float(w)))
    ref = top_n_sparse_reference(users, nbs, 2, [{i for i, _ in u} for u in users])
    want = sorted((u, i, pytest.approx(s, rel=1e-6)) for u, pairs in enumerate(ref) for s, i in pairs)
    assert got == want and len(got) > 0
    assert ease.fit(x, lam=3.0, max_items=7, top_n=3, precision="float32") is None
    with caplog.at_level(logging.INFO, logger="shelf.ease"):
        single = ease.fit(x, lam=3.0, max_items=8, top_n=3, precision="float32")  # train.ease.precision's default
    assert single is not None and "float32 inverse" in caplog.text and single.dense_bytes * 2 == model.dense_bytes
    np.testing.assert_array_equal(single.src, model.src)
    np.testing.assert_array_equal(single.dst, model.dst)
    np.testing.assert_allclose(single.weight, model.weight, rtol=1e-4)


def test_to_long_flattens_sparse_result() -> None:
    ids = np.array([1, 2], dtype=np.int64)
    indptr, cols, weights = ease_csr([1], [2], [0.5], ids)
    result = top_n_sparse([0, 1, 1], [1], [2.0], indptr, cols, weights, ids, 3)
    keys, items, scores, ranks = to_long(np.array([7, 8]), result)
    assert keys.tolist() == [7] and items.tolist() == [2] and scores.tolist() == [1.0] and ranks.tolist() == [1]


def test_the_drivers_cholesky_inverse_gives_the_same_b_as_numpys_general_inverse() -> None:
    from pipelines.core.ease import spd_inverse

    rng = np.random.default_rng(3)
    x = (rng.random((120, 40)) < 0.2).astype(np.float64)
    gram = x.T @ x
    np.testing.assert_allclose(spd_inverse(gram + 7.0 * np.eye(40)), np.linalg.inv(gram + 7.0 * np.eye(40)), rtol=1e-10)
    np.testing.assert_allclose(fit_ease(gram, 7.0, inverse=spd_inverse), fit_ease(gram, 7.0), rtol=1e-5, atol=1e-7)
    with pytest.raises(np.linalg.LinAlgError, match="positive definite"):
        spd_inverse(-np.eye(3))


def test_a_float32_inverse_ranks_every_users_top_10_as_float64_does() -> None:
    """train.ease.precision float32: half the driver's time and memory. On skewed binary data (popular items, so the
    Gram matrix spans orders of magnitude) B agrees to float32's precision and the users' top 10 are the same."""
    from pipelines.core.ease import spd_inverse

    rng = np.random.default_rng(11)
    popularity = 1.0 / np.arange(1, 301) ** 0.8
    x = (rng.random((2000, 300)) < 0.05 * popularity / popularity.mean()).astype(np.float64)
    gram = x.T @ x
    inverse32 = spd_inverse((gram + 50.0 * np.eye(300)).astype(np.float32))
    assert inverse32.dtype == np.float32
    np.testing.assert_allclose(inverse32, np.linalg.inv(gram + 50.0 * np.eye(300)), rtol=1e-3, atol=1e-7)
    b64 = fit_ease(gram, 50.0, inverse=spd_inverse)
    b32 = fit_ease(gram, 50.0, inverse=spd_inverse, dtype=np.float32)
    assert b32.dtype == np.float32
    np.testing.assert_allclose(b32, b64, atol=1e-5 * np.abs(b64).max())
    scores64, scores32 = x @ b64, x @ b32
    scores64[x > 0] = scores32[x > 0] = -np.inf
    top64 = np.argsort(-scores64, axis=1, kind="stable")[:, :10]
    top32 = np.argsort(-scores32, axis=1, kind="stable")[:, :10]
    assert (top64 == top32).all(axis=1).mean() >= 0.99
