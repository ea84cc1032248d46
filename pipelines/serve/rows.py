"""The kernel's user rows held as numpy, not pandas: gold.rerank_inputs converted once per run into one value
array and one offsets array per list column (and the factors as one matrix), sliced per request without copying,
and a batch of requests' rows assembled straight into udfs.rerank's UserBatch.

This is what the Spark path's `kernel_frames.to_user_batch` builds from a pandas batch, minus pandas: per
request the service pays for numpy slicing and one concatenation per column, not for a DataFrame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.columns import FEATURES
from pipelines.core.kernel_frames import (
    CAND_ALS,
    CAND_EASE,
    CAND_ITEMS,
    CAND_REBUY,
    EV_AGES,
    EV_BOUGHT,
    EV_ITEMS,
    EV_WEIGHTS,
)
from udfs.rerank import UserBatch
from udfs.segments import range_positions

LIST_COLUMNS = {
    CAND_ITEMS: np.int64,
    CAND_ALS: np.bool_,
    CAND_EASE: np.float64,
    CAND_REBUY: np.float64,
    EV_ITEMS: np.int64,
    EV_WEIGHTS: np.float64,
    EV_AGES: np.float64,
    EV_BOUGHT: np.bool_,
}


class UserRow(NamedTuple):
    """One user's kernel input: factors (None: none) and the candidate and fresh-event arrays."""

    features: np.ndarray | None  # (rank,) float32
    cand_items: np.ndarray
    cand_als: np.ndarray
    cand_ease: np.ndarray
    cand_rebuy: np.ndarray
    ev_items: np.ndarray
    ev_weights: np.ndarray
    ev_ages: np.ndarray
    ev_bought: np.ndarray


@dataclass(frozen=True)
class StoredRows:
    """gold.rerank_inputs of one run: row i's values of column c are values[c][offsets[c][i]:offsets[c][i + 1]]."""

    factors: np.ndarray  # (users, rank) float32; zeros where has is False
    has: np.ndarray  # (users,) bool: the user has factors
    offsets: dict[str, np.ndarray]  # (users + 1,) int64 per list column
    values: dict[str, np.ndarray]

    @classmethod
    def from_arrow(cls, table: pa.Table, rank: int) -> StoredRows:
        """From gold.rerank_inputs' Arrow columns (a missing score column reads as zeros: 'none')."""
        offsets, values = {}, {}
        cands = _lengths(table.column(CAND_ITEMS))
        for name, dtype in LIST_COLUMNS.items():
            if name in table.column_names:
                lengths, flat = _lengths(table.column(name)), _flat(table.column(name), dtype)
            else:
                lengths, flat = cands, np.zeros(int(cands.sum()), dtype=dtype)
            offsets[name] = np.r_[0, np.cumsum(lengths)].astype(np.int64)
            values[name] = flat
        features = table.column(FEATURES)
        has = ~np.asarray(features.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        factors = np.zeros((table.num_rows, rank), dtype=np.float32)
        if has.any():
            factors[has] = _flat(features, np.float32).reshape(int(has.sum()), rank)
        return cls(factors, has, offsets, values)

    @property
    def nbytes(self) -> int:
        arrays = [self.factors, self.has, *self.offsets.values(), *self.values.values()]
        return sum(a.nbytes for a in arrays)

    def row(self, at: int) -> UserRow:
        """Row `at` (views into the stored arrays)."""
        lists = [self.values[c][self.offsets[c][at] : self.offsets[c][at + 1]] for c in LIST_COLUMNS]
        return UserRow(self.factors[at] if self.has[at] else None, *lists)

    def take(self, positions: np.ndarray) -> StoredRows:
        """The rows at `positions` (repeats allowed) as a new StoredRows: tiling a run to a larger one."""
        offsets, values = {}, {}
        for name, ptr in self.offsets.items():
            lengths = np.diff(ptr)[positions]
            new = np.r_[0, np.cumsum(lengths)].astype(np.int64)
            source = range_positions(ptr[positions], lengths)
            offsets[name], values[name] = new, self.values[name][source]
        return StoredRows(self.factors[positions], self.has[positions], offsets, values)


def user_batch(rows: list[UserRow], rank: int) -> UserBatch:
    """The kernel's segment arrays for `rows`, in order (what kernel_frames.to_user_batch makes of a pandas batch)."""
    factors = np.zeros((len(rows), rank), dtype=np.float32)
    has = np.array([r.features is not None for r in rows], dtype=bool)
    for at, row in enumerate(rows):
        if row.features is not None:
            factors[at] = row.features

    def joined(field: str) -> np.ndarray:
        return np.concatenate([getattr(r, field) for r in rows])

    def indptr(field: str) -> np.ndarray:
        return np.concatenate(([0], np.cumsum([len(getattr(r, field)) for r in rows]))).astype(np.int64)

    return UserBatch(
        factors,
        has,
        indptr("cand_items"),
        joined("cand_items"),
        joined("cand_als"),
        indptr("ev_items"),
        joined("ev_items"),
        joined("ev_weights"),
        joined("ev_ages"),
        joined("ev_bought"),
        joined("cand_ease"),
        joined("cand_rebuy"),
    )


def _lengths(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.list_value_length(column), 0).to_numpy(), dtype=np.int64)


def _flat(column: pa.ChunkedArray, dtype: type) -> np.ndarray:
    return np.asarray(pc.list_flatten(column).to_numpy(zero_copy_only=False), dtype=dtype)
