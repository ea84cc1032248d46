"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders"): the numpy kernels behind `pipelines.core.ease`.

No pyspark import (and no scipy): the fit runs on the driver, the scoring kernel inside `mapInPandas`
on the executors, and both in plain unit tests.

Model. With X the (users, n) interaction matrix and G = XᵀX its (n, n) Gram matrix,
P = (G + λI)⁻¹ and B_ij = -P_ij / P_jj for i != j, B_jj = 0. A user's scores are s_u = x_u B, i.e.
s_ui = Σ_j x_uj B_ji: row j of B is what holding item j adds to every other item.

Shapes (n catalogue items, m users, k = min(N, n) result columns, e pruned entries <= n * top_n):

- `gram`     (n, n) float64: XᵀX over the catalogue `ids`
- `ids`, `item_ids` (n,) int64: distinct item ids, strictly ascending (column order is the tie-break order)
- `B`        (n, n) float32: the EASE weights, zero diagonal
- pruned long arrays (e,): `src` int64 (the row's item), `dst` int64 (the item it scores), `weight`
  float32, `rank` int32 (1 = src's largest weight)
- neighbour CSR over catalogue rows: `nb_indptr` (n + 1,) int64, `nb_cols` (e,) int64 column positions
  in `item_ids`, `nb_weights` (e,) float32
- user CSR: `user_indptr` (m + 1,) int64, `user_items` item ids, `user_values` float64 (x_uj)
- result: `udfs.topk.TopN` (`ids` (m, k) padded -1, `scores` (m, k) float32 padded -inf, `counts` (m,)),
  so `udfs.topk.to_long` flattens it

Ordering everywhere is deterministic: weight (or score) descending, then item id ascending; ties at
the cut go to the lower id, so results equal a full sort.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from udfs.topk import TopN

FloatArray = npt.NDArray[np.float32]
DoubleArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Entries of one dense (users x items) score block: 4M float64 = 32 MB, whatever the catalogue size.
DEFAULT_BLOCK_CELLS = 4_000_000
# Dense n x n float64 buffers alive at once in fit_ease(overwrite_gram=True): the gram (overwritten
# with G + λI), LAPACK's copy of it, the identity right-hand side, and np.linalg.inv's output.
DENSE_BUFFERS = 4


def fit_ease(
    gram: npt.ArrayLike,
    lam: float,
    *,
    overwrite_gram: bool = False,
    inverse: Callable[[npt.NDArray[np.floating]], npt.NDArray[np.floating]] = np.linalg.inv,  # type: ignore[assignment]
    dtype: type[np.floating] = np.float64,
) -> FloatArray:
    """The EASE weight matrix from a Gram matrix, inverted in `dtype` (float64 by default).

    Args:
        gram: (n, n) XᵀX, symmetric.
        lam: L2 penalty λ added to the diagonal; must be positive so G + λI is invertible.
        overwrite_gram: reuse `gram` (an ndarray of `dtype`) as the work buffer, saving one n x n copy;
            its contents are then destroyed.
        inverse: inverts the symmetric positive definite G + λI in its dtype (it may overwrite its argument);
            numpy's general inverse by default, a Cholesky inverse (about 2.7x fewer flops) on the driver.
        dtype: float64, or float32 for half the time and memory of the inverse (B is float32 either way).

    Returns:
        (n, n) float32 B with B_ij = -P_ij / P_jj and a zero diagonal, P = (G + λI)⁻¹.

    Raises:
        ValueError: `gram` is not square or `lam` is not positive.
    """
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    g = np.asarray(gram, dtype=dtype)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram has shape {g.shape}, expected (n, n)")
    if g is gram and not overwrite_gram:
        g = g.copy()  # np.asarray already copied when gram was a list or another dtype
    n = g.shape[0]
    g.flat[:: n + 1] += lam
    p = inverse(g)
    del g
    diag = np.diagonal(p).copy()
    p /= -diag[None, :]  # column j scaled by -1 / P_jj, in place: no third n x n float64 buffer
    p.flat[:: n + 1] = 0.0
    return p.astype(np.float32, copy=False)


def fit_ease_reference(gram: npt.ArrayLike, lam: float) -> FloatArray:
    """Slow reference of `fit_ease`, the formula written out entry by entry (tests only)."""
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    p = np.linalg.inv(g + lam * np.eye(n))
    b = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                b[i, j] = -p[i, j] / p[j, j]
    return b.astype(np.float32)


def dense_peak_bytes(n: int, itemsize: int = 8) -> int:
    """Estimated peak bytes of the dense n x n matrices during `fit_ease(overwrite_gram=True)` in a dtype of
    `itemsize` bytes (8: float64, 4: float32)."""
    return DENSE_BUFFERS * itemsize * n * n


def _ascending_ids(ids: npt.ArrayLike, n: int) -> IntArray:
    arr = np.asarray(ids, dtype=np.int64)
    if arr.shape != (n,):
        raise ValueError(f"ids has shape {arr.shape}, expected ({n},)")
    if np.any(arr[1:] <= arr[:-1]):
        raise ValueError("ids must be strictly ascending")
    return arr


def _top_k_rows(scores: npt.NDArray[np.floating], k: int) -> tuple[IntArray, npt.NDArray[np.floating]]:
    """Top-k columns of each row, score desc then column asc; -inf marks an entry that may not be picked.

    Returns (columns (r, k) padded -1, scores (r, k) padded -inf), ordered within each row.
    """
    rows, width = scores.shape
    k = min(k, width)
    if k == 0 or rows == 0:
        return np.full((rows, k), -1, dtype=np.int64), np.full((rows, k), -np.inf, dtype=scores.dtype)
    if k < width:
        cols = np.argpartition(-scores, k - 1, axis=1)[:, :k].astype(np.int64)
        kth = np.take_along_axis(scores, cols, axis=1).min(axis=1)
        # argpartition picks arbitrarily among values equal to a finite k-th: re-pick those rows in full.
        ambiguous = np.nonzero(np.isfinite(kth) & ((scores >= kth[:, None]).sum(axis=1) > k))[0]
        if ambiguous.size:
            sub = scores[ambiguous]
            keys = np.broadcast_to(np.arange(width), sub.shape)
            cols[ambiguous] = np.lexsort((keys, -sub), axis=1)[:, :k]
    else:
        cols = np.broadcast_to(np.arange(width, dtype=np.int64), (rows, width)).copy()
    top = np.take_along_axis(scores, cols, axis=1)
    order = np.lexsort((cols, -top), axis=1)
    cols, top = np.take_along_axis(cols, order, axis=1), np.take_along_axis(top, order, axis=1)
    cols[~np.isfinite(top)] = -1
    return cols, top


def prune_top_n(
    b: npt.ArrayLike, ids: npt.ArrayLike, top_n: int, *, block_cells: int = DEFAULT_BLOCK_CELLS
) -> tuple[IntArray, IntArray, FloatArray, npt.NDArray[np.int32]]:
    """Each item's `top_n` strongest contributions, as long arrays.

    Rule: for each row j of B (what holding item j adds to item i), keep only positive weights, the
    `top_n` largest, ties to the lower item id; rank counts from 1. A row with fewer positive weights
    keeps them all. The zero diagonal is never kept.

    Args:
        b: (n, n) EASE weights.
        ids: (n,) strictly ascending item ids of B's rows and columns.
        top_n: entries kept per row, positive.
        block_cells: rows are processed in blocks of about this many entries.

    Returns:
        (src (e,) int64, dst (e,) int64, weight (e,) float32, rank (e,) int32), ordered by src then rank.

    Raises:
        ValueError: shapes disagree, ids are not strictly ascending, or top_n is not positive.
    """
    w = np.asarray(b, dtype=np.float32)
    n = w.shape[0]
    if w.shape != (n, n):
        raise ValueError(f"B has shape {w.shape}, expected (n, n)")
    item_ids = _ascending_ids(ids, n)
    if top_n < 1:
        raise ValueError(f"top_n must be positive, got {top_n}")
    step = max(1, block_cells // max(n, 1))
    parts: list[tuple[IntArray, IntArray, FloatArray, npt.NDArray[np.int32]]] = []
    for r0 in range(0, n, step):
        block = w[r0 : r0 + step]
        cols, top = _top_k_rows(np.where(block > 0, block, np.float32(-np.inf)), top_n)
        rows, slots = np.nonzero(cols >= 0)
        parts.append(
            (
                item_ids[rows + r0],
                item_ids[cols[rows, slots]],
                top[rows, slots].astype(np.float32),
                (slots + 1).astype(np.int32),
            )
        )
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int32)
    src, dst, weight, rank = (np.concatenate(a) for a in zip(*parts, strict=True))
    return src, dst, weight, rank


def _positions(values: npt.ArrayLike, item_ids: IntArray) -> IntArray:
    """Position of each id in the ascending `item_ids`, -1 for ids that are not in it."""
    v = np.asarray(values, dtype=np.int64)
    if item_ids.size == 0:
        return np.full(v.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(item_ids, v), item_ids.size - 1)
    return np.where(item_ids[pos] == v, pos, -1).astype(np.int64)


def ease_csr(
    src: npt.ArrayLike, dst: npt.ArrayLike, weight: npt.ArrayLike, item_ids: npt.ArrayLike
) -> tuple[IntArray, IntArray, FloatArray]:
    """The pruned neighbour rows as CSR over the catalogue: row r holds the entries whose src is item_ids[r].

    Args:
        src: (e,) item ids of the rows.
        dst: (e,) item ids of the columns.
        weight: (e,) weights.
        item_ids: (n,) strictly ascending catalogue ids, containing every src and dst.

    Returns:
        (nb_indptr (n + 1,) int64, nb_cols (e,) int64 positions of dst in item_ids, nb_weights (e,) float32),
        entries ordered by row then column.

    Raises:
        ValueError: lengths disagree, item_ids is not strictly ascending, or an id is not in item_ids.
    """
    catalogue = np.asarray(item_ids, dtype=np.int64)
    catalogue = _ascending_ids(catalogue, catalogue.size)
    rows, cols = _positions(src, catalogue), _positions(dst, catalogue)
    w = np.asarray(weight, dtype=np.float32)
    if not rows.shape == cols.shape == w.shape or rows.ndim != 1:
        raise ValueError(f"src {rows.shape}, dst {cols.shape} and weight {w.shape} must be equal 1-d shapes")
    if np.any(rows < 0) or np.any(cols < 0):
        raise ValueError("every src and dst id must be in item_ids")
    order = np.lexsort((cols, rows))
    indptr = np.zeros(catalogue.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=catalogue.size), out=indptr[1:])
    return indptr, cols[order], w[order]


def _gather_ranges(starts: IntArray, lengths: IntArray) -> IntArray:
    """Concatenation of arange(starts[i], starts[i] + lengths[i]) over i, vectorised."""
    total = int(lengths.sum())
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total, dtype=np.int64) - offsets)


def _user_entries(
    indptr: IntArray, items: npt.ArrayLike, values: npt.ArrayLike, item_ids: IntArray
) -> tuple[IntArray, IntArray, DoubleArray]:
    """(row, catalogue position, x) of every user entry whose item is in the catalogue."""
    cols = _positions(items, item_ids)
    x = np.asarray(values, dtype=np.float64)
    if cols.shape != x.shape or indptr[-1] != cols.size:
        raise ValueError(f"user_items {cols.shape} and user_values {x.shape} must match user_indptr[-1]")
    rows = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
    keep = cols >= 0
    return rows[keep], cols[keep], x[keep]


def _exclusions(
    indptr: npt.ArrayLike | None, indices: npt.ArrayLike | None, m: int, item_ids: IntArray
) -> tuple[IntArray, IntArray]:
    """(row, catalogue position) of every excluded item that is in the catalogue, rows ascending."""
    if indptr is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ptr = np.asarray(indptr, dtype=np.int64)
    if ptr.shape != (m + 1,):
        raise ValueError(f"exclude_indptr has shape {ptr.shape}, expected ({m + 1},)")
    cols = _positions(np.asarray(indices if indices is not None else [], np.int64), item_ids)
    rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(ptr))
    return rows[cols >= 0], cols[cols >= 0]


def _block_scores(
    rows: IntArray, cols: IntArray, x: DoubleArray, nb: tuple[IntArray, IntArray, FloatArray], r: int, n: int
) -> FloatArray:
    """Dense (r, n) scores Σ_j x_uj B_ji of one block of users (rows local to the block), float32."""
    nb_indptr, nb_cols, nb_weights = nb
    lengths = nb_indptr[cols + 1] - nb_indptr[cols]
    entries = _gather_ranges(nb_indptr[cols], lengths)
    keys = np.repeat(rows, lengths) * n + nb_cols[entries]
    contrib = np.repeat(x, lengths) * nb_weights[entries].astype(np.float64)
    # float64 sums, then float32 like udfs.topk, so ties are decided on the scores callers see.
    return np.bincount(keys, weights=contrib, minlength=r * n).reshape(r, n).astype(np.float32)


def _neighbour_arrays(
    nb_indptr: npt.ArrayLike, nb_cols: npt.ArrayLike, nb_weights: npt.ArrayLike, n: int
) -> tuple[IntArray, IntArray, FloatArray]:
    """The neighbour CSR as typed arrays, its shapes checked against a catalogue of `n` items."""
    nb = (np.asarray(nb_indptr, np.int64), np.asarray(nb_cols, np.int64), np.asarray(nb_weights, np.float32))
    if nb[0].shape != (n + 1,) or nb[1].shape != nb[2].shape:
        raise ValueError(f"nb_indptr must have shape ({n + 1},) and nb_cols / nb_weights equal shapes")
    return nb


def _positive_top(scores: FloatArray, ex_rows: IntArray, ex_cols: IntArray, width: int) -> tuple[IntArray, FloatArray]:
    """The top `width` columns per row of a score block among the positive, not excluded scores."""
    scores[ex_rows, ex_cols] = -np.inf
    scores[~(scores > 0)] = -np.inf
    return _top_k_rows(scores, width)


def top_n_sparse(
    user_indptr: npt.ArrayLike,
    user_items: npt.ArrayLike,
    user_values: npt.ArrayLike,
    nb_indptr: npt.ArrayLike,
    nb_cols: npt.ArrayLike,
    nb_weights: npt.ArrayLike,
    item_ids: npt.ArrayLike,
    k: int,
    exclude_indptr: npt.ArrayLike | None = None,
    exclude_indices: npt.ArrayLike | None = None,
    *,
    block_cells: int = DEFAULT_BLOCK_CELLS,
) -> TopN:
    """Top-`k` items per user by EASE score s_ui = Σ_j x_uj B_ji over the pruned neighbour rows.

    Users are scored in blocks of about `block_cells // n` rows with one np.bincount each, so memory is
    bounded by `block_cells`, not by users x items. Only items with a positive score are returned (a
    user may get fewer than k); items of `exclude_*` never are. User items outside the catalogue are
    ignored and repeated items add up.

    Args:
        user_indptr: (m + 1,) CSR offsets into `user_items` / `user_values`.
        user_items: item ids each user holds.
        user_values: x_uj of each held item.
        nb_indptr: (n + 1,) neighbour CSR offsets over catalogue rows (see `ease_csr`).
        nb_cols: catalogue positions of the neighbours.
        nb_weights: B_ji of each neighbour entry.
        item_ids: (n,) strictly ascending catalogue ids.
        k: results per user, positive.
        exclude_indptr: (m + 1,) CSR offsets into `exclude_indices`, or None.
        exclude_indices: item ids each user must not get back.
        block_cells: dense score cells per block.

    Returns:
        TopN with min(k, n) columns, ordered by score desc then id asc.

    Raises:
        ValueError: shapes disagree, ids are not strictly ascending, or k is not positive.
    """
    catalogue = _ascending_ids(np.asarray(item_ids, dtype=np.int64), np.size(item_ids))
    n = catalogue.size
    nb = _neighbour_arrays(nb_indptr, nb_cols, nb_weights, n)
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    indptr = np.asarray(user_indptr, dtype=np.int64)
    m, width = indptr.size - 1, min(k, n)
    rows, cols, x = _user_entries(indptr, user_items, user_values, catalogue)
    ex_rows, ex_cols = _exclusions(exclude_indptr, exclude_indices, m, catalogue)
    out_ids, out_scores = np.full((m, width), -1, dtype=np.int64), np.full((m, width), -np.inf, dtype=np.float32)
    step = max(1, block_cells // max(n, 1))
    for r0 in range(0, m if width else 0, step):
        r1 = min(r0 + step, m)
        u0, u1 = np.searchsorted(rows, (r0, r1))  # rows and ex_rows are ascending: a block is a slice
        scores = _block_scores(rows[u0:u1] - r0, cols[u0:u1], x[u0:u1], nb, r1 - r0, n)
        e0, e1 = np.searchsorted(ex_rows, (r0, r1))
        top_cols, top = _positive_top(scores, ex_rows[e0:e1] - r0, ex_cols[e0:e1], width)
        out_ids[r0:r1] = np.where(top_cols >= 0, catalogue[np.maximum(top_cols, 0)], -1)
        out_scores[r0:r1] = top
    return TopN(out_ids, out_scores, (out_ids >= 0).sum(axis=1).astype(np.int64))


def top_n_sparse_reference(
    user_lists: list[list[tuple[int, float]]],
    neighbours: dict[int, list[tuple[int, float]]],
    k: int,
    excluded: list[set[int]] | None = None,
) -> list[list[tuple[float, int]]]:
    """Slow reference of `top_n_sparse`: per user, (score, id) pairs with a positive score, best k.

    Args:
        user_lists: per user, (item id, x) pairs.
        neighbours: item id -> its pruned (neighbour id, weight) pairs.
        k: results per user.
        excluded: per user, ids never returned.

    Returns:
        Per user, up to k (float32-rounded score, id) pairs ordered by score desc then id asc.
    """
    out = []
    for u, held in enumerate(user_lists):
        acc: dict[int, float] = {}
        for item, x in held:
            for dst, w in neighbours.get(item, []):
                acc[dst] = acc.get(dst, 0.0) + float(x) * float(np.float32(w))
        banned = excluded[u] if excluded is not None else set()
        pairs = [(float(np.float32(s)), i) for i, s in acc.items() if i not in banned and np.float32(s) > 0]
        pairs.sort(key=lambda p: (-p[0], p[1]))
        out.append(pairs[:k])
    return out
