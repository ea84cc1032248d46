"""Re-ranking features: a batch of users' candidates -> one (C,) array per feature (FEATURES).

No pyspark import: called by `udfs.rerank.rerank` inside `mapInPandas` and in plain unit tests. Inputs are
the kernel's `ItemTable`, `UserBatch` and `RerankParams` (shapes in the `udfs.rerank` module doc); no step
loops over users.

Per user u with fresh events j (age <= fresh_days, on a catalogue item) and candidates c:
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
  buy_again = cand_rebuy;
- `_similar_to` (the `similar_to:<j>` reason): the fresh item j with the highest co-occurrence score when it
  reaches `cooc_threshold`, else the one with the highest factor cosine when that reaches
  `similar_threshold` (ties: lower item id), -1 = none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from udfs.segments import catalogue_columns, range_positions, segment_reduce, segment_rows

if TYPE_CHECKING:  # udfs.rerank imports this module; the types are only annotations here
    from udfs.rerank import ItemTable, RerankParams, UserBatch

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

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


class _FreshEvents(NamedTuple):
    """The batch's fresh events on catalogue items, in event order: owning user row, catalogue row, pull."""

    row: IntArray
    col: IntArray
    pull: FloatArray  # w * 2^(-age / half_life)


class _Recent(NamedTuple):
    """Each user's distinct fresh items (pulls summed per item), by user row then catalogue row: user r owns
    entries `ptr[r]:ptr[r + 1]`."""

    row: IntArray
    col: IntArray  # catalogue row of the fresh item
    pull: FloatArray  # the user's summed pull on the item
    ptr: IntArray  # (m + 1,)


def features(items: ItemTable, batch: UserBatch, params: RerankParams) -> dict[str, npt.NDArray[Any]]:
    """(C,) float64 feature arrays (FEATURES names) plus int64 helper arrays `_col`, `_row`, `_similar_to`."""
    m = batch.cand_indptr.size - 1
    n = items.factors.shape[0]
    q, _ = items.padded  # row n: unknown items
    cand_row = segment_rows(batch.cand_indptr)
    cand_col = catalogue_columns(batch.cand_items, items.ids)
    cand_q = q[cand_col]  # -1 reads row n: zeros

    fresh = _fresh_events(items, batch, params)
    p, session = _user_vectors(items, batch, fresh, params.alpha)
    recent = _recent_items(items, fresh, m)
    max_cos, mean_cos, similar_to = _cosine_features(
        items, recent, batch.cand_indptr, cand_col, params.similar_threshold
    )
    cooc_sum, cooc_max, cooc_to = _cooccurrence(items, recent, cand_row, cand_col)
    similar_to = np.where((cooc_to >= 0) & (cooc_max >= params.cooc_threshold), cooc_to, similar_to)
    price_fit = _price_fit(items, cand_row, cand_col, fresh.row, fresh.col, fresh.pull, m)

    return {
        "als": np.einsum("cd,cd->c", p[cand_row], cand_q),
        "session": np.einsum("cd,cd->c", session[cand_row], cand_q),
        "max_cosine": max_cos,
        "mean_cosine": mean_cos,
        "popularity": _attribute(items.popularity, cand_col, n),
        "promo": _attribute(items.promo, cand_col, n),
        "new_arrival": _attribute(items.new_arrival, cand_col, n),
        "price_fit": price_fit,
        "cooc_sum": cooc_sum,
        "cooc_max": cooc_max,
        "ease": np.zeros(cand_row.size) if batch.cand_ease is None else batch.cand_ease.astype(np.float64),
        "buy_again": np.zeros(cand_row.size) if batch.cand_rebuy is None else batch.cand_rebuy.astype(np.float64),
        "_col": cand_col,
        "_row": cand_row,
        "_similar_to": similar_to,
    }


def _fresh_events(items: ItemTable, batch: UserBatch, params: RerankParams) -> _FreshEvents:
    """The events at most `fresh_days` old on catalogue items, with their pulls w * 2^(-age / half_life)."""
    ev_row = segment_rows(batch.event_indptr)
    ev_col = catalogue_columns(batch.event_items, items.ids)
    fresh = (batch.event_ages <= params.fresh_days) & (ev_col >= 0)
    pull = batch.event_weights * np.power(2.0, -np.maximum(batch.event_ages, 0.0) / params.half_life_days)
    return _FreshEvents(ev_row[fresh], ev_col[fresh], pull[fresh])


def _user_vectors(
    items: ItemTable, batch: UserBatch, fresh: _FreshEvents, alpha: float
) -> tuple[FloatArray, FloatArray]:
    """(p, s), each (m, d): ALS vectors (cold users folded in from their fresh events) and session vectors."""
    m = batch.cand_indptr.size - 1
    d = items.factors.shape[1]
    q, _ = items.padded
    p = batch.user_factors.astype(np.float64).reshape(m, d).copy()
    cold = ~batch.has_factors
    if cold.any():  # only cold users' events are folded in: warm users (most of a batch) skip the gather
        on_cold = cold[fresh.row]
        p[cold] = _fold_in(q, fresh.row[on_cold], fresh.col[on_cold], fresh.pull[on_cold], m)[cold]
    contrib = fresh.pull[:, None] * q[fresh.col]
    session = p + alpha * segment_reduce(contrib.reshape(-1, d), fresh.row, m, np.add, 0.0)
    return p, session


def _fold_in(q: FloatArray, ev_row: IntArray, ev_col: IntArray, pull: FloatArray, m: int) -> FloatArray:
    """(m, d) fold-in vectors from the fresh events: sum_j P_j q_j / |q_j|^2 / sum_j P_j (0 without events)."""
    vectors = q[ev_col]
    norm2 = np.einsum("ed,ed->e", vectors, vectors)
    weight = np.where(norm2 > 0, pull, 0.0)  # an item without factors says nothing about the user
    scaled = (weight / np.where(norm2 > 0, norm2, 1.0))[:, None] * vectors
    total = segment_reduce(scaled, ev_row, m, np.add, 0.0)
    mass = np.bincount(ev_row, weights=weight, minlength=m)[:, None]
    return np.divide(total, mass, out=np.zeros_like(total), where=mass > 0)


def _recent_items(items: ItemTable, fresh: _FreshEvents, m: int) -> _Recent:
    """Each user's distinct fresh items with the pulls of their events on it summed."""
    n = items.factors.shape[0]
    key, inverse = np.unique(fresh.row * (n + 1) + fresh.col, return_inverse=True)  # by (row, col)
    pull = np.asarray(np.bincount(inverse.reshape(-1), weights=fresh.pull, minlength=key.size), dtype=np.float64)
    row = key // (n + 1)
    return _Recent(row, key % (n + 1), pull, np.searchsorted(row, np.arange(m + 1)).astype(np.int64))


def _cosine_features(
    items: ItemTable, recent: _Recent, cand_indptr: IntArray, cand_col: IntArray, similar_threshold: float
) -> tuple[FloatArray, FloatArray, IntArray]:
    """(max_cosine, mean_cosine, similar_to by cosine or -1), each (C,), over each candidate's pairs with its
    user's distinct fresh items other than itself.

    One (candidates x fresh items) matrix product per user with fresh items: the pairs of a user are a dense
    block, and gathering both factor vectors of every pair instead cost ~240 ns a pair (a served user has ~300
    candidates x 20 fresh items); the loop is over users of the batch, each iteration a handful of array calls.
    """
    n_cands = cand_col.size
    _, unit = items.padded
    max_cos, mean_cos = np.zeros(n_cands), np.zeros(n_cands)
    similar_to = np.full(n_cands, -1, dtype=np.int64)
    users = np.flatnonzero((np.diff(recent.ptr) > 0) & (np.diff(cand_indptr) > 0))
    for u in users.tolist():
        cands = slice(int(cand_indptr[u]), int(cand_indptr[u + 1]))
        cols, near = cand_col[cands], recent.col[recent.ptr[u] : recent.ptr[u + 1]]
        cos = unit[cols] @ unit[near].T  # unknown candidates (-1) read row n: zeros
        own = cols[:, None] == near[None, :]  # a candidate the user touched is not its own neighbour
        count = near.size - own.sum(axis=1)
        cos[own] = 0.0
        mean_cos[cands] = np.divide(cos.sum(axis=1), count, out=np.zeros(cols.size), where=count > 0)
        cos[own] = -np.inf
        best = cos.max(axis=1)
        nearest = items.ids[near[np.argmax(cos >= best[:, None], axis=1)]]  # ascending rows: the lower id on ties
        found = np.isfinite(best)
        similar_to[cands] = np.where(found & (best >= similar_threshold), nearest, -1)
        max_cos[cands] = np.where(found, best, 0.0)
    return max_cos, mean_cos, similar_to


def _cooccurrence(
    items: ItemTable, recent: _Recent, cand_row: IntArray, cand_col: IntArray
) -> tuple[FloatArray, FloatArray, IntArray]:
    """(cooc_sum, cooc_max, the fresh item id at the max or -1), each (C,).

    Each distinct fresh item j's neighbour list is expanded to (user, neighbour c, sim(j, c)) and matched to
    the user's candidates by binary search of the key row * (n + 1) + col: the work grows with fresh items x
    list length, not with candidates x fresh items. Matches are summed in (candidate, fresh item row) order.
    """
    n, n_cands = items.ids.size, cand_col.size
    zeros = np.zeros(n_cands)
    none = (zeros, zeros.copy(), np.full(n_cands, -1, dtype=np.int64))
    if items.nb_indptr is None or items.nb_cols is None or items.nb_scores is None or not (recent.col.size and n_cands):
        return none
    starts, lengths = items.nb_indptr[recent.col], np.diff(items.nb_indptr)[recent.col]
    src = np.repeat(np.arange(recent.col.size), lengths)  # index into recent
    entry = range_positions(starts, lengths)
    cand_key = np.where(cand_col >= 0, cand_row * (n + 1) + cand_col, -1)
    order = np.argsort(cand_key, kind="stable")
    sorted_key = cand_key[order]
    want = recent.row[src] * (n + 1) + items.nb_cols[entry]
    lo = np.searchsorted(sorted_key, want, "left")
    if ((sorted_key[1:] == sorted_key[:-1]) & (sorted_key[1:] >= 0)).any():  # a candidate listed twice: matched twice
        per = np.searchsorted(sorted_key, want, "right") - lo
    else:  # distinct candidates (the usual batch): one binary search
        per = (sorted_key[np.minimum(lo, sorted_key.size - 1)] == want).astype(np.int64)
    hit_src, hit_entry = np.repeat(src, per), np.repeat(entry, per)
    hit_cand = order[range_positions(lo, per)]
    keep = recent.col[hit_src] != cand_col[hit_cand]  # a fresh item is not its own neighbour
    by = np.lexsort((recent.col[hit_src[keep]], hit_cand[keep]))
    hc, hs, sim = hit_cand[keep][by], hit_src[keep][by], items.nb_scores[hit_entry[keep][by]]
    if not hc.size:
        return none
    cooc_sum = np.bincount(hc, weights=recent.pull[hs] * sim, minlength=n_cands).astype(np.float64)
    cooc_max: FloatArray = np.maximum(segment_reduce(sim, hc, n_cands, np.maximum, 0.0), 0.0)
    top = np.flatnonzero((sim > 0) & (sim >= cooc_max[hc]))
    best = segment_reduce(items.ids[recent.col[hs[top]]].astype(np.float64), hc[top], n_cands, np.minimum, np.inf)
    cooc_to = np.where((cooc_max > 0) & np.isfinite(best), best, -1.0).astype(np.int64)
    return cooc_sum, cooc_max, cooc_to


def _log_prices(items: ItemTable) -> FloatArray:
    """(n + 1,) log price per catalogue row, NaN when unknown; row n (unknown items) is NaN."""
    price = np.append(items.price.astype(np.float64), np.nan)
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


def _attribute(values: npt.NDArray[np.generic], cand_col: IntArray, n: int) -> FloatArray:
    """(C,) a catalogue attribute of each candidate as float64, 0 for candidates not in the catalogue."""
    known = cand_col >= 0
    safe = np.where(known, cand_col, 0)
    return np.where(known, values[safe] if n else 0, 0).astype(np.float64)
