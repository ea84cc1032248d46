"""Re-ranking kernel: a batch of users' candidates -> top-K per user with a score and reasons.

No pyspark import: runs inside `mapInPandas` on the executors and in plain unit tests. One call
handles a whole batch of users; per-user data are segments of flat arrays (CSR / indptr style:
user row r owns entries `indptr[r]:indptr[r + 1]`). Only the MMR selection loops over users, and
only when `mmr_lambda < 1`, over at most `mmr_pool` candidates and `top_k` steps each.

Shapes (n catalogue items, d factor rank, m users in the batch, C candidates, E fresh events):

ItemTable (the broadcast model, one row per catalogue item):
- `ids`         (n,)   int64   distinct item ids, ascending
- `factors`     (n, d) float32 ALS item factors q_i (zero rows for items without factors)
- `popularity`  (n,)   float64 in [0, 1] (distinct fresh users / the most popular item's)
- `promo`, `new_arrival`, `in_stock`, `blocked` (n,) bool
- `category`    (n,)   int64   category code, -1 = unknown (never capped)
- `price`       (n,)   float64 price, NaN (or <= 0) = unknown

UserBatch:
- `user_factors`  (m, d) float32 p_u, rows of users without factors are ignored
- `has_factors`   (m,)   bool
- `cand_indptr`   (m + 1,) int64, `cand_items` (C,) int64 ids, `cand_als` (C,) bool (ALS proposed it)
- `event_indptr`  (m + 1,) int64, `event_items` (E,) int64, `event_weights` (E,) float64 w(type),
  `event_ages` (E,) float64 days before as_of, `event_bought` (E,) bool (a purchase-like event)

Model, per user u with fresh events j (age <= fresh_days) and candidates c:
- session vector s_u = p_u + alpha * sum_j w_j * 2^(-age_j / half_life) * q_j (p_u = 0 without factors:
  a cold user folds in from the session items alone);
- features: als = p_u . q_c, session = s_u . q_c, max/mean cosine of q_c to the user's distinct fresh
  items other than c, popularity, promo, new_arrival, price_fit = exp(-|log price_c - ref_u|) where
  ref_u is the mean log price of u's fresh priced items weighted like the session pull (0 when the
  candidate's price is unknown or u has no fresh priced item);
- rules: drop out-of-stock, blocked-category, unknown and already-bought (age <= bought_window_days)
  items; keep each category's `category_cap` most relevant candidates;
- relevance = weights . features (promo / new-arrival weights are the boosts);
- diversity: greedy MMR over the `mmr_pool` most relevant, value = lambda * relevance -
  (1 - lambda) * max(0, cosine to the already chosen). The chosen values never increase, so the
  output is sorted by score; ties go to the lower item id. lambda = 1 is the relevance order.

Result (R rows, sorted by user row then rank): `user_rows` (R,) int64 index into the batch,
`items` (R,) int64, `ranks` (R,) int32 from 1, `scores` (R,) float64, `flags` (R, 5) bool in
REASON_FLAGS order, `similar_to` (R,) int64 (-1 = none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from udfs.topk import normalise_rows

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

ALS, PROMO, NEW_ARRIVAL, TRENDING, SIMILAR = "als", "promo", "new_arrival", "trending", "similar_to"
REASON_FLAGS = (SIMILAR, ALS, PROMO, NEW_ARRIVAL, TRENDING)  # column order of RerankResult.flags
PAIR_CHUNK = 1 << 15  # (candidate, fresh item) pairs per cosine block
FEATURES = ("als", "session", "max_cosine", "mean_cosine", "popularity", "promo", "new_arrival", "price_fit")


@dataclass(frozen=True)
class RerankParams:
    top_k: int = 10
    alpha: float = 0.5
    half_life_days: float = 2.0
    fresh_days: float = 7.0
    bought_window_days: float = 30.0
    category_cap: int | None = 3
    mmr_lambda: float = 0.7
    mmr_pool: int = 50
    trending_threshold: float = 0.5
    similar_threshold: float = 0.5
    weights: dict[str, float] = field(
        default_factory=lambda: {
            "als": 1.0,
            "session": 1.0,
            "max_cosine": 0.5,
            "mean_cosine": 0.25,
            "popularity": 0.2,
            "promo": 0.1,
            "new_arrival": 0.1,
            "price_fit": 0.1,
        }
    )


@dataclass(frozen=True)
class ItemTable:
    ids: IntArray
    factors: npt.NDArray[np.float32]
    popularity: FloatArray
    promo: BoolArray
    new_arrival: BoolArray
    in_stock: BoolArray
    blocked: BoolArray
    category: IntArray
    price: FloatArray

    @staticmethod
    def plain(ids: npt.ArrayLike, factors: npt.ArrayLike, **attrs: npt.ArrayLike) -> ItemTable:
        """An ItemTable sorted by id; missing attributes default to in stock, no promo, category -1."""
        ids_arr = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids_arr, kind="stable")
        n = ids_arr.size
        defaults: dict[str, npt.ArrayLike] = {
            "popularity": np.zeros(n),
            "promo": np.zeros(n, bool),
            "new_arrival": np.zeros(n, bool),
            "in_stock": np.ones(n, bool),
            "blocked": np.zeros(n, bool),
            "category": np.full(n, -1),
            "price": np.full(n, np.nan),
        }
        defaults.update(attrs)
        dtypes = {"popularity": np.float64, "category": np.int64, "price": np.float64}
        cols = {k: np.asarray(v, dtype=dtypes.get(k, np.bool_))[order] for k, v in defaults.items()}
        if np.any(ids_arr[order][1:] == ids_arr[order][:-1]):
            raise ValueError("item ids must be distinct")
        return ItemTable(ids_arr[order], np.asarray(factors, dtype=np.float32)[order], **cols)  # type: ignore[arg-type]


class UserBatch(NamedTuple):
    user_factors: npt.NDArray[np.float32]
    has_factors: BoolArray
    cand_indptr: IntArray
    cand_items: IntArray
    cand_als: BoolArray
    event_indptr: IntArray
    event_items: IntArray
    event_weights: FloatArray
    event_ages: FloatArray
    event_bought: BoolArray


class RerankResult(NamedTuple):
    user_rows: IntArray
    items: IntArray
    ranks: npt.NDArray[np.int32]
    scores: FloatArray
    flags: BoolArray
    similar_to: IntArray


def _columns(ids: IntArray, catalogue: IntArray) -> IntArray:
    """Row of each id in the sorted catalogue, -1 when absent."""
    if catalogue.size == 0:
        return np.full(ids.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(catalogue, ids), catalogue.size - 1)
    found: IntArray = np.where(catalogue[pos] == ids, pos, -1).astype(np.int64)
    return found


def _segment_rows(indptr: IntArray) -> IntArray:
    """(nnz,) owning row of every entry of a CSR segment array."""
    return np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))


def _group_rank(*keys: npt.NDArray[Any]) -> IntArray:
    """0-based position of each entry within its run of equal consecutive key tuples (keys sorted)."""
    n = keys[0].size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.zeros(n - 1, dtype=bool)
    for key in keys:
        change |= key[1:] != key[:-1]
    starts = np.r_[0, np.flatnonzero(change) + 1]
    lengths = np.diff(np.r_[starts, n])
    return np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)


def _segment_reduce(
    values: FloatArray, segments: IntArray, n_segments: int, ufunc: np.ufunc, empty: float
) -> FloatArray:
    """ufunc.reduceat along axis 0 over sorted segment ids; segments with no entry get `empty`."""
    out = np.full((n_segments, *values.shape[1:]), empty, dtype=np.float64)
    if values.shape[0]:
        starts = np.r_[0, np.flatnonzero(segments[1:] != segments[:-1]) + 1]
        out[segments[starts]] = ufunc.reduceat(values, starts, axis=0)
    return out


def empty_result() -> RerankResult:
    z = np.zeros(0, dtype=np.int64)
    return RerankResult(z, z, np.zeros(0, np.int32), np.zeros(0), np.zeros((0, len(REASON_FLAGS)), bool), z)


def mmr_select(relevance: FloatArray, unit: npt.NDArray[np.float64], k: int, lam: float) -> tuple[IntArray, FloatArray]:
    """Greedy MMR for one user's candidates, which must be ordered by item id (ties -> lower id).

    Args:
        relevance: (p,) relevance scores.
        unit: (p, d) unit-norm factors of the same candidates.
        k: picks.
        lam: lambda; value = lam * relevance - (1 - lam) * max(0, max cosine to the picked).

    Returns:
        (positions (<= k,) into the inputs in pick order, their values (non-increasing)).
    """
    p = relevance.size
    k = min(k, p)
    if lam >= 1.0:
        order = np.lexsort((np.arange(p), -relevance))[:k]
        return order.astype(np.int64), relevance[order].astype(np.float64)
    sims = np.maximum(unit @ unit.T, 0.0)
    redundancy = np.zeros(p)
    free = np.ones(p, dtype=bool)
    picks = np.empty(k, dtype=np.int64)
    values = np.empty(k)
    for step in range(k):
        value = np.where(free, lam * relevance - (1.0 - lam) * redundancy, -np.inf)
        best = int(np.argmax(value))  # first maximum = lowest item id among ties
        picks[step], values[step] = best, value[best]
        free[best] = False
        np.maximum(redundancy, sims[best], out=redundancy)
    return picks, values


def _log_prices(items: ItemTable) -> FloatArray:
    """(n + 1,) log price per catalogue row, NaN when unknown; row n (unknown items) is NaN."""
    price = np.r_[items.price.astype(np.float64), np.nan]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(price > 0, np.log(np.where(price > 0, price, 1.0)), np.nan)


def _price_fit(
    items: ItemTable,
    cand_row: IntArray,
    cand_col: IntArray,
    ev_row: IntArray,
    ev_col: IntArray,
    ev_pull: FloatArray,
    m: int,
) -> FloatArray:
    """(C,) exp(-|log price_c - ref_u|), ref_u = pull-weighted mean log price of u's fresh priced events.

    0 when the candidate's price is unknown or the user has no fresh event on a priced item with a
    positive pull. Fresh events are the (row, col, pull) triples the session vector uses.
    """
    log_price = _log_prices(items)
    ev_log = log_price[ev_col]
    ok = np.isfinite(ev_log) & (ev_pull > 0)
    weight = np.bincount(ev_row[ok], weights=ev_pull[ok], minlength=m)
    total = np.bincount(ev_row[ok], weights=ev_pull[ok] * ev_log[ok], minlength=m)
    ref = np.divide(total, weight, out=np.full(m, np.nan), where=weight > 0)
    gap = np.abs(log_price[cand_col] - ref[cand_row])  # cand_col -1 reads row n: NaN
    return np.where(np.isfinite(gap), np.exp(-np.where(np.isfinite(gap), gap, 0.0)), 0.0)


def features(items: ItemTable, batch: UserBatch, params: RerankParams) -> dict[str, FloatArray]:
    """(C,) feature arrays (FEATURES names) plus helper arrays `_col`, `_row`, `_similar_to`."""
    m = batch.cand_indptr.size - 1
    n, d = items.factors.shape
    q = np.vstack([items.factors.astype(np.float64), np.zeros((1, d))])  # row n: unknown items
    unit = np.vstack([normalise_rows(items.factors).astype(np.float64), np.zeros((1, d))])

    cand_row = _segment_rows(batch.cand_indptr)
    cand_col = _columns(batch.cand_items, items.ids)
    cand_q = np.where(cand_col[:, None] >= 0, q[cand_col], 0.0)  # -1 would read row n anyway

    p = np.where(batch.has_factors[:, None], batch.user_factors.astype(np.float64), 0.0).reshape(m, d)
    ev_row = _segment_rows(batch.event_indptr)
    ev_col = _columns(batch.event_items, items.ids)
    fresh = (batch.event_ages <= params.fresh_days) & (ev_col >= 0)
    pull = batch.event_weights * np.power(2.0, -np.maximum(batch.event_ages, 0.0) / params.half_life_days)
    contrib = (pull[fresh])[:, None] * q[ev_col[fresh]]
    session = p + params.alpha * _segment_reduce(contrib.reshape(-1, d), ev_row[fresh], m, np.add, 0.0)

    als = np.einsum("cd,cd->c", p[cand_row], cand_q)
    sess = np.einsum("cd,cd->c", session[cand_row], cand_q)

    # Cosine of each candidate to each distinct fresh item of its user (itself excluded).
    key = np.unique(ev_row[fresh] * (n + 1) + ev_col[fresh])  # sorted by (row, col)
    recent_row, recent_col = key // (n + 1), key % (n + 1)
    recent_ptr = np.searchsorted(recent_row, np.arange(m + 1))
    per_cand = np.diff(recent_ptr)[cand_row]
    pair_cand = np.repeat(np.arange(cand_row.size), per_cand)
    first = np.repeat(recent_ptr[cand_row], per_cand)
    offset = np.arange(pair_cand.size) - np.repeat(np.cumsum(per_cand) - per_cand, per_cand)
    pair_recent = recent_col[first + offset]
    pair_ok = pair_recent != cand_col[pair_cand]
    pc, pr = pair_cand[pair_ok], pair_recent[pair_ok]
    cos = np.empty(pc.size)
    for start in range(0, pc.size, PAIR_CHUNK):  # bounded memory: PAIR_CHUNK x d floats at a time
        stop = min(start + PAIR_CHUNK, pc.size)
        cos[start:stop] = np.einsum("pd,pd->p", unit[cand_col[pc[start:stop]]], unit[pr[start:stop]])
    count = np.bincount(pc, minlength=cand_row.size).astype(np.float64)
    max_cos = _segment_reduce(cos, pc, cand_row.size, np.maximum, -np.inf)
    mean_cos = np.divide(
        np.bincount(pc, weights=cos, minlength=cand_row.size),
        count,
        out=np.zeros(cand_row.size),
        where=count > 0,
    )
    big = np.iinfo(np.int64).max
    at_max = np.where(cos >= max_cos[pc], items.ids[pr] if n else pr, big)
    similar_to = _segment_reduce(at_max.astype(np.float64), pc, cand_row.size, np.minimum, np.inf)
    has_similar = np.isfinite(max_cos) & (max_cos >= params.similar_threshold)
    similar_to = np.where(has_similar, np.nan_to_num(similar_to, posinf=-1), -1).astype(np.int64)
    max_cos = np.where(np.isfinite(max_cos), max_cos, 0.0)

    known = cand_col >= 0
    safe = np.where(known, cand_col, 0)
    price_fit = _price_fit(items, cand_row, cand_col, ev_row[fresh], ev_col[fresh], pull[fresh], m)

    def attr(values: npt.NDArray[np.generic]) -> FloatArray:
        return np.where(known, values[safe] if n else 0, 0).astype(np.float64)

    return {
        "als": als,
        "session": sess,
        "max_cosine": max_cos,
        "mean_cosine": mean_cos,
        "popularity": attr(items.popularity),
        "promo": attr(items.promo),
        "new_arrival": attr(items.new_arrival),
        "price_fit": price_fit,
        "_col": cand_col,
        "_row": cand_row,
        "_similar_to": similar_to,
    }


def rerank(items: ItemTable, batch: UserBatch, params: RerankParams) -> RerankResult:
    """Score, filter, cap and diversify every user's candidates in one call (see the module doc)."""
    m = batch.cand_indptr.size - 1
    n = items.ids.size
    if m == 0 or batch.cand_items.size == 0:
        return empty_result()
    feats = features(items, batch, params)
    row, col = feats["_row"], feats["_col"]
    relevance = sum(params.weights.get(name, 0.0) * feats[name] for name in FEATURES)
    relevance = np.asarray(relevance, dtype=np.float64)

    known = col >= 0
    safe = np.where(known, col, 0)
    keep = known & (items.in_stock[safe] if n else False) & ~(items.blocked[safe] if n else True)
    ev_row = _segment_rows(batch.event_indptr)
    bought = batch.event_bought & (batch.event_ages <= params.bought_window_days)
    bought_keys = ev_row[bought] * (n + 1) + _columns(batch.event_items[bought], items.ids)
    keep &= ~np.isin(row * (n + 1) + col, bought_keys)

    idx = np.flatnonzero(keep)
    cat = items.category[safe[idx]] if n else np.zeros(idx.size, np.int64)
    if params.category_cap is not None and idx.size:
        by_cat = np.lexsort((batch.cand_items[idx], -relevance[idx], cat, row[idx]))
        rank_in_cat = np.empty(idx.size, dtype=np.int64)
        rank_in_cat[by_cat] = _group_rank(row[idx][by_cat], cat[by_cat])
        idx = idx[(cat < 0) | (rank_in_cat < params.category_cap)]

    pool_size = params.top_k if params.mmr_lambda >= 1.0 else max(params.mmr_pool, params.top_k)
    order = idx[np.lexsort((batch.cand_items[idx], -relevance[idx], row[idx]))]
    order = order[_group_rank(row[order]) < pool_size]  # (row, -relevance, item) order
    if params.mmr_lambda >= 1.0:
        chosen, scores = order, relevance[order]
    else:
        unit = normalise_rows(items.factors).astype(np.float64) if n else np.zeros((0, 0))
        pieces, values = [], []
        bounds = np.searchsorted(row[order], np.arange(m + 1))
        for r in np.flatnonzero(np.diff(bounds)):
            pool = order[bounds[r] : bounds[r + 1]]
            pool = pool[np.argsort(batch.cand_items[pool], kind="stable")]  # id order for tie-breaks
            picks, vals = mmr_select(relevance[pool], unit[col[pool]], params.top_k, params.mmr_lambda)
            pieces.append(pool[picks])
            values.append(vals)
        chosen = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        scores = np.concatenate(values) if values else np.zeros(0)

    chosen_rows = row[chosen]
    ranks = (_group_rank(chosen_rows) + 1).astype(np.int32)
    csafe = safe[chosen]
    flags = np.zeros((chosen.size, len(REASON_FLAGS)), dtype=bool)
    similar_to = feats["_similar_to"][chosen]
    flags[:, 0] = similar_to >= 0
    flags[:, 1] = batch.cand_als[chosen] & batch.has_factors[chosen_rows]
    flags[:, 2] = items.promo[csafe] if n else False
    flags[:, 3] = items.new_arrival[csafe] if n else False
    flags[:, 4] = (items.popularity[csafe] >= params.trending_threshold) if n else False
    return RerankResult(
        chosen_rows.astype(np.int64),
        batch.cand_items[chosen].astype(np.int64),
        ranks,
        scores.astype(np.float64),
        flags,
        similar_to.astype(np.int64),
    )


def reason_lists(result: RerankResult) -> list[list[str]]:
    """Reasons of each result row as strings, e.g. ["similar_to:42", "als", "promo"] (flag order)."""
    names = np.array(REASON_FLAGS[1:], dtype=object)
    out: list[list[str]] = []
    for flags, similar in zip(result.flags, result.similar_to, strict=True):  # output-sized (users x K)
        reasons = [f"{SIMILAR}:{int(similar)}"] if flags[0] else []
        reasons.extend(names[flags[1:]].tolist())
        out.append(reasons)
    return out
