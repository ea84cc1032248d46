"""Re-ranking kernel: a batch of users' candidates -> top-K per user with a score and reasons.

No pyspark import: runs inside `mapInPandas` on the executors and in plain unit tests. One call
handles a whole batch of users; per-user data are segments of flat arrays (CSR / indptr style:
user row r owns entries `indptr[r]:indptr[r + 1]`). No step loops over users: the MMR selection runs
for all users at once (`udfs.mmr.mmr_batch`, `top_k` vectorised steps; `mmr_select` is its per-user reference).

Shapes (n catalogue items, d factor rank, m users in the batch, C candidates, E fresh events):

ItemTable (the broadcast model, one row per catalogue item):
- `ids`         (n,)   int64   distinct item ids, ascending
- `factors`     (n, d) float32 ALS item factors q_i (zero rows for items without factors)
- `popularity`  (n,)   float64 in [0, 1] (distinct fresh users / the most popular item's)
- `promo`, `new_arrival`, `in_stock`, `blocked` (n,) bool
- `category`    (n,)   int64   category code, -1 = unknown (never capped)
- `price`       (n,)   float64 price, NaN (or <= 0) = unknown
- `nb_indptr` (n + 1,) int64, `nb_cols` (N,) int64, `nb_scores` (N,) float64: each item's bounded
  co-occurrence neighbour list as CSR over catalogue rows (row i owns `nb_indptr[i]:nb_indptr[i + 1]`,
  columns ascending within a row, so row * (n + 1) + col are sorted pair keys); empty by default

UserBatch:
- `user_factors`  (m, d) float32 p_u, rows of users without factors are ignored
- `has_factors`   (m,)   bool
- `cand_indptr`   (m + 1,) int64, `cand_items` (C,) int64 ids, `cand_als` (C,) bool (ALS proposed it)
- `event_indptr`  (m + 1,) int64, `event_items` (E,) int64, `event_weights` (E,) float64 w(type),
  `event_ages` (E,) float64 days before as_of, `event_bought` (E,) bool (a purchase-like event)
- `cand_ease`     (C,) float64 or None: the candidate's EASE score (x_u B)_c from `shelf candidates`, 0 when
  EASE did not score it; None: every 0
- `cand_rebuy`    (C,) float64 or None: the buy-again score of an item the user already consumed (candidates'
  source buy_again, recommend.repeat_purchase); such a candidate escapes the already-bought rule and earns
  the reason `buy_again`; None: every 0

Model, per user u with fresh events j (age <= fresh_days) and candidates c:
- session vector s_u = p_u + alpha * sum_j w_j * 2^(-age_j / half_life) * q_j;
- a cold user (no ALS vector) folds in from the session items: p_u = sum_j P_j q_j / |q_j|^2 / sum_j P_j
  with the pulls P_j = w_j * 2^(-age_j / half_life), so p_u . q_j = 1 for a user who touched only j (the
  scale of an implicit-ALS preference) and `als` / `session` rank the cold user's candidates like a warm
  user's; without fresh events on items with factors p_u = 0;
- features: als = p_u . q_c, session = s_u . q_c, max/mean cosine of q_c to the user's distinct fresh
  items other than c, popularity, promo, new_arrival, price_fit = exp(-|log price_c - ref_u|) where
  ref_u is the mean log price of u's fresh priced items weighted like the session pull (0 when the
  candidate's price is unknown or u has no fresh priced item), cooc_sum = sum_j P_j * sim(j, c) and
  cooc_max = max_j sim(j, c) over u's distinct fresh items j other than c, where sim(j, c) is c's score
  in j's neighbour list (0 when c is not in it or j has no list) and P_j sums the pulls
  w * 2^(-age / half_life) of u's fresh events on j (the session vector's weights); ease = cand_ease;
- rules: drop out-of-stock, blocked-category, unknown and already-bought (age <= bought_window_days)
  items; keep each category's `category_cap` most relevant candidates;
- relevance = weights . features (promo / new-arrival weights are the boosts);
- reasons: `similar_to:<j>` names the fresh item j with the highest co-occurrence score when it
  reaches `cooc_threshold`, else the one with the highest factor cosine when that reaches
  `similar_threshold` (ties: lower item id);
- diversity: greedy MMR over the `mmr_pool` most relevant, value = lambda * relevance -
  (1 - lambda) * max(0, cosine to the already chosen). The chosen values never increase, so the
  output is sorted by score; ties go to the lower item id. lambda = 1 is the relevance order.

Result (R rows, sorted by user row then rank): `user_rows` (R,) int64 index into the batch,
`items` (R,) int64, `ranks` (R,) int32 from 1, `scores` (R,) float64, `flags` (R, 6) bool in
REASON_FLAGS order, `similar_to` (R,) int64 (-1 = none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from udfs.mmr import mmr_batch
from udfs.topk import normalise_rows

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

ALS, PROMO, NEW_ARRIVAL, TRENDING, SIMILAR = "als", "promo", "new_arrival", "trending", "similar_to"
BUY_AGAIN = "buy_again"
REASON_FLAGS = (SIMILAR, ALS, PROMO, NEW_ARRIVAL, TRENDING, BUY_AGAIN)  # column order of RerankResult.flags
PAIR_CHUNK = 1 << 15  # (candidate, fresh item) pairs per cosine block
FEATURES = (
    "als",
    "session",
    "max_cosine",
    "mean_cosine",
    "popularity",
    "promo",
    "new_arrival",
    "price_fit",
    "cooc_sum",
    "cooc_max",
    "ease",
    "buy_again",
)


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
    cooc_threshold: float = 0.1
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
            "cooc_sum": 8.0,
            "cooc_max": 0.5,
            "ease": 1.0,
            "buy_again": 1.0,
        }
    )  # the kernel's own defaults, used by its tests; the product's tuned defaults live in conf/base.yaml


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
    nb_indptr: IntArray | None = None  # None: no neighbour lists (co-occurrence features are 0)
    nb_cols: IntArray | None = None
    nb_scores: FloatArray | None = None

    @staticmethod
    def plain(
        ids: npt.ArrayLike,
        factors: npt.ArrayLike,
        neighbours: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike] | None = None,
        **attrs: npt.ArrayLike,
    ) -> ItemTable:
        """An ItemTable sorted by id; missing attributes default to in stock, no promo, category -1.

        `neighbours` = (item ids, neighbour ids, scores): each item's co-occurrence neighbour list
        (pairs naming an unknown item or the item itself are dropped; a repeated pair keeps its best score).
        """
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
        csr = neighbour_csr(ids_arr[order], *neighbours) if neighbours is not None else (None, None, None)
        return ItemTable(
            ids_arr[order],
            np.asarray(factors, dtype=np.float32)[order],
            **cols,  # type: ignore[arg-type]
            nb_indptr=csr[0],
            nb_cols=csr[1],
            nb_scores=csr[2],
        )

    @cached_property
    def padded(self) -> tuple[FloatArray, FloatArray]:
        """(q, unit): float64 factors and unit-norm factors with a zero row n for unknown items.

        Built once per ItemTable (per executor after the broadcast), not on every kernel call."""
        d = self.factors.shape[1]
        q = np.vstack([self.factors.astype(np.float64), np.zeros((1, d))])
        unit = np.vstack([normalise_rows(self.factors).astype(np.float64), np.zeros((1, d))])
        return q, unit

    def neighbour_keys(self) -> tuple[IntArray, FloatArray]:
        """(sorted pair keys row * (n + 1) + col, their scores) of the neighbour lists; empty without lists."""
        if self.nb_indptr is None or self.nb_cols is None or self.nb_scores is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        n = self.ids.size
        return _segment_rows(self.nb_indptr) * (n + 1) + self.nb_cols, self.nb_scores


def neighbour_csr(
    ids: IntArray, items: npt.ArrayLike, neighbours: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[IntArray, IntArray, FloatArray]:
    """(indptr (n + 1,), cols, scores): neighbour lists over the rows of the sorted catalogue `ids`."""
    n = ids.size
    src = _columns(np.asarray(items, dtype=np.int64), ids)
    dst = _columns(np.asarray(neighbours, dtype=np.int64), ids)
    score = np.asarray(scores, dtype=np.float64)
    ok = (src >= 0) & (dst >= 0) & (src != dst)
    key, score = src[ok] * (n + 1) + dst[ok], score[ok]
    order = np.lexsort((-score, key))  # by key, best score first
    key, score = key[order], score[order]
    first = np.r_[True, key[1:] != key[:-1]] if key.size else np.zeros(0, dtype=bool)
    key, score = key[first], score[first]
    indptr = np.searchsorted(key // (n + 1), np.arange(n + 1)).astype(np.int64)
    return indptr, (key % (n + 1)).astype(np.int64), score


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
    cand_ease: FloatArray | None = None  # (C,) the candidate's EASE score s_u . B_c (0 = none); None: all 0
    cand_rebuy: FloatArray | None = None  # (C,) buy-again score of an item the user consumed (0 = none); None: all 0


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
    return np.asarray(np.arange(n, dtype=np.int64) - np.repeat(starts, lengths), dtype=np.int64)


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

    The per-user reference of `udfs.mmr.mmr_batch` (which `rerank` uses); tests hold them bit-identical.

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


def _cooccurrence(
    items: ItemTable, pc: IntArray, pr: IntArray, pull: FloatArray, cand_col: IntArray, n_cands: int
) -> tuple[FloatArray, FloatArray, IntArray]:
    """(cooc_sum, cooc_max, the fresh item id at the max or -1), each (C,), over (candidate, fresh row, pull) pairs.

    sim(j, c) is found by binary search of the pair key j * (n + 1) + c in the sorted neighbour keys.
    """
    n = items.ids.size
    keys, scores = items.neighbour_keys()
    if not (keys.size and pc.size):
        zeros = np.zeros(n_cands)
        return zeros, zeros.copy(), np.full(n_cands, -1, dtype=np.int64)
    want = pr * (n + 1) + cand_col[pc]
    pos = np.minimum(np.searchsorted(keys, want), keys.size - 1)
    hit = np.flatnonzero((keys[pos] == want) & (cand_col[pc] >= 0) & ~np.isnan(pull))  # NaN pull: excluded pair
    hc, sim = pc[hit], scores[pos[hit]]
    cooc_sum = np.bincount(hc, weights=pull[hit] * sim, minlength=n_cands).astype(np.float64)
    cooc_max: FloatArray = np.maximum(_segment_reduce(sim, hc, n_cands, np.maximum, 0.0), 0.0)
    top = np.flatnonzero((sim > 0) & (sim >= cooc_max[hc]))
    best = _segment_reduce(items.ids[pr[hit[top]]].astype(np.float64), hc[top], n_cands, np.minimum, np.inf)
    cooc_to = np.where((cooc_max > 0) & np.isfinite(best), best, -1.0).astype(np.int64)
    return cooc_sum, cooc_max, cooc_to


def _fold_in(q: FloatArray, ev_row: IntArray, ev_col: IntArray, pull: FloatArray, m: int) -> FloatArray:
    """(m, d) fold-in vectors from the fresh events: sum_j P_j q_j / |q_j|^2 / sum_j P_j (0 without events)."""
    vectors = q[ev_col]
    norm2 = np.einsum("ed,ed->e", vectors, vectors)
    weight = np.where(norm2 > 0, pull, 0.0)  # an item without factors says nothing about the user
    scaled = (weight / np.where(norm2 > 0, norm2, 1.0))[:, None] * vectors
    total = _segment_reduce(scaled, ev_row, m, np.add, 0.0)
    mass = np.bincount(ev_row, weights=weight, minlength=m)[:, None]
    return np.divide(total, mass, out=np.zeros_like(total), where=mass > 0)


def features(items: ItemTable, batch: UserBatch, params: RerankParams) -> dict[str, FloatArray]:
    """(C,) feature arrays (FEATURES names) plus helper arrays `_col`, `_row`, `_similar_to`."""
    m = batch.cand_indptr.size - 1
    n, d = items.factors.shape
    q, unit = items.padded  # row n: unknown items

    cand_row = _segment_rows(batch.cand_indptr)
    cand_col = _columns(batch.cand_items, items.ids)
    cand_q = q[cand_col]  # -1 reads row n: zeros

    ev_row = _segment_rows(batch.event_indptr)
    ev_col = _columns(batch.event_items, items.ids)
    fresh = (batch.event_ages <= params.fresh_days) & (ev_col >= 0)
    pull = batch.event_weights * np.power(2.0, -np.maximum(batch.event_ages, 0.0) / params.half_life_days)
    warm = batch.user_factors.astype(np.float64).reshape(m, d)
    p = warm.copy()
    cold = ~batch.has_factors
    if cold.any():  # only cold users' events are folded in: warm users (most of a batch) skip the gather
        on_cold = fresh & cold[ev_row]
        p[cold] = _fold_in(q, ev_row[on_cold], ev_col[on_cold], pull[on_cold], m)[cold]
    contrib = (pull[fresh])[:, None] * q[ev_col[fresh]]
    session = p + params.alpha * _segment_reduce(contrib.reshape(-1, d), ev_row[fresh], m, np.add, 0.0)

    als = np.einsum("cd,cd->c", p[cand_row], cand_q)
    sess = np.einsum("cd,cd->c", session[cand_row], cand_q)

    # Cosine of each candidate to each distinct fresh item of its user (itself excluded).
    key, inverse = np.unique(ev_row[fresh] * (n + 1) + ev_col[fresh], return_inverse=True)  # by (row, col)
    recent_row, recent_col = key // (n + 1), key % (n + 1)
    recent_pull = np.bincount(inverse.reshape(-1), weights=pull[fresh], minlength=key.size)
    recent_ptr = np.searchsorted(recent_row, np.arange(m + 1))
    per_cand = np.diff(recent_ptr)[cand_row]
    pair_cand = np.repeat(np.arange(cand_row.size), per_cand)
    first = np.repeat(recent_ptr[cand_row], per_cand)
    offset = np.arange(pair_cand.size) - np.repeat(np.cumsum(per_cand) - per_cand, per_cand)
    pair_recent = recent_col[first + offset]
    pair_slot = first + offset
    self_pair = pair_recent == cand_col[pair_cand]  # a candidate the user touched: not its own neighbour
    pc, pr, pp = pair_cand, pair_recent, recent_pull[pair_slot]
    cos = np.empty(pc.size)
    for start in range(0, pc.size, PAIR_CHUNK):  # bounded memory: PAIR_CHUNK x d floats at a time
        stop = min(start + PAIR_CHUNK, pc.size)
        cos[start:stop] = np.einsum("pd,pd->p", unit[cand_col[pc[start:stop]]], unit[pr[start:stop]])
    cos[self_pair] = np.nan
    valid = ~self_pair
    count = np.bincount(pc, weights=valid, minlength=cand_row.size)
    max_cos = _segment_reduce(np.where(valid, cos, -np.inf), pc, cand_row.size, np.maximum, -np.inf)
    mean_cos = np.divide(
        np.bincount(pc, weights=np.where(valid, cos, 0.0), minlength=cand_row.size),
        count,
        out=np.zeros(cand_row.size),
        where=count > 0,
    )
    at_best = np.flatnonzero(cos >= max_cos[pc])  # NaN (self) pairs never compare true
    best_ids = (items.ids[pr[at_best]] if n else pr[at_best]).astype(np.float64)
    similar_to = _segment_reduce(best_ids, pc[at_best], cand_row.size, np.minimum, np.inf)
    has_similar = np.isfinite(max_cos) & (max_cos >= params.similar_threshold)
    similar_to = np.where(has_similar, np.nan_to_num(similar_to, posinf=-1), -1).astype(np.int64)
    max_cos = np.where(np.isfinite(max_cos), max_cos, 0.0)
    pp = np.where(valid, pp, np.nan)
    cooc_sum, cooc_max, cooc_to = _cooccurrence(items, pc, pr, pp, cand_col, cand_row.size)
    similar_to = np.where((cooc_to >= 0) & (cooc_max >= params.cooc_threshold), cooc_to, similar_to)

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
        "cooc_sum": cooc_sum,
        "cooc_max": cooc_max,
        "ease": np.zeros(cand_row.size) if batch.cand_ease is None else batch.cand_ease.astype(np.float64),
        "buy_again": np.zeros(cand_row.size) if batch.cand_rebuy is None else batch.cand_rebuy.astype(np.float64),
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
    rebuy = feats["buy_again"] > 0  # a buy-again candidate (recommend.repeat_purchase) escapes the bought rule
    keep &= ~np.isin(row * (n + 1) + col, bought_keys) | rebuy

    idx = np.flatnonzero(keep)
    order = idx[np.lexsort((batch.cand_items[idx], -relevance[idx], row[idx]))]  # (row, -relevance, item) order
    if params.category_cap is not None and order.size:
        # The one float sort above also orders each category; a stable integer sort by (row, category) groups them.
        cat = items.category[safe[order]] if n else np.zeros(order.size, np.int64)
        by_cat = np.lexsort((cat, row[order]))
        rank_in_cat = np.empty(order.size, dtype=np.int64)
        rank_in_cat[by_cat] = _group_rank(row[order][by_cat], cat[by_cat])
        order = order[(cat < 0) | (rank_in_cat < params.category_cap)]

    pool_size = params.top_k if params.mmr_lambda >= 1.0 else max(params.mmr_pool, params.top_k)
    order = order[_group_rank(row[order]) < pool_size]
    if params.mmr_lambda >= 1.0:
        chosen, scores = order, relevance[order]
    else:
        pool = order[np.lexsort((batch.cand_items[order], row[order]))]  # each user's pool in id order: tie-breaks
        bounds = np.searchsorted(row[pool], np.arange(m + 1))
        unit = normalise_rows(items.factors[col[pool]])  # only the pooled rows: O(pool), not O(catalogue), per call
        picked = mmr_batch(relevance[pool], np.arange(pool.size), unit, bounds, params.top_k, params.mmr_lambda)
        chosen, scores = pool[picked.positions], picked.values

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
    flags[:, 5] = rebuy[chosen]
    return RerankResult(
        chosen_rows.astype(np.int64),
        batch.cand_items[chosen].astype(np.int64),
        ranks,
        scores.astype(np.float64),
        flags,
        similar_to.astype(np.int64),
    )


def reason_lists(result: RerankResult, name_items: Callable[[np.ndarray], np.ndarray] | None = None) -> list[list[str]]:
    """Reasons of each result row as strings, e.g. ["similar_to:42", "als", "promo"] (flag order).

    `name_items` maps the dense ids of the rows' similar_to items to the names the reasons carry, in one
    vectorised call (e.g. the source's item ids); without it a reason names the dense id.

    The lists are output-sized (users x K), so no per-row numpy call: each row's flag combination is a
    code into the 2^5 precomputed name lists (copied per row), and only rows with `similar_to` format a string.
    """
    flags = np.asarray(result.flags, dtype=bool).reshape(-1, len(REASON_FLAGS))
    names = REASON_FLAGS[1:]
    bits = 1 << np.arange(len(names))
    combos = [[name for name, bit in zip(names, bits, strict=True) if code & bit] for code in range(1 << len(names))]
    out = [combos[code][:] for code in (flags[:, 1:] @ bits).tolist()]
    similar = np.flatnonzero(flags[:, 0])
    recent = np.asarray(result.similar_to, dtype=np.int64)[similar]
    named = recent if name_items is None else np.asarray(name_items(recent))
    for row, item in zip(similar.tolist(), named.tolist(), strict=True):
        out[row] = [f"{SIMILAR}:{item}", *out[row]]
    return out
