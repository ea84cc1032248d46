"""A small Python API for notebooks: load a config, run the pipeline, and look at its tables.

Notebooks (Jupyter or Databricks) call only these functions plus `display`, so no pipeline logic
lives in a notebook. Reads and writes what the steps do (README, "What runs"); the look-up helpers
only read: `table` returns a Delta table (the rows of one run id when it has a run_id column), and
`explain_user` returns one user's history, fresh events, candidates and final list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines import inspection, runner
from pipelines.core import metrics, reports, tables, uris
from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import load_config
from pipelines.core.errors import ConfigError, InputDataError
from pipelines.core.runs import RunContext, make_context
from pipelines.core.schemas import ALS_MODEL, ALS_RERANK, MODEL
from pipelines.core.session import get_spark
from pipelines.steps import STEPS, step_function

REPORT_PLOTS = ("metrics_at_k.png", "metric_vs_k.png")

# Looking up what a run wrote (pipelines/inspection.py, shared with `shelf show` and `shelf tables`):
table = inspection.read_run  # (spark, config, layer, name, run_id=None): a table, or one run's rows of it
UserExplanation = inspection.UserExplanation
explain_user = inspection.explain_user  # one user's history, fresh events, candidates and list


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


def load(conf: str | Path | None = None, overrides: Mapping[str, object] | None = None) -> ShelfConfig:
    """The validated config: the packaged defaults, `conf` (base.yaml beside it) and `overrides` as `--set
    key=value` would give.

    Args:
        conf: the overlay file; None: the defaults alone.
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


def table_overview(spark: SparkSession, config: ShelfConfig, run_id: str) -> pd.DataFrame:
    """One row per table the run wrote, with the rows its last commit to each wrote (`shelf run`'s summary)."""
    return inspection.run_tables(spark, config, run_id)


def summary(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> inspection.RunSummary:
    """`shelf run`'s end-of-run summary: tables written, the report, NDCG against popularity, three users' lists.
    A notebook shows it inline as the last expression of a cell; `.tables`, `.headline`, `.lists` are frames."""
    return inspection.summarize(spark, config, ctx)


def tables_state(spark: SparkSession, config: ShelfConfig) -> pd.DataFrame:
    """`shelf tables`: every table with its version, last run, when it was written and its row count."""
    return inspection.table_states(spark, config)


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


def pick_user(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> str:
    """A user worth explaining, deterministically: the one with most fresh events that got a list (ties: smallest id)."""
    chosen = inspection.pick_users(spark, config, ctx, 1)
    if not chosen:
        raise InputDataError(f"No user has a list in gold.recommendations of run {ctx.run_id}; pass a user_id.")
    return chosen[0]
