"""The serving run, loaded without Spark: delta-rs reads the Delta tables into Arrow and numpy, once per run.

What the batch re-rank saw is what the service re-ranks: `shelf rerank` writes gold.rerank_inputs (one row per
user: factors, candidate arrays, fresh-event arrays with ages as of the run's as_of) and gold.rerank_items (the
item side: factors and business attributes), and the service builds the kernel's ItemTable from the latter with
the same function the batch uses (`kernel_frames.item_table_from_pandas`). The published lists come from
gold.recommendations as written. Nothing is held as a Python object per user: user ids are one pandas Index
(hash lookups), the lists stay Arrow columns sliced per request, and the kernel inputs become numpy value and
offset arrays per column (pipelines/serve/rows.py), sliced per request without copying.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from pipelines.core import uris
from pipelines.core.columns import (
    AS_OF,
    COOCCURRENCE,
    ITEM_ID,
    ITEM_IDX,
    NEIGHBOUR_IDX,
    RANK,
    RUN_ID,
    SCORE,
    SIM_SOURCE,
    USER_ID,
    USER_IDX,
)
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.kernel_frames import ItemIds, item_table_from_pandas, params_from
from pipelines.serve.rows import StoredRows, UserRow
from pipelines.serve.storage import delta_rs_location
from udfs.rerank import ItemTable, RerankParams

LIST_COLUMNS = (ITEM_ID, RANK, SCORE, "reasons")


def table_uri(config: ShelfConfig, layer: str, name: str) -> str:
    """Where a table lives for delta-rs: tables by path only (a catalog name needs the catalog's own client)."""
    if config.storage.catalog:
        raise InputDataError(
            f"shelf serve reads tables by path, but storage.catalog is {config.storage.catalog!r}; set storage.root "
            "to the tables' location (the catalog's storage path) for the service."
        )
    return uris.join(config.storage.root, f"{config.storage.namespace}{layer}", name)


def read_table(
    config: ShelfConfig, layer: str, name: str, columns: list[str] | None = None, run_id: str | None = None
) -> pa.Table:
    """The columns (None: all) of a Delta table (of one run when `run_id` is given), read by delta-rs into Arrow."""
    uri = table_uri(config, layer, name)
    try:
        location, options = delta_rs_location(uri, config.spark.extra)
        dataset = DeltaTable(location, storage_options=options or None).to_pyarrow_dataset()
    except Exception as exc:  # delta-rs raises its own TableNotFoundError; its message names the path
        raise InputDataError(f"{layer}.{name} is not a Delta table at {uri} ({exc}); run 'shelf run' first.") from exc
    wanted = dataset.schema.names if columns is None else [c for c in columns if c in dataset.schema.names]
    where = pc.field(RUN_ID) == run_id if run_id is not None else None
    return dataset.to_table(columns=wanted, filter=where)


def serving_run(config: ShelfConfig) -> tuple[str, datetime]:
    """(run_id, as_of) of the gold.recommendations run with the latest as_of (ties: the larger run id), as
    `shelf stream` chooses it."""
    runs = read_table(config, "gold", "recommendations", [RUN_ID, AS_OF]).group_by(RUN_ID).aggregate([(AS_OF, "max")])
    if runs.num_rows == 0:
        raise InputDataError("gold.recommendations is empty; run 'shelf run' before 'shelf serve'.")
    frame = runs.to_pandas().sort_values([f"{AS_OF}_max", RUN_ID], ascending=False)
    return str(frame.iloc[0][RUN_ID]), utc_naive(frame.iloc[0][f"{AS_OF}_max"])


@dataclass(frozen=True)
class ServingState:
    """One published run, ready to answer: its lists, the kernel's inputs and the item side."""

    run_id: str
    as_of: datetime
    params: RerankParams
    items: ItemTable
    item_ids: ItemIds  # item_idx <-> item_id
    listed: pd.Index  # user_id of each published list, aligned with list_offsets
    list_offsets: np.ndarray  # (users + 1,): rows of `lists` per user, in rank order
    lists: pa.Table  # item_id, rank, score, reasons of every published list
    input_users: pd.Index  # user_id of each gold.rerank_inputs row
    rows: StoredRows  # the kernel's user rows (reranking.to_user_rows' columns) as numpy arrays
    item_index: dict[str, int]  # item_id -> item_idx (catalogue-sized): posted item ids looked up

    def published(self, user_id: str) -> pa.Table | None:
        """The user's published list as written, or None when the run has no list for them."""
        at = _position(self.listed, user_id)
        if at < 0:
            return None
        start, end = int(self.list_offsets[at]), int(self.list_offsets[at + 1])
        return self.lists.slice(start, end - start)

    def user_row(self, user_id: str) -> UserRow | None:
        """The user's stored kernel input (views into the run's arrays), or None for a user the run does not know."""
        at = _position(self.input_users, user_id)
        return None if at < 0 else self.rows.row(at)

    def item_idx(self, item_ids: list[str]) -> np.ndarray:
        """Dense ids of `item_ids` (-1 for an item the run does not know)."""
        return np.fromiter((self.item_index.get(i, -1) for i in item_ids), dtype=np.int64, count=len(item_ids))


def load_state(config: ShelfConfig, run_id: str | None = None) -> ServingState:
    """Read the serving run (or `run_id`) from Delta with delta-rs."""
    if run_id is None:
        run_id, as_of = serving_run(config)
    else:
        as_of = _as_of_of(config, run_id)
    index = read_table(config, "silver", "item_index", [ITEM_ID, ITEM_IDX]).to_pandas()
    order = np.argsort(index[ITEM_IDX].to_numpy(dtype=np.int64), kind="stable")
    item_ids = ItemIds(index[ITEM_IDX].to_numpy(dtype=np.int64)[order], index[ITEM_ID].to_numpy(dtype=object)[order])
    lists = read_table(config, "gold", "recommendations", [USER_ID, *LIST_COLUMNS], run_id)
    lists = lists.sort_by([(USER_ID, "ascending"), (RANK, "ascending")])
    listed, offsets = _offsets(lists.column(USER_ID))
    inputs = read_table(config, "gold", "rerank_inputs", None, run_id)
    if inputs.num_rows == 0 and lists.num_rows:
        raise InputDataError(
            f"gold.rerank_inputs has no rows of run {run_id}; rerun 'shelf rerank' with this version of shelf."
        )
    users = read_table(config, "silver", "user_index", [USER_ID, USER_IDX]).to_pandas()
    by_idx = pd.Series(users[USER_ID].to_numpy(dtype=object), index=users[USER_IDX].to_numpy(dtype=np.int64))
    input_users = pd.Index(by_idx.reindex(inputs.column(USER_IDX).to_numpy()).to_numpy(dtype=object))
    items = _item_table(config, run_id)
    return ServingState(
        run_id=run_id,
        as_of=as_of,
        params=params_from(config.rerank),
        items=items,
        item_ids=item_ids,
        listed=listed,
        list_offsets=offsets,
        lists=lists.select(list(LIST_COLUMNS)),
        input_users=input_users,
        rows=StoredRows.from_arrow(inputs, items.factors.shape[1]),
        item_index=dict(zip(item_ids.ids.tolist(), item_ids.idx.tolist(), strict=True)),
    )


def _as_of_of(config: ShelfConfig, run_id: str) -> datetime:
    rows = read_table(config, "gold", "recommendations", [AS_OF], run_id)
    if rows.num_rows == 0:
        raise InputDataError(f"gold.recommendations has no rows of run {run_id}; pass a published run id.")
    return utc_naive(pc.max(rows.column(AS_OF)).as_py())


def utc_naive(value: object) -> datetime:
    """A timestamp as the tables mean it: UTC, without tzinfo (delta-rs reads Delta timestamps as UTC-aware)."""
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    moment: datetime = stamp.to_pydatetime()
    return moment


def _position(index: pd.Index, user_id: str) -> int:
    """The user's position in a unique index, or -1 (one hash lookup; get_indexer would build an Index per call)."""
    try:
        at = index.get_loc(user_id)
    except KeyError:
        return -1
    return int(at)


def _offsets(users: pa.ChunkedArray) -> tuple[pd.Index, np.ndarray]:
    """(the distinct users in order, offsets of their runs) of a column sorted by user."""
    values = users.to_numpy(zero_copy_only=False)
    if values.size == 0:
        return pd.Index([], dtype=object), np.zeros(1, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    return pd.Index(values[starts], dtype=object), np.r_[starts, values.size].astype(np.int64)


def _item_table(config: ShelfConfig, run_id: str) -> ItemTable:
    """The kernel's item side as the batch built it: gold.rerank_items and the run's co-occurrence lists."""
    attributes = read_table(config, "gold", "rerank_items", None, run_id).to_pandas()
    if attributes.empty:
        raise InputDataError(f"gold.rerank_items has no rows of run {run_id}; rerun 'shelf rerank' first.")
    neighbours = None
    try:
        sims = read_table(config, "gold", "item_similarities", [ITEM_IDX, NEIGHBOUR_IDX, SCORE, SIM_SOURCE, RUN_ID])
    except InputDataError:
        sims = None
    if sims is not None and sims.num_rows:
        rows = sims.filter(pc.field(SIM_SOURCE) == COOCCURRENCE)
        if RUN_ID in rows.column_names and len(pc.unique(rows.column(RUN_ID))) > 1:
            rows = rows.filter(pc.field(RUN_ID) == run_id)
        if rows.num_rows:
            neighbours = (
                np.asarray(rows.column(ITEM_IDX).to_numpy(), dtype=np.int64),
                np.asarray(rows.column(NEIGHBOUR_IDX).to_numpy(), dtype=np.int64),
                np.asarray(rows.column(SCORE).to_numpy(), dtype=np.float64),
            )
    return item_table_from_pandas(attributes, neighbours)
