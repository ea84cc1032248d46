"""A small Python API for notebooks: load a config, run the pipeline, and look at its tables.

Notebooks (Jupyter or Databricks) call only these functions plus `display`, so no pipeline logic
lives in a notebook. Reads and writes what the steps do (README, "What runs"); the look-up helpers
only read: `table` returns a Delta table (the rows of one run id when it has a run_id column), and
`explain_user` returns one user's history, fresh events, candidates and final list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines import runner
from pipelines.core import metrics, reports, tables, uris
from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import load_config
from pipelines.core.errors import ConfigError, InputDataError
from pipelines.core.runs import RunContext, make_context
from pipelines.core.schemas import (
    ALS_MODEL,
    ALS_RERANK,
    CATEGORY,
    EVENT_TS,
    ITEM_ID,
    ITEM_IDX,
    MODEL,
    RANK,
    RUN_ID,
    TITLE,
    USER_ID,
    USER_IDX,
)
from pipelines.core.session import get_spark
from pipelines.steps import STEPS, step_function

REPORT_PLOTS = ("metrics_at_k.png", "metric_vs_k.png")


def widgets(**defaults: str) -> dict[str, str]:
    """A notebook's parameters: on Databricks from its widgets (each created with its default, then read), elsewhere
    (Jupyter, papermill, which rewrites the parameters cell) the defaults unchanged."""
    dbutils = _dbutils()
    if dbutils is None:
        return dict(defaults)
    for name, value in defaults.items():
        dbutils.widgets.text(name, value)
    return {name: str(dbutils.widgets.get(name)) for name in defaults}


def _dbutils() -> Any:
    """Databricks' `dbutils`, which its notebooks define as a global of the IPython session; None elsewhere."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return None if shell is None else shell.user_ns.get("dbutils")


def load(conf: str | Path = "conf/local.yaml", overrides: Mapping[str, object] | None = None) -> ShelfConfig:
    """The validated config: `conf` (base.yaml beside it) plus `overrides` as `--set key=value` would give.

    Args:
        conf: the overlay file.
        overrides: dotted keys to values, e.g. {"storage.root": "/tmp/t", "rerank.top_k": 5}.
    """
    sets = [
        f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in (overrides or {}).items()
    ]
    return load_config(conf, sets)


def context(config: ShelfConfig, run_id: str | None = None, as_of: str | None = None) -> RunContext:
    """The run's identity, as the CLI builds it: as_of defaults to generate.end, run_id to one derived from it."""
    return make_context(run_id, as_of, config.generate.end)


def session(config: ShelfConfig) -> SparkSession:
    """The active session (Databricks, a cluster notebook) or a local Delta-enabled one."""
    return get_spark(config)


def run_pipeline(
    spark: SparkSession,
    config: ShelfConfig,
    ctx: RunContext,
    steps: Sequence[str] | None = None,
    skip_if_done: bool = False,
) -> list[str]:
    """Run the steps in pipeline order (all by default), generating the demo shop first when it is absent.

    Args:
        skip_if_done: do nothing when gold.recommendations already holds rows of this run id.

    Returns:
        The names of the steps that ran.
    """
    chosen = list(STEPS) if steps is None else list(steps)
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise ConfigError(f"Unknown step(s) {unknown}; choose from {list(STEPS)}.")
    if skip_if_done and _has_run(spark, config, "gold", "recommendations", ctx.run_id):
        return []
    if config.source.preset == "synthetic" and uris.local_missing(config.source.path):
        step_function("generate")(spark, config, ctx)
    ran: list[str] = runner.run_steps(spark, config, ctx, chosen)
    return ran


def _has_run(spark: SparkSession, config: ShelfConfig, layer: str, name: str, run_id: str) -> bool:
    if not tables.exists(spark, config, layer, name):
        return False
    return not table(spark, config, layer, name, run_id).limit(1).isEmpty()


def table(spark: SparkSession, config: ShelfConfig, layer: str, name: str, run_id: str | None = None) -> DataFrame:
    """A pipeline table; with `run_id`, only that run's rows (tables without a run_id column are returned whole)."""
    df = tables.read(spark, config, layer, name)
    if run_id is not None and RUN_ID in df.columns:
        df = df.filter(F.col(RUN_ID) == run_id)
    return df


def table_overview(spark: SparkSession, config: ShelfConfig, run_id: str) -> pd.DataFrame:
    """One row per pipeline table: where it lives, whether it exists, and its row count for this run."""
    rows = []
    for layer, name in tables.KNOWN_TABLES:
        present = tables.exists(spark, config, layer, name)
        count = table(spark, config, layer, name, run_id).count() if present else None
        rows.append(
            {
                "table": f"{layer}.{name}",
                "location": tables.location(config, layer, name),
                "exists": present,
                "rows": count,
            }
        )
    return pd.DataFrame(rows)


def metrics_at_k(spark: SparkSession, config: ShelfConfig, run_id: str, k: int | None = None) -> pd.DataFrame:
    """gold.metrics of a run at cut-off k (default evaluate.k) as a model x metric table."""
    cut = config.evaluate.k if k is None else k
    rows = table(spark, config, "gold", "metrics", run_id).filter(F.col(metrics.K) == cut)
    frame = cast(pd.DataFrame, rows.select(MODEL, metrics.METRIC, metrics.METRIC_VALUE).toPandas())  # a few dozen
    if frame.empty:
        raise InputDataError(f"gold.metrics has no rows for run {run_id} at k={cut}; run 'shelf evaluate' first.")
    return frame.pivot(index=MODEL, columns=metrics.METRIC, values=metrics.METRIC_VALUE)


def ensure_replay_metrics(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> bool:
    """Run `shelf evaluate` with evaluate.protocol=replay unless gold.metrics has this run's ALS + re-rank rows.

    The replay protocol is the one that scores the re-rank (model als_rerank) against ALS alone.

    Returns:
        True when evaluate ran.
    """
    if tables.exists(spark, config, "gold", "metrics"):
        rows = table(spark, config, "gold", "metrics", ctx.run_id).filter(F.col(MODEL) == ALS_RERANK)
        if not rows.limit(1).isEmpty():
            return False
    replay = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"protocol": "replay"})})
    run_pipeline(spark, replay, ctx, steps=["evaluate"])
    return True


def rerank_lift(by_model: pd.DataFrame) -> pd.DataFrame:
    """ALS + re-rank against ALS alone, per metric (rows of `metrics_at_k`; needs evaluate.protocol=replay).

    Returns:
        One row per metric: als, als_rerank and lift (als_rerank / als - 1; NaN where als is 0).
    """
    missing = {ALS_MODEL, ALS_RERANK} - set(by_model.index)
    if missing:
        raise InputDataError(
            f"gold.metrics has no {sorted(missing)} rows; run 'shelf evaluate' with evaluate.protocol=replay."
        )
    als, reranked = by_model.loc[ALS_MODEL], by_model.loc[ALS_RERANK]
    lift = (reranked / als.where(als != 0)) - 1.0
    return pd.DataFrame({ALS_MODEL: als, ALS_RERANK: reranked, "lift": lift})


def report_plots(spark: SparkSession, config: ShelfConfig, run_id: str) -> list[bytes]:
    """The evaluation report's PNG plots of a run, read from ops.reports (`shelf evaluate` writes them);
    `IPython.display.Image(data=...)` shows one."""
    files = reports.read(spark, config, run_id)
    return [files[name] for name in REPORT_PLOTS if name in files]


@dataclass(frozen=True)
class UserExplanation:
    """Everything behind one user's list: what they did, what was fresh, what was proposed, what was kept."""

    user_id: str
    history: DataFrame  # their silver.interactions rows, newest first
    fresh: DataFrame  # the rows in [as_of - rerank.fresh_days, as_of): the session the re-rank used
    candidates: DataFrame  # gold.candidates of the run, best ALS score first
    recommendations: DataFrame  # gold.recommendations of the run, by rank, with reasons


def pick_user(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> str:
    """A user worth explaining, deterministically: the one with most fresh events that got a list (ties: smallest id)."""
    fresh = _with_items(spark, config, _fresh(_interactions(spark, config, ctx), config, ctx), ctx.run_id)
    listed = table(spark, config, "gold", "recommendations", ctx.run_id).select(USER_ID).distinct()
    best = (
        fresh.join(listed, on=USER_ID, how="inner")
        .groupBy(USER_ID)
        .count()
        .orderBy(F.col("count").desc(), F.col(USER_ID))
        .first()
    )
    if best is None:
        raise InputDataError(f"No user of run {ctx.run_id} has both fresh events and recommendations; pass a user_id.")
    return str(best[USER_ID])


def explain_user(spark: SparkSession, config: ShelfConfig, ctx: RunContext, user_id: str) -> UserExplanation:
    """One user's history, fresh events, candidates and final list (string ids, catalogue titles when known)."""
    user_index = table(spark, config, "silver", "user_index", ctx.run_id).filter(F.col(USER_ID) == user_id)
    if user_index.limit(1).isEmpty():
        raise InputDataError(f"User '{user_id}' is not in silver.user_index of run {ctx.run_id}; pick another user_id.")
    mine = _interactions(spark, config, ctx).join(user_index.select(USER_IDX), on=USER_IDX, how="inner")
    history = _with_items(spark, config, mine, ctx.run_id).orderBy(F.col(EVENT_TS).desc())
    fresh = history.filter(_fresh_window(config, ctx))
    candidates = (
        table(spark, config, "gold", "candidates", ctx.run_id)
        .join(user_index.select(USER_IDX), on=USER_IDX, how="inner")
        .transform(lambda df: _with_items(spark, config, df, ctx.run_id))
        .drop(USER_IDX, ITEM_IDX, RUN_ID)
        .orderBy(F.col("als_score").desc_nulls_last(), F.col(ITEM_ID))
    )
    recommendations = _with_catalog(
        spark, config, table(spark, config, "gold", "recommendations", ctx.run_id).filter(F.col(USER_ID) == user_id)
    ).orderBy(RANK)
    return UserExplanation(user_id, history, fresh, candidates, recommendations)


def _interactions(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> DataFrame:
    return table(spark, config, "silver", "interactions", ctx.run_id)


def _fresh_window(config: ShelfConfig, ctx: RunContext) -> Column:
    start = ctx.as_of - timedelta(days=config.rerank.fresh_days)
    return (F.col(EVENT_TS) >= F.lit(start)) & (F.col(EVENT_TS) < F.lit(ctx.as_of))


def _fresh(df: DataFrame, config: ShelfConfig, ctx: RunContext) -> DataFrame:
    return df.filter(_fresh_window(config, ctx))


def _with_items(spark: SparkSession, config: ShelfConfig, df: DataFrame, run_id: str) -> DataFrame:
    """Dense ids -> the source's string ids (user when present, item), plus catalogue title and category."""
    items = table(spark, config, "silver", "item_index", run_id).select(ITEM_ID, ITEM_IDX)
    out = df.join(items, on=ITEM_IDX, how="left")
    if USER_IDX in df.columns:
        users = table(spark, config, "silver", "user_index", run_id).select(USER_ID, USER_IDX)
        out = out.join(users, on=USER_IDX, how="left")
    return _with_catalog(spark, config, out)


def _with_catalog(spark: SparkSession, config: ShelfConfig, df: DataFrame) -> DataFrame:
    if not tables.exists(spark, config, "silver", "catalog"):
        return df
    catalog = tables.read(spark, config, "silver", "catalog")
    wanted = [c for c in (TITLE, CATEGORY) if c in catalog.columns and c not in df.columns]
    return df.join(catalog.select(ITEM_ID, *wanted), on=ITEM_ID, how="left") if wanted else df
