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
as_of - h, so its test window precedes the reported one) by greedy coordinate search on the mean
over datasets of NDCG@k(ALS + re-rank) / NDCG@k(ALS); the test window is then scored with both the
configured and the tuned parameters. Prints markdown tables: every model at k, and the lift.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pyspark.sql import DataFrame, SparkSession

from pipelines import evaluate as ev
from pipelines.core import metrics, tables
from pipelines.core.cli import setup_logging
from pipelines.core.config import RerankConfig, ShelfConfig, load_config
from pipelines.core.reranking import read_catalog
from pipelines.core.runs import parse_as_of
from pipelines.core.session import get_spark

SHOWN = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage", "novelty", "diversity")
# Greedy coordinate search: each key's values are tried in turn, keeping the best so far.
GRID: list[tuple[str, list[Any]]] = [
    ("category_cap", [None]),
    ("mmr_lambda", [1.0]),
    ("weights.popularity", [0.0]),
]


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

    def score(self, models: list[str], rerank: RerankConfig | None = None) -> dict[tuple[str, str], float]:
        table = ev.replay_metrics(
            self.spark, self.window, self.data.config, self.item_index, self.catalog, models, rerank
        )
        return values_at(table, self.data.config.evaluate.k)


def tune(windows: list[Window], start: RerankConfig) -> RerankConfig:
    """Greedy coordinate search on the validation windows; returns the best re-rank config found."""
    base = [w.score([ev.ALS_MODEL])[(ev.ALS_MODEL, "ndcg")] for w in windows]

    def objective(rerank: RerankConfig) -> float:
        ratios = [
            w.score([ev.ALS_RERANK], rerank)[(ev.ALS_RERANK, "ndcg")] / b for w, b in zip(windows, base, strict=True)
        ]
        return sum(ratios) / len(ratios)

    best, best_value = start, objective(start)
    print(f"validation: configured re-rank, NDCG ratio to ALS = {best_value:.3f}", flush=True)
    for key, values in GRID:
        for value in values:
            trial = with_value(best, key, value)
            if trial == best:
                continue
            got = objective(trial)
            print(f"  {key}={value}: {got:.3f}", flush=True)
            if got > best_value:
                best, best_value = trial, got
        print(f"validation: after {key}, best {best_value:.3f}", flush=True)
    return best


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
    args = parser.parse_args()
    setup_logging()
    datasets = [parse_data(text) for text in args.data]
    spark = get_spark(datasets[0].config)
    started = time.perf_counter()
    configured = datasets[0].config.rerank
    tuned = None
    if args.tune:
        validation = [Window(spark, d, d.config.evaluate.replay_horizon_days) for d in datasets]
        tuned = tune(validation, configured)
        for w in validation:
            w.window.release()
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
        window.window.release()
    print(f"\n{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
