"""udfs/topk.py against a brute-force full sort; no Spark.

Factors are small integers, so every float32 dot product is exact whatever the GEMM blocking, and
ties are frequent: the kernel must match the brute force id for id, not only score for score.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udfs.topk import csr_from_lists, normalise_rows, to_long, top_n_dot


def brute_force(
    queries: np.ndarray,
    items: np.ndarray,
    item_ids: np.ndarray,
    n: int,
    query_ids: np.ndarray | None,
    excluded: list[set[int]],
) -> list[list[tuple[float, int]]]:
    """Every row's (score, id) pairs fully sorted by score desc then id asc, first n kept."""
    rows = []
    for r, q in enumerate(queries):
        pairs = []
        for item, vec in zip(item_ids.tolist(), items, strict=True):
            if query_ids is not None and item == int(query_ids[r]):
                continue
            if item in excluded[r]:
                continue
            pairs.append((float(np.dot(q.astype(np.float64), vec.astype(np.float64))), item))
        pairs.sort(key=lambda p: (-p[0], p[1]))
        rows.append(pairs[:n])
    return rows


def assert_matches(result, expected: list[list[tuple[float, int]]]) -> None:
    for r, want in enumerate(expected):
        count = int(result.counts[r])
        got = list(
            zip(
                result.scores[r, :count].astype(np.float64).tolist(),
                result.ids[r, :count].tolist(),
                strict=True,
            )
        )
        assert got == want, f"row {r}"
        assert np.all(result.ids[r, count:] == -1)
        assert np.all(np.isneginf(result.scores[r, count:]))


@st.composite
def problems(draw: st.DrawFn) -> dict:
    m = draw(st.integers(0, 12))
    n_items = draw(st.integers(0, 40))
    d = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    queries = rng.integers(-2, 3, size=(m, d)).astype(np.float32)
    items = rng.integers(-2, 3, size=(n_items, d)).astype(np.float32)
    item_ids = rng.permutation(np.arange(n_items) * 3 + 7).astype(np.int64)  # sparse, unsorted ids
    pool = np.concatenate([item_ids, [-5, 1000]])  # includes ids outside the catalogue
    excluded = [set(rng.choice(pool, size=rng.integers(0, 6), replace=True).tolist()) for _ in range(m)]
    use_self = draw(st.booleans()) and n_items > 0
    query_ids = rng.choice(item_ids, size=m) if use_self else None
    return {
        "queries": queries,
        "items": items,
        "item_ids": item_ids,
        "n": draw(st.integers(1, 50)),  # often larger than the catalogue
        "query_ids": query_ids,
        "excluded": excluded,
        "block_rows": draw(st.integers(1, 8)),
        "block_items": draw(st.integers(1, 16)),
        "use_exclusions": draw(st.booleans()),
    }


@settings(max_examples=300, deadline=None)
@given(problems())
def test_blocked_top_n_equals_full_sort(p: dict) -> None:
    excluded = p["excluded"] if p["use_exclusions"] else [set() for _ in range(len(p["queries"]))]
    indptr, indices = csr_from_lists([sorted(e) for e in excluded]) if p["use_exclusions"] else (None, None)
    result = top_n_dot(
        p["queries"],
        p["items"],
        p["n"],
        p["item_ids"],
        query_ids=p["query_ids"],
        exclude_self=p["query_ids"] is not None,
        exclude_indptr=indptr,
        exclude_indices=indices,
        block_rows=p["block_rows"],
        block_items=p["block_items"],
    )
    expected = brute_force(p["queries"], p["items"], p["item_ids"], p["n"], p["query_ids"], excluded)
    assert result.ids.shape == (len(p["queries"]), min(p["n"], len(p["items"])))
    assert_matches(result, expected)


def test_many_blocks_with_ties_and_exclusions_equal_full_sort() -> None:
    # Hundreds of catalogue blocks: thresholds rise, candidates wait and merge many times, and the
    # few distinct score values make ties at every cut.
    rng = np.random.default_rng(5)
    queries = rng.integers(-2, 3, size=(37, 3)).astype(np.float32)
    items = rng.integers(-2, 3, size=(900, 3)).astype(np.float32)
    item_ids = rng.permutation(900).astype(np.int64) * 5
    excluded = [set(rng.choice(item_ids, size=40, replace=False).tolist()) for _ in range(37)]
    indptr, indices = csr_from_lists([sorted(e) for e in excluded])
    for n in (1, 17, 120):
        result = top_n_dot(
            queries, items, n, item_ids, exclude_indptr=indptr, exclude_indices=indices, block_rows=8, block_items=3
        )
        assert_matches(result, brute_force(queries, items, item_ids, n, None, excluded))


def test_ties_go_to_the_lower_id_across_blocks() -> None:
    items = np.ones((10, 2), dtype=np.float32)
    ids = np.array([9, 3, 8, 1, 7, 0, 6, 2, 5, 4])
    result = top_n_dot(np.ones((1, 2)), items, 4, ids, block_items=3)
    assert result.ids.tolist() == [[0, 1, 2, 3]]
    assert result.counts.tolist() == [4]


def test_n_larger_than_catalogue_with_exclusions_pads() -> None:
    items = np.eye(3, dtype=np.float32)
    indptr, indices = csr_from_lists([[1], None])
    result = top_n_dot(np.array([[1, 2, 3], [3, 2, 1]]), items, 10, exclude_indptr=indptr, exclude_indices=indices)
    assert result.ids.tolist() == [[2, 0, -1], [0, 1, 2]]
    assert result.counts.tolist() == [2, 3]
    keys, got_ids, scores, ranks = to_long([100, 200], result)
    assert keys.tolist() == [100, 100, 200, 200, 200]
    assert got_ids.tolist() == [2, 0, 0, 1, 2]
    assert scores.tolist() == [3.0, 1.0, 3.0, 2.0, 1.0]
    assert ranks.tolist() == [1, 2, 1, 2, 3]


def test_self_exclusion_on_cosine_neighbours() -> None:
    rng = np.random.default_rng(0)
    factors = normalise_rows(rng.normal(size=(50, 8)))
    ids = np.arange(50)
    result = top_n_dot(factors, factors, 5, ids, query_ids=ids, exclude_self=True, block_rows=7, block_items=9)
    assert not np.any(result.ids == ids[:, None])
    assert np.all(result.scores <= 1.0 + 1e-6)
    full = factors @ factors.T
    np.fill_diagonal(full, -np.inf)
    assert result.ids[:, 0].tolist() == np.argmax(full, axis=1).tolist()


def test_normalise_keeps_zero_rows() -> None:
    out = normalise_rows([[3.0, 4.0], [0.0, 0.0]])
    assert out.tolist() == [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]


def test_duplicate_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="distinct"):
        top_n_dot(np.ones((1, 2)), np.ones((2, 2)), 1, [4, 4])
