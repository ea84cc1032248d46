"""udfs/mmr.py without Spark: the batched MMR equals the per-user reference `mmr_select` bit for bit."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipelines.core.kernel_frames import CAND_ITEMS, kernel_chunks
from udfs.features import FEATURES, features
from udfs.mmr import CHUNK_BYTES, MmrPicks, mmr_batch, mmr_select
from udfs.rerank import ItemTable, RerankParams, UserBatch, rerank
from udfs.topk import normalise_rows

SIMPLE = st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0])  # values that tie exactly
LAMBDAS = st.sampled_from([0.0, 0.5, 0.7, 1.0]) | st.floats(0.0, 1.0)


def unit_rows(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Rows scaled to unit norm in float64 (zero rows stay zero), like the kernel's factors."""
    arr = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    out: npt.NDArray[np.float64] = np.divide(arr, norms, out=np.zeros_like(arr), where=norms > 0)
    return out


@st.composite
def pools(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(relevance, factor rows, unit palette, indptr): pools of different lengths (0 included) whose
    factors come from a small palette (duplicate rows, zero rows) and relevance with repeated values."""
    lengths = draw(st.lists(st.integers(0, 12), max_size=8))
    n = sum(lengths)
    d = draw(st.integers(1, 5))
    palette_size = draw(st.integers(1, 6))
    palette = draw(arrays(np.float64, (palette_size, d), elements=SIMPLE | st.floats(-2.0, 2.0)))
    rows = draw(arrays(np.int64, n, elements=st.integers(0, palette_size - 1)))
    relevance = draw(arrays(np.float64, n, elements=SIMPLE | st.floats(-3.0, 3.0)))
    return relevance, rows, unit_rows(palette), np.r_[0, np.cumsum(lengths)].astype(np.int64)


def assert_matches_reference(
    picked: MmrPicks, relevance: np.ndarray, rows: np.ndarray, unit: np.ndarray, indptr: np.ndarray, k: int, lam: float
) -> None:
    lengths = np.diff(indptr)
    np.testing.assert_array_equal(picked.indptr, np.r_[0, np.cumsum(np.minimum(lengths, k))])
    for r in range(lengths.size):
        seg = slice(indptr[r], indptr[r + 1])
        picks, values = mmr_select(relevance[seg], unit[rows[seg]], k, lam)
        got = slice(picked.indptr[r], picked.indptr[r + 1])
        np.testing.assert_array_equal(picked.positions[got] - indptr[r], picks)
        assert picked.values[got].tobytes() == values.tobytes()  # bit-identical, not merely close


@settings(max_examples=300, deadline=None)
@given(
    case=pools(),
    k=st.integers(0, 14),
    lam=LAMBDAS,
    chunk_bytes=st.integers(1, 4096) | st.just(CHUNK_BYTES),
)
def test_batched_mmr_equals_the_per_user_reference(
    case: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], k: int, lam: float, chunk_bytes: int
) -> None:
    relevance, rows, unit, indptr = case
    picked = mmr_batch(relevance, rows, unit, indptr, k, lam, chunk_bytes=chunk_bytes)
    assert_matches_reference(picked, relevance, rows, unit, indptr, k, lam)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lam=LAMBDAS)
def test_batched_mmr_equals_the_reference_at_the_real_shape(seed: int, lam: float) -> None:
    """Pools of 50 in rank-32 factors (the default config's shape), in several chunks."""
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(40) < 0.7, 50, rng.integers(0, 50, 40))
    indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    unit = unit_rows(rng.normal(size=(300, 32)))
    rows = rng.integers(0, 300, int(indptr[-1]))
    relevance = np.round(rng.normal(size=rows.size), 2)  # rounded: many exact ties
    picked = mmr_batch(relevance, rows, unit, indptr, 10, lam, chunk_bytes=200_000)
    assert_matches_reference(picked, relevance, rows, unit, indptr, 10, lam)


def test_batched_mmr_by_hand() -> None:
    """User 0: a duplicate of the best item loses to a less relevant orthogonal one; user 1: a tie goes to
    the lower position; user 2: an empty pool; user 3: a pool shorter than k."""
    unit = np.array([[1.0, 0.0], [0.0, 1.0]])
    relevance = np.array([1.0, 0.9, 0.5, 0.3, 0.3, 0.2])
    rows = np.array([0, 0, 1, 1, 0, 0])
    picked = mmr_batch(relevance, rows, unit, np.array([0, 3, 5, 5, 6]), 3, 0.5)
    np.testing.assert_array_equal(picked.indptr, [0, 3, 5, 5, 6])
    np.testing.assert_array_equal(picked.positions, [0, 2, 1, 3, 4, 5])
    np.testing.assert_allclose(picked.values, [0.5, 0.25, -0.05, 0.15, 0.15, 0.1], atol=1e-12)
    by_relevance = mmr_batch(relevance, rows, unit, np.array([0, 3, 5, 5, 6]), 2, 1.0)
    np.testing.assert_array_equal(by_relevance.positions, [0, 1, 3, 4, 5])
    np.testing.assert_array_equal(by_relevance.values, [1.0, 0.9, 0.3, 0.3, 0.2])


def tie_case(seed: int) -> tuple[ItemTable, UserBatch]:
    """Items whose factors come from 3 rows (so features and relevance tie), 3 categories, some out of
    stock; users with 0-25 candidates and a few fresh or bought events."""
    rng = np.random.default_rng(seed)
    n, d, m = 40, 3, 8
    ids = rng.permutation(n) * 2 + 1
    items = ItemTable.plain(
        ids,
        rng.normal(size=(3, d))[rng.integers(0, 3, n)],
        popularity=rng.choice([0.0, 0.5], n),
        promo=rng.random(n) < 0.2,
        in_stock=rng.random(n) < 0.9,
        category=rng.integers(-1, 3, n),
    )
    cands = [rng.choice(ids, rng.integers(0, 26), replace=False) for _ in range(m)]
    events = [rng.choice(ids, rng.integers(0, 4)) for _ in range(m)]
    n_ev = sum(e.size for e in events)
    return items, UserBatch(
        rng.normal(size=(m, d)).astype(np.float32),
        rng.random(m) < 0.8,
        np.r_[0, np.cumsum([c.size for c in cands])].astype(np.int64),
        np.concatenate(cands).astype(np.int64),
        rng.random(sum(c.size for c in cands)) < 0.5,
        np.r_[0, np.cumsum([e.size for e in events])].astype(np.int64),
        np.concatenate(events).astype(np.int64),
        np.ones(n_ev),
        rng.random(n_ev) * 10.0,
        rng.random(n_ev) < 0.3,
    )


def reference_lists(items: ItemTable, batch: UserBatch, params: RerankParams) -> list[tuple[list[int], list[float]]]:
    """Per user in plain Python: the kernel's relevance, the rules, the category cap and the pool by
    (relevance desc, item id), then `mmr_select` on the pool in id order (or the pool itself for lambda 1)."""
    feats = features(items, batch, params)
    relevance = np.asarray(sum(params.weights.get(name, 0.0) * feats[name] for name in FEATURES), dtype=np.float64)
    unit = normalise_rows(items.factors).astype(np.float64)
    pool_size = params.top_k if params.mmr_lambda >= 1.0 else max(params.mmr_pool, params.top_k)
    out = []
    for r in range(batch.cand_indptr.size - 1):
        e = slice(batch.event_indptr[r], batch.event_indptr[r + 1])
        bought = set(batch.event_items[e][batch.event_bought[e] & (batch.event_ages[e] <= params.bought_window_days)])
        ok = []
        for c in range(batch.cand_indptr[r], batch.cand_indptr[r + 1]):
            col = int(np.searchsorted(items.ids, batch.cand_items[c]))
            if items.in_stock[col] and not items.blocked[col] and batch.cand_items[c] not in bought:
                ok.append(c)
        ok.sort(key=lambda c: (-relevance[c], batch.cand_items[c]))
        seen: dict[int, int] = {}
        capped = []
        for c in ok:
            cat = int(items.category[np.searchsorted(items.ids, batch.cand_items[c])])
            seen[cat] = seen.get(cat, 0) + 1
            if cat < 0 or params.category_cap is None or seen[cat] <= params.category_cap:
                capped.append(c)
        pool = capped[:pool_size]
        if params.mmr_lambda >= 1.0:
            chosen, scores = pool[: params.top_k], [float(relevance[c]) for c in pool[: params.top_k]]
        else:
            pool.sort(key=lambda c: batch.cand_items[c])
            cols = np.searchsorted(items.ids, batch.cand_items[pool]).astype(np.int64)
            picks, values = mmr_select(relevance[pool], unit[cols], params.top_k, params.mmr_lambda)
            chosen, scores = [pool[p] for p in picks], values.tolist()
        out.append(([int(batch.cand_items[c]) for c in chosen], scores))
    return out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    params=st.builds(
        RerankParams,
        top_k=st.integers(1, 12),
        category_cap=st.one_of(st.none(), st.integers(1, 4)),
        mmr_lambda=LAMBDAS,
        mmr_pool=st.integers(1, 20),
    ),
)
def test_rerank_selection_equals_the_per_user_reference(seed: int, params: RerankParams) -> None:
    items, batch = tie_case(seed)
    out = rerank(items, batch, params)
    for r, (want_items, want_scores) in enumerate(reference_lists(items, batch, params)):
        mine = out.user_rows == r
        assert out.items[mine].tolist() == want_items
        assert out.scores[mine].tolist() == want_scores


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(0, 9) | st.none(), max_size=30), cap=st.integers(1, 12))
def test_kernel_chunks_cut_whole_users_within_the_candidate_cap(sizes: list[int | None], cap: int) -> None:
    pdf = pd.DataFrame({CAND_ITEMS: [None if s is None else list(range(s)) for s in sizes]})
    chunks = kernel_chunks(pdf, cap)
    assert [i for c in chunks for i in c.index] == list(range(len(sizes)))
    for chunk in chunks:
        total = sum(len(v) for v in chunk[CAND_ITEMS] if v is not None)
        assert total <= cap or len(chunk) == 1
    for first, second in zip(chunks, chunks[1:], strict=False):  # cut only where the next user would overflow
        used = sum(len(v) for v in first[CAND_ITEMS] if v is not None)
        nxt = second[CAND_ITEMS].iloc[0]
        assert used + (0 if nxt is None else len(nxt)) > cap
