"""Re-ranking kernel: a batch of users' candidates -> top-K per user with a score and reasons.

No pyspark import: runs inside `mapInPandas` on the executors and in plain unit tests. One call
handles a whole batch of users; per-user data are segments of flat arrays (CSR / indptr style:
user row r owns entries `indptr[r]:indptr[r + 1]`, helpers in `udfs.segments`). No step loops over users:
the features are computed for all candidates at once (`udfs.features.features`; only the factor cosines take
one small matrix product per user with fresh items, the cheapest way to read each factor row once) and the MMR
selection runs for all users at once (`udfs.mmr.mmr_batch`, `top_k` vectorised steps; `udfs.mmr.mmr_select` is
its per-user reference).

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
- features (FEATURES, defined in the `udfs.features` module doc): als = p_u . q_c and session = s_u . q_c
  (the session vector s_u adds u's decayed fresh items to p_u; a cold user's p_u is folded in from them),
  max/mean cosine to u's fresh items, popularity, promo, new_arrival, price_fit, cooc_sum / cooc_max
  (co-occurrence neighbour scores of u's fresh items), ease = cand_ease, buy_again = cand_rebuy;
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

from udfs.features import FEATURES, features
from udfs.mmr import mmr_batch
from udfs.segments import catalogue_columns, group_rank, segment_rows
from udfs.topk import normalise_rows

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

ALS, PROMO, NEW_ARRIVAL, TRENDING, SIMILAR = "als", "promo", "new_arrival", "trending", "similar_to"
BUY_AGAIN = "buy_again"
REASON_FLAGS = (SIMILAR, ALS, PROMO, NEW_ARRIVAL, TRENDING, BUY_AGAIN)  # column order of RerankResult.flags


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
    )  # the kernel's own defaults, used by its tests; the product's tuned defaults live in pipelines/core/config_sections.py (RerankConfig)


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


def neighbour_csr(
    ids: IntArray, items: npt.ArrayLike, neighbours: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[IntArray, IntArray, FloatArray]:
    """(indptr (n + 1,), cols, scores): neighbour lists over the rows of the sorted catalogue `ids`."""
    n = ids.size
    src = catalogue_columns(np.asarray(items, dtype=np.int64), ids)
    dst = catalogue_columns(np.asarray(neighbours, dtype=np.int64), ids)
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


def empty_result() -> RerankResult:
    z = np.zeros(0, dtype=np.int64)
    return RerankResult(z, z, np.zeros(0, np.int32), np.zeros(0), np.zeros((0, len(REASON_FLAGS)), bool), z)


def rerank(items: ItemTable, batch: UserBatch, params: RerankParams) -> RerankResult:
    """Score, filter, cap and diversify every user's candidates in one call (see the module doc)."""
    m = batch.cand_indptr.size - 1
    if m == 0 or batch.cand_items.size == 0:
        return empty_result()
    feats = features(items, batch, params)
    row, col = feats["_row"], feats["_col"]
    relevance = sum(params.weights.get(name, 0.0) * feats[name] for name in FEATURES)
    relevance = np.asarray(relevance, dtype=np.float64)
    rebuy = feats["buy_again"] > 0  # a buy-again candidate (recommend.repeat_purchase) escapes the bought rule

    idx = np.flatnonzero(_eligible(items, batch, params, row, col, rebuy))
    order = idx[np.lexsort((batch.cand_items[idx], -relevance[idx], row[idx]))]  # (row, -relevance, item) order
    if params.category_cap is not None and order.size:
        order = _cap_categories(items, order, row, col, params.category_cap)
    chosen, scores = _select(items, batch, params, order, row, col, relevance)

    chosen_rows = row[chosen]
    similar_to = feats["_similar_to"][chosen]
    return RerankResult(
        chosen_rows.astype(np.int64),
        batch.cand_items[chosen].astype(np.int64),
        (group_rank(chosen_rows) + 1).astype(np.int32),
        scores.astype(np.float64),
        _reason_flags(items, batch, params, chosen, chosen_rows, col, rebuy, similar_to),
        similar_to.astype(np.int64),
    )


def _eligible(
    items: ItemTable, batch: UserBatch, params: RerankParams, row: IntArray, col: IntArray, rebuy: BoolArray
) -> npt.NDArray[Any]:
    """(C,) nonzero where a candidate passes the rules: known, in stock, not blocked, and not bought within
    `bought_window_days` unless `rebuy` (bool; an empty catalogue keeps nothing)."""
    n = items.ids.size
    known = col >= 0
    safe = np.where(known, col, 0)
    keep = known & (items.in_stock[safe] if n else False) & ~(items.blocked[safe] if n else True)
    ev_row = segment_rows(batch.event_indptr)
    bought = batch.event_bought & (batch.event_ages <= params.bought_window_days)
    bought_keys = ev_row[bought] * (n + 1) + catalogue_columns(batch.event_items[bought], items.ids)
    keep &= ~np.isin(row * (n + 1) + col, bought_keys) | rebuy
    return keep


def _cap_categories(items: ItemTable, order: IntArray, row: IntArray, col: IntArray, cap: int) -> IntArray:
    """`order` (by row, then relevance) without each user's candidates past the `cap` best of their category."""
    n = items.ids.size
    safe = np.where(col >= 0, col, 0)
    # The one float sort of `order` also orders each category; a stable integer sort by (row, category) groups them.
    cat = items.category[safe[order]] if n else np.zeros(order.size, np.int64)
    by_cat = np.lexsort((cat, row[order]))
    rank_in_cat = np.empty(order.size, dtype=np.int64)
    rank_in_cat[by_cat] = group_rank(row[order][by_cat], cat[by_cat])
    kept: IntArray = order[(cat < 0) | (rank_in_cat < cap)]
    return kept


def _select(
    items: ItemTable,
    batch: UserBatch,
    params: RerankParams,
    order: IntArray,
    row: IntArray,
    col: IntArray,
    relevance: FloatArray,
) -> tuple[IntArray, FloatArray]:
    """(chosen candidates by row then rank, their scores): MMR over each user's pool of the most relevant."""
    m = batch.cand_indptr.size - 1
    pool_size = params.top_k if params.mmr_lambda >= 1.0 else max(params.mmr_pool, params.top_k)
    order = order[group_rank(row[order]) < pool_size]
    if params.mmr_lambda >= 1.0:
        return order, relevance[order]
    pool = order[np.lexsort((batch.cand_items[order], row[order]))]  # each user's pool in id order: tie-breaks
    bounds = np.searchsorted(row[pool], np.arange(m + 1))
    unit = normalise_rows(items.factors[col[pool]])  # only the pooled rows: O(pool), not O(catalogue), per call
    picked = mmr_batch(relevance[pool], np.arange(pool.size), unit, bounds, params.top_k, params.mmr_lambda)
    return pool[picked.positions], picked.values


def _reason_flags(
    items: ItemTable,
    batch: UserBatch,
    params: RerankParams,
    chosen: IntArray,
    chosen_rows: IntArray,
    col: IntArray,
    rebuy: BoolArray,
    similar_to: IntArray,
) -> BoolArray:
    """(R, 6) reason flags of the chosen candidates in REASON_FLAGS order."""
    n = items.ids.size
    csafe = np.where(col >= 0, col, 0)[chosen]
    flags: BoolArray = np.zeros((chosen.size, len(REASON_FLAGS)), dtype=bool)
    flags[:, 0] = similar_to >= 0
    flags[:, 1] = batch.cand_als[chosen] & batch.has_factors[chosen_rows]
    flags[:, 2] = items.promo[csafe] if n else False
    flags[:, 3] = items.new_arrival[csafe] if n else False
    flags[:, 4] = (items.popularity[csafe] >= params.trending_threshold) if n else False
    flags[:, 5] = rebuy[chosen]
    return flags


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
