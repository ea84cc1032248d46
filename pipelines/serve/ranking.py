"""One user's list at request time: the published list, or the same kernel the batch ran, re-run with the events
the service knows for the user at the request's time.

Parity by construction: a known user's kernel input is the row `shelf rerank` re-ranked (gold.rerank_inputs);
at request time `now` its fresh events age by (now - as_of), those past the horizon drop out, the new events join
(weighted by `rerank.event_weights`, consumed per `recommend.consumed_event_types`), the per-user cap applies
(most recent first) and the kernel (`udfs.rerank.rerank`, the batch's) runs on the row, together with the other
requests of its batch (each row is ranked on its own). With no new event the service answers the published list
as written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np

from pipelines.core.config import ShelfConfig
from pipelines.serve.rows import UserRow, user_batch
from pipelines.serve.state import ServingState
from udfs.rerank import reason_lists, rerank

SECONDS_PER_DAY = 86400.0
MIN_AGE_DAYS = 1.0 / SECONDS_PER_DAY  # an event stamped at (or after) the request counts as one second old


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
    run_id: str = ""  # the run it was ranked on


@dataclass(frozen=True)
class Ask:
    """One request for a list: whose, the events the service knows for them, how long, at what time."""

    user_id: str
    events: tuple[Event, ...]
    k: int
    now: datetime


def recommend(
    state: ServingState, config: ShelfConfig, user_id: str, events: list[Event], k: int, now: datetime
) -> Ranked:
    """The user's top-k: the published list when no event is new, else the kernel on their row plus the events."""
    return recommend_many(state, config, [Ask(user_id, tuple(events), k, now)])[0]


def recommend_many(state: ServingState, config: ShelfConfig, asks: list[Ask]) -> list[Ranked]:
    """Each request's list: published ones looked up, the others re-ranked together in one kernel call per list
    length (the kernel is vectorised over users: dynamic batching shares its per-call cost)."""
    answers = [published_list(state, a.user_id, a.k) if not a.events else None for a in asks]
    todo = [at for at, answer in enumerate(answers) if answer is None]
    inputs = {at: kernel_input(state, config, asks[at]) for at in todo}
    for k in sorted({asks[at].k for at in todo}):
        group = [at for at in todo if asks[at].k == k]
        lists = rank_rows(state, [inputs[at][0] for at in group], k)
        for at, items in zip(group, lists, strict=True):
            answers[at] = Ranked(items, inputs[at][1], state.run_id)
    return [answer for answer in answers if answer is not None]


def rank_rows(state: ServingState, rows: list[UserRow], k: int) -> list[list[dict[str, object]]]:
    """The kernel's top-k of each row, in one call: (item_id, rank, score, reasons) rows per input row."""
    result = rerank(state.items, user_batch(rows, state.items.factors.shape[1]), replace(state.params, top_k=k))
    reasons = reason_lists(result, state.item_ids.of)
    order = np.lexsort((result.ranks, result.user_rows))
    bounds = np.searchsorted(result.user_rows[order], np.arange(len(rows) + 1))
    ids = state.item_ids.of(result.items[order])
    ranks, scores = result.ranks[order].tolist(), result.scores[order].astype(np.float64).tolist()
    picked = [reasons[i] for i in order]
    return [
        [
            {"item_id": str(ids[j]), "rank": int(ranks[j]), "score": float(scores[j]), "reasons": list(picked[j])}
            for j in range(int(bounds[at]), int(bounds[at + 1]))
        ]
        for at in range(len(rows))
    ]


def published_list(state: ServingState, user_id: str, k: int) -> Ranked | None:
    """The user's published list as written (its first k rows), or None when the run has none for them."""
    published = state.published(user_id)
    if published is None:
        return None
    rows = published.slice(0, k).to_pylist()
    items = [{key: r[key] for key in ("item_id", "rank", "score", "reasons")} for r in rows]
    return Ranked(items, "published", state.run_id)


def kernel_input(state: ServingState, config: ShelfConfig, ask: Ask) -> tuple[UserRow, str]:
    """The request's kernel input (the stored row, or the cold-start row) with its events, and its source."""
    row, source = state.user_row(ask.user_id), "reranked"
    if row is None:
        row, source = cold_row(state, config, list(ask.events)), "cold_start"
    return with_events(row, state, config, list(ask.events), ask.now), source


def horizon_days(config: ShelfConfig) -> float:
    """How old (days) a fresh event may be and still reach the kernel."""
    return float(max(config.rerank.fresh_days, config.rerank.bought_window_days))


def with_events(row: UserRow, state: ServingState, config: ShelfConfig, events: list[Event], now: datetime) -> UserRow:
    """The kernel input at `now`: stored events aged, expired ones dropped, `events` added, capped, sorted as
    `reranking.to_event_lists` sorts (age, item, weight, bought)."""
    shift = (now - state.as_of).total_seconds() / SECONDS_PER_DAY
    consumed = set(config.consumed_event_types)
    new_weights = np.array([config.rerank.event_weights.get(e.event_type, 0.0) for e in events], dtype=np.float64)
    new_bought = np.array([e.event_type in consumed for e in events], dtype=bool)
    ages = np.concatenate((row.ev_ages + shift, _new_ages(events, now)))  # not np.r_: ~20 us a call
    items = np.concatenate((row.ev_items, state.item_idx([e.item_id for e in events])))
    weights = np.concatenate((row.ev_weights, new_weights))
    bought = np.concatenate((row.ev_bought, new_bought)).astype(bool)
    horizon = horizon_days(config)
    keep = (items >= 0) & (ages > 0) & (ages <= horizon)
    items, ages, weights, bought = items[keep], ages[keep], weights[keep], bought[keep]
    newest = np.lexsort((-weights, ~bought, items, ages))[: config.rerank.max_fresh_events]  # to_capped_events
    items, ages, weights, bought = items[newest], ages[newest], weights[newest], bought[newest]
    order = np.lexsort((bought, weights, items, ages))  # array_sort of struct(_age, item_idx, _w, _bought)
    return row._replace(
        ev_items=items[order].astype(np.int64),
        ev_ages=ages[order].astype(np.float64),
        ev_weights=weights[order].astype(np.float64),
        ev_bought=bought[order],
    )


def cold_row(state: ServingState, config: ShelfConfig, events: list[Event]) -> UserRow:
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
    zeros, none = np.zeros(candidates.size), np.zeros(0)
    no_items, no_flags = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return UserRow(
        None, candidates, np.zeros(candidates.size, dtype=bool), zeros, zeros, no_items, none, none, no_flags
    )


def held_by_run(state: ServingState, config: ShelfConfig, user_id: str, events: list[Event]) -> set[Event]:
    """The events of `user_id` the service can forget once `state` serves: those the run's stored row holds (same
    item, same age at the run's as_of to the second) and those past the fresh horizon at its as_of."""
    horizon = horizon_days(config)
    ages = _new_ages(events, state.as_of) if events else np.zeros(0)
    held = {e for e, age in zip(events, ages, strict=True) if e.event_ts <= state.as_of and age > horizon}
    row = state.user_row(user_id)
    if row is None or not events:
        return held
    stored = set(zip(row.ev_items.tolist(), _seconds(row.ev_ages), strict=True))
    items = state.item_idx([e.item_id for e in events]).tolist()
    for event, item, age in zip(events, items, _seconds(ages), strict=True):
        if event.event_ts <= state.as_of and any((item, age + d) in stored for d in (-1, 0, 1)):
            held.add(event)
    return held


def _seconds(ages_in_days: np.ndarray) -> list[int]:
    seconds: list[int] = np.rint(np.asarray(ages_in_days, dtype=np.float64) * SECONDS_PER_DAY).astype(np.int64).tolist()
    return seconds


def _new_ages(events: list[Event], now: datetime) -> np.ndarray:
    seconds = np.array([(now - e.event_ts).total_seconds() for e in events], dtype=np.float64)
    return np.maximum(seconds / SECONDS_PER_DAY, MIN_AGE_DAYS)
