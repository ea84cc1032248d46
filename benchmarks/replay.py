"""Does re-ranking with fresh behaviour help? The temporal replay protocol on one or more datasets.

    .venv/bin/python -u -m benchmarks.replay \\
        --data demo=conf/local.yaml@.data/tables@2026-11-01 \\
        --data retail=conf/online_retail.yaml@.data/online-retail-tables@2011-12-10 [--tune]

Each `--data NAME=CONF@STORAGE_ROOT@AS_OF` names a config overlay, the storage root holding its
silver tables (run `shelf ingest` and `shelf clean` first) and the as_of that ends its test window.
Windows (pipelines/evaluate.py, protocol `replay`): ALS trains before T, [T, T + d) is the fresh
behaviour the re-rank sees, the test window is [T + d, as_of), with d = evaluate.replay_fresh_days and
h = evaluate.replay_horizon_days. Items a user touched before T + d are neither relevant nor listed.

With `--tune`, the re-rank parameters are tuned on the *validation* window (the one ending at
as_of - h, so its test window precedes the reported one) by greedy coordinate search (`GRID`, two
rounds) on the mean over datasets of NDCG@k(ALS + re-rank) / NDCG@k(ALS); the test window is then
scored with both the configured and the tuned parameters. Tuning builds each validation window's
kernel input once (the same frames `rerank_candidates` builds: candidates, fresh events, item table
with the co-occurrence lists), caches it with each user's relevant items, and scores all values of
one coordinate in a single `mapInPandas` pass (kernel + NDCG@k per user, summed per value), so a
coordinate costs one Spark job, not one replay each. NDCG@k of ALS comes from the regular replay.
Prints markdown tables: every model at k, and the lift.

With `--paired`, it prints instead, per dataset, the test window's NDCG@k lift of the configured
re-rank over ALS with a paired bootstrap 95% interval over the scored users (2,000 resamples, seed 0)
and how many users gain, lose or tie; that needs one NDCG value per scored user on the driver (a
few hundred floats here: a benchmark's read-out, not a pipeline step).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StructField, StructType

from pipelines import evaluate as ev
from pipelines.core import metrics, reranking, tables
from pipelines.core.cli import setup_logging
from pipelines.core.config import RerankConfig, ShelfConfig, load_config
from pipelines.core.reranking import read_catalog
from pipelines.core.runs import parse_as_of
from pipelines.core.schemas import ITEM_IDX, USER_IDX
from pipelines.core.session import get_spark
from udfs.rerank import ItemTable, RerankParams, rerank

SHOWN = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage", "novelty", "diversity")
# Greedy coordinate search: each key's values are tried in turn, keeping the best so far.
GRID: list[tuple[str, list[Any]]] = [
    ("category_cap", [None, 3, 5]),
    ("mmr_lambda", [1.0, 0.9, 0.7]),
    ("weights.cooc_sum", [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]),
    ("weights.cooc_max", [0.0, 0.5, 1.0, 2.0, 4.0]),
    ("alpha", [0.0, 0.25, 0.5, 1.0]),
    ("half_life_days", [1.0, 2.0, 4.0, 8.0]),
    ("fresh_days", [7.0, 14.0, 28.0]),
    ("weights.session", [0.0, 0.5, 1.0]),
    ("weights.max_cosine", [0.0, 0.5, 1.0]),
    ("weights.mean_cosine", [0.0, 0.25]),
    ("weights.popularity", [0.0, 0.2, 0.5]),
]
ROUNDS = 2
RELEVANT, VALUE, NDCG_SUM = "_relevant", "_value", "_ndcg_sum"
GRID_SCHEMA = StructType([StructField(VALUE, IntegerType(), False), StructField(NDCG_SUM, DoubleType(), False)])


@dataclass
class Dataset:
    name: str
    config: ShelfConfig
    as_of_text: str


def parse_data(text: str) -> Dataset:
    name, rest = text.split("=", 1)
    conf, root, as_of = rest.split("@")
    config = load_config(conf, [f"storage.root={root}", "spark.master=local[2]", "spark.driver_memory=3g"])
    return Dataset(name, config, as_of)


def with_value(rerank: RerankConfig, key: str, value: Any) -> RerankConfig:
    if key.startswith("weights."):
        weights = rerank.weights.model_copy(update={key.split(".", 1)[1]: value})
        return rerank.model_copy(update={"weights": weights})
    return rerank.model_copy(update={key: value})


def values_at(table: DataFrame, k: int) -> dict[tuple[str, str], float]:
    rows = table.filter(table[metrics.K] == k).collect()  # models x metrics rows
    return {(r[ev.MODEL], r[metrics.METRIC]): float(r[metrics.METRIC_VALUE]) for r in rows}


def ndcg_sum(rows: np.ndarray, items: np.ndarray, ranks: np.ndarray, relevant: list[set[int]], k: int) -> float:
    """Sum over the batch's users (each with a relevant item) of NDCG@k as `metrics` defines it."""
    hit = np.fromiter((int(i) in relevant[r] for r, i in zip(rows, items, strict=True)), dtype=bool, count=items.size)
    keep = hit & (ranks <= k)
    dcg = np.bincount(rows[keep], weights=1.0 / np.log2(ranks[keep] + 1.0), minlength=len(relevant))
    ideal = np.cumsum(1.0 / np.log2(np.arange(1, k + 1) + 1.0))
    n_relevant = np.array([len(r) for r in relevant], dtype=np.int64)
    has = n_relevant > 0
    return float(np.sum(dcg[has] / ideal[np.minimum(k, n_relevant[has]) - 1]))


def grid_batches(
    batches: Iterable[pd.DataFrame],
    tables_by_fresh: Broadcast[dict[float, ItemTable]],
    trials: list[RerankParams],
    k: int,
) -> Iterator[pd.DataFrame]:
    """mapInPandas body: every trial's kernel on a batch of user rows -> (trial, summed NDCG@k)."""
    item_tables = tables_by_fresh.value
    for pdf in batches:
        if pdf.empty:
            continue
        rank = next(iter(item_tables.values())).factors.shape[1]
        batch = reranking.to_user_batch(pdf, rank)
        relevant = [set(np.asarray(v, dtype=np.int64).tolist()) for v in pdf[RELEVANT]]
        sums = []
        for trial in trials:
            out = rerank(item_tables[trial.fresh_days], batch, trial)
            sums.append(ndcg_sum(out.user_rows, out.items, out.ranks, relevant, k))
        yield pd.DataFrame({VALUE: np.arange(len(trials), dtype=np.int32), NDCG_SUM: np.asarray(sums)})


def bootstrap_lift(als: np.ndarray, reranked: np.ndarray, resamples: int = 2000, seed: int = 0) -> str:
    """'lift [2.5%, 97.5%] of mean(reranked) / mean(als) - 1 over users resampled in pairs; gain/lose/tie'."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, als.size, size=(resamples, als.size))
    lifts = reranked[picks].mean(axis=1) / als[picks].mean(axis=1) - 1.0
    low, high = np.percentile(lifts, [2.5, 97.5])
    gain, lose = int(np.sum(reranked > als)), int(np.sum(reranked < als))
    lift = reranked.mean() / als.mean() - 1.0
    return f"{lift:+.1%} [{low:+.1%}, {high:+.1%}]; users gaining {gain}, losing {lose}, tied {als.size - gain - lose}"


class Window:
    """One dataset's replay window, ALS fitted once; scores any re-rank config on it."""

    def __init__(self, spark: SparkSession, data: Dataset, end_shift_days: float) -> None:
        self.spark, self.data = spark, data
        self.as_of = parse_as_of(data.as_of_text) - timedelta(days=end_shift_days)
        interactions = tables.read(spark, data.config, "silver", "interactions")
        self.window = ev.prepare_replay(spark, interactions, data.config, self.as_of)
        self.item_index = tables.read(spark, data.config, "silver", "item_index")
        self.catalog = read_catalog(spark, data.config)
        self.users = self.window.users.count()

        self._rows: DataFrame | None = None
        self._tables: Broadcast[dict[float, ItemTable]] | None = None

    def score(self, models: list[str], rerank: RerankConfig | None = None) -> dict[tuple[str, str], float]:
        table = ev.replay_metrics(
            self.spark, self.window, self.data.config, self.item_index, self.catalog, models, rerank
        )
        return values_at(table, self.data.config.evaluate.k)

    def prepare_grid(self, rr: RerankConfig, fresh_days: list[float]) -> None:
        """Cache the kernel input of this window (as `replay_rerank` builds it) with each user's relevant
        items, and broadcast one item table per fresh_days value (popularity counts the fresh window)."""
        horizon = rr.model_copy(update={"fresh_days": max(fresh_days)})
        fresh = reranking.to_fresh_events(self.window.history, horizon, self.window.fresh_end).cache()
        user_factors, item_factors = ev.replay_factors(self.window)
        by_fresh = {}
        for days in sorted(set(fresh_days)):
            attributes = reranking.to_item_attributes(
                self.item_index,
                item_factors,
                self.catalog,
                fresh,
                rr.model_copy(update={"fresh_days": days}),
                self.window.fresh_end,
            )
            by_fresh[days] = reranking.build_item_table(attributes, self.window.neighbours)
        self._tables = self.spark.sparkContext.broadcast(by_fresh)
        candidates = reranking.to_capped_candidates(
            ev.replay_candidates(self.window, rr, self.data.config.recommend), rr.max_candidates
        )
        events = reranking.to_capped_events(fresh, rr.max_fresh_events)
        relevant = self.window.relevant.groupBy(USER_IDX).agg(F.collect_list(ITEM_IDX).alias(RELEVANT))
        rows = reranking.to_user_rows(candidates, user_factors, events).join(relevant, on=USER_IDX, how="inner")
        self._rows = rows.repartition(4, USER_IDX).cache()
        print(f"  {self.data.name}: {self._rows.count()} user rows cached for tuning", flush=True)

    def grid_ndcg(self, trials: list[RerankConfig]) -> list[float]:
        """Mean NDCG@k over the scored users (no list counts 0) of each trial, in one Spark pass."""
        assert self._rows is not None and self._tables is not None, "call prepare_grid first"
        k = self.data.config.evaluate.k
        params = [replace(reranking.params_from(t), top_k=k) for t in trials]
        model = self._tables
        sums = (
            self._rows.mapInPandas(lambda it: grid_batches(it, model, params, k), GRID_SCHEMA)
            .groupBy(VALUE)
            .agg(F.sum(NDCG_SUM).alias(NDCG_SUM))
            .collect()  # one row per trial
        )
        got = {int(r[VALUE]): float(r[NDCG_SUM]) for r in sums}
        return [got.get(i, 0.0) / self.users for i in range(len(trials))]

    def paired(self, rr: RerankConfig) -> str:
        """The re-rank's NDCG@k lift over ALS with a paired bootstrap interval (see the module doc)."""
        k, cfg = self.data.config.evaluate.k, self.data.config
        als = ev.replay_baseline(ev.ALS_MODEL, self.window, cfg.evaluate, k).select(USER_IDX, ITEM_IDX, ev.RANK)
        done = ev.replay_rerank(self.spark, self.window, rr, self.item_index, self.catalog, k, recommend=cfg.recommend)
        lists = als.withColumn(ev.MODEL, F.lit(ev.ALS_MODEL)).unionByName(
            done.rows.select(USER_IDX, ITEM_IDX, ev.RANK).withColumn(ev.MODEL, F.lit(ev.ALS_RERANK))
        )
        per_user = metrics.per_user_metrics(lists, self.window.relevant, [k], by=[ev.MODEL])
        pdf = per_user.select(ev.MODEL, USER_IDX, "ndcg").toPandas()  # scored users x 2 rows
        done.unpersist()
        wide = pdf.pivot(index=USER_IDX, columns=ev.MODEL, values="ndcg").fillna(0.0)
        return bootstrap_lift(wide[ev.ALS_MODEL].to_numpy(), wide[ev.ALS_RERANK].to_numpy())

    def release(self) -> None:
        if self._rows is not None:
            self._rows.unpersist()
        self.window.release()


def tune(windows: list[Window], start: RerankConfig, check: bool = False) -> RerankConfig:
    """Greedy coordinate search on the validation windows; returns the best re-rank config found."""
    base = [w.score([ev.ALS_MODEL])[(ev.ALS_MODEL, "ndcg")] for w in windows]
    fresh_days = [start.fresh_days, *dict(GRID).get("fresh_days", [])]
    for w, b in zip(windows, base, strict=True):
        print(f"validation {w.data.name}: ALS NDCG@{w.data.config.evaluate.k} = {b:.4f}, {w.users} users", flush=True)
        w.prepare_grid(start, fresh_days)

    def objective(trials: list[RerankConfig]) -> list[float]:
        per_window = [[v / b for v in w.grid_ndcg(trials)] for w, b in zip(windows, base, strict=True)]
        for trial, ratios in zip(trials, zip(*per_window, strict=True), strict=True):
            per_dataset[trial.model_dump_json()] = ", ".join(
                f"{w.data.name} {r:.4f}" for w, r in zip(windows, ratios, strict=True)
            )
        return [sum(r) / len(r) for r in zip(*per_window, strict=True)]

    per_dataset: dict[str, str] = {}  # trial (as JSON) -> its ratio per dataset, for the log

    best, best_value = start, objective([start])[0]
    print(
        f"validation: configured re-rank, NDCG ratio to ALS = {best_value:.4f} ({per_dataset[start.model_dump_json()]})"
    )
    if check:  # the one-pass grid must agree with the regular replay
        regular = [
            w.score([ev.ALS_RERANK], start)[(ev.ALS_RERANK, "ndcg")] / b for w, b in zip(windows, base, strict=True)
        ]
        print(f"validation: the same from the regular replay = {sum(regular) / len(regular):.4f}", flush=True)
    for round_ in range(ROUNDS):
        for key, values in GRID:
            trials = [t for t in (with_value(best, key, v) for v in values) if t != best]
            if not trials:
                continue
            for trial, got in zip(trials, objective(trials), strict=True):
                print(
                    f"  {key}={_value_of(trial, key)}: {got:.4f} ({per_dataset[trial.model_dump_json()]})", flush=True
                )
                if got > best_value + 1e-9:
                    best, best_value = trial, got
            print(f"validation round {round_ + 1}: after {key}, best {best_value:.4f}", flush=True)
    return best


def _value_of(rerank: RerankConfig, key: str) -> Any:
    if key.startswith("weights."):
        return getattr(rerank.weights, key.split(".", 1)[1])
    return getattr(rerank, key)


def print_table(title: str, window: Window, values: dict[tuple[str, str], float], models: list[str]) -> None:
    cut, fresh_end = ev.replay_cuts(window.data.config.evaluate, window.as_of)
    k = window.data.config.evaluate.k
    print(f"\n### {title}: T = {cut:%Y-%m-%d}, T + d = {fresh_end:%Y-%m-%d}, as_of = {window.as_of:%Y-%m-%d}, ", end="")
    print(f"{window.users} users scored, k = {k}\n")
    print("| model | " + " | ".join(SHOWN) + " |")
    print("|---|" + "---:|" * len(SHOWN))
    for model in models:
        print(f"| {model} | " + " | ".join(f"{values.get((model, m), float('nan')):.4f}" for m in SHOWN) + " |")
    als, rr = ev.ALS_MODEL, ev.ALS_RERANK
    lifts = [values[(rr, m)] / values[(als, m)] - 1 if values.get((als, m)) else float("nan") for m in SHOWN]
    print("| **re-rank vs ALS** | " + " | ".join(f"{x:+.1%}" for x in lifts) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", action="append", required=True, help="NAME=CONF@STORAGE_ROOT@AS_OF")
    parser.add_argument("--tune", action="store_true", help="tune the re-rank on the validation windows first")
    parser.add_argument("--models", nargs="+", help="models scored on the test window (default: all)")
    parser.add_argument("--check", action="store_true", help="with --tune: also score the start by the regular replay")
    parser.add_argument("--paired", action="store_true", help="only the paired bootstrap of NDCG@k, re-rank vs ALS")
    args = parser.parse_args()
    setup_logging()
    datasets = [parse_data(text) for text in args.data]
    spark = get_spark(datasets[0].config)
    started = time.perf_counter()
    configured = datasets[0].config.rerank
    if args.paired:
        for data in datasets:
            window = Window(spark, data, 0.0)
            k = data.config.evaluate.k
            print(f"{data.name}: NDCG@{k} re-rank vs ALS, {window.users} users: {window.paired(data.config.rerank)}")
            window.release()
        print(f"\n{time.perf_counter() - started:.0f} s", flush=True)
        return
    tuned = None
    if args.tune:
        validation = [Window(spark, d, d.config.evaluate.replay_horizon_days) for d in datasets]
        tuned = tune(validation, configured, args.check)
        for w in validation:
            w.release()
        changed = {k: v for k, v in tuned.model_dump().items() if v != configured.model_dump()[k] and k != "weights"}
        changed.update(
            {
                f"weights.{k}": v
                for k, v in tuned.weights.model_dump().items()
                if v != configured.weights.model_dump()[k]
            }
        )
        print(f"\ntuned re-rank (changes from the configured one): {changed}", flush=True)
    for data in datasets:
        window = Window(spark, data, 0.0)
        models = args.models or ev.replay_models(data.config.evaluate)
        values = window.score(models, data.config.rerank)
        print_table(f"{data.name}, configured re-rank", window, values, models)
        if tuned is not None:
            values.update(window.score([ev.ALS_RERANK], tuned))
            print_table(f"{data.name}, tuned re-rank", window, values, models)
        window.release()
    print(f"\n{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
