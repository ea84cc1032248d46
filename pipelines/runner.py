"""Steps in order, with the evaluation in front of the publish: `shelf run`, `shelf evaluate`, `api.run_pipeline`.

`shelf evaluate` measures what the publish path writes: `pipelines.core.holdout` writes the training part of
silver.interactions under the holdout namespace, the publishing steps (train, similarities, candidates,
rerank) run on it unchanged, and the evaluate step scores the lists they wrote as the model `published`
beside the baselines.

`shelf run` evaluates before it publishes: ingest, clean, evaluate (with its holdout rehearsal), the publish
gate, then train, similarities, candidates and rerank. The gate compares published NDCG@k with popularity's
on the holdout (`evaluate.gate`: fail refuses to publish with exit code 6, so the previous run stays the
serving run and gold.recommendations gets no row of the refused run; warn logs and publishes; off skips).
`shelf rerank` on its own publishes as before. An orchestrator that runs each command as a task (Airflow,
Databricks jobs) follows `pipelines.steps.ORCHESTRATED`: the same order, with `shelf gate` as the task between evaluate and the
publishing steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core import holdout, metrics, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError, PublishRefusedError
from pipelines.core.runs import RunContext
from pipelines.core.schemas import POPULARITY, PUBLISHED, RUN_ID
from pipelines.steps import EVALUATE, PUBLISHING, STEPS, step_function

log = logging.getLogger("shelf.run")

NDCG = "ndcg"


def rehearsal_steps(config: ShelfConfig) -> tuple[str, ...]:
    """The publishing steps the holdout needs: all four for `published`, train alone for `ease` or (except under
    replay, which fits its own ALS) `als`, none for the plain baselines."""
    models = set(config.evaluate.models)
    if PUBLISHED in models:
        return PUBLISHING
    needs_model = {"ease"} if config.evaluate.protocol == "replay" else {"als", "ease"}
    return ("train",) if needs_model & models else ()


def evaluate_published(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """The holdout rehearsal (publishing steps on the training part), then the evaluate step."""
    held, held_ctx = holdout.prepare(spark, config, ctx)
    steps = rehearsal_steps(config)
    if steps:
        log.info("[evaluate] holdout rehearsal: %s on the training part, as_of=%s", ", ".join(steps), held_ctx.as_of)
    for name in steps:
        step_function(name)(spark, held, held_ctx)
    step_function(EVALUATE)(spark, config, ctx)


def gate_figures(spark: SparkSession, config: ShelfConfig, run_id: str) -> dict[str, float]:
    """NDCG@evaluate.k of each model in gold.metrics for `run_id` (a handful of rows)."""
    rows = (
        tables.read(spark, config, "gold", "metrics")
        .filter((F.col(RUN_ID) == run_id) & (F.col(metrics.METRIC) == NDCG) & (F.col(metrics.K) == config.evaluate.k))
        .select("model", metrics.METRIC_VALUE)
        .collect()
    )
    return {str(r[0]): float(r[1]) for r in rows}


def check_gate(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """Refuse (or warn about) a publish whose published NDCG@k is below popularity's x (1 + gate_margin).

    Raises:
        PublishRefusedError: evaluate.gate is fail and the published lists lose to popularity.
    """
    ev = config.evaluate
    if ev.gate == "off":
        return
    figures = gate_figures(spark, config, ctx.run_id)
    if PUBLISHED not in figures or POPULARITY not in figures:
        log.warning("[gate] skipped: evaluate.models needs both published and popularity for the publish gate")
        return
    published, popular = figures[PUBLISHED], figures[POPULARITY]
    bar = popular * (1.0 + ev.gate_margin)
    if published >= bar:
        log.info(
            "[gate] passed: published NDCG@%d %.4f >= popularity %.4f x %.2f",
            ev.k,
            published,
            popular,
            1.0 + ev.gate_margin,
        )
        return
    message = (
        f"Run {ctx.run_id} was not published: its lists scored NDCG@{ev.k} {published:.4f} on the holdout, below "
        f"popularity's {popular:.4f} x {1.0 + ev.gate_margin:.2f}, so the previous run stays the serving run; read "
        f"the evaluation report ('shelf report --run-id {ctx.run_id}'), or set evaluate.gate=warn to publish anyway."
    )
    if ev.gate == "warn":
        log.warning("[gate] %s", message.replace(" was not published", " is published anyway (evaluate.gate=warn)"))
        return
    raise PublishRefusedError(message)


def gate_evaluated_run(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> None:
    """`shelf gate`: the publish gate of a run whose `shelf evaluate` has run.

    Raises:
        InputDataError: gold.metrics holds no row of the run (its evaluate task did not run).
        PublishRefusedError: evaluate.gate is fail and the published lists lose to popularity.
    """
    evaluated = tables.exists(spark, config, "gold", "metrics") and gate_figures(spark, config, ctx.run_id)
    if config.evaluate.gate != "off" and not evaluated:
        raise InputDataError(
            f"gold.metrics has no NDCG@{config.evaluate.k} row of run {ctx.run_id}; run 'shelf evaluate --run-id "
            f"{ctx.run_id}' before 'shelf gate' (same --run-id and --as-of)."
        )
    check_gate(spark, config, ctx)


def run_steps(spark: SparkSession, config: ShelfConfig, ctx: RunContext, names: Sequence[str]) -> list[str]:
    """Run `names` in pipeline order; with evaluate and a publishing step, evaluate and gate before publishing."""
    ordered = [s for s in STEPS if s in names]
    gated = EVALUATE in ordered and any(s in PUBLISHING for s in ordered)
    if gated:
        ordered = [s for s in ordered if s not in PUBLISHING and s != EVALUATE] + [EVALUATE]
        ordered += [s for s in STEPS if s in names and s in PUBLISHING]
    ran: list[str] = []
    for name in ordered:
        if name == EVALUATE:
            evaluate_published(spark, config, ctx)
            if gated:
                check_gate(spark, config, ctx)
        else:
            step_function(name)(spark, config, ctx)
        ran.append(name)
    return ran
