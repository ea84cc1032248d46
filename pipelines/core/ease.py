"""EASE on Spark: the Gram matrix, the driver-side fit, the neighbour table and the candidates.

Reads silver.interactions rows (one row per event) handed in by the caller; writes nothing. The
frames it builds:

- EASE input: one row per (user_idx, item_idx) with the value x (1.0, or log1p of the event count)
- the neighbour table, the shape of gold.ease_neighbours: one row per (item_idx, rank) with
  neighbour_idx, weight (B_item,neighbour > 0) and run_id
- candidates: one row per (user_idx, item_idx) with ease_score, at most k per user

Only the model travels to the driver: the n x n Gram matrix (bounded by max_items², never by users)
and the pruned neighbour table (items x top_n). Users stay in Spark and are scored inside
`mapInPandas`, the numpy arrays riding in the function's closure. No SparkContext, RDD, broadcast
or JVM call, so it all runs over Spark Connect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from scipy.linalg import lapack

from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import EaseValues
from pipelines.core.schemas import EASE_SCORE, ITEM_IDX, NEIGHBOUR_IDX, RANK, RUN_ID, USER_IDX, WEIGHT
from pipelines.core.session import parallelism
from udfs.ease import dense_peak_bytes, ease_csr, fit_ease, prune_top_n, top_n_sparse
from udfs.topk import csr_from_lists, to_long

log = logging.getLogger("shelf.ease")

X = "x"
ITEMS = "_items"
VALUES = "_values"
EXCLUDED = "_excluded"
BAND_ENTRIES = 1 << 18  # matrix entries per band of the Gram's partials at most (n x rows): 4 MB per binary row
_BAND, _BLOB = "_band", "_entries"
_BANDS_SCHEMA = f"{_BAND} int, {_BLOB} binary"


NEIGHBOURS_SCHEMA = f"{ITEM_IDX} int, {NEIGHBOUR_IDX} int, {WEIGHT} float, {RANK} int, {RUN_ID} string"
_CANDIDATES_SCHEMA = f"{USER_IDX} int, {ITEM_IDX} int, {EASE_SCORE} double"

# The catalogue's pruned neighbour CSR (item_ids, nb_indptr, nb_cols, nb_weights), shipped in a closure.
Catalogue = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]


@dataclass(frozen=True)
class EaseModel:
    """A fitted, pruned EASE model and how the fit went.

    Attributes:
        ids: (n,) ascending item ids of the catalogue.
        src, dst, weight, rank: the pruned long arrays of `udfs.ease.prune_top_n`.
        items: n.
        gram_seconds: Spark job(s) computing XᵀX and bringing it to the driver.
        inverse_seconds: the inverse (train.ease.precision) and B on the driver.
        dense_bytes: estimated peak bytes of the dense n x n matrices during the fit.
    """

    ids: npt.NDArray[np.int64]
    src: npt.NDArray[np.int64]
    dst: npt.NDArray[np.int64]
    weight: npt.NDArray[np.float32]
    rank: npt.NDArray[np.int32]
    items: int
    gram_seconds: float
    inverse_seconds: float
    dense_bytes: int


def to_ease_input(interactions: DataFrame, values: EaseValues) -> DataFrame:
    """One row per (user, item) pair of silver.interactions: user_idx, item_idx, x.

    Args:
        interactions: silver.interactions rows, one per event.
        values: "binary" (x = 1.0) or "log_count" (x = log1p(number of the pair's events)).

    Returns:
        user_idx int, item_idx int, x double.

    Raises:
        ValueError: `values` is neither "binary" nor "log_count".
    """
    if values not in ("binary", "log_count"):
        raise ValueError(f"EASE values must be 'binary' or 'log_count', got {values!r}.")
    pairs = interactions.groupBy(USER_IDX, ITEM_IDX).agg(F.count(F.lit(1)).alias("_events"))
    x = F.lit(1.0) if values == "binary" else F.log1p(F.col("_events").cast("double"))
    return pairs.select(
        F.col(USER_IDX).cast("int").alias(USER_IDX),
        F.col(ITEM_IDX).cast("int").alias(ITEM_IDX),
        x.cast("double").alias(X),
    )


def gram_matrix(
    x: DataFrame, max_items: int, dtype: type[np.floating] = np.float64
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.floating]] | None:
    """XᵀX over the items of `x`, dense on the driver, or None when there are more than `max_items` items.

    Each task holds whole users (`x` repartitioned by user into one partition per task slot) and multiplies its
    users' sparse rows (scipy's sparse product in C, Σ_u (items of u)² multiply-adds) into a partial Gram matrix,
    whose upper triangle it emits as one binary row per band of `BAND_ENTRIES` / n matrix rows. The bands are
    summed in Spark (scipy per band), and the driver collects one row per band. So no (user, item, item) row is
    ever built, and what crosses a shuffle or reaches the driver is bounded by the model's size (tasks x n² / 2 and
    n² / 2 entries), never by the users'.

    Args:
        x: user_idx, item_idx, x (one row per pair, see `to_ease_input`).
        max_items: the largest catalogue fitted; n² entries must fit the driver several times over.
        dtype: of the dense matrix (the bands are summed in float64 either way).

    Returns:
        (ids (n,) int64 ascending, gram (n, n) of `dtype`), or None above `max_items`.
    """
    found = pd.DataFrame(x.select(ITEM_IDX).distinct().limit(max_items + 1).toPandas())  # one job, bounded
    if len(found) > max_items:
        return None
    ids = np.sort(found[ITEM_IDX].to_numpy(dtype=np.int64))
    band_rows = max(1, BAND_ENTRIES // ids.size)
    slots = parallelism(x.sparkSession)
    partials = x.repartition(slots, USER_IDX).mapInPandas(_partial_bands(ids, band_rows), _BANDS_SCHEMA)
    summed = pd.DataFrame(partials.groupBy(_BAND).applyInPandas(_summed_band(ids.size), _BANDS_SCHEMA).toPandas())
    gram = np.zeros((ids.size, ids.size), dtype=dtype)
    for blob in summed[_BLOB]:
        a, b, g = _decode(blob)
        gram[a, b] = gram[b, a] = g  # positions in ids; symmetric
    return ids, gram


def _encode(a: npt.NDArray[np.integer], b: npt.NDArray[np.integer], g: npt.NDArray[np.floating]) -> bytes:
    """Entries (row a, column b, value g) as one binary value: int32 a, int32 b, float64 g."""
    return a.astype(np.int32).tobytes() + b.astype(np.int32).tobytes() + g.astype(np.float64).tobytes()


def _decode(blob: bytes) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float64]]:
    m = len(blob) // 16
    view = memoryview(blob)
    return (
        np.frombuffer(view[: 4 * m], dtype=np.int32),
        np.frombuffer(view[4 * m : 8 * m], dtype=np.int32),
        np.frombuffer(view[8 * m :], dtype=np.float64),
    )


def _partial_bands(
    ids: npt.NDArray[np.int64], band_rows: int
) -> Callable[[Iterable[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The per-task function of `gram_matrix`: this task's users' XᵀX, upper triangle, as one (band, entries) row per
    band of `band_rows` matrix rows (positions in `ids`)."""

    def partial(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from scipy import sparse

        frames = [f for f in batches if len(f)]
        if not frames:
            return
        rows = pd.concat(frames, ignore_index=True)
        users = pd.factorize(rows[USER_IDX])[0]
        cols = np.searchsorted(ids, rows[ITEM_IDX].to_numpy(dtype=np.int64))
        xs = sparse.csr_matrix((rows[X].to_numpy(dtype=np.float64), (users, cols)), shape=(users.max() + 1, ids.size))
        gram = sparse.triu(xs.T.tocsr() @ xs, format="csr")
        bands, blobs = [], []
        for top in range(0, ids.size, band_rows):
            bottom = min(top + band_rows, ids.size)
            lo, hi = gram.indptr[top], gram.indptr[bottom]
            if hi > lo:
                a = np.repeat(np.arange(top, bottom), np.diff(gram.indptr[top : bottom + 1]))
                bands.append(top // band_rows)
                blobs.append(_encode(a, gram.indices[lo:hi], gram.data[lo:hi]))
        yield pd.DataFrame({_BAND: np.asarray(bands, dtype=np.int32), _BLOB: blobs})

    return partial


def _summed_band(n: int) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The per-band function of `gram_matrix`: the tasks' partial entries of one band, summed (one row)."""

    def summed(band: pd.DataFrame) -> pd.DataFrame:
        from scipy import sparse

        a, b, g = (np.concatenate(parts) for parts in zip(*(_decode(blob) for blob in band[_BLOB]), strict=True))
        total = sparse.coo_matrix((g, (a, b)), shape=(n, n)).tocsr()  # duplicates (a, b) summed
        entries = total.tocoo()
        return pd.DataFrame(
            {_BAND: band[_BAND].iloc[:1].to_numpy(), _BLOB: [_encode(entries.row, entries.col, entries.data)]}
        )

    return summed


def spd_inverse(matrix: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    """The inverse of a symmetric positive definite float32 or float64 matrix, in its dtype, by Cholesky (LAPACK
    potrf + potri: about n³ flops against 8n³/3 for a general inverse), in `matrix`'s own buffer where LAPACK
    allows."""
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (matrix,))
    factor, info = potrf(matrix, lower=0, clean=0, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"G + lambda I is not positive definite (potrf info {info})")
    inv, info = potri(factor, lower=0, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the Cholesky inverse failed (potri info {info})")
    upper = np.triu_indices_from(inv, k=1)
    inv[(upper[1], upper[0])] = inv[upper]  # potri fills the upper triangle only
    return np.asarray(inv, dtype=matrix.dtype)


def fit(x: DataFrame, lam: float, max_items: int, top_n: int, precision: str) -> EaseModel | None:
    """Fit EASE on `x` and prune it to each item's `top_n` positive weights; None above `max_items` items.

    Args:
        x: user_idx, item_idx, x (see `to_ease_input`).
        lam: L2 penalty λ, positive.
        max_items: largest catalogue fitted (see `gram_matrix`).
        top_n: neighbours kept per item.
        precision: "float64" or "float32", the dtype of the Gram matrix and its inverse on the driver (no default
            here: train.ease.precision is the one default, float32).

    Returns:
        The model with its fit diagnostics, or None (logged) when the catalogue is too large.
    """
    started = time.perf_counter()
    dtype = np.float32 if precision == "float32" else np.float64
    got = gram_matrix(x, max_items, dtype)
    gram_seconds = time.perf_counter() - started
    if got is None:
        log.info("ease: skipped, more than max_items=%d items", max_items)
        return None
    ids, gram = got
    del got  # fit_ease overwrites gram in place: no second n x n copy
    started = time.perf_counter()
    b = fit_ease(gram, lam, overwrite_gram=True, inverse=spd_inverse, dtype=dtype)
    del gram
    inverse_seconds = time.perf_counter() - started
    src, dst, weight, rank = prune_top_n(b, ids, top_n)
    model = EaseModel(
        ids, src, dst, weight, rank, int(ids.size), gram_seconds, inverse_seconds,
        dense_peak_bytes(ids.size, np.dtype(dtype).itemsize),
    )  # fmt: skip
    log.info(
        "ease: %d items, lambda %g, %d neighbours kept (top %d), gram %.2fs, %s inverse %.2fs, dense peak %.1f MB",
        model.items,
        lam,
        src.size,
        top_n,
        gram_seconds,
        np.dtype(dtype).name,
        inverse_seconds,
        model.dense_bytes / 1e6,
    )
    return model


def to_neighbour_frame(spark: SparkSession, model: EaseModel, run_id: str) -> DataFrame:
    """The pruned model as rows of gold.ease_neighbours: item_idx, neighbour_idx, weight, rank, run_id.

    Built from pandas on the driver: items x top_n rows at most.
    """
    pdf = pd.DataFrame(
        {
            ITEM_IDX: model.src.astype(np.int32),
            NEIGHBOUR_IDX: model.dst.astype(np.int32),
            WEIGHT: model.weight.astype(np.float32),
            RANK: model.rank.astype(np.int32),
            RUN_ID: np.full(model.src.size, run_id, dtype=object),
        }
    )
    return spark.createDataFrame(pdf, NEIGHBOURS_SCHEMA)


def neighbour_catalogue(neighbours: DataFrame) -> Catalogue:
    """Collect item_idx, neighbour_idx, weight to the driver as the kernel's CSR (items x top_n rows)."""
    pdf = pd.DataFrame(neighbours.select(ITEM_IDX, NEIGHBOUR_IDX, WEIGHT).toPandas())
    src = pdf[ITEM_IDX].to_numpy(dtype=np.int64)
    dst = pdf[NEIGHBOUR_IDX].to_numpy(dtype=np.int64)
    item_ids = np.union1d(src, dst).astype(np.int64)
    indptr, cols, weights = ease_csr(src, dst, pdf[WEIGHT].to_numpy(dtype=np.float32), item_ids)
    return item_ids, indptr, cols, weights


def ease_batches(batches: Iterable[pd.DataFrame], catalogue: Catalogue, k: int) -> Iterator[pd.DataFrame]:
    """pandas adapter: users' (items, values, excluded) -> top-k items by EASE score.

    Output dtypes match _CANDIDATES_SCHEMA (int32, int32, float64).
    """
    item_ids, nb_indptr, nb_cols, nb_weights = catalogue
    for batch in batches:
        if batch.empty:
            continue
        users = batch[USER_IDX].to_numpy(dtype=np.int64)
        indptr, items = csr_from_lists(list(batch[ITEMS]))
        values = [np.asarray(v, dtype=np.float64) for v in batch[VALUES]]
        flat = np.concatenate(values) if values else np.zeros(0, dtype=np.float64)
        ex_indptr, ex_indices = csr_from_lists(list(batch[EXCLUDED]))
        result = top_n_sparse(indptr, items, flat, nb_indptr, nb_cols, nb_weights, item_ids, k, ex_indptr, ex_indices)
        keys, ids, scores, _ = to_long(users, result)
        yield pd.DataFrame(
            {USER_IDX: keys.astype(np.int32), ITEM_IDX: ids.astype(np.int32), EASE_SCORE: scores.astype(np.float64)}
        )


def ease_candidates(x: DataFrame, neighbours: DataFrame, exclude: DataFrame, k: int) -> DataFrame:
    """Top-k items per user by EASE score, excluded pairs removed: user_idx, item_idx, ease_score.

    Args:
        x: user_idx, item_idx, x (see `to_ease_input`).
        neighbours: item_idx, neighbour_idx, weight (the pruned model, e.g. gold.ease_neighbours of one run).
        exclude: user_idx, item_idx pairs never proposed (e.g. items already bought).
        k: candidates per user.

    Returns:
        user_idx int, item_idx int, ease_score double; only positive scores, so users whose items are
        all outside the model get no rows.
    """
    catalogue = neighbour_catalogue(neighbours)
    # Sorting the (item, x) structs keeps the two lists aligned and their order deterministic.
    held = F.sort_array(F.collect_list(F.struct(F.col(ITEM_IDX), F.col(X))))
    users = (
        x.groupBy(USER_IDX)
        .agg(held.alias("_held"))
        .select(USER_IDX, F.col(f"_held.{ITEM_IDX}").alias(ITEMS), F.col(f"_held.{X}").alias(VALUES))
    )
    excluded = exclude.groupBy(USER_IDX).agg(F.collect_list(ITEM_IDX).alias(EXCLUDED))
    scored = users.join(excluded, on=USER_IDX, how="left").select(USER_IDX, ITEMS, VALUES, EXCLUDED)
    return scored.mapInPandas(lambda it: ease_batches(it, catalogue, k), _CANDIDATES_SCHEMA)


TABLE = "ease_neighbours"  # gold.ease_neighbours: the train step's pruned B, rows of each run


def neighbours_of_run(spark: SparkSession, config: ShelfConfig, run_id: str) -> DataFrame | None:
    """gold.ease_neighbours rows of `run_id` (item_idx, neighbour_idx, weight), or None when that run has no EASE
    (the table is absent, or the train step skipped EASE: catalogue over train.ease.max_items, or disabled)."""
    if not tables.exists(spark, config, "gold", TABLE):
        return None
    rows = tables.read(spark, config, "gold", TABLE).filter(F.col(RUN_ID) == run_id)
    return rows.select(ITEM_IDX, NEIGHBOUR_IDX, WEIGHT) if not rows.isEmpty() else None
