"""Blocked top-N by dot product: the numpy kernel behind item-item similarities and ALS candidates.

No pyspark import: the kernel runs inside `mapInPandas` on the executors and in plain unit tests.

Shapes (m query rows, n catalogue items, d factor rank, k = min(N, n) result columns):

- `queries`  (m, d) float32: user factors, or (normalised) item factors for item-item similarity
- `items`    (n, d) float32: the catalogue's factors, one row per entry of `item_ids`
- `item_ids` (n,)   int64:   distinct item ids, any order
- result `ids` (m, k) int64 padded with -1, `scores` (m, k) float32 padded with -inf,
  `counts` (m,) int64: how many leading entries of each row are real

Scores are computed as float32 GEMMs of `block_rows` query rows against `block_items` catalogue
columns, so each score block (block_rows x block_items floats, 2 MB by default) stays in cache and
memory never grows with the catalogue. The partial sort, not the GEMM, is the expensive part, so
each query row keeps a threshold (its k-th best score so far): a block's scores are compared with
it once, and only the few that beat it are kept and merged back to k (np.argpartition on k + a
few columns). A whole block goes through np.argpartition only when more than k of a row's scores
pass (the first blocks). Ordering is deterministic: score descending, then item id ascending; ties
at the cut are resolved by id too, so the result equals a full sort.

Exclusions: `exclude_self` drops the item whose id equals the query's `query_ids` entry (an item is
not its own neighbour); `exclude_indptr` / `exclude_indices` are CSR-style segments (row r excludes
`exclude_indices[exclude_indptr[r]:exclude_indptr[r + 1]]`, e.g. the items a user already bought).
Ids not in the catalogue are ignored. Factors must be finite: -inf marks an excluded score.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

DEFAULT_BLOCK_ROWS = 256
DEFAULT_BLOCK_ITEMS = 2048

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class TopN(NamedTuple):
    """Per-row top-N: `ids` (m, k) padded with -1, `scores` (m, k) padded with -inf, `counts` (m,)."""

    ids: IntArray
    scores: FloatArray
    counts: IntArray


def normalise_rows(x: npt.ArrayLike) -> FloatArray:
    """Rows scaled to unit L2 norm (float32), so dot products are cosines; all-zero rows stay zero."""
    arr = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    out: FloatArray = np.divide(arr, norms, out=np.zeros_like(arr), where=norms > 0)
    return out


def _sorted_catalogue(items: FloatArray, item_ids: IntArray) -> tuple[FloatArray, IntArray]:
    """The catalogue ordered by id, so column order is the id tie-break order."""
    if np.all(item_ids[1:] > item_ids[:-1]):
        return items, item_ids
    order = np.argsort(item_ids, kind="stable")
    sorted_ids = item_ids[order]
    if np.any(sorted_ids[1:] == sorted_ids[:-1]):
        raise ValueError("item_ids must be distinct")
    return items[order], sorted_ids


def _columns_of(ids: npt.ArrayLike, sorted_ids: IntArray) -> IntArray:
    """Column of each id in the sorted catalogue, -1 for ids that are not in it."""
    ids = np.asarray(ids, dtype=np.int64)
    if sorted_ids.size == 0:
        return np.full(ids.shape, -1, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, ids)
    pos_clipped = np.minimum(pos, sorted_ids.size - 1)
    return np.where(sorted_ids[pos_clipped] == ids, pos_clipped, -1).astype(np.int64)


def _block_top(scores: FloatArray, k: int, keys: IntArray | None = None) -> tuple[IntArray, FloatArray]:
    """Top-k positions of each row of a score block; ties at the cut go to the lower key.

    `keys` (same shape as `scores`) are the tie-break keys, by default the position itself.
    Returns (positions (r, k), scores (r, k)), unordered within a row.
    """
    rows, width = scores.shape
    if k >= width:
        cols = np.broadcast_to(np.arange(width, dtype=np.int64), (rows, width)).copy()
        return cols, scores.copy()
    cols = np.argpartition(-scores, k - 1, axis=1)[:, :k].astype(np.int64)
    top = np.take_along_axis(scores, cols, axis=1)
    kth = top.min(axis=1)
    # argpartition picks arbitrarily among values equal to the k-th: re-pick those rows by key.
    ambiguous = np.nonzero((scores >= kth[:, None]).sum(axis=1) > k)[0]
    if ambiguous.size:
        sub = scores[ambiguous]
        sub_keys = np.broadcast_to(np.arange(width), sub.shape) if keys is None else keys[ambiguous]
        picked = np.lexsort((sub_keys, -sub), axis=1)[:, :k].astype(np.int64)
        cols[ambiguous] = picked
        top[ambiguous] = np.take_along_axis(sub, picked, axis=1)
    return cols, top


def _padded(passed: npt.NDArray[np.bool_], scores: FloatArray, c0: int) -> tuple[IntArray, FloatArray]:
    """The True entries of each row of `passed` as (columns + c0, scores), left-aligned, padded -1 / -inf."""
    rows, cols = np.nonzero(passed)
    width = int(np.bincount(rows, minlength=passed.shape[0]).max())
    slot = np.arange(rows.size) - np.searchsorted(rows, rows)
    out_cols = np.full((passed.shape[0], width), -1, dtype=np.int64)
    out_scores = np.full((passed.shape[0], width), -np.inf, dtype=np.float32)
    out_cols[rows, slot] = cols + c0
    out_scores[rows, slot] = scores[rows, cols]
    return out_cols, out_scores


def _merge(cols: list[IntArray], scores: list[FloatArray], k: int) -> tuple[IntArray, FloatArray]:
    """The best k (columns, scores) per row of several candidate blocks, ties to the lower column."""
    all_cols = np.concatenate(cols, axis=1)
    all_scores = np.concatenate(scores, axis=1)
    # Padding (-1, -inf) never beats a real score; among padding the order does not matter.
    pos, top = _block_top(all_scores, k, np.where(all_cols >= 0, all_cols, np.iinfo(np.int64).max))
    return np.take_along_axis(all_cols, pos, axis=1), top


def _row_block_top(
    q_block: FloatArray,
    x: FloatArray,
    k: int,
    block_items: int,
    own: IntArray | None,
    ex_rows: IntArray | None,
    ex_cols: IntArray | None,
) -> tuple[IntArray, FloatArray]:
    """Top-k (columns, scores) of one block of query rows over the whole catalogue, ordered, padded -1 / -inf.

    Each row keeps a threshold, the k-th best score kept so far (-inf until it has k). A later
    score must beat it strictly, since a tie loses to the lower column already kept; so after the
    first blocks only a few scores per block pass one comparison, and `argpartition` runs on a
    whole block only where more than k per row pass. Passing scores wait in a small buffer that is
    merged back to k per row (raising the thresholds) once it holds k columns.
    """
    r, n_items = q_block.shape[0], x.shape[0]
    best_cols = np.full((r, k), -1, dtype=np.int64)
    best_scores = np.full((r, k), -np.inf, dtype=np.float32)
    thr = np.full(r, -np.inf, dtype=np.float32)
    pending_cols: list[IntArray] = []
    pending_scores: list[FloatArray] = []
    pending = 0
    for c0 in range(0, n_items, block_items):
        c1 = min(c0 + block_items, n_items)
        scores = q_block @ x[c0:c1].T  # (rows, cols) float32 GEMM
        if own is not None:
            hit = np.nonzero((own >= c0) & (own < c1))[0]
            scores[hit, own[hit] - c0] = -np.inf
        if ex_rows is not None and ex_cols is not None:
            inside = (ex_cols >= c0) & (ex_cols < c1)
            scores[ex_rows[inside], ex_cols[inside] - c0] = -np.inf
        passed = scores > thr[:, None]
        most = int(passed.sum(axis=1).max())
        if most == 0:
            continue
        if most > k:
            pos, top = _block_top(np.where(passed, scores, -np.inf).astype(np.float32, copy=False), k)
            cand_cols, cand_scores = np.where(np.isfinite(top), pos + c0, -1), top
        else:
            cand_cols, cand_scores = _padded(passed, scores, c0)
        pending_cols.append(cand_cols)
        pending_scores.append(cand_scores)
        pending += cand_cols.shape[1]
        if pending >= k:
            best_cols, best_scores = _merge([best_cols, *pending_cols], [best_scores, *pending_scores], k)
            thr = best_scores.min(axis=1)
            pending_cols, pending_scores, pending = [], [], 0
    if pending:
        best_cols, best_scores = _merge([best_cols, *pending_cols], [best_scores, *pending_scores], k)
    key = np.where(best_cols >= 0, best_cols, np.iinfo(np.int64).max)
    order = np.lexsort((key, -best_scores), axis=1)
    return np.take_along_axis(best_cols, order, axis=1), np.take_along_axis(best_scores, order, axis=1)


def _checked_factors(
    queries: npt.ArrayLike, items: npt.ArrayLike, item_ids: npt.ArrayLike | None
) -> tuple[FloatArray, FloatArray, IntArray]:
    """float32 query and item factors and the item ids (default 0..n_items-1), catalogue sorted by id."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    x = np.ascontiguousarray(items, dtype=np.float32)
    if q.ndim != 2 or x.ndim != 2 or (q.shape[0] and x.shape[0] and q.shape[1] != x.shape[1]):
        raise ValueError(f"queries {q.shape} and items {x.shape} must be 2-d with the same rank")
    n_items = x.shape[0]
    ids = np.arange(n_items, dtype=np.int64) if item_ids is None else np.asarray(item_ids, dtype=np.int64)
    if ids.shape != (n_items,):
        raise ValueError(f"item_ids has shape {ids.shape}, expected ({n_items},)")
    x, ids = _sorted_catalogue(x, ids)
    return q, x, ids


def _self_columns(query_ids: npt.ArrayLike | None, ids: IntArray, m: int) -> IntArray:
    """The catalogue column of each query row's own item (exclude_self)."""
    if query_ids is None:
        raise ValueError("exclude_self needs query_ids")
    cols = _columns_of(query_ids, ids)
    if cols.shape != (m,):
        raise ValueError(f"query_ids has shape {cols.shape}, expected ({m},)")
    return cols


def _excluded_columns(
    exclude_indptr: npt.ArrayLike | None, exclude_indices: npt.ArrayLike | None, ids: IntArray, m: int
) -> tuple[IntArray | None, IntArray | None]:
    """(indptr, catalogue column of each excluded id: -1 outside the catalogue), or (None, None): no exclusions."""
    if exclude_indptr is None:
        return None, None
    indptr = np.asarray(exclude_indptr, dtype=np.int64)
    if indptr.shape != (m + 1,):
        raise ValueError(f"exclude_indptr has shape {indptr.shape}, expected ({m + 1},)")
    excluded = np.asarray(exclude_indices if exclude_indices is not None else [], dtype=np.int64)
    return indptr, _columns_of(excluded, ids)


def _block_exclusions(
    indptr: IntArray | None, excl_cols: IntArray | None, r0: int, r1: int
) -> tuple[IntArray | None, IntArray | None]:
    """(block row, catalogue column) of the excluded items of query rows r0..r1 that are in the catalogue."""
    if indptr is None or excl_cols is None:
        return None, None
    ex_rows = np.repeat(np.arange(r1 - r0), np.diff(indptr[r0 : r1 + 1]))
    ex_cols = excl_cols[indptr[r0] : indptr[r1]]
    valid = ex_cols >= 0
    return ex_rows[valid], ex_cols[valid]


def top_n_dot(
    queries: npt.ArrayLike,
    items: npt.ArrayLike,
    n: int,
    item_ids: npt.ArrayLike | None = None,
    *,
    query_ids: npt.ArrayLike | None = None,
    exclude_self: bool = False,
    exclude_indptr: npt.ArrayLike | None = None,
    exclude_indices: npt.ArrayLike | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_items: int = DEFAULT_BLOCK_ITEMS,
) -> TopN:
    """Top-`n` catalogue items per query row by dot product, blocked float32 GEMM.

    Args:
        queries: (m, d) query factors.
        items: (n_items, d) catalogue factors.
        n: results per row; more than the catalogue returns the whole (non-excluded) catalogue.
        item_ids: (n_items,) distinct ids of `items` rows; default 0..n_items-1.
        query_ids: (m,) the query rows' own item ids, used by `exclude_self`.
        exclude_self: drop the item whose id equals the row's `query_ids` entry.
        exclude_indptr: (m + 1,) CSR offsets into `exclude_indices`.
        exclude_indices: item ids each row must not get back.
        block_rows: query rows per GEMM block.
        block_items: catalogue columns per GEMM block.

    Returns:
        TopN with k = min(n, n_items) columns, ordered by score desc then id asc.

    Raises:
        ValueError: shapes disagree, ids repeat, or n/block sizes are not positive.
    """
    if n < 1 or block_rows < 1 or block_items < 1:
        raise ValueError("n, block_rows and block_items must be positive")
    q, x, ids = _checked_factors(queries, items, item_ids)
    m, n_items = q.shape[0], x.shape[0]
    k = min(n, n_items)
    out_ids = np.full((m, k), -1, dtype=np.int64)
    out_scores = np.full((m, k), -np.inf, dtype=np.float32)
    if m == 0 or k == 0:
        return TopN(out_ids, out_scores, np.zeros(m, dtype=np.int64))

    self_cols = _self_columns(query_ids, ids, m) if exclude_self else None
    indptr, excl_cols = _excluded_columns(exclude_indptr, exclude_indices, ids, m)
    for r0 in range(0, m, block_rows):
        r1 = min(r0 + block_rows, m)
        ex_rows, ex_cols = _block_exclusions(indptr, excl_cols, r0, r1)
        own = self_cols[r0:r1] if self_cols is not None else None
        cols, top = _row_block_top(q[r0:r1], x, k, block_items, own, ex_rows, ex_cols)
        out_scores[r0:r1] = top
        out_ids[r0:r1] = np.where(cols >= 0, ids[np.maximum(cols, 0)], -1)
    real = np.isfinite(out_scores)
    out_ids[~real] = -1
    out_scores[~real] = -np.inf
    return TopN(out_ids, out_scores, real.sum(axis=1).astype(np.int64))


def to_long(query_keys: npt.ArrayLike, result: TopN) -> tuple[IntArray, IntArray, FloatArray, IntArray]:
    """Flatten a TopN into long form: (query key, item id, score, rank starting at 1) per real entry."""
    keys = np.asarray(query_keys)
    width = result.ids.shape[1]
    real = np.arange(width)[None, :] < result.counts[:, None]
    rows, cols = np.nonzero(real)
    return (
        keys[rows].astype(np.int64),
        result.ids[rows, cols],
        result.scores[rows, cols],
        (cols + 1).astype(np.int64),
    )


def csr_from_lists(lists: list[npt.ArrayLike | None]) -> tuple[IntArray, IntArray]:
    """CSR segments (indptr (m + 1,), indices) from one id list (or None) per row."""
    arrays = [np.asarray(v if v is not None else [], dtype=np.int64).ravel() for v in lists]
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    indptr = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return indptr, indices.astype(np.int64)
