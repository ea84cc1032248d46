"""Batched greedy MMR: many users' diversity selections at once, numpy only (no pyspark import).

Reads and writes nothing: called by `udfs.rerank.rerank` on a batch of users' candidate pools. The
pools are segments of flat arrays (CSR / indptr style: user r owns entries `indptr[r]:indptr[r + 1]`),
each ordered by item id (so the lowest position is the lowest item id). Output grain: one entry per
(user, pick), users in input order, picks in pick order, `min(k, pool length)` picks per user.

Per user it is exactly `mmr_select` below (the per-user reference the tests compare against):
value = lam * relevance - (1 - lam) * max(0, cosine to the already picked), the highest value is
picked, ties go to the lowest position; lam >= 1 is the relevance order. "Exactly" means the same
picks and bit-identical values, so the arithmetic is the reference's, vectorised over users:

- users are grouped by pool length, so each group is a dense (users x p) relevance block and a
  (users x p x d) factor block with no padding: the stacked `U @ U^T` then calls the same BLAS
  routine with the same shape per user as the reference's `unit @ unit.T` (a padded product does
  not round the same way);
- each group is processed in chunks of users whose working set (the p x p cosines, the p x d factors
  and a few p-vectors per user) stays under `chunk_bytes` (64 MB by default), so memory is bounded
  whatever the batch size;
- the k greedy steps are vectorised across the chunk (row-wise argmax keeps the first maximum).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

CHUNK_BYTES = 64 << 20  # working set per chunk of users
_VECTORS_PER_USER = 6  # p-long float64 / bool work arrays per user in the greedy loop (generous)


class MmrPicks(NamedTuple):
    """`positions` (R,) into the flat inputs and `values` (R,), grouped by user (`indptr` (m + 1,)) in pick order."""

    positions: IntArray
    values: FloatArray
    indptr: IntArray


def mmr_batch(
    relevance: npt.ArrayLike,
    factor_rows: npt.ArrayLike,
    unit: npt.ArrayLike,
    indptr: npt.ArrayLike,
    k: int,
    lam: float,
    chunk_bytes: int = CHUNK_BYTES,
) -> MmrPicks:
    """Greedy MMR for every user's pool at once (see the module doc).

    Args:
        relevance: (N,) relevance of every pooled candidate, users' pools concatenated.
        factor_rows: (N,) row of each candidate in `unit` (unused when lam >= 1).
        unit: (n, d) unit-norm factors (float64 gives the reference's values); each user's factors are
            gathered from it chunk by chunk, so the (N, d) block is never built.
        indptr: (m + 1,) user r's pool is entries `indptr[r]:indptr[r + 1]`, ordered by item id.
        k: picks per user (fewer when the pool is shorter).
        lam: lambda in value = lam * relevance - (1 - lam) * redundancy.
        chunk_bytes: working-set bound per chunk of users.

    Returns:
        MmrPicks: flat positions into the inputs and their values, `indptr` segmenting them by user.
    """
    rel = np.asarray(relevance, dtype=np.float64)
    rows = np.asarray(factor_rows, dtype=np.int64)
    ptr = np.asarray(indptr, dtype=np.int64)
    lengths = np.diff(ptr)
    take = np.minimum(lengths, max(k, 0))
    out_ptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(take, out=out_ptr[1:])
    positions = np.empty(int(out_ptr[-1]), dtype=np.int64)
    values = np.empty(int(out_ptr[-1]), dtype=np.float64)
    if positions.size == 0:
        return MmrPicks(positions, values, out_ptr)
    table = np.asarray(unit, dtype=np.float64) if lam < 1.0 else np.zeros((0, 0))
    for users, p in _length_groups(lengths):
        kk = min(k, p)
        for chunk in np.array_split(users, -(-users.size // _chunk_users(p, table.shape[1], chunk_bytes))):
            idx = ptr[chunk][:, None] + np.arange(p)  # (B, p) flat positions
            if lam >= 1.0:
                picks, vals = _relevance_order(rel[idx], kk)
            else:
                picks, vals = _greedy(rel[idx], table[rows[idx]], kk, lam)
            dest = out_ptr[chunk][:, None] + np.arange(kk)
            positions[dest] = np.take_along_axis(idx, picks, axis=1)
            values[dest] = vals
    return MmrPicks(positions, values, out_ptr)


def mmr_select(relevance: FloatArray, unit: npt.NDArray[np.float64], k: int, lam: float) -> tuple[IntArray, FloatArray]:
    """Greedy MMR for one user's candidates, which must be ordered by item id (ties -> lower id).

    The per-user reference of `mmr_batch` (which `udfs.rerank.rerank` uses); tests hold them bit-identical.

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


def _length_groups(lengths: IntArray) -> list[tuple[IntArray, int]]:
    """(users with that pool length, length) for every non-zero length, users ascending."""
    by_length = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[by_length]
    starts = np.flatnonzero(np.concatenate(([True], sorted_lengths[1:] != sorted_lengths[:-1])))
    stops = np.append(starts[1:], sorted_lengths.size)
    return [
        (by_length[a:b], int(sorted_lengths[a])) for a, b in zip(starts, stops, strict=True) if sorted_lengths[a] > 0
    ]


def _chunk_users(p: int, d: int, chunk_bytes: int) -> int:
    """Users per chunk so that cosines (p x p), factors (p x d) and the work vectors fit in chunk_bytes."""
    per_user = 8 * (p * p + p * d + _VECTORS_PER_USER * p) + 8 * p  # + the (B, p) index block
    return max(1, chunk_bytes // per_user)


def _relevance_order(rel: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """(B, k) positions of the k most relevant per row (ties: lowest position) and their relevance."""
    picks = np.argsort(-rel, axis=1, kind="stable")[:, :k]
    return picks, np.take_along_axis(rel, picks, axis=1)


def _greedy(rel: FloatArray, unit: FloatArray, k: int, lam: float) -> tuple[IntArray, FloatArray]:
    """(B, k) picks and values of greedy MMR on B equal-length pools: rel (B, p), unit (B, p, d)."""
    b, p = rel.shape
    sims = np.matmul(unit, unit.transpose(0, 2, 1))  # per user the reference's unit @ unit.T
    np.maximum(sims, 0.0, out=sims)
    gain = lam * rel
    redundancy = np.zeros((b, p))
    free = np.ones((b, p), dtype=bool)
    users = np.arange(b)
    picks = np.empty((b, k), dtype=np.int64)
    values = np.empty((b, k))
    for step in range(k):
        value = np.where(free, gain - (1.0 - lam) * redundancy, -np.inf)
        best = np.argmax(value, axis=1)  # first maximum = lowest item id among ties
        picks[:, step] = best
        values[:, step] = value[users, best]
        free[users, best] = False
        np.maximum(redundancy, sims[users, best], out=redundancy)
    return picks, values
