"""Intra-list diversity of many lists at once, numpy only (no pyspark import).

Called by `pipelines.core.metrics` inside `mapInPandas` on a batch of lists (one per user and model). A list is a
segment of flat arrays (CSR style: list r owns entries `indptr[r]:indptr[r + 1]`), each entry an item's rank in
the list and its unit factor vector, in any order. For every cut-off k the value of a list is the mean of
(1 - cosine) over the unordered pairs of its entries ranked <= k, NaN where fewer than two entries are.

Lists are processed in chunks of at most `chunk_lists`, padded to the chunk's longest list (padding is never
inside a cut-off), so memory is bounded whatever the batch size: (lists x m x m) cosines, m <= the longest list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

CHUNK_LISTS = 4096
_OUTSIDE = np.iinfo(np.int64).max  # the rank of a padding entry: above every cut-off


def list_diversity(
    indptr: IntArray, ranks: IntArray, units: FloatArray, ks: Sequence[int], chunk_lists: int = CHUNK_LISTS
) -> FloatArray:
    """(lists, len(ks)): each list's mean (1 - cosine) over its pairs within each cut-off; NaN without a pair.

    Args:
        indptr: (lists + 1,) segment bounds into `ranks` and `units`.
        ranks: (entries,) each entry's rank in its list (1 = first).
        units: (entries, d) unit vectors (cosine = dot product).
        ks: the cut-offs.
        chunk_lists: lists per chunk.
    """
    lists = indptr.size - 1
    out = np.full((lists, len(ks)), np.nan)
    for start in range(0, lists, chunk_lists):
        stop = min(start + chunk_lists, lists)
        out[start:stop] = _chunk(indptr[start : stop + 1], ranks, units, ks)
    return out


def _chunk(indptr: IntArray, ranks: IntArray, units: FloatArray, ks: Sequence[int]) -> FloatArray:
    lengths = np.diff(indptr)
    n, m = lengths.size, int(lengths.max(initial=0))
    row = np.repeat(np.arange(n), lengths)
    pos = np.arange(indptr[0], indptr[-1]) - np.repeat(indptr[:-1], lengths)
    padded_ranks = np.full((n, m), _OUTSIDE, dtype=np.int64)
    padded_units = np.zeros((n, m, units.shape[1]))
    padded_ranks[row, pos] = ranks[indptr[0] : indptr[-1]]
    padded_units[row, pos] = units[indptr[0] : indptr[-1]]
    distance = 1.0 - np.einsum("nid,njd->nij", padded_units, padded_units)
    upper = np.triu(np.ones((m, m), dtype=bool), k=1)
    out = np.full((n, len(ks)), np.nan)
    for j, k in enumerate(ks):
        inside = padded_ranks <= k
        pairs = upper & inside[:, :, None] & inside[:, None, :]
        count = pairs.sum(axis=(1, 2))
        total = np.where(pairs, distance, 0.0).sum(axis=(1, 2))
        out[:, j] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out
