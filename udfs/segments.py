"""CSR segment helpers shared by the re-ranking kernel (`udfs.rerank`) and its features (`udfs.features`).

No pyspark import. Per-user data are segments of flat arrays (CSR / indptr style: row r owns entries
`indptr[r]:indptr[r + 1]`); these helpers map ids to catalogue rows and reduce or rank within segments
without a loop over rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def catalogue_columns(ids: IntArray, catalogue: IntArray) -> IntArray:
    """Row of each id in the sorted catalogue, -1 when absent."""
    if catalogue.size == 0:
        return np.full(ids.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(catalogue, ids), catalogue.size - 1)
    found: IntArray = np.where(catalogue[pos] == ids, pos, -1).astype(np.int64)
    return found


def segment_rows(indptr: IntArray) -> IntArray:
    """(nnz,) owning row of every entry of a CSR segment array."""
    return np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))


def range_positions(starts: IntArray, lengths: IntArray) -> IntArray:
    """Positions of the ranges [starts[i], starts[i] + lengths[i]) one after the other (a CSR gather)."""
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))


def group_rank(*keys: npt.NDArray[Any]) -> IntArray:
    """0-based position of each entry within its run of equal consecutive key tuples (keys sorted)."""
    n = keys[0].size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.zeros(n - 1, dtype=bool)
    for key in keys:
        change |= key[1:] != key[:-1]
    starts = np.concatenate(([0], np.flatnonzero(change) + 1))  # not np.r_: ~20 us a call, on the serving path
    lengths = np.diff(np.append(starts, n))
    return np.asarray(np.arange(n, dtype=np.int64) - np.repeat(starts, lengths), dtype=np.int64)


def segment_reduce(
    values: FloatArray, segments: IntArray, n_segments: int, ufunc: np.ufunc, empty: float
) -> FloatArray:
    """ufunc.reduceat along axis 0 over sorted segment ids; segments with no entry get `empty`."""
    out = np.full((n_segments, *values.shape[1:]), empty, dtype=np.float64)
    if values.shape[0]:
        starts = np.concatenate(([0], np.flatnonzero(segments[1:] != segments[:-1]) + 1))
        out[segments[starts]] = ufunc.reduceat(values, starts, axis=0)
    return out
