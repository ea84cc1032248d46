"""One user's list at request time: the published list, or the same kernel the batch ran, re-run with the events
the service knows for the user at the request's time.

Parity by construction: a known user's kernel input is the row `shelf rerank` re-ranked (gold.rerank_inputs);
at request time `now` its fresh events age by (now - as_of), those past the horizon drop out, the new events join
(weighted by `rerank.event_weights`, consumed per `recommend.consumed_event_types`), the per-user cap applies
(most recent first) and the kernel (`kernel_frames.rerank_frame`) runs on the one row. With no new event the
service answers the published list as written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
import pandas as pd

from pipelines.core.columns import FEATURES, ITEM_IDX, RANK, REASONS, SCORE, USER_IDX
from pipelines.core.config import ShelfConfig
from pipelines.core.kernel_frames import (
    CAND_ALS,
    CAND_EASE,
    CAND_ITEMS,
    CAND_REBUY,
    EV_AGES,
    EV_BOUGHT,
    EV_ITEMS,
    EV_WEIGHTS,
    rerank_frame,
)
from pipelines.serve.state import ServingState

SECONDS_PER_DAY = 86400.0
MIN_AGE_DAYS = 1.0 / SECONDS_PER_DAY  # an event stamped at (or after) the request counts as one second old
COLD_USER_IDX = -1


@dataclass(frozen=True)
class Event:
    """One tracker event the service knows (validated): the source's ids, a shelf event type, its time (UTC)."""

    user_id: str
    item_id: str
    event_type: str
    event_ts: datetime


@dataclass(frozen=True)
class Ranked:
    """A list: (item_id, rank, score, reasons) rows and where it came from."""

    items: list[dict[str, object]]
    source: str  # published | reranked | cold_start


def recommend(
    state: ServingState, config: ShelfConfig, user_id: str, events: list[Event], k: int, now: datetime
) -> Ranked:
    """The user's top-k: the published list when no event is new, else the kernel on their row plus the events."""
    if not events:
        published = state.published(user_id)
        if published is not None:
            rows = published.slice(0, k).to_pylist()
            return Ranked([{key: r[key] for key in ("item_id", "rank", "score", "reasons")} for r in rows], "published")
    row = state.kernel_row(user_id)
    source = "reranked"
    if row is None:
        row, source = cold_row(state, config, events), "cold_start"
    row = with_events(row, state, config, events, now)
    params = replace(state.params, top_k=k)
    ranked = rerank_frame(row, state.items, params, name_items=state.item_ids.of)
    ids = state.item_ids.of(ranked[ITEM_IDX].to_numpy(dtype=np.int64))
    items = [
        {"item_id": str(i), "rank": int(r), "score": float(s), "reasons": list(reasons)}
        for i, r, s, reasons in zip(ids, ranked[RANK], ranked[SCORE], ranked[REASONS], strict=True)
    ]
    return Ranked(items, source)


def with_events(
    row: pd.DataFrame, state: ServingState, config: ShelfConfig, events: list[Event], now: datetime
) -> pd.DataFrame:
    """The one-row kernel input at `now`: stored events aged, expired ones dropped, `events` added, capped, sorted
    as `reranking.to_event_lists` sorts (age, item, weight, bought)."""
    shift = (now - state.as_of).total_seconds() / SECONDS_PER_DAY
    first = row.iloc[0]
    stored_items = _array(first[EV_ITEMS], np.int64)
    ages = np.r_[_array(first[EV_AGES], np.float64) + shift, _new_ages(events, now)]
    items = np.r_[stored_items, state.item_idx([e.item_id for e in events])]
    weights = np.r_[
        _array(first[EV_WEIGHTS], np.float64), [config.rerank.event_weights.get(e.event_type, 0.0) for e in events]
    ]
    consumed = set(config.consumed_event_types)
    bought = np.r_[_array(first[EV_BOUGHT], np.bool_), [e.event_type in consumed for e in events]].astype(bool)
    horizon = max(config.rerank.fresh_days, config.rerank.bought_window_days)
    keep = (items >= 0) & (ages > 0) & (ages <= horizon)
    items, ages, weights, bought = items[keep], ages[keep], weights[keep], bought[keep]
    newest = np.lexsort((-weights, ~bought, items, ages))[: config.rerank.max_fresh_events]  # to_capped_events
    items, ages, weights, bought = items[newest], ages[newest], weights[newest], bought[newest]
    order = np.lexsort((bought, weights, items, ages))  # array_sort of struct(_age, item_idx, _w, _bought)
    out = row.copy()
    out.at[out.index[0], EV_ITEMS] = items[order]
    out.at[out.index[0], EV_AGES] = ages[order]
    out.at[out.index[0], EV_WEIGHTS] = weights[order]
    out.at[out.index[0], EV_BOUGHT] = bought[order]
    return out


def cold_row(state: ServingState, config: ShelfConfig, events: list[Event]) -> pd.DataFrame:
    """A user the run does not know: candidates are the co-occurrence neighbours of the items they just touched,
    the most popular items (stream.popular_k) and the new arrivals, with no factors (the kernel folds in the
    fresh items)."""
    table = state.items
    touched = state.item_idx([e.item_id for e in events])
    rows = np.searchsorted(table.ids, touched[touched >= 0])
    neighbours: list[np.ndarray] = []
    if table.nb_indptr is not None and table.nb_cols is not None:
        neighbours = [table.ids[table.nb_cols[table.nb_indptr[r] : table.nb_indptr[r + 1]]] for r in rows]
    available = table.in_stock & ~table.blocked
    popular = table.ids[
        np.argsort(-np.where(available, table.popularity, -1.0), kind="stable")[: config.stream.popular_k]
    ]
    arrivals = table.ids[table.new_arrival & available]
    candidates = np.unique(np.concatenate([popular, arrivals, *neighbours]).astype(np.int64))
    zeros = np.zeros(candidates.size)
    return pd.DataFrame(
        {
            USER_IDX: [COLD_USER_IDX],
            FEATURES: [None],
            CAND_ITEMS: [candidates],
            CAND_ALS: [np.zeros(candidates.size, dtype=bool)],
            CAND_EASE: [zeros],
            CAND_REBUY: [zeros],
            EV_ITEMS: [np.zeros(0, dtype=np.int64)],
            EV_WEIGHTS: [np.zeros(0)],
            EV_AGES: [np.zeros(0)],
            EV_BOUGHT: [np.zeros(0, dtype=bool)],
        }
    )


def _new_ages(events: list[Event], now: datetime) -> np.ndarray:
    seconds = np.array([(now - e.event_ts).total_seconds() for e in events], dtype=np.float64)
    return np.maximum(seconds / SECONDS_PER_DAY, MIN_AGE_DAYS)


def _array(value: object, dtype: type) -> np.ndarray:
    return np.zeros(0, dtype=dtype) if value is None else np.asarray(value, dtype=dtype)
