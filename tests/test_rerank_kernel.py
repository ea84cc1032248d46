"""udfs/rerank.py and udfs/features.py without Spark: invariants over random batches (hypothesis) and hand-built cases."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from udfs.features import FEATURES, features
from udfs.mmr import mmr_select
from udfs.rerank import ItemTable, RerankParams, UserBatch, neighbour_csr, reason_lists, rerank


def make_case(seed: int, n_items: int = 30, n_users: int = 6, d: int = 4) -> tuple[ItemTable, UserBatch]:
    """Random catalogue (sparse ids, 4 categories, some out of stock / blocked / promo, neighbour lists for
    about half the items, a few naming unknown items) and users."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(n_items) * 3 + 1)
    items = ItemTable.plain(
        ids,
        rng.normal(size=(n_items, d)),
        popularity=rng.random(n_items),
        promo=rng.random(n_items) < 0.2,
        new_arrival=rng.random(n_items) < 0.2,
        in_stock=rng.random(n_items) < 0.85,
        blocked=rng.random(n_items) < 0.1,
        category=rng.integers(-1, 4, n_items),
        price=np.where(rng.random(n_items) < 0.2, np.nan, rng.lognormal(3.0, 1.0, n_items)),
        neighbours=random_neighbours(rng, ids),
    )
    cands, events = [], []
    for _ in range(n_users):
        cands.append(rng.choice(ids, rng.integers(0, n_items), replace=False))
        events.append(rng.choice(ids, rng.integers(0, 8)))
    cand_ptr = np.r_[0, np.cumsum([c.size for c in cands])].astype(np.int64)
    ev_ptr = np.r_[0, np.cumsum([e.size for e in events])].astype(np.int64)
    n_ev = int(ev_ptr[-1])
    batch = UserBatch(
        rng.normal(size=(n_users, d)).astype(np.float32),
        rng.random(n_users) < 0.8,
        cand_ptr,
        np.concatenate(cands).astype(np.int64),
        rng.random(int(cand_ptr[-1])) < 0.7,
        ev_ptr,
        np.concatenate(events).astype(np.int64),
        rng.choice([1.0, 3.0, 5.0], n_ev),
        rng.random(n_ev) * 40.0,
        rng.random(n_ev) < 0.3,
    )
    return items, batch


def random_neighbours(rng: np.random.Generator, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(items, neighbours, scores): up to 5 neighbours for about half the items; some name an unknown id."""
    with_list = ids[rng.random(ids.size) < 0.5]
    sizes = rng.integers(1, 6, with_list.size)
    src = np.repeat(with_list, sizes)
    dst = np.where(rng.random(src.size) < 0.1, 10_000, rng.choice(ids, src.size))
    return src, dst, rng.random(src.size)


def user_slice(batch: UserBatch, r: int) -> UserBatch:
    """The one-user batch of row r."""
    c0, c1 = batch.cand_indptr[r], batch.cand_indptr[r + 1]
    e0, e1 = batch.event_indptr[r], batch.event_indptr[r + 1]
    return UserBatch(
        batch.user_factors[r : r + 1],
        batch.has_factors[r : r + 1],
        np.array([0, c1 - c0]),
        batch.cand_items[c0:c1],
        batch.cand_als[c0:c1],
        np.array([0, e1 - e0]),
        batch.event_items[e0:e1],
        batch.event_weights[e0:e1],
        batch.event_ages[e0:e1],
        batch.event_bought[e0:e1],
    )


params_st = st.builds(
    RerankParams,
    top_k=st.integers(1, 12),
    category_cap=st.one_of(st.none(), st.integers(1, 4)),
    mmr_lambda=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    mmr_pool=st.integers(1, 30),
    bought_window_days=st.sampled_from([0.0, 10.0, 30.0]),
)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), params=params_st)
def test_rules_caps_order_and_size(seed: int, params: RerankParams) -> None:
    items, batch = make_case(seed)
    out = rerank(items, batch, params)
    col = np.searchsorted(items.ids, out.items)
    assert items.in_stock[col].all() and not items.blocked[col].any()
    m = batch.cand_indptr.size - 1
    for r in range(m):
        mine = out.user_rows == r
        got = out.items[mine]
        cands = batch.cand_items[batch.cand_indptr[r] : batch.cand_indptr[r + 1]]
        assert set(got) <= set(cands) and len(set(got)) == got.size <= params.top_k
        e = slice(batch.event_indptr[r], batch.event_indptr[r + 1])
        recent_buys = batch.event_bought[e] & (batch.event_ages[e] <= params.bought_window_days)
        assert not set(got) & set(batch.event_items[e][recent_buys])
        assert out.ranks[mine].tolist() == list(range(1, got.size + 1))
        scores = out.scores[mine]
        assert np.all(np.diff(scores) <= 1e-12)
        ties = np.flatnonzero(np.diff(scores) == 0)
        assert np.all(got[ties] < got[ties + 1])  # equal scores: lower item id first
        if params.category_cap is not None:
            cats = items.category[np.searchsorted(items.ids, got)]
            counts = np.bincount(cats[cats >= 0], minlength=4)
            assert counts.max(initial=0) <= params.category_cap
    assert np.all(np.diff(out.user_rows) >= 0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), params=params_st)
def test_deterministic_and_independent_of_batching(seed: int, params: RerankParams) -> None:
    items, batch = make_case(seed)
    whole = rerank(items, batch, params)
    again = rerank(items, batch, params)
    for a, b in zip(whole, again, strict=True):
        np.testing.assert_array_equal(a, b)
    for r in range(batch.cand_indptr.size - 1):
        alone = rerank(items, user_slice(batch, r), params)
        mine = whole.user_rows == r
        np.testing.assert_array_equal(alone.items, whole.items[mine])
        np.testing.assert_array_equal(alone.scores, whole.scores[mine])
        np.testing.assert_array_equal(alone.flags, whole.flags[mine])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), top_k=st.integers(1, 12))
def test_lambda_one_is_the_pure_relevance_order(seed: int, top_k: int) -> None:
    items, batch = make_case(seed)
    params = RerankParams(top_k=top_k, mmr_lambda=1.0, category_cap=None)
    out = rerank(items, batch, params)
    feats = features(items, batch, params)
    relevance = sum(params.weights[f] * feats[f] for f in FEATURES)
    for r in range(batch.cand_indptr.size - 1):
        c = slice(batch.cand_indptr[r], batch.cand_indptr[r + 1])
        mine = out.user_rows == r
        got = out.items[mine]
        by_item = dict(zip(batch.cand_items[c].tolist(), np.asarray(relevance)[c].tolist(), strict=True))
        np.testing.assert_allclose(out.scores[mine], [by_item[i] for i in got])  # score = relevance
        expected = sorted(got.tolist(), key=lambda i: (-by_item[i], i))
        assert got.tolist() == expected
        # Nothing eligible that was left out beats the last pick.
        e = slice(batch.event_indptr[r], batch.event_indptr[r + 1])
        bought = set(batch.event_items[e][batch.event_bought[e] & (batch.event_ages[e] <= 30.0)].tolist())
        eligible = [
            i
            for i in by_item
            if (k := np.searchsorted(items.ids, i)) < items.ids.size
            and items.in_stock[k]
            and not items.blocked[k]
            and i not in bought
        ]
        assert got.size == min(top_k, len(eligible))
        if got.size:
            worst = (-by_item[int(got[-1])], int(got[-1]))
            assert all((-by_item[i], i) >= worst for i in eligible if i not in set(got.tolist()))


def test_mmr_with_lambda_one_equals_relevance_sort_and_diversifies_below_one() -> None:
    relevance = np.array([1.0, 0.99, 0.5, 0.99])
    unit = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    picks, values = mmr_select(relevance, unit, 3, 1.0)
    assert picks.tolist() == [0, 1, 3] and values.tolist() == [1.0, 0.99, 0.99]
    picks, values = mmr_select(relevance, unit, 3, 0.5)
    # Item 1 duplicates item 0: the orthogonal item 2 comes before it.
    assert picks.tolist()[:2] == [0, 2] and np.all(np.diff(values) <= 0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), target=st.integers(0, 3), n_events=st.integers(1, 6))
def test_fresh_events_in_one_category_raise_that_category(seed: int, target: int, n_events: int) -> None:
    rng = np.random.default_rng(seed)
    n, n_cat, top_k = 40, 4, 8
    category = np.arange(n) % n_cat
    factors = np.zeros((n, n_cat))
    factors[np.arange(n), category] = 0.5 + rng.random(n)  # categories are orthogonal directions
    items = ItemTable.plain(np.arange(n), factors, category=category, popularity=rng.random(n))
    cands = np.arange(n)
    in_target = np.flatnonzero(category == target)
    events = rng.choice(in_target, n_events)
    p_u = rng.normal(size=(1, n_cat)).astype(np.float32)

    def batch(ev: np.ndarray) -> UserBatch:
        return UserBatch(
            p_u,
            np.array([True]),
            np.array([0, n]),
            cands,
            np.ones(n, bool),
            np.array([0, ev.size]),
            ev.astype(np.int64),
            np.full(ev.size, 3.0),
            np.full(ev.size, 0.5),
            np.zeros(ev.size, bool),
        )

    params = RerankParams(top_k=top_k, mmr_lambda=1.0, category_cap=None)
    before = rerank(items, batch(np.zeros(0, np.int64)), params)
    after = rerank(items, batch(events), params)
    share_before = np.mean(category[before.items] == target)
    share_after = np.mean(category[after.items] == target)
    assert share_after >= share_before
    rel_before = _relevance(items, batch(np.zeros(0, np.int64)), params)
    rel_after = _relevance(items, batch(events), params)
    assert np.all(rel_after[in_target] > rel_before[in_target])  # every item of the category gains
    others = category != target
    np.testing.assert_allclose(rel_after[others], rel_before[others])  # the rest keep their score
    rank_before = np.argsort(np.lexsort((np.arange(n), -rel_before)))
    rank_after = np.argsort(np.lexsort((np.arange(n), -rel_after)))
    assert np.mean(rank_after[in_target]) <= np.mean(rank_before[in_target])


def _relevance(items: ItemTable, batch: UserBatch, params: RerankParams) -> np.ndarray:
    feats = features(items, batch, params)
    return np.asarray(sum(params.weights[f] * feats[f] for f in FEATURES))


def test_session_vector_reasons_and_cold_user_fold_in() -> None:
    # Items 10 and 11 point the same way, 12 is orthogonal; the user has no ALS vector, viewed 10.
    items = ItemTable.plain(
        [10, 11, 12],
        [[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]],
        promo=[False, False, True],
        popularity=[0.1, 0.2, 0.9],
    )
    batch = UserBatch(
        np.zeros((1, 2), np.float32),
        np.array([False]),
        np.array([0, 2]),
        np.array([11, 12]),
        np.array([True, False]),
        np.array([0, 1]),
        np.array([10]),
        np.array([1.0]),
        np.array([0.0]),
        np.array([False]),
    )
    params = RerankParams(top_k=2, mmr_lambda=1.0, alpha=1.0, weights={"session": 1.0})
    out = rerank(items, batch, params)
    assert out.items.tolist() == [11, 12]
    # p_u = q_10 / |q_10|^2 = (1, 0) folded in, s_u = p_u + 1.0 * q_10 = (2, 0): s.q_11 = 2, s.q_12 = 0
    np.testing.assert_allclose(out.scores, [2.0, 0.0])
    assert reason_lists(out) == [["similar_to:10"], ["promo", "trending"]]  # no ALS vector: no "als"


def test_cold_user_fold_in_is_the_pull_weighted_mean_of_q_over_its_squared_norm() -> None:
    # Cold user 0 viewed 10 (q = (2, 0), pull 1) and bought 12 (q = (0, 1), pull 3, an hour old, half-life 1 day);
    # item 13 has no factors (says nothing); warm user 1 keeps its ALS vector; cold user 2 has no fresh event.
    items = ItemTable.plain([10, 11, 12, 13], [[2.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    age = 1 / 24
    batch = UserBatch(
        np.array([[9.0, 9.0], [0.5, -0.5], [9.0, 9.0]], np.float32),
        np.array([False, True, False]),
        np.array([0, 1, 2, 3]),
        np.array([11, 11, 11]),
        np.array([True, True, True]),
        np.array([0, 3, 3, 3]),
        np.array([10, 12, 13]),
        np.array([1.0, 3.0, 5.0]),
        np.array([0.0, age, 0.0]),
        np.array([False, False, False]),
    )
    params = RerankParams(top_k=1, mmr_lambda=1.0, alpha=0.0, half_life_days=1.0, weights={"als": 1.0})
    pull_12 = 3.0 * 2 ** (-age)
    fold = (1.0 * np.array([2.0, 0.0]) / 4.0 + pull_12 * np.array([0.0, 1.0]) / 1.0) / (1.0 + pull_12)
    feats = features(items, batch, params)
    np.testing.assert_allclose(feats["als"], [fold @ [1.0, 1.0], 0.0, 0.0])  # warm: (0.5, -0.5) . (1, 1) = 0
    np.testing.assert_allclose(feats["session"], feats["als"])  # alpha 0: s_u = p_u, folded in or not
    single = replace(params, weights={"als": 1.0})
    one = UserBatch(
        np.zeros((1, 2), np.float32),
        np.array([False]),
        np.array([0, 1]),
        np.array([10]),
        np.array([True]),
        np.array([0, 1]),
        np.array([10]),
        np.array([5.0]),
        np.array([3.0]),
        np.array([False]),
    )
    np.testing.assert_allclose(features(items, one, single)["als"], [1.0])  # p_u . q_j = 1 for its only item j


def test_half_life_halves_an_events_pull() -> None:
    items = ItemTable.plain([0, 1], [[1.0, 0.0], [0.0, 1.0]])
    base = dict(  # a warm user with p_u = 0, so the session term is the event's pull alone (no fold-in)
        user_factors=np.zeros((1, 2), np.float32),
        has_factors=np.array([True]),
        cand_indptr=np.array([0, 1]),
        cand_items=np.array([0]),
        cand_als=np.array([False]),
        event_indptr=np.array([0, 1]),
        event_items=np.array([0]),
        event_weights=np.array([2.0]),
        event_bought=np.array([False]),
    )
    params = RerankParams(top_k=1, mmr_lambda=1.0, alpha=1.0, half_life_days=2.0, weights={"session": 1.0})
    fresh = rerank(items, UserBatch(**base, event_ages=np.array([0.0])), params)
    older = rerank(items, UserBatch(**base, event_ages=np.array([2.0])), params)
    stale = rerank(items, UserBatch(**base, event_ages=np.array([30.0])), replace(params, fresh_days=7.0))
    np.testing.assert_allclose([fresh.scores[0], older.scores[0], stale.scores[0]], [2.0, 1.0, 0.0])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), half_life=st.sampled_from([0.5, 2.0, 10.0]))
def test_price_fit_matches_its_definition_per_user(seed: int, half_life: float) -> None:
    items, batch = make_case(seed)
    params = RerankParams(half_life_days=half_life, fresh_days=20.0)
    fit = features(items, batch, params)["price_fit"]
    assert np.all((fit >= 0) & (fit <= 1))
    price = dict(zip(items.ids.tolist(), items.price.tolist(), strict=True))
    for r in range(batch.cand_indptr.size - 1):
        e = slice(batch.event_indptr[r], batch.event_indptr[r + 1])
        num = den = 0.0
        for item, w, age in zip(batch.event_items[e], batch.event_weights[e], batch.event_ages[e], strict=True):
            p = price.get(int(item), np.nan)
            if age <= params.fresh_days and np.isfinite(p) and p > 0:
                pull = w * 2.0 ** (-age / half_life)
                num, den = num + pull * np.log(p), den + pull
        for c in range(batch.cand_indptr[r], batch.cand_indptr[r + 1]):
            p = price.get(int(batch.cand_items[c]), np.nan)
            want = np.exp(-abs(np.log(p) - num / den)) if den > 0 and np.isfinite(p) else 0.0
            np.testing.assert_allclose(fit[c], want, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    prices=st.lists(st.floats(1.0, 1000.0), min_size=3, max_size=12, unique=True),
    viewed=st.floats(1.0, 1000.0),
)
def test_price_fit_alone_ranks_by_closeness_in_log_price(prices: list[float], viewed: float) -> None:
    # Item 0 is the viewed one (not a candidate); candidates 1..n differ only in price.
    n = len(prices)
    items = ItemTable.plain(np.arange(n + 1), np.ones((n + 1, 2)), price=[viewed, *prices])
    batch = UserBatch(
        np.zeros((1, 2), np.float32),
        np.array([False]),
        np.array([0, n]),
        np.arange(1, n + 1),
        np.zeros(n, bool),
        np.array([0, 1]),
        np.array([0]),
        np.array([1.0]),
        np.array([0.5]),
        np.array([False]),
    )
    params = RerankParams(top_k=n, mmr_lambda=1.0, category_cap=None, weights={"price_fit": 1.0})
    out = rerank(items, batch, params)
    gaps = np.abs(np.log(np.asarray(prices)) - np.log(viewed))
    assert sorted(out.items.tolist()) == list(range(1, n + 1))
    assert np.all(np.diff(gaps[out.items - 1]) >= -1e-12)  # closest log price first (ties: rounding)
    np.testing.assert_allclose(out.scores, np.exp(-np.sort(gaps)))
    unknown = ItemTable.plain(np.arange(n + 1), np.ones((n + 1, 2)), price=[np.nan, *prices])
    np.testing.assert_array_equal(rerank(unknown, batch, params).scores, np.zeros(n))  # no reference price


def _cooc_world() -> tuple[ItemTable, UserBatch]:
    """Items 1..5 with orthogonal factors. Neighbour lists: 1 -> {2: 0.5, 3: 0.2}, 2 -> {1: 0.5}; 3, 4 and 5
    have none. User 0 viewed 1 now and carted it 2 days ago (pull 1 + 3 / 2 = 2.5) and viewed 4 (no list);
    user 1 only viewed 4; user 2 has no fresh event; user 3 viewed 2 (whose list holds 1 but not 3)."""
    items = ItemTable.plain(np.arange(1, 6), np.eye(5), neighbours=([1, 1, 2], [2, 3, 1], [0.5, 0.2, 0.5]))
    cands = [[2, 3, 5], [2, 3, 5], [2, 3, 5], [1, 3]]
    events = [([1, 1, 4], [1.0, 3.0, 1.0], [0.0, 2.0, 0.0]), ([4], [1.0], [0.0]), ([], [], []), ([2], [1.0], [0.0])]
    batch = UserBatch(
        np.zeros((4, 5), np.float32),
        np.zeros(4, bool),
        np.r_[0, np.cumsum([len(c) for c in cands])],
        np.concatenate(cands).astype(np.int64),
        np.zeros(sum(len(c) for c in cands), bool),
        np.r_[0, np.cumsum([len(e[0]) for e in events])],
        np.concatenate([e[0] for e in events]).astype(np.int64),
        np.concatenate([e[1] for e in events]),
        np.concatenate([e[2] for e in events]),
        np.zeros(sum(len(e[0]) for e in events), bool),
    )
    return items, batch


def test_cooccurrence_features_by_hand() -> None:
    items, batch = _cooc_world()
    params = RerankParams(half_life_days=2.0, cooc_threshold=0.1)
    feats = features(items, batch, params)
    # Candidates in batch order: user 0: 2, 3, 5; user 1: 2, 3, 5; user 2: 2, 3, 5; user 3: 1, 3.
    np.testing.assert_allclose(feats["cooc_sum"], [2.5 * 0.5, 2.5 * 0.2, 0, 0, 0, 0, 0, 0, 0, 0.5, 0])
    np.testing.assert_allclose(feats["cooc_max"], [0.5, 0.2, 0, 0, 0, 0, 0, 0, 0, 0.5, 0])
    # Reasons come from the co-occurrence list (the factors are orthogonal: no cosine reason).
    assert feats["_similar_to"].tolist() == [1, 1, -1, -1, -1, -1, -1, -1, -1, 2, -1]
    stricter = features(items, batch, replace(params, cooc_threshold=0.3))["_similar_to"]
    assert stricter.tolist() == [1, -1, -1, -1, -1, -1, -1, -1, -1, 2, -1]


def test_cooccurrence_weight_orders_the_list_and_earns_the_reason() -> None:
    items, batch = _cooc_world()
    params = RerankParams(top_k=3, mmr_lambda=1.0, category_cap=None, weights={"cooc_sum": 1.0, "cooc_max": 1.0})
    out = rerank(items, batch, params)
    mine = out.user_rows == 0
    assert out.items[mine].tolist() == [2, 3, 5]  # 5 has no co-occurrence neighbour: last, score 0
    np.testing.assert_allclose(out.scores[mine], [1.25 + 0.5, 0.5 + 0.2, 0.0])
    user0 = [r for r, row in zip(reason_lists(out), out.user_rows, strict=True) if row == 0]
    assert user0 == [["similar_to:1"], ["similar_to:1"], []]
    for r in (1, 2):  # fresh item without a list, or no fresh item: every score is 0, id order
        assert out.items[out.user_rows == r].tolist() == [2, 3, 5]
        np.testing.assert_array_equal(out.scores[out.user_rows == r], [0.0, 0.0, 0.0])
    # Lists are directed: 2's list holds 1 but not 3, although 1's list holds 3.
    assert out.items[out.user_rows == 3].tolist() == [1, 3]
    np.testing.assert_allclose(out.scores[out.user_rows == 3], [1.0, 0.0])


def test_without_neighbour_lists_the_cooccurrence_features_are_zero() -> None:
    items, batch = _cooc_world()
    bare = ItemTable.plain(items.ids, items.factors)
    feats = features(bare, batch, RerankParams())
    assert not feats["cooc_sum"].any() and not feats["cooc_max"].any()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), half_life=st.sampled_from([0.5, 2.0, 10.0]))
def test_cooccurrence_matches_its_definition_per_user(seed: int, half_life: float) -> None:
    items, batch = make_case(seed)
    rng = np.random.default_rng(seed)
    src, dst, score = random_neighbours(rng, items.ids)
    indptr, cols, scores = neighbour_csr(items.ids, src, dst, score)
    items = replace(items, nb_indptr=indptr, nb_cols=cols, nb_scores=scores)
    sim: dict[tuple[int, int], float] = {}
    for i, j, s in zip(src.tolist(), dst.tolist(), score.tolist(), strict=True):
        if i != j and j in set(items.ids.tolist()):
            sim[(i, j)] = max(s, sim.get((i, j), 0.0))
    params = RerankParams(half_life_days=half_life, fresh_days=20.0)
    feats = features(items, batch, params)
    for r in range(batch.cand_indptr.size - 1):
        e = slice(batch.event_indptr[r], batch.event_indptr[r + 1])
        pull: dict[int, float] = {}
        for item, w, age in zip(batch.event_items[e], batch.event_weights[e], batch.event_ages[e], strict=True):
            if age <= params.fresh_days:
                pull[int(item)] = pull.get(int(item), 0.0) + w * 2.0 ** (-age / half_life)
        for c in range(batch.cand_indptr[r], batch.cand_indptr[r + 1]):
            cand = int(batch.cand_items[c])
            sims = {j: sim.get((j, cand), 0.0) for j in pull if j != cand}
            want_sum = sum(pull[j] * s for j, s in sims.items())
            np.testing.assert_allclose(feats["cooc_sum"][c], want_sum, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(feats["cooc_max"][c], max(sims.values(), default=0.0))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), threshold=st.sampled_from([-1.0, 0.0, 0.5]))
def test_cosine_features_match_their_definition_per_user(seed: int, threshold: float) -> None:
    """max / mean cosine of each candidate to its user's distinct fresh items other than itself, and the
    `similar_to` item by cosine (the highest, ties to the lower id), pair by pair in plain Python."""
    items, batch = make_case(seed)
    params = RerankParams(fresh_days=20.0, similar_threshold=threshold, cooc_threshold=2.0)  # no cooc reason
    feats = features(items, batch, params)
    unit = dict(zip(items.ids.tolist(), items.padded[1], strict=False))  # the kernel's unit rows (float32 norms)
    for r in range(batch.cand_indptr.size - 1):
        e = slice(batch.event_indptr[r], batch.event_indptr[r + 1])
        fresh = {int(i) for i, age in zip(batch.event_items[e], batch.event_ages[e], strict=True) if age <= 20.0}
        for c in range(batch.cand_indptr[r], batch.cand_indptr[r + 1]):
            cand = int(batch.cand_items[c])
            cos = {j: float(unit[cand] @ unit[j]) for j in sorted(fresh) if j != cand}
            best = max(cos.values(), default=None)
            np.testing.assert_allclose(feats["max_cosine"][c], 0.0 if best is None else best, atol=1e-12)
            np.testing.assert_allclose(feats["mean_cosine"][c], np.mean(list(cos.values())) if cos else 0.0, atol=1e-12)
            nearest = min((j for j, v in cos.items() if v >= best - 1e-12), default=-1) if best is not None else -1
            assert feats["_similar_to"][c] == (nearest if best is not None and best >= threshold else -1)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_a_candidate_listed_twice_gets_the_same_features_twice(seed: int) -> None:
    """Each user's first candidate repeated in place: both copies carry the features the single one had."""
    items, batch = make_case(seed)
    first = batch.cand_indptr[:-1][np.diff(batch.cand_indptr) > 0]
    at = np.sort(np.r_[np.arange(batch.cand_items.size), first])  # each first candidate twice, in place
    extra = np.cumsum(np.r_[0, np.diff(batch.cand_indptr) > 0])
    twice = batch._replace(
        cand_indptr=batch.cand_indptr + extra, cand_items=batch.cand_items[at], cand_als=batch.cand_als[at]
    )
    params = RerankParams(fresh_days=20.0, similar_threshold=0.0, cooc_threshold=0.0)
    once, again = features(items, batch, params), features(items, twice, params)
    for name in (*FEATURES, "_similar_to"):
        np.testing.assert_allclose(again[name], once[name][at], rtol=0, atol=1e-12, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_ease_feature_alone_ranks_by_the_candidates_ease_scores(seed: int) -> None:
    """With only the ease weight, each user's list is its candidates in descending cand_ease (ties: lower id),
    and without cand_ease (a batch built before EASE) the feature is 0 everywhere."""
    items, batch = make_case(seed)
    items = replace(items, in_stock=np.ones_like(items.in_stock), blocked=np.zeros_like(items.blocked))
    batch = batch._replace(event_bought=np.zeros_like(batch.event_bought))
    ease = np.random.default_rng(seed).permutation(batch.cand_items.size).astype(np.float64)
    params = RerankParams(top_k=3, mmr_lambda=1.0, category_cap=None, weights={"ease": 1.0})
    result = rerank(items, batch._replace(cand_ease=ease), params)
    for r in range(batch.cand_indptr.size - 1):
        lo, hi = batch.cand_indptr[r], batch.cand_indptr[r + 1]
        known = np.isin(batch.cand_items[lo:hi], items.ids)
        order = np.lexsort((batch.cand_items[lo:hi][known], -ease[lo:hi][known]))
        expected = batch.cand_items[lo:hi][known][order][:3]
        np.testing.assert_array_equal(result.items[result.user_rows == r], expected)
        np.testing.assert_array_equal(result.scores[result.user_rows == r], -np.sort(-ease[lo:hi][known])[:3])
    plain = rerank(items, batch, params)
    assert np.all(plain.scores == 0.0)


def test_a_buy_again_candidate_escapes_the_bought_rule_and_says_so() -> None:
    """Two candidates the user bought yesterday: only the one with a buy-again score survives the already-bought
    rule, it carries the reason buy_again, and the buy_again weight orders it."""
    items = ItemTable.plain(np.arange(3, dtype=np.int64), np.eye(3, dtype=np.float32))
    base = dict(
        user_factors=np.ones((1, 3), np.float32),
        has_factors=np.array([True]),
        cand_indptr=np.array([0, 3]),
        cand_items=np.array([0, 1, 2]),
        cand_als=np.array([False, False, True]),
        event_indptr=np.array([0, 2]),
        event_items=np.array([0, 1]),
        event_weights=np.array([5.0, 5.0]),
        event_ages=np.array([1.0, 1.0]),
        event_bought=np.array([True, True]),
    )
    params = RerankParams(top_k=3, mmr_lambda=1.0, category_cap=None, weights={"als": 1.0, "buy_again": 2.0})
    result = rerank(items, UserBatch(**base, cand_rebuy=np.array([0.0, 0.9, 0.0])), params)
    assert result.items.tolist() == [1, 2]
    assert reason_lists(result) == [["buy_again"], ["als"]]
    assert rerank(items, UserBatch(**base), params).items.tolist() == [2]
