"""udfs.diversity against the definition written out pair by pair (docs in pipelines/core/metrics.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from udfs.diversity import list_diversity


def reference(ranks: list[int], units: np.ndarray, k: int) -> float:
    inside = [i for i, r in enumerate(ranks) if r <= k]
    pairs = list(itertools.combinations(inside, 2))
    return float(np.mean([1.0 - units[a] @ units[b] for a, b in pairs])) if pairs else float("nan")


@pytest.mark.parametrize("chunk_lists", [1, 3, 4096])
def test_each_lists_mean_distance_within_each_cutoff_equals_the_pairwise_definition(chunk_lists: int) -> None:
    rng = np.random.default_rng(7)
    lists, ks = [], [1, 2, 5, 10]
    for length in [0, 1, 2, 7, 10, 3, 10]:
        ranks = rng.permutation(np.arange(1, 13))[:length]  # any order; gaps where an item had no factors
        vectors = rng.normal(size=(length, 4))
        lists.append((ranks, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)))
    lists = [entry for entry in lists if len(entry[0])]  # a list reaches the kernel with one entry at least
    indptr = np.concatenate([[0], np.cumsum([len(r) for r, _ in lists])]).astype(np.int64)
    ranks = np.concatenate([r for r, _ in lists]).astype(np.int64)
    units = np.concatenate([u for _, u in lists])
    got = list_diversity(indptr, ranks, units, ks, chunk_lists=chunk_lists)
    want = np.array([[reference(list(r), u, k) for k in ks] for r, u in lists])
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
    assert np.isnan(got[0]).all()  # a one-item list has no pair at any k
    assert not np.isnan(got[:, -1][[len(r) >= 2 and sorted(r)[1] <= 10 for r, _ in lists]]).any()
