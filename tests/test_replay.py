"""The temporal replay protocol of pipelines/evaluate.py on a small hand-built shop: windows, the models
it compares, and that no list (ALS + re-rank included) recommends an item seen before T + d."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines import evaluate
from pipelines.core import metrics, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.runs import RunContext
from pipelines.core.schemas import CATALOG_SCHEMA, INTERACTIONS_SCHEMA
from tests.conftest import make_test_config

AS_OF = datetime(2026, 11, 1)
FRESH_DAYS, HORIZON_DAYS = 3.0, 4.0
FRESH_END = AS_OF - timedelta(days=HORIZON_DAYS)  # T + d
CUT = FRESH_END - timedelta(days=FRESH_DAYS)  # T
RUN = "replay-1"
N_USERS, N_ITEMS, N_CATS = 60, 40, 4

Event = tuple[int, int, str, datetime]


def make_events(seed: int = 3) -> list[Event]:
    """Each user likes one category (item % 4): 8 views before T (5 in that category), 2 carts in
    [T, T + d), 3 purchases in the test window, one of which repeats a fresh item (so it is not relevant)."""
    rng = np.random.default_rng(seed)
    events: list[Event] = []
    for u in range(N_USERS):
        liked = np.arange(u % N_CATS, N_ITEMS, N_CATS)
        pick = rng.permutation(liked)
        before = [*pick[:5].tolist(), *rng.integers(0, N_ITEMS, 3).tolist()]  # 3 items off-taste
        for item in before:
            events.append((u, int(item), "view", CUT - timedelta(days=rng.uniform(1, 20))))
        fresh = [int(pick[5]), int(pick[6])]
        for item in fresh:
            events.append((u, item, "add_to_cart", CUT + timedelta(days=rng.uniform(0.1, FRESH_DAYS - 0.1))))
        later = [int(rng.integers(0, N_ITEMS)), int(rng.integers(0, N_ITEMS)), fresh[0]]
        for item in later:
            events.append((u, item, "purchase", FRESH_END + timedelta(days=rng.uniform(0.1, HORIZON_DAYS - 0.1))))
    return events


def write_shop(spark: SparkSession, config: ShelfConfig, events: list[Event]) -> None:
    items = spark.createDataFrame([(f"sku-{i}", i) for i in range(N_ITEMS)], "item_id string, item_idx int")
    users = spark.createDataFrame([(f"u{u}", u) for u in range(N_USERS)], "user_id string, user_idx int")
    tables.write(items, config, "silver", "item_index", RUN)
    tables.write(users, config, "silver", "user_index", RUN)
    rows = [(u, i, t, ts, None, 1.0, 1.0, RUN, AS_OF) for u, i, t, ts in events]
    tables.write(spark.createDataFrame(rows, INTERACTIONS_SCHEMA), config, "silver", "interactions", RUN)
    catalog = [
        (f"sku-{i}", f"c{i % N_CATS}", 5.0 + i, True, False, AS_OF - timedelta(days=300), f"t{i}")
        for i in range(N_ITEMS)
    ]
    tables.write(spark.createDataFrame(catalog, CATALOG_SCHEMA), config, "silver", "catalog", RUN)


@pytest.fixture(scope="module")
def shop(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> tuple[ShelfConfig, list[Event]]:
    config = make_test_config(
        tmp_path_factory.mktemp("replay"),
        "evaluate.protocol=replay",
        f"evaluate.replay_fresh_days={FRESH_DAYS}",
        f"evaluate.replay_horizon_days={HORIZON_DAYS}",
        "evaluate.models=[popularity, item_knn, als]",
        "evaluate.ks=[5, 10]",
        "rerank.max_candidates=15",  # fewer than the unseen items: neighbours add their own
        "train.rank=4",
    )
    events = make_events()
    write_shop(spark, config, events)
    return config, events


def seen_before(events: list[Event], end: datetime) -> dict[int, set[int]]:
    seen: dict[int, set[int]] = {}
    for u, i, _, ts in events:
        if ts < end:
            seen.setdefault(u, set()).add(i)
    return seen


def test_cuts_put_the_test_window_at_the_end() -> None:
    config = make_test_config(Path("/unused"), "evaluate.replay_fresh_days=2", "evaluate.replay_horizon_days=5")
    assert evaluate.replay_cuts(config.evaluate, AS_OF) == (datetime(2026, 10, 25), datetime(2026, 10, 27))


def test_als_rerank_lists_exclude_items_seen_before_the_end_of_the_fresh_window(
    spark: SparkSession, shop: tuple[ShelfConfig, list[Event]]
) -> None:
    config, events = shop
    interactions = tables.read(spark, config, "silver", "interactions")
    window = evaluate.prepare_replay(spark, interactions, config, AS_OF)
    try:
        assert (window.cut, window.fresh_end) == (CUT, FRESH_END)
        # The relevant set, computed here from the raw events: test pairs not seen before T + d.
        seen = seen_before(events, FRESH_END)
        trained = {u for u, _, _, ts in events if ts < CUT}
        want = {(u, i) for u, i, _, ts in events if ts >= FRESH_END and i not in seen[u] and u in trained}
        got = {(r.user_idx, r.item_idx) for r in window.relevant.collect()}
        assert got == want and len(want) >= N_USERS  # each user bought two random items later

        lists = window.neighbours.toPandas()
        cands = evaluate.replay_candidates(window, config.rerank, config.recommend).toPandas()
        item_index = tables.read(spark, config, "silver", "item_index")
        catalog = tables.read(spark, config, "silver", "catalog")
        done = evaluate.replay_rerank(
            spark, window, config.rerank, item_index, catalog, k=10, recommend=config.recommend
        )
        try:
            rows = done.rows.toPandas()
        finally:
            done.unpersist()
        plain = evaluate.replay_baseline(evaluate.ALS_MODEL, window, config.evaluate, 10).toPandas()
    finally:
        window.release()
    scored = {u for u, _ in want}
    # Co-occurrence lists over the events before T + d: no self pair, at most top_n per item, scores in (0, 1].
    assert len(lists) and (lists["item_idx"] != lists["neighbour_idx"]).all()
    assert lists.groupby("item_idx").size().max() <= config.similarities.top_n
    assert lists["score"].between(0.0, 1.0, inclusive="right").all()
    # Candidates: ALS's best 15 unseen items plus neighbours of recent items, for scored users only.
    assert set(cands["user_idx"]) == scored
    sources = cands["sources"].map(tuple)
    assert set(sources) <= {("als",), ("neighbours",), ("als", "neighbours")}
    only_near = sources.map(lambda s: s == ("neighbours",))
    from_near = sources.map(lambda s: "neighbours" in s)
    assert only_near.any()  # neighbours ALS did not propose
    assert cands[~only_near].groupby("user_idx").size().max() <= 15
    assert cands["als_score"].isna().eq(only_near).all()
    assert set(cands.loc[from_near, "item_idx"]) <= set(lists["neighbour_idx"])
    for u, group in cands.groupby("user_idx"):
        assert not set(group["item_idx"]) & seen[int(u)], u
    assert set(rows["user_idx"]) == scored  # every scored user gets a re-ranked list
    for u, group in rows.groupby("user_idx"):
        assert not set(group["item_idx"]) & seen[int(u)], u  # nothing seen before T + d, fresh items included
        assert group["rank"].tolist() == list(range(1, len(group) + 1))
        assert len(group) <= 10
    for u, group in plain.groupby("user_idx"):
        assert not set(group["item_idx"]) & seen[int(u)]
    # The fresh window changes the order: the re-rank does not just copy ALS's lists.
    als_lists = plain.sort_values("rank").groupby("user_idx")["item_idx"].apply(list)
    rerank_lists = rows.sort_values("rank").groupby("user_idx")["item_idx"].apply(list)
    assert (als_lists != rerank_lists.reindex(als_lists.index)).any()


def test_replay_run_scores_every_model_and_reports_the_lift(
    spark: SparkSession, shop: tuple[ShelfConfig, list[Event]]
) -> None:
    config, _ = shop
    evaluate.run(spark, config, RunContext(RUN, AS_OF))
    table = tables.read(spark, config, "gold", "metrics").filter(F.col("run_id") == RUN).toPandas()
    models = {"popularity", "item_knn", "als", evaluate.ITEM_KNN_FRESH, evaluate.ALS_RERANK}
    assert set(table["model"]) == models
    names = {*metrics.PER_USER_METRICS, *metrics.CATALOG_METRICS}
    assert set(table["metric"]) == names
    assert len(table) == len(models) * len(names) * 2  # k = 5 and 10, one row each
    per_user = table[table["metric"].isin(metrics.PER_USER_METRICS) | (table["metric"] == "coverage")]
    assert per_user["value"].between(0.0, 1.0).all()
    at10 = table[table["k"] == 10].set_index(["model", "metric"])["value"]
    for model in models:  # hits are counted once: hit rate bounds precision and recall from above
        assert at10[(model, "hit_rate")] >= at10[(model, "recall")] - 1e-12
        assert at10[(model, "hit_rate")] >= at10[(model, "precision")]
    summary = (evaluate.report_dir(config, RUN) / "summary.md").read_text(encoding="utf-8")
    assert "| ndcg |" in summary and "als_rerank" in summary and "Replay windows" in summary
    assert (evaluate.report_dir(config, RUN) / "metrics_at_k.png").stat().st_size > 0
