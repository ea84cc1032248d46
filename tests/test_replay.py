"""The temporal replay protocol of pipelines/evaluate.py on a small hand-built shop: windows, the models
it compares, and that no list (ALS + re-rank included) recommends an item seen before T + d; and
benchmarks/replay.py's consecutive test windows, validation window and cluster bootstrap."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from benchmarks import replay as replay_benchmark
from pipelines import evaluate, replay, tune
from pipelines.core import metrics, reports, schemas, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import RerankConfig
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
    assert replay.replay_cuts(config.evaluate, AS_OF) == (datetime(2026, 10, 25), datetime(2026, 10, 27))


@pytest.mark.steps
def test_als_rerank_lists_exclude_items_seen_before_the_end_of_the_fresh_window(
    spark: SparkSession, shop: tuple[ShelfConfig, list[Event]]
) -> None:
    config, events = shop
    interactions = tables.read(spark, config, "silver", "interactions")
    window = replay.prepare_replay(spark, interactions, config, AS_OF)
    try:
        assert (window.cut, window.fresh_end) == (CUT, FRESH_END)
        # The relevant set, computed here from the raw events: test pairs not seen before T + d.
        seen = seen_before(events, FRESH_END)
        trained = {u for u, _, _, ts in events if ts < CUT}
        want = {(u, i) for u, i, _, ts in events if ts >= FRESH_END and i not in seen[u] and u in trained}
        got = {(r.user_idx, r.item_idx) for r in window.relevant.collect()}
        assert got == want and len(want) >= N_USERS  # each user bought two random items later

        lists = window.neighbours.toPandas()
        cands = replay.replay_candidates(window, config.rerank, config.recommend).toPandas()
        item_index = tables.read(spark, config, "silver", "item_index")
        catalog = tables.read(spark, config, "silver", "catalog")
        done = replay.replay_rerank(spark, window, config.rerank, item_index, catalog, k=10, recommend=config.recommend)
        try:
            rows = done.rows.toPandas()
        finally:
            done.unpersist()
        plain = replay.replay_baseline(schemas.ALS_MODEL, window, config.evaluate, 10).toPandas()
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


@pytest.mark.steps
def test_replay_run_scores_every_model_and_reports_the_lift(
    spark: SparkSession, shop: tuple[ShelfConfig, list[Event]]
) -> None:
    config, _ = shop
    evaluate.run(spark, config, RunContext(RUN, AS_OF))
    table = tables.read(spark, config, "gold", "metrics").filter(F.col("run_id") == RUN).toPandas()
    models = {"popularity", "item_knn", "als", schemas.ITEM_KNN_FRESH, schemas.ALS_RERANK}
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
    stored = reports.read(spark, config, RUN)
    summary = stored["summary.md"].decode("utf-8")
    assert "| ndcg |" in summary and "als_rerank" in summary and "Replay windows" in summary
    assert stored["metrics_at_k.png"].startswith(b"\x89PNG")


# benchmarks/replay.py: consecutive test windows, the validation window before them, the cluster bootstrap.


def test_test_windows_tile_the_scored_days_and_validation_ends_at_the_first_test_day() -> None:
    config = make_test_config(Path("/unused"), "evaluate.replay_fresh_days=3", "evaluate.replay_horizon_days=7")
    plan = replay_benchmark.replay_plan(config.evaluate, AS_OF, test_windows=3, validation_windows=2)
    day = timedelta(days=1)
    assert [s.end for s in plan.test] == [AS_OF, AS_OF - 7 * day, AS_OF - 14 * day]
    for span in [*plan.test, *plan.validation]:  # each window has its own T and fresh window
        assert (span.fresh_end, span.cut) == (span.end - 7 * day, span.end - 10 * day)
    scored = [(s.fresh_end, s.end) for s in plan.test]
    for (start, end), (prev_start, _) in zip(scored[1:], scored[:-1], strict=True):
        assert end == prev_start and start < end  # consecutive, never overlapping
    first_test_day = plan.test[-1].fresh_end
    assert first_test_day == AS_OF - 21 * day
    assert plan.validation[0].end == first_test_day  # the latest validation window stops where testing starts
    assert plan.validation[1].end == first_test_day - 7 * day
    assert all(v.end <= first_test_day for v in plan.validation)
    with pytest.raises(ValueError, match="--test-windows"):
        replay_benchmark.replay_plan(config.evaluate, AS_OF, test_windows=0)


def test_cluster_bootstrap_of_identical_models_is_zero_with_a_zero_width_interval() -> None:
    users = np.array([1, 2, 3, 1, 2, 3])
    ndcg = np.array([0.1, 0.0, 0.3, 0.2, 0.5, 0.0])
    got = replay_benchmark.cluster_bootstrap(users, ndcg, ndcg.copy())
    assert (got.lift, got.low, got.high) == (0.0, 0.0, 0.0)
    assert (got.gain, got.lose, got.tie) == (0, 0, 6)


def test_cluster_bootstrap_of_a_model_better_for_every_user_is_above_zero() -> None:
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(50), 3)  # 50 users x 3 windows
    base = rng.uniform(0.05, 0.5, users.size)
    got = replay_benchmark.cluster_bootstrap(users, base, base * 1.2)
    assert got.lift == pytest.approx(0.2)
    assert got.low == pytest.approx(0.2) and got.high == pytest.approx(0.2)  # every resample gains 20%
    noisy = replay_benchmark.cluster_bootstrap(users, base, base + rng.uniform(0.01, 0.1, users.size))
    assert 0.0 < noisy.low < noisy.lift < noisy.high and noisy.gain == users.size


def test_cluster_bootstrap_resamples_users_with_all_their_windows() -> None:
    # User 0 gains in three windows, user 1 ties in one. Resampling users, a draw of two has no user 0 with
    # probability 1/4, so the 2.5% quantile is exactly 0; resampling the four pairs independently, no gain
    # at all needs all four draws on user 1's pair (1/256), so that interval would sit above 0.
    users = np.array([0, 0, 0, 1])
    base = np.ones(4)
    other = np.array([2.0, 2.0, 2.0, 1.0])
    got = replay_benchmark.cluster_bootstrap(users, base, other)
    assert got.lift == pytest.approx(0.75)  # (6 + 1) / (3 + 1) - 1
    assert got.low == 0.0 and got.high == 1.0  # both draws user 1: 0; both user 0: 6 / 3 - 1
    pairs = replay_benchmark.cluster_bootstrap(np.arange(4), base, other)
    assert pairs.low > 0.0


def test_pooled_metrics_weight_windows_by_their_scored_users() -> None:
    first = {("als", "ndcg"): 0.2, ("als", "coverage"): 0.4}
    second = {("als", "ndcg"): 0.5, ("als", "coverage"): 0.6}
    got = replay_benchmark.pooled([first, second], [10, 30])
    assert got[("als", "ndcg")] == pytest.approx((0.2 * 10 + 0.5 * 30) / 40)  # mean over (window, user) pairs
    assert got[("als", "coverage")] == pytest.approx(0.5)  # a catalog metric: mean over windows


def test_data_argument_takes_an_optional_number_of_test_windows() -> None:
    root = Path(__file__).resolve().parents[1]
    assert replay_benchmark.parse_data(f"d={root}/conf/test.yaml@/tmp/x@2026-11-01", 2).test_windows == 2
    data = replay_benchmark.parse_data(f"d={root}/conf/test.yaml@/tmp/x@2026-11-01@5", 2)
    assert (data.name, data.as_of_text, data.test_windows) == ("d", "2026-11-01", 5)
    assert data.config.storage.root == "/tmp/x"


@pytest.mark.steps
def test_each_test_window_scores_its_own_users_and_the_paired_values_match_the_table(
    spark: SparkSession, shop: tuple[ShelfConfig, list[Event]]
) -> None:
    config, events = shop
    data = replay_benchmark.Dataset("shop", config, AS_OF.isoformat(), test_windows=2)
    plan = replay_benchmark.replay_plan(config.evaluate, AS_OF, data.test_windows)
    models: dict[str, RerankConfig | None] = {schemas.ALS_MODEL: None, schemas.ALS_RERANK: config.rerank}
    for span in plan.test:
        window = replay_benchmark.Window(spark, data, span, "test")
        try:
            values, wide = window.score_lists(models, paired=True)
        finally:
            window.release()
        assert wide is not None
        # The scored users of this window, from the raw events: trained before its T, a new item in its days.
        trained = {u for u, _, _, ts in events if ts < span.cut}
        seen = seen_before(events, span.fresh_end)
        want = {
            u
            for u, i, _, ts in events
            if span.fresh_end <= ts < span.end and u in trained and i not in seen.get(u, set())
        }
        assert set(wide["user_idx"]) == want and window.users == len(want) > 0
        for model in models:  # the per-user NDCG the bootstrap resamples averages to the table's value
            assert wide[model].mean() == pytest.approx(values[(model, "ndcg")])


@pytest.mark.steps
def test_shelf_tune_records_every_trial_and_its_grid_pass_agrees_with_the_regular_replay(
    spark: SparkSession, shop: tuple[ShelfConfig, list[Event]]
) -> None:
    """`shelf tune` (pipelines/tune.py) on the shop's latest replay window: one gold.rerank_tuning row per trial, the
    best so far only ever rising, the returned config the last best; and the one-pass grid's NDCG ratio of a config
    equals the regular replay's NDCG@k(ALS + re-rank) / NDCG@k(ALS) on the same window."""
    config, _ = shop
    config = config.model_copy(update={"rerank": config.rerank.model_copy(update={"tune_rounds": 1})})
    tuned = tune.run(spark, config, RunContext("tune-1", AS_OF))
    rows = tables.read(spark, config, "gold", "rerank_tuning").filter(F.col("run_id") == "tune-1").toPandas()
    tried = sum(len([v for v in values if v != tune.value_of(config.rerank, key)]) for key, values in tune.GRID)
    assert len(rows) >= 1 + len(tune.GRID) and len(rows) <= 1 + tried  # the start, then each new value tried
    assert rows.iloc[0]["key"] == "start" and bool(rows.iloc[0]["best"])
    best = rows[rows["best"]]
    assert list(best["ndcg_ratio"]) == sorted(best["ndcg_ratio"]) and best["ndcg_ratio"].is_unique
    assert rows["ndcg_ratio"].max() == pytest.approx(best["ndcg_ratio"].iloc[-1])
    won = {r["key"]: json.loads(r["value"]) for _, r in best.iloc[1:].iterrows()}  # one round: a key wins once
    assert tune.changes(config.rerank, tuned) == won
    window = tune.TuningWindow(spark, config, AS_OF, "check")
    try:
        regular = window.score([schemas.ALS_MODEL, schemas.ALS_RERANK], tuned)
        search = tune.Search([window], config.rerank, [])
        ratio = regular[(schemas.ALS_RERANK, "ndcg")] / regular[(schemas.ALS_MODEL, "ndcg")]
        assert search.values([tuned])[0] == pytest.approx(ratio, rel=1e-6)
        assert search.values([tuned])[0] == pytest.approx(best["ndcg_ratio"].iloc[-1], rel=1e-6)
    finally:
        window.release()


@pytest.mark.steps
def test_tuning_windows_fit_ease_at_t_and_its_scores_reach_the_re_rank(
    spark: SparkSession, shop: tuple[ShelfConfig, list[Event]]
) -> None:
    """`shelf tune`'s windows fit EASE on the events before T as `shelf train` does: its candidates are unseen
    items in each user's taste, with their EASE score, and weights.ease changes the re-rank's lists."""
    config, events = shop
    window = tune.TuningWindow(spark, config, AS_OF, "ease")
    try:
        scored = {r.user_idx for r in window.window.users.collect()}
        cands = replay.replay_candidates(window.window, config.rerank, config.recommend).toPandas()
        search = tune.Search([window], config.rerank, [])
        off, heavy = search.values([tune.with_value(config.rerank, "weights.ease", v) for v in (0.0, 16.0)])
    finally:
        window.release()
    seen = seen_before(events, FRESH_END)
    by_ease = cands["sources"].map(lambda s: "ease" in s)
    assert set(cands.loc[by_ease, "user_idx"]) == scored
    assert (cands.loc[by_ease, "ease_score"] > 0).all() and cands.loc[~by_ease, "ease_score"].isna().all()
    for u, group in cands.groupby("user_idx"):
        assert not set(group["item_idx"]) & seen[int(u)], u
    # Each user viewed 5 items of one category before T (and 3 at random): EASE's best 3 are mostly in it.
    best = cands[by_ease].sort_values("ease_score", ascending=False).groupby("user_idx").head(3)
    in_taste = (best["item_idx"] % N_CATS == best["user_idx"] % N_CATS).mean()
    assert in_taste > 0.6, in_taste
    assert off != pytest.approx(heavy, rel=1e-9)  # the EASE score is a feature of the kernel
