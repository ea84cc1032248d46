"""Per-user candidate union and cap in numpy: the stream's replacement for a Spark group-by per micro-batch.

No pyspark import: runs inside `mapInPandas` on the executors and in plain unit tests.

The batch path builds each user's candidates in Spark (`pipelines.core.reranking.to_capped_candidates` over
the union of the sources, one row per user and item). The stream holds the serving run's stored candidates
already grouped per user, and adds per micro-batch a few extra candidates per user (neighbours of the items
they just touched, popular items for users without factors). Re-grouping every stored candidate of the batch's
users in Spark cost a shuffle of all of them each batch; here the union and the cap run on the segments of
one Arrow batch, with the same result:

- one candidate per (user, item): the largest ALS score (NaN = none), the union of the sources;
- per user, at most `max_candidates` with an ALS score (highest score, then more sources, then item id) and
  at most `max_candidates` without (more sources, then item id);
- output per user in item order.

Segments are CSR-style: user r's entries are `[indptr[r], indptr[r + 1])`. Sources are counted, not named:
a stored candidate carries `others` (how many of its sources are neither of the two extra kinds) and `kinds`,
a bit mask of the extra kinds it already has (NEIGHBOURS_BIT, POPULAR_BIT); an extra carries its kinds. The
union's size is `others + popcount(kinds | kinds')`, exactly the size of the union of the source names.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

NEIGHBOURS_BIT = 1
POPULAR_BIT = 2

IntArray = npt.NDArray[np.int64]


class Candidates(NamedTuple):
    indptr: IntArray  # (users + 1,)
    items: IntArray
    als: npt.NDArray[np.bool_]  # the candidate has an ALS score


def _rows(indptr: IntArray) -> IntArray:
    return np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))


def merge_candidates(
    stored_indptr: IntArray,
    stored_items: IntArray,
    stored_als: npt.NDArray[np.float64],
    stored_others: IntArray,
    stored_kinds: IntArray,
    extra_indptr: IntArray,
    extra_items: IntArray,
    extra_kinds: IntArray,
    max_candidates: int,
) -> Candidates:
    """The union of each user's stored and extra candidates, capped as to_capped_candidates (see module doc)."""
    users = stored_indptr.size - 1
    if extra_indptr.size - 1 != users:
        raise ValueError(f"stored segments have {users} users, extra segments {extra_indptr.size - 1}")
    n_extra = extra_items.size
    row = np.concatenate([_rows(stored_indptr), _rows(extra_indptr)])
    item = np.concatenate([stored_items, extra_items]).astype(np.int64)
    als = np.concatenate([stored_als.astype(np.float64), np.full(n_extra, np.nan)])
    others = np.concatenate([stored_others, np.zeros(n_extra, dtype=np.int64)]).astype(np.int64)
    kinds = np.concatenate([stored_kinds, extra_kinds]).astype(np.int64)
    if item.size == 0:
        return Candidates(np.zeros(users + 1, dtype=np.int64), item, np.zeros(0, dtype=bool))
    # One entry per (user, item): sort, then reduce each run of equal keys.
    order = np.lexsort((item, row))
    row, item, als, others, kinds = row[order], item[order], als[order], others[order], kinds[order]
    first = np.flatnonzero(np.r_[True, (row[1:] != row[:-1]) | (item[1:] != item[:-1])])
    row, item = row[first], item[first]
    als = np.fmax.reduceat(als, first)  # fmax skips NaN: the largest score, NaN when none has one
    others = np.maximum.reduceat(others, first)
    kinds = np.bitwise_or.reduceat(kinds, first)
    has = ~np.isnan(als)
    sources = others + (kinds & NEIGHBOURS_BIT > 0) + (kinds & POPULAR_BIT > 0)
    # The cap: within (user, has a score), best first; keep the first max_candidates of each group.
    rank_order = np.lexsort((item, -sources, np.where(has, -als, 0.0), ~has, row))
    r, h = row[rank_order], has[rank_order]
    starts = np.r_[True, (r[1:] != r[:-1]) | (h[1:] != h[:-1])]
    group_start = np.flatnonzero(starts)[np.cumsum(starts) - 1]
    position = np.arange(r.size) - group_start
    kept = np.sort(rank_order[position < max_candidates])  # back to (user, item) order
    indptr = np.zeros(users + 1, dtype=np.int64)
    np.cumsum(np.bincount(row[kept], minlength=users), out=indptr[1:])
    return Candidates(indptr, item[kept], has[kept])
