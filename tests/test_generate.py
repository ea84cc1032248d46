"""The demo generator: deterministic, dirty at the configured rates, heavy-tailed, and learnable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.core.config_sections import GenerateConfig
from pipelines.generate import BAD_TIMESTAMPS, UNKNOWN_EVENT_TYPES, generate

CFG = GenerateConfig(users=1500, items=400, categories=10, days=40, bots=2, bot_events=800)


@pytest.fixture(scope="module")
def shop() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate(CFG)


def test_same_seed_gives_identical_output(shop: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    events, catalog = generate(CFG)
    pd.testing.assert_frame_equal(events, shop[0])
    pd.testing.assert_frame_equal(catalog, shop[1])
    other, _ = generate(CFG.model_copy(update={"seed": 7}))
    assert not other.equals(shop[0])


def test_dirty_rows_match_configured_rates(shop: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    events = shop[0]
    n_dupes = int(events.duplicated().sum())
    n = len(events) - n_dupes  # rates are relative to the rows before duplicates were appended
    observed = {
        "null_user": int((events["user_id"].isna() | (events["user_id"] == "")).sum()),
        "bad_timestamp": int(events["event_ts"].isin(BAD_TIMESTAMPS).sum()),
        "future_timestamp": int((pd.to_datetime(events["event_ts"], errors="coerce") > pd.Timestamp(CFG.end)).sum()),
        "unknown_event_type": int(events["event_type"].isin(UNKNOWN_EVENT_TYPES).sum()),
        "negative_value": int((events["value"] < 0).sum()),
        "duplicate": n_dupes,
    }
    for kind, count in observed.items():
        expected = getattr(CFG.dirty, kind) * n
        assert abs(count - expected) <= max(3.0, 0.1 * expected), (kind, count, expected)


def test_bots_have_absurd_event_counts(shop: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    events = shop[0]
    day = events["event_ts"].str.slice(0, 10)
    per_user_day = events.groupby([events["user_id"], day]).size().groupby(level=0).max()
    bots = per_user_day[per_user_day.index.str.startswith("bot-")]
    humans = per_user_day[~per_user_day.index.str.startswith("bot-") & (per_user_day.index != "")]
    assert len(bots) == CFG.bots
    assert bots.min() > 10 * humans.quantile(0.99)


def test_item_popularity_is_heavy_tailed(shop: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    counts = shop[0]["item_id"].value_counts().to_numpy()
    top_decile = counts[: max(1, len(counts) // 10)].sum() / counts.sum()
    assert top_decile > 0.3  # a uniform catalogue would give 0.1
    assert counts[0] > 20 * np.median(counts)


def test_funnel_drops_off(shop: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    kinds = shop[0]["event_type"].value_counts()
    assert kinds["view"] > 3 * kinds["add_to_cart"] > 0
    assert kinds["add_to_cart"] > 1.5 * kinds["purchase"] > 0


def test_catalog_has_new_items_promos_and_stock_flags(shop: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    catalog = shop[1]
    launched = pd.to_datetime(catalog["launched_at"])
    new_share = float((launched > pd.Timestamp(CFG.end) - pd.Timedelta(days=7)).mean())
    assert abs(new_share - CFG.new_item_share) < 0.05
    assert abs(float(catalog["promo"].mean()) - CFG.promo_share) < 0.04
    assert abs(float((~catalog["in_stock"]).mean()) - CFG.out_of_stock_share) < 0.04
    assert catalog["item_id"].is_unique and (catalog["price"] > 0).all()


def test_planted_taste_is_learnable(shop: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """A category co-occurrence baseline beats popularity on each user's held-out last events."""
    events, catalog = shop
    good = events[events["user_id"].str.startswith("u", na=False) & events["event_type"].isin(["view", "purchase"])]
    good = good.assign(ts=pd.to_datetime(good["event_ts"], errors="coerce")).dropna(subset=["ts"])
    good = good[good["ts"] <= pd.Timestamp(CFG.end)].sort_values(["user_id", "ts"], kind="stable")
    cut = good["ts"].max() - pd.Timedelta(days=3)
    train, test = good[good["ts"] < cut], good[good["ts"] >= cut]
    category = catalog.set_index("item_id")["category"]
    popularity = train["item_id"].value_counts()
    top_pop = set(popularity.index[:10])
    # Per user: their category shares in training times item popularity within the category.
    user_cat = pd.crosstab(train["user_id"], train["item_id"].map(category), normalize="index")
    item_pop = popularity / popularity.sum()
    items = item_pop.index.to_numpy()
    scores = user_cat.to_numpy() @ (
        pd.get_dummies(category.reindex(items)).reindex(columns=user_cat.columns, fill_value=0).to_numpy().T
        * item_pop.to_numpy()
    )
    top_learned = {u: set(items[np.argsort(-row)[:10]]) for u, row in zip(user_cat.index, scores, strict=True)}
    truth = test[test["user_id"].isin(user_cat.index)].groupby("user_id")["item_id"].apply(set)
    precision_pop = np.mean([len(t & top_pop) / 10 for t in truth])
    precision_learned = np.mean([len(t & top_learned[u]) / 10 for u, t in truth.items()])
    assert precision_learned > 1.5 * precision_pop, (precision_learned, precision_pop)
