"""Demo data generator (`shelf generate`, `source.preset: synthetic`): a shop that looks real.

Writes two inputs that ingest reads like any other source:
- events at `source.path`: one row per event, columns user_id, item_id, event_type, event_ts,
  value, session_id (CSV with header, or Parquet, per `generate.format`);
- catalog at `source.catalog_path`: one row per item, columns item_id, category, price, in_stock,
  promo, launched_at, title.

The planted structure: every user has one or two favourite categories (latent taste), items have
power-law popularity, and sessions run view -> add_to_cart -> purchase with drop-off, with a daily
rhythm. So a model that learns tastes beats popularity by a clear margin. Dirty rows real feeds
carry are injected at `generate.dirty.*` rates, plus a few bot users with absurd event counts.

Everything is vectorised numpy (loops run over categories, never over events) and deterministic
for a given `generate.seed`: 10 million events take about a minute, mostly CSV writing.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.core import uris
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import GenerateConfig
from pipelines.core.errors import ConfigError
from pipelines.core.runs import RunContext, parse_as_of, step_log

log = logging.getLogger("shelf.generate")

EVENT_COLUMNS = ["user_id", "item_id", "event_type", "event_ts", "value", "session_id"]
# Probability of a view leading to add_to_cart, and of a cart leading to purchase.
CART_RATE = 0.22
PURCHASE_RATE = 0.45
MEAN_VIEWS_PER_SESSION = 4.0
# Share of traffic per hour of day (UTC): quiet nights, a lunch bump, an evening peak.
HOURLY = np.array([1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 3.5, 3.5, 4, 4.5, 4, 3.5, 3.5, 4, 4.5, 5.5, 6.5, 7, 6, 4, 2])
UNKNOWN_EVENT_TYPES = np.array(["wishlist_add", "clickk", "VIEW_ITEM", "share"])
BAD_TIMESTAMPS = np.array(["not-a-date", "2026-13-45 25:61:00", "yesterday", "31/02/2026"])


@dataclass(frozen=True)
class Shop:
    """The generated world: catalog columns plus each user's category preferences."""

    item_category: np.ndarray  # (items,) int
    item_popularity: np.ndarray  # (items,) float, sums to 1 within the whole catalog
    user_category_prefs: np.ndarray  # (users, categories) float, rows sum to 1
    catalog: pd.DataFrame


def user_ids(n: int) -> np.ndarray:
    return np.char.add("u", np.char.zfill(np.arange(n).astype(str), 6))


def item_ids(n: int) -> np.ndarray:
    return np.char.add("i", np.char.zfill(np.arange(n).astype(str), 5))


def make_shop(cfg: GenerateConfig, end: datetime, rng: np.random.Generator) -> Shop:
    """Items with categories, power-law popularity, prices, stock, promos and launch dates; user tastes."""
    n_items, n_cats = cfg.items, cfg.categories
    category = rng.integers(0, n_cats, n_items)
    popularity = 1.0 / np.arange(1, n_items + 1) ** cfg.popularity_exponent
    popularity = popularity[rng.permutation(n_items)]
    popularity /= popularity.sum()
    category_price = rng.lognormal(3.0, 0.8, n_cats)
    price = np.round(category_price[category] * rng.lognormal(0.0, 0.35, n_items), 2)
    in_stock = rng.random(n_items) >= cfg.out_of_stock_share
    promo = rng.random(n_items) < cfg.promo_share
    is_new = rng.random(n_items) < cfg.new_item_share
    age_days = np.where(is_new, rng.uniform(0, 7, n_items), rng.uniform(cfg.days, cfg.days + 700, n_items))
    launched = pd.Timestamp(end) - pd.to_timedelta(age_days, unit="D")
    catalog = pd.DataFrame(
        {
            "item_id": item_ids(n_items),
            "category": np.char.add("cat_", category.astype(str)),
            "price": price,
            "in_stock": in_stock,
            "promo": promo,
            "launched_at": launched.floor("s").strftime("%Y-%m-%dT%H:%M:%S"),
            "title": np.char.add("Product ", np.arange(n_items).astype(str)),
        }
    )
    # Latent taste: one or two favourite categories carry most of a user's interest.
    n_users = cfg.users
    logits = rng.normal(0.0, 0.5, (n_users, n_cats))
    favourite = rng.integers(0, n_cats, n_users)
    second = rng.integers(0, n_cats, n_users)
    has_second = rng.random(n_users) < 0.5
    logits[np.arange(n_users), favourite] += cfg.taste_strength
    logits[np.arange(n_users)[has_second], second[has_second]] += cfg.taste_strength * 0.7
    prefs = np.exp(logits)
    prefs /= prefs.sum(axis=1, keepdims=True)
    return Shop(category, popularity, prefs, catalog)


def _sample_rows(cdf: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each entry of `rows`, draw a column index from that row's cumulative distribution."""
    draws = np.asarray(rng.random(rows.shape[0]))
    picked = (cdf[rows] < draws[:, None]).sum(axis=1)
    return np.asarray(np.minimum(picked, cdf.shape[1] - 1))


def _sample_items_in_category(shop: Shop, categories: np.ndarray, rng: np.random.Generator, n_cats: int) -> np.ndarray:
    """Draw one item per event from its category, proportionally to item popularity."""
    items = np.empty(categories.shape[0], dtype=np.int64)
    for c in range(n_cats):
        where = np.flatnonzero(categories == c)
        members = np.flatnonzero(shop.item_category == c)
        if where.size == 0:
            continue
        if members.size == 0:  # an empty category: fall back to the whole catalog
            members = np.arange(shop.item_category.shape[0])
        weights = shop.item_popularity[members]
        cdf = np.cumsum(weights / weights.sum())
        items[where] = members[np.minimum(np.searchsorted(cdf, rng.random(where.size)), members.size - 1)]
    return items


def make_events(cfg: GenerateConfig, shop: Shop, end: datetime, rng: np.random.Generator) -> pd.DataFrame:
    """Clean sessions: views drawn from each user's taste, then add_to_cart and purchase with drop-off."""
    n_users = cfg.users
    activity = rng.pareto(2.0, n_users) + 0.3  # heavy-tailed user activity
    sessions_per_user = rng.poisson(cfg.sessions_per_user * activity / activity.mean())
    session_user = np.repeat(np.arange(n_users), sessions_per_user)
    n_sessions = session_user.shape[0]
    hour_p = HOURLY / HOURLY.sum()
    start = (
        rng.integers(0, cfg.days, n_sessions) * 86400
        + rng.choice(24, n_sessions, p=hour_p) * 3600
        + rng.integers(0, 3600, n_sessions)
    )
    views_per_session = rng.geometric(1.0 / MEAN_VIEWS_PER_SESSION, n_sessions)
    view_session = np.repeat(np.arange(n_sessions), views_per_session)
    view_user = session_user[view_session]
    cdf = np.cumsum(shop.user_category_prefs, axis=1)
    view_cat = _sample_rows(cdf, view_user, rng)
    view_item = _sample_items_in_category(shop, view_cat, rng, cfg.categories)
    # Seconds since the session started: exponential gaps between clicks.
    gaps = rng.exponential(45.0, view_session.shape[0])
    first_in_session = np.r_[True, view_session[1:] != view_session[:-1]]
    cumulative = np.cumsum(gaps)
    session_start = np.maximum.accumulate(np.where(first_in_session, np.arange(gaps.size), 0))
    session_offset = cumulative - (cumulative[session_start] - gaps[session_start])
    view_t = start[view_session] + session_offset
    carted = rng.random(view_session.shape[0]) < CART_RATE
    cart_idx = np.flatnonzero(carted)
    bought = rng.random(cart_idx.shape[0]) < PURCHASE_RATE
    buy_idx = cart_idx[bought]
    kinds = np.concatenate(
        [
            np.zeros(view_session.shape[0], np.int8),
            np.ones(cart_idx.shape[0], np.int8),
            np.full(buy_idx.shape[0], 2, np.int8),
        ]
    )
    src = np.concatenate([np.arange(view_session.shape[0]), cart_idx, buy_idx])
    t = view_t[src] + np.select(
        [kinds == 1, kinds == 2], [rng.uniform(5, 60, src.size), rng.uniform(60, 600, src.size)], 0.0
    )
    value = np.where(kinds == 2, rng.integers(1, 4, src.size), 1).astype(np.float64)
    window_start = np.datetime64(end.replace(microsecond=0)) - np.timedelta64(cfg.days * 86400, "s")
    seconds = np.minimum(t, cfg.days * 86400 - 1).astype(np.int64)
    events = pd.DataFrame(
        {
            "user_id": user_ids(n_users)[view_user[src]],
            "item_id": item_ids(cfg.items)[view_item[src]],
            "event_type": np.array(["view", "add_to_cart", "purchase"])[kinds],
            "ts": window_start + seconds.astype("timedelta64[s]"),
            "value": value,
            "session_id": np.char.add("s", view_session[src].astype(str)),
        }
    )
    return events


def make_bots(cfg: GenerateConfig, end: datetime, rng: np.random.Generator) -> pd.DataFrame:
    """Crawlers: a handful of users viewing random items thousands of times within one day."""
    n = cfg.bots * cfg.bot_events
    if n == 0:
        return pd.DataFrame(columns=["user_id", "item_id", "event_type", "ts", "value", "session_id"])
    bot = np.repeat(np.arange(cfg.bots), cfg.bot_events)
    day = rng.integers(1, cfg.days, cfg.bots)[bot]
    window_start = np.datetime64(end.replace(microsecond=0)) - np.timedelta64(cfg.days * 86400, "s")
    seconds = day * 86400 + rng.integers(0, 86400, n)
    return pd.DataFrame(
        {
            "user_id": np.char.add("bot-", bot.astype(str)),
            "item_id": item_ids(cfg.items)[rng.integers(0, cfg.items, n)],
            "event_type": "view",
            "ts": window_start + seconds.astype("timedelta64[s]"),
            "value": 1.0,
            "session_id": np.char.add("bot-session-", bot.astype(str)),
        }
    )


def inject_dirt(events: pd.DataFrame, cfg: GenerateConfig, end: datetime, rng: np.random.Generator) -> pd.DataFrame:
    """Serialise timestamps and damage disjoint random rows at the configured rates.

    Each damaged row carries exactly one defect, so the quarantine counts per reason code can be
    checked against the configured rates. Exact duplicates are appended copies of clean rows.
    """
    n = len(events)
    out = events.assign(event_ts=events["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S")).drop(columns="ts")
    rates = cfg.dirty
    kinds = ["null_user", "bad_timestamp", "future_timestamp", "unknown_event_type", "negative_value"]
    counts = [int(round(getattr(rates, k) * n)) for k in kinds]
    order = rng.permutation(n)
    bounds = np.cumsum([0, *counts])
    picked = {k: order[bounds[i] : bounds[i + 1]] for i, k in enumerate(kinds)}
    user = out["user_id"].to_numpy(dtype=object)
    half = picked["null_user"].size // 2
    user[picked["null_user"][:half]] = None
    user[picked["null_user"][half:]] = ""
    out["user_id"] = user
    ts = out["event_ts"].to_numpy(dtype=object)
    ts[picked["bad_timestamp"]] = BAD_TIMESTAMPS[rng.integers(0, BAD_TIMESTAMPS.size, picked["bad_timestamp"].size)]
    future = pd.Timestamp(end) + pd.to_timedelta(rng.uniform(2, 400, picked["future_timestamp"].size), unit="D")
    ts[picked["future_timestamp"]] = future.floor("s").strftime("%Y-%m-%dT%H:%M:%S")
    out["event_ts"] = ts
    etype = out["event_type"].to_numpy(dtype=object)
    u = picked["unknown_event_type"]
    etype[u] = UNKNOWN_EVENT_TYPES[rng.integers(0, UNKNOWN_EVENT_TYPES.size, u.size)]
    out["event_type"] = etype
    value = out["value"].to_numpy(copy=True)
    value[picked["negative_value"]] = -np.abs(value[picked["negative_value"]]) - 1.0
    out["value"] = value
    damaged = np.zeros(n, bool)
    damaged[order[: bounds[-1]]] = True
    clean_rows = np.flatnonzero(~damaged)
    dupes = rng.choice(clean_rows, int(round(rates.duplicate * n)), replace=False)
    out = pd.concat([out, out.iloc[dupes]], ignore_index=True)
    # Shuffle deterministically so duplicates and dirt are spread through the file.
    out = out.iloc[rng.permutation(len(out))].reset_index(drop=True)
    return out[EVENT_COLUMNS]


def generate(cfg: GenerateConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (events, catalog) for the configured shop; the same seed gives identical frames."""
    end = parse_as_of(cfg.end)
    rng = np.random.default_rng(cfg.seed)
    shop = make_shop(cfg, end, rng)
    events = pd.concat([make_events(cfg, shop, end, rng), make_bots(cfg, end, rng)], ignore_index=True)
    events = events.sort_values(["ts", "user_id", "item_id", "event_type"], kind="stable").reset_index(drop=True)
    return inject_dirt(events, cfg, end, rng), shop.catalog


def _write(frame: pd.DataFrame, folder: Path, fmt: str) -> None:
    """Write one file into `folder` (replacing it), named like Spark's part files."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if fmt == "parquet":
        frame.to_parquet(folder / "part-00000.parquet", index=False)
    else:
        frame.to_csv(folder / "part-00000.csv", index=False)


def run(spark: object, config: ShelfConfig, ctx: RunContext) -> None:
    """Generate the demo shop into `source.path` and `source.catalog_path` (no Spark needed: pandas writes them,
    so both must be on the driver's disk).

    Raises:
        ConfigError: `source.path` or `source.catalog_path` is a remote URI.
    """
    remote = [p for p in (config.source.path, config.source.catalog_path) if p and not uris.is_local(p)]
    if remote:
        raise ConfigError(
            f"shelf generate writes the demo shop to the driver's disk, not to {remote[0]}; generate it into a "
            "local folder and copy it there, or set source.path to data that already exists."
        )
    with step_log("generate", ctx) as counts:
        events, catalog = generate(config.generate)
        _write(events, Path(uris.local_path(config.source.path)), config.generate.format)
        if config.source.catalog_path:
            _write(catalog, Path(uris.local_path(config.source.catalog_path)), "csv")
        counts.update(events=len(events), users=config.generate.users, items=len(catalog))
    log.info("demo events in %s, catalog in %s", config.source.path, config.source.catalog_path)


__all__ = ["generate", "run"]
