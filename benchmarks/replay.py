"""Does re-ranking with fresh behaviour help? The temporal replay protocol on one or more datasets.

    .venv/bin/python -u -m benchmarks.replay --test-windows 4 --paired \\
        --data demo=conf/local.yaml@.data/tables@2026-11-01 \\
        --data retail=conf/online_retail.yaml@.data/online-retail-tables@2011-12-10@6 [--tune]

Each `--data NAME=CONF@STORAGE_ROOT@AS_OF[@N]` names a config overlay, the storage root holding its
silver tables (run `shelf ingest` and `shelf clean` first), the as_of that ends its latest test window
and, optionally, its number of test windows (default `--test-windows`, default 1). A window
(pipelines/evaluate.py, protocol `replay`) ending at E has T = E - h - d: ALS trains before T, [T, T + d)
is the fresh behaviour the re-rank sees, the scored days are [T + d, E), with d = evaluate.replay_fresh_days
and h = evaluate.replay_horizon_days. Items a user touched before T + d are neither relevant nor listed.
Test window i (i = 0 .. N - 1) ends at as_of - i x h, so the scored days of consecutive windows tile
[as_of - N x h, as_of) without overlap; each window has its own T, ALS fit and fresh window.

With `--tune`, the re-rank parameters are tuned on `--validation-windows` validation windows, the j-th
ending at as_of - (N + j) x h: the latest ends at the earliest test window's T + d, so no scored test day
is used for tuning. Greedy coordinate search (`shelf tune`'s: pipelines/tune.py, `GRID`, three rounds) on the mean over datasets of
the pooled NDCG@k(ALS + re-rank) / NDCG@k(ALS) over that dataset's validation windows. Tuning builds each validation
window's kernel input once (the same frames `rerank_candidates` builds: candidates, fresh events, item
table with the co-occurrence lists), caches it with each user's relevant items, and scores all values of
one coordinate in a single `mapInPandas` pass (kernel + NDCG@k per user, summed per value), so a
coordinate costs one Spark job, not one replay each. The test windows are then scored with both the
configured (`als_rerank`) and the tuned (`als_rerank_tuned`) parameters.

Every model's lists are built once per test window. It prints, per dataset, the windows' days, NDCG@k per
window and model, and the pooled table: per-user metrics averaged over all scored (window, user) pairs,
catalog metrics (coverage, novelty, diversity) averaged over windows. With `--paired` it adds the NDCG@k
lift of each re-rank over ALS per window and pooled, with a 95% percentile interval from a cluster
bootstrap by user (users resampled with replacement, each carrying all their windows; 2,000 resamples,
seed 0) and how many (window, user) pairs gain, lose or tie; that brings one NDCG value per scored
(window, user) pair and model to the driver (a few thousand floats: a benchmark's read-out, not a
pipeline step).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines import baselines, replay
from pipelines.core import metrics, schemas
from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import load_config
from pipelines.core.config_sections import EvaluateConfig, RerankConfig
from pipelines.core.logs import setup_logging
from pipelines.core.runs import parse_as_of
from pipelines.core.schemas import USER_IDX
from pipelines.core.session import get_spark
from pipelines.tune import TuningWindow, changes, tune, values_at

SHOWN = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage", "novelty", "diversity")
TUNED = "als_rerank_tuned"
ROUNDS = 3
RESAMPLES, BOOTSTRAP_SEED = 2000, 0
WINDOW = "window"


@dataclass
class Dataset:
    name: str
    config: ShelfConfig
    as_of_text: str
    test_windows: int = 1


def parse_data(text: str, test_windows: int = 1) -> Dataset:
    """NAME=CONF@STORAGE_ROOT@AS_OF[@N] -> a dataset with N (default `test_windows`) test windows."""
    name, rest = text.split("=", 1)
    conf, root, as_of, *windows = rest.split("@")
    config = load_config(conf, [f"storage.root={root}", "spark.master=local[2]", "spark.driver_memory=3g"])
    return Dataset(name, config, as_of, int(windows[0]) if windows else test_windows)


@dataclass(frozen=True)
class WindowSpan:
    """One replay window's days: ALS trains before `cut` (T), the fresh window is [T, T + d), scored [T + d, end)."""

    cut: datetime
    fresh_end: datetime
    end: datetime

    def describe(self) -> str:
        return f"ALS before {self.cut:%Y-%m-%d}, fresh [{self.cut:%Y-%m-%d}, {self.fresh_end:%Y-%m-%d}), " + (
            f"scored [{self.fresh_end:%Y-%m-%d}, {self.end:%Y-%m-%d})"
        )


@dataclass(frozen=True)
class ReplayPlan:
    """Test windows (latest first) and validation windows (latest first) of one dataset."""

    test: list[WindowSpan]
    validation: list[WindowSpan]


def replay_plan(
    evaluate: EvaluateConfig, as_of: datetime, test_windows: int, validation_windows: int = 1
) -> ReplayPlan:
    """Test window i ends at as_of - i x h (i < N); validation window j at as_of - (N + j) x h, so the latest
    validation window's scored days end where the earliest test window's scored days begin (its T + d).

    Raises:
        ValueError: fewer than one test or validation window.
    """
    if test_windows < 1 or validation_windows < 1:
        raise ValueError(
            f"Need at least one test and one validation window, got {test_windows} and "
            f"{validation_windows}; pass --test-windows 1 or more."
        )

    def span(i: int) -> WindowSpan:
        end = as_of - timedelta(days=i * evaluate.replay_horizon_days)
        cut, fresh_end = replay.replay_cuts(evaluate, end)
        return WindowSpan(cut, fresh_end, end)

    return ReplayPlan(
        [span(i) for i in range(test_windows)],
        [span(test_windows + j) for j in range(validation_windows)],
    )


@dataclass(frozen=True)
class Lift:
    """Relative lift of sum(other) / sum(base) - 1 with its bootstrap interval and the per-pair signs."""

    lift: float
    low: float
    high: float
    gain: int
    lose: int
    tie: int

    def describe(self) -> str:
        return f"{self.lift:+.1%} [{self.low:+.1%}, {self.high:+.1%}] | {self.gain} / {self.lose} / {self.tie}"


def cluster_bootstrap(
    users: np.ndarray, base: np.ndarray, other: np.ndarray, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> Lift:
    """Lift of mean(other) over mean(base) across (window, user) pairs, 95% percentile interval from resampling
    users with replacement, each user carrying all of their pairs (a cluster bootstrap: a user's windows are
    not independent). With one pair per user it is the plain paired bootstrap.

    Args:
        users: the user of each pair; base, other: the two models' metric for that pair (same length).
    """
    codes, inverse = np.unique(users, return_inverse=True)
    base_sum = np.bincount(inverse, weights=base, minlength=codes.size)
    other_sum = np.bincount(inverse, weights=other, minlength=codes.size)
    picks = np.random.default_rng(seed).integers(0, codes.size, size=(resamples, codes.size))
    base_draw, other_draw = base_sum[picks].sum(axis=1), other_sum[picks].sum(axis=1)
    ok = base_draw > 0  # a resample with no ALS hit at all has no ratio
    low, high = np.percentile(other_draw[ok] / base_draw[ok] - 1.0, [2.5, 97.5])
    gain, lose = int(np.sum(other > base)), int(np.sum(other < base))
    return Lift(float(other.sum() / base.sum() - 1.0), float(low), float(high), gain, lose, base.size - gain - lose)


class Window(TuningWindow):
    """One dataset's replay window ending at `span.end`, ALS fitted once; scores any re-rank config on it."""

    def __init__(self, spark: SparkSession, data: Dataset, span: WindowSpan, label: str) -> None:
        super().__init__(spark, data.config, span.end, label, name=data.name)
        self.data, self.span = data, span
        print(f"  {data.name} {label}: {span.describe()}, {self.users} users scored", flush=True)

    def score_lists(
        self, models: dict[str, RerankConfig | None], paired: bool
    ) -> tuple[dict[tuple[str, str], float], pd.DataFrame | None]:
        """Every model's metrics at k from lists built once, and (with `paired`) NDCG@k per scored user of ALS
        and of each re-rank: columns user_idx, model..., one row per user."""
        cfg, k = self.data.config, self.data.config.evaluate.k
        ks = baselines.cutoffs(cfg.evaluate)
        lists = replay.replay_lists(self.spark, self.window, cfg, self.item_index, self.catalog, models, max(ks))
        try:
            values = values_at(replay.score_replay_lists(self.spark, self.window, lists, ks), k)
            if not paired:
                return values, None
            names = [schemas.ALS_MODEL, *[m for m, rr in models.items() if rr is not None]]
            groups = self.spark.createDataFrame([(m,) for m in names], f"{schemas.MODEL} string")
            recs = lists.combined.filter(F.col(schemas.MODEL).isin(names))
            per_user = metrics.per_user_metrics(recs, self.window.relevant, [k], by=[schemas.MODEL], groups=groups)
            pdf = per_user.select(schemas.MODEL, USER_IDX, "ndcg").toPandas()  # scored users x models rows
        finally:
            lists.release()
        wide = pdf.pivot(index=USER_IDX, columns=schemas.MODEL, values="ndcg").fillna(0.0).reset_index()
        return values, wide


def pooled(values: list[dict[tuple[str, str], float]], users: list[int]) -> dict[tuple[str, str], float]:
    """Per-user metrics averaged over all scored (window, user) pairs; catalog metrics averaged over windows."""
    out = {}
    for key in values[0]:
        if key[1] in metrics.PER_USER_METRICS:
            out[key] = sum(v[key] * n for v, n in zip(values, users, strict=True)) / sum(users)
        else:
            out[key] = sum(v[key] for v in values) / len(values)
    return out


def print_table(title: str, values: dict[tuple[str, str], float], models: list[str]) -> None:
    print(f"\n### {title}\n")
    print("| model | " + " | ".join(SHOWN) + " |")
    print("|---|" + "---:|" * len(SHOWN))
    for model in models:
        print(f"| {model} | " + " | ".join(f"{values.get((model, m), float('nan')):.4f}" for m in SHOWN) + " |")
    als = schemas.ALS_MODEL
    for rr in (m for m in models if m in (schemas.ALS_RERANK, TUNED)):
        lifts = [values[(rr, m)] / values[(als, m)] - 1 if values.get((als, m)) else float("nan") for m in SHOWN]
        print(f"| **{rr} vs ALS** | " + " | ".join(f"{x:+.1%}" for x in lifts) + " |", flush=True)


def print_windows(
    data: Dataset, windows: list[Window], values: list[dict[tuple[str, str], float]], models: list[str]
) -> None:
    k = data.config.evaluate.k
    print(f"\n### {data.name}: NDCG@{k} per test window\n")
    print("| window | scored days | users | " + " | ".join(models) + " |")
    print("|---|---|---:|" + "---:|" * len(models))
    for i, (w, v) in enumerate(zip(windows, values, strict=True)):
        days = f"{w.span.fresh_end:%Y-%m-%d} to {w.span.end:%Y-%m-%d}"
        print(
            f"| {i} | {days} | {w.users} | "
            + " | ".join(f"{v.get((m, 'ndcg'), float('nan')):.4f}" for m in models)
            + " |"
        )


def print_paired(data: Dataset, windows: list[Window], per_user: list[pd.DataFrame], rerankers: list[str]) -> None:
    k = data.config.evaluate.k
    print(
        f"\n### {data.name}: NDCG@{k} lift over ALS, 95% cluster-bootstrap interval by user; pairs gaining / losing / tied\n"
    )
    print("| window | users | " + " | ".join(f"{r}: lift [95%] | gain / lose / tie" for r in rerankers) + " |")
    print("|---|---:|" + "---|---:|" * len(rerankers))
    for i, (w, pdf) in enumerate(zip(windows, per_user, strict=True)):
        lifts = [
            cluster_bootstrap(pdf[USER_IDX].to_numpy(), pdf[schemas.ALS_MODEL].to_numpy(), pdf[r].to_numpy())
            for r in rerankers
        ]
        print(
            f"| {i} ({w.span.fresh_end:%Y-%m-%d} to {w.span.end:%Y-%m-%d}) | {w.users} | "
            + " | ".join(x.describe() for x in lifts)
            + " |"
        )
    every = pd.concat(per_user, ignore_index=True)
    lifts = [
        cluster_bootstrap(every[USER_IDX].to_numpy(), every[schemas.ALS_MODEL].to_numpy(), every[r].to_numpy())
        for r in rerankers
    ]
    users = every[USER_IDX].nunique()
    print(
        f"| **pooled** ({len(every)} pairs) | {users} | " + " | ".join(x.describe() for x in lifts) + " |", flush=True
    )


def score_dataset(spark: SparkSession, data: Dataset, models: dict[str, RerankConfig | None], paired: bool) -> None:
    """Every model on each test window (lists built once per window), then the per-window, pooled and paired tables."""
    plan = replay_plan(data.config.evaluate, parse_as_of(data.as_of_text), data.test_windows)
    print(f"\n{data.name}: {data.test_windows} test window(s)", flush=True)
    windows, values, per_user = [], [], []
    for i, span in enumerate(plan.test):
        window = Window(spark, data, span, f"test window {i}")
        got, wide = window.score_lists(models, paired)
        window.release()
        windows.append(window)
        values.append(got)
        if wide is not None:
            per_user.append(wide)
    names = list(models)
    print_windows(data, windows, values, names)
    users = [w.users for w in windows]
    k = data.config.evaluate.k
    print_table(
        f"{data.name}, pooled over {len(windows)} test windows ({sum(users)} scored pairs), k = {k}",
        pooled(values, users),
        names,
    )
    if paired:
        print_paired(data, windows, per_user, [m for m, rr in models.items() if rr is not None])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", action="append", required=True, help="NAME=CONF@STORAGE_ROOT@AS_OF[@N]")
    parser.add_argument("--test-windows", type=int, default=1, help="consecutive test windows per dataset (default 1)")
    parser.add_argument("--validation-windows", type=int, default=1, help="with --tune: validation windows per dataset")
    parser.add_argument("--tune", action="store_true", help="tune the re-rank on the validation windows first")
    parser.add_argument("--models", nargs="+", help="models scored on the test windows (default: all)")
    parser.add_argument("--paired", action="store_true", help="add the NDCG@k lift over ALS with bootstrap intervals")
    args = parser.parse_args()
    setup_logging()
    datasets = [parse_data(text, args.test_windows) for text in args.data]
    spark = get_spark(datasets[0].config)
    started = time.perf_counter()
    configured = datasets[0].config.rerank
    tuned = None
    if args.tune:
        validation = []
        for data in datasets:
            plan = replay_plan(
                data.config.evaluate, parse_as_of(data.as_of_text), data.test_windows, args.validation_windows
            )
            first_test_day = plan.test[-1].fresh_end
            assert all(v.end <= first_test_day for v in plan.validation), "a validation window reaches a test day"
            validation += [
                Window(spark, data, span, f"validation window {j}") for j, span in enumerate(plan.validation)
            ]
        tuned, _ = tune(validation, configured, ROUNDS)
        for w in validation:
            w.release()
        print(f"\ntuned re-rank (changes from the configured one): {changes(configured, tuned)}", flush=True)
        print(f"tuning took {time.perf_counter() - started:.0f} s", flush=True)
    for data in datasets:
        names = args.models or replay.replay_models(data.config.evaluate)
        models: dict[str, RerankConfig | None] = {
            m: (data.config.rerank if m == schemas.ALS_RERANK else None) for m in names
        }
        if tuned is not None:
            models[TUNED] = tuned
        if args.paired and schemas.ALS_MODEL not in models:
            models = {schemas.ALS_MODEL: None, **models}
        score_dataset(spark, data, models, args.paired)
    print(f"\n{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
