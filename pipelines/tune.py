"""`shelf tune`: the re-rank's parameters tuned on replay validation windows of the run's own data.

Validation window j (j = 0 .. rerank.tune_windows - 1) is the replay window (pipelines/replay.py) ending at
as_of - j x evaluate.replay_horizon_days: ALS and EASE (train.ease, when the catalogue fits) fitted before its T,
the fresh behaviour the re-rank sees in [T, T + d), the scored days [T + d, end). Greedy coordinate search (`GRID`,
rerank.tune_rounds rounds, each key's values tried in turn keeping the best so far; the first keys are the blend
of the two model families, weights.ease and weights.als) on the pooled NDCG@k(ALS + re-rank) / NDCG@k(ALS) over
the windows.
Each window's kernel input (candidates, fresh events, item table with the co-occurrence lists: the frames
`rerank_candidates` builds) is built and cached once with each user's relevant items, and all values of one key
are scored in a single `mapInPandas` pass (kernel + NDCG@k per user, summed per value): a key costs one Spark job
per window, not one replay each.

Writes gold.rerank_tuning (one row per trial: run_id, round, key, value as JSON, the NDCG ratio to ALS, whether it
became the best) and logs the tuned `rerank:` overlay to put in a config file. It changes no config itself, and
tunes on days up to as_of: score the tuned values on later days (`shelf evaluate` of a later run, or
benchmarks/replay.py --tune, which keeps its validation windows before its test windows).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StructField, StructType

from pipelines import replay
from pipelines.core import kernel_frames, metrics, reranking, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import RerankConfig
from pipelines.core.reranking import read_catalog
from pipelines.core.runs import RunContext, step_log
from pipelines.core.schemas import ALS_MODEL, ITEM_IDX, MODEL, USER_IDX
from udfs.rerank import ItemTable, RerankParams, rerank

log = logging.getLogger("shelf.tune")

STEP = "tune"
TUNING = ("gold", "rerank_tuning")
# Greedy coordinate search: each key's values are tried in turn, keeping the best so far.
GRID: list[tuple[str, list[Any]]] = [
    ("weights.ease", [0.0, 1.0, 2.0, 4.0, 8.0, 16.0]),  # the blend of the two model families, first
    ("weights.als", [0.0, 0.5, 1.0, 2.0]),
    ("category_cap", [None, 3, 5]),
    ("mmr_lambda", [1.0, 0.9, 0.7]),
    ("weights.cooc_sum", [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]),
    ("weights.cooc_max", [0.0, 0.5, 1.0, 2.0, 4.0]),
    ("alpha", [0.0, 0.25, 0.5, 1.0]),
    ("half_life_days", [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]),
    ("fresh_days", [7.0, 14.0, 28.0, 56.0, 112.0]),
    ("weights.session", [0.0, 0.5, 1.0, 2.0, 4.0]),
    ("weights.max_cosine", [0.0, 0.5, 1.0]),
    ("weights.mean_cosine", [0.0, 0.25]),
    ("weights.popularity", [0.0, 0.2, 0.5, 1.0, 2.0]),
]
RELEVANT, VALUE, NDCG_SUM = "_relevant", "_value", "_ndcg_sum"
GRID_SCHEMA = StructType([StructField(VALUE, IntegerType(), False), StructField(NDCG_SUM, DoubleType(), False)])
TUNING_SCHEMA = "run_id string, round int, key string, value string, ndcg_ratio double, best boolean"


def with_value(rerank_config: RerankConfig, key: str, value: Any) -> RerankConfig:
    """`rerank_config` with `key` (a field, or weights.<feature>) set to `value`."""
    if key.startswith("weights."):
        weights = rerank_config.weights.model_copy(update={key.split(".", 1)[1]: value})
        return rerank_config.model_copy(update={"weights": weights})
    return rerank_config.model_copy(update={key: value})


def value_of(rerank_config: RerankConfig, key: str) -> Any:
    if key.startswith("weights."):
        return getattr(rerank_config.weights, key.split(".", 1)[1])
    return getattr(rerank_config, key)


def changes(configured: RerankConfig, tuned: RerankConfig) -> dict[str, Any]:
    """The keys whose tuned value differs from the configured one (weights as weights.<feature>)."""
    before, after = configured.model_dump(), tuned.model_dump()
    changed = {k: v for k, v in after.items() if v != before[k] and k != "weights"}
    changed.update({f"weights.{k}": v for k, v in after["weights"].items() if v != before["weights"][k]})
    return changed


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
    item_tables: dict[float, ItemTable],
    trials: list[RerankParams],
    k: int,
) -> Iterator[pd.DataFrame]:
    """mapInPandas body: every trial's kernel on a batch of user rows -> (trial, summed NDCG@k)."""
    for pdf in batches:
        if pdf.empty:
            continue
        rank = next(iter(item_tables.values())).factors.shape[1]
        batch = kernel_frames.to_user_batch(pdf, rank)
        relevant = [set(np.asarray(v, dtype=np.int64).tolist()) for v in pdf[RELEVANT]]
        sums = []
        for trial in trials:
            out = rerank(item_tables[trial.fresh_days], batch, trial)
            sums.append(ndcg_sum(out.user_rows, out.items, out.ranks, relevant, k))
        yield pd.DataFrame({VALUE: np.arange(len(trials), dtype=np.int32), NDCG_SUM: np.asarray(sums)})


def values_at(table: DataFrame, k: int) -> dict[tuple[str, str], float]:
    """gold.metrics-shaped rows at k -> {(model, metric): value} (models x metrics rows on the driver)."""
    rows = table.filter(table[metrics.K] == k).collect()
    return {(r[MODEL], r[metrics.METRIC]): float(r[metrics.METRIC_VALUE]) for r in rows}


class TuningWindow:
    """One replay window ending at `end` (ALS fitted once) of the data `config` points at; `name` groups windows of
    one dataset (the objective averages the datasets' pooled ratios)."""

    def __init__(self, spark: SparkSession, config: ShelfConfig, end: datetime, label: str, name: str = "") -> None:
        self.spark, self.config, self.label, self.name = spark, config, label, name
        interactions = tables.read(spark, config, "silver", "interactions")
        self.window = replay.prepare_replay(spark, interactions, config, end, with_ease=True)
        self.item_index = tables.read(spark, config, "silver", "item_index")
        self.catalog = read_catalog(spark, config)
        self.users = self.window.users.count()
        self._rows: DataFrame | None = None
        self._tables: dict[float, ItemTable] | None = None

    def score(self, models: list[str], rerank_config: RerankConfig | None = None) -> dict[tuple[str, str], float]:
        """The regular replay's metrics at k of `models`."""
        table = replay.replay_metrics(
            self.spark, self.window, self.config, self.item_index, self.catalog, models, rerank_config
        )
        return values_at(table, self.config.evaluate.k)

    def prepare_grid(self, rr: RerankConfig, fresh_days: list[float]) -> None:
        """Cache the kernel input of this window (as `replay_rerank` builds it) with each user's relevant
        items, and build one item table per fresh_days value (popularity counts the fresh window)."""
        horizon = rr.model_copy(update={"fresh_days": max(fresh_days)})
        fresh = reranking.to_fresh_events(self.window.history, horizon, self.window.fresh_end).cache()
        user_factors, item_factors = replay.replay_factors(self.window)
        by_fresh = {}
        for days in sorted(set(fresh_days)):
            rr_days = rr.model_copy(update={"fresh_days": days})
            attributes = reranking.to_item_attributes(
                self.item_index, item_factors, self.catalog, fresh, rr_days, self.window.fresh_end
            )
            by_fresh[days] = reranking.build_item_table(attributes, self.window.neighbours)
        # Shipped in the grid pass's closure (pyspark broadcasts a large pickled function itself), as
        # reranking.to_reranked does: no SparkContext, so tuning runs over Spark Connect too.
        self._tables = by_fresh
        candidates = reranking.to_capped_candidates(
            replay.replay_candidates(self.window, rr, self.config.recommend), rr.max_candidates
        )
        events = reranking.to_capped_events(fresh, rr.max_fresh_events)
        relevant = self.window.relevant.groupBy(USER_IDX).agg(F.collect_list(ITEM_IDX).alias(RELEVANT))
        rows = reranking.to_user_rows(candidates, user_factors, events).join(relevant, on=USER_IDX, how="inner")
        self._rows = rows.repartition(4, USER_IDX).cache()
        log.info("[%s] %s: %d user rows cached for tuning", STEP, self.label, self._rows.count())

    def grid_ndcg(self, trials: list[RerankConfig]) -> list[float]:
        """Mean NDCG@k over the scored users (no list counts 0) of each trial, in one Spark pass."""
        assert self._rows is not None and self._tables is not None, "call prepare_grid first"
        k = self.config.evaluate.k
        params = [replace(kernel_frames.params_from(t), top_k=k) for t in trials]
        model = self._tables
        sums = (
            self._rows.mapInPandas(lambda it: grid_batches(it, model, params, k), GRID_SCHEMA)
            .groupBy(VALUE)
            .agg(F.sum(NDCG_SUM).alias(NDCG_SUM))
            .collect()  # one row per trial
        )
        got = {int(r[VALUE]): float(r[NDCG_SUM]) for r in sums}
        return [got.get(i, 0.0) / self.users for i in range(len(trials))]

    def release(self) -> None:
        if self._rows is not None:
            self._rows.unpersist()
        self._tables = None
        self.window.release()


@dataclass(frozen=True)
class Trial:
    """One tried value: its round (0: the configured start), key, value, NDCG ratio to ALS, and whether it won."""

    round: int
    key: str
    value: Any
    ratio: float
    best: bool


class Search:
    """The objective over a set of windows: the mean over datasets of the pooled NDCG@k ratio to ALS."""

    def __init__(self, windows: list[TuningWindow], start: RerankConfig, fresh_values: list[float]) -> None:
        self.windows = windows
        self.names = list(dict.fromkeys(w.name for w in windows))
        self.base = [w.score([ALS_MODEL])[(ALS_MODEL, "ndcg")] for w in windows]
        for w, b in zip(windows, self.base, strict=True):
            log.info("[%s] %s: ALS NDCG@%d = %.4f, %d users", STEP, w.label, w.config.evaluate.k, b, w.users)
            w.prepare_grid(start, [start.fresh_days, *fresh_values])

    def values(self, trials: list[RerankConfig]) -> list[float]:
        per_window = [w.grid_ndcg(trials) for w in self.windows]
        out = []
        for i in range(len(trials)):
            ratios = []
            for name in self.names:
                own = [j for j, w in enumerate(self.windows) if w.name == name]
                got = sum(per_window[j][i] * self.windows[j].users for j in own)
                als = sum(self.base[j] * self.windows[j].users for j in own)
                ratios.append(got / als if als else 0.0)
            out.append(sum(ratios) / len(ratios))
        return out


def tune(
    windows: list[TuningWindow], start: RerankConfig, rounds: int, grid: list[tuple[str, list[Any]]] | None = None
) -> tuple[RerankConfig, list[Trial]]:
    """Greedy coordinate search from `start`; returns the best re-rank config found and every trial."""
    grid = GRID if grid is None else grid
    search = Search(windows, start, dict(grid).get("fresh_days", []))
    best, best_value = start, search.values([start])[0]
    trials = [Trial(0, "start", None, best_value, True)]
    log.info("[%s] the configured re-rank: NDCG ratio to ALS %.4f", STEP, best_value)
    for round_ in range(1, rounds + 1):
        for key, values in grid:
            tried = [t for t in (with_value(best, key, v) for v in values) if t != best]
            for trial, got in zip(tried, search.values(tried) if tried else [], strict=True):
                won = got > best_value + 1e-9
                if won:
                    best, best_value = trial, got
                trials.append(Trial(round_, key, value_of(trial, key), got, won))
                log.info(
                    "[%s] round %d %s=%s: %.4f%s", STEP, round_, key, value_of(trial, key), got, " best" if won else ""
                )
    return best, trials


def validation_ends(config: ShelfConfig, as_of: datetime) -> list[datetime]:
    """Window j ends at as_of - j x evaluate.replay_horizon_days (j < rerank.tune_windows), latest first."""
    horizon = timedelta(days=config.evaluate.replay_horizon_days)
    return [as_of - j * horizon for j in range(config.rerank.tune_windows)]


def run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> RerankConfig:
    """Tune the re-rank on the run's validation windows; write gold.rerank_tuning; return the tuned config."""
    with step_log(STEP, ctx) as counts:
        ends = validation_ends(config, ctx.as_of)
        windows = [TuningWindow(spark, config, end, f"validation window {j}") for j, end in enumerate(ends)]
        try:
            tuned, trials = tune(windows, config.rerank, config.rerank.tune_rounds)
        finally:
            for w in windows:
                w.release()
        rows = [(ctx.run_id, t.round, t.key, json.dumps(t.value), float(t.ratio), t.best) for t in trials]
        tables.write(spark.createDataFrame(rows, TUNING_SCHEMA), config, *TUNING, ctx.run_id, mode="run")
        best_ratio = max(t.ratio for t in trials if t.best)
        counts.update({"trials": len(trials), "windows": len(windows), "ndcg_ratio": best_ratio})
        overlay = yaml.safe_dump({"rerank": _nested(changes(config.rerank, tuned))}, sort_keys=True)
        log.info("[%s] tuned re-rank, to put in a config overlay:\n%s", STEP, overlay)
    return tuned


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("weights."):
            out.setdefault("weights", {})[key.split(".", 1)[1]] = value
        else:
            out[key] = value
    return out
