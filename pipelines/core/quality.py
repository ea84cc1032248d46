"""The data-quality gate: Great Expectations 1.x suites run on Spark DataFrames before a silver write.

The clean step validates two batches: the interactions themselves (row-level expectations: ids not
null, weights positive and finite, timestamps inside the window, unique keys) and a one-row summary
of run-level measures (quarantine rate, largest single user's share of events). Both results are
kept as one JSON document in the Delta table ops.quality_gates (a row per run and step, written by Spark
like every table, so it lives under storage.root or in the catalog, never on the driver's disk); a failure
raises QualityGateError naming every failed expectation, so nothing downstream is written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import QualityGateError, ReconciliationError
from pipelines.core.schemas import RUN_ID, RUN_METRICS_SCHEMA, STEP

log = logging.getLogger("shelf.quality")


@dataclass(frozen=True)
class GateLimits:
    """What the interactions gate accepts; built from CleanConfig and the run's as_of."""

    window_start: datetime
    window_end: datetime
    max_weight: float
    max_quarantine_rate: float
    max_user_share: float


GATES = ("ops", "quality_gates")  # run_id, step, success, failed, result (the JSON document)
GATES_SCHEMA = "run_id string, step string, success boolean, failed array<string>, result string"


def gate_recorder(spark: SparkSession, config: ShelfConfig, run_id: str, step: str) -> Callable[[dict[str, Any]], str]:
    """A function that keeps a gate result as the (run_id, step) row of ops.quality_gates, replacing an earlier
    attempt's, and returns where to read it (for the log and the failure message)."""

    def save(document: dict[str, Any]) -> str:
        row = [(run_id, step, bool(document["success"]), list(document["failed"]), json.dumps(document, default=str))]
        frame = spark.createDataFrame(row, GATES_SCHEMA)
        tables.write_replacing(frame, config, *GATES, run_id, {RUN_ID: run_id, STEP: step})
        return f"{'.'.join(GATES)} at {tables.location(config, *GATES)} (run_id {run_id}, step {step})"

    return save


def read_gate(spark: SparkSession, config: ShelfConfig, run_id: str, step: str) -> dict[str, Any] | None:
    """The gate result a step kept for a run (the JSON document), or None when it kept none."""
    if not tables.exists(spark, config, *GATES):
        return None
    found = tables.read(spark, config, *GATES).filter((F.col(RUN_ID) == run_id) & (F.col(STEP) == step)).first()
    return None if found is None else dict(json.loads(found["result"]))


def _expectations(limits: GateLimits, key: list[str], ids: list[str], weight: str, ts: str) -> list[Any]:
    import great_expectations.expectations as expectations

    gxe: Any = expectations  # GX 1.x re-exports its expectation classes without declaring them public

    fmt = "%Y-%m-%dT%H:%M:%S"
    found: list[Any] = [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in [*ids, weight, ts]]
    found.append(
        gxe.ExpectColumnValuesToBeBetween(column=weight, min_value=0.0, max_value=limits.max_weight, strict_min=True)
    )
    found.append(
        gxe.ExpectColumnValuesToBeBetween(
            column=ts,
            min_value=limits.window_start.strftime(fmt),
            max_value=limits.window_end.strftime(fmt),
        )
    )
    found.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=key))
    return found


def _summary_expectations(limits: GateLimits) -> list[Any]:
    import great_expectations.expectations as expectations

    gxe: Any = expectations  # GX 1.x re-exports its expectation classes without declaring them public

    return [
        gxe.ExpectColumnValuesToBeBetween(
            column="quarantine_rate", min_value=0.0, max_value=limits.max_quarantine_rate
        ),
        gxe.ExpectColumnValuesToBeBetween(column="max_user_share", min_value=0.0, max_value=limits.max_user_share),
    ]


def _validate(context: Any, name: str, df: DataFrame, expectations: list[Any]) -> Any:
    import great_expectations as gx

    source = context.data_sources.add_spark(name=f"{name}_source")
    batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
    for expectation in expectations:
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    # BASIC: counts and a few unexpected values, without the extra value-count queries of SUMMARY.
    return definition.run(batch_parameters={"dataframe": df}, result_format="BASIC")


def _describe(result: Any) -> list[str]:
    failed = []
    for item in result.results:
        if item.success:
            continue
        cfg = item.expectation_config
        target = cfg.kwargs.get("column") or ",".join(cfg.kwargs.get("column_list") or [])
        failed.append(f"{cfg.type}({target})")
    return failed


def check_interactions(
    interactions: DataFrame,
    summary: DataFrame,
    limits: GateLimits,
    key: list[str],
    ids: list[str],
    weight: str,
    ts: str,
    save: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Validate the interactions and the run summary; keep the result with `save` (see `gate_recorder`).

    Args:
        interactions: the silver rows about to be written.
        summary: one row with `quarantine_rate` and `max_user_share`.
        limits: the accepted ranges.
        key: columns that must be unique together; ids: columns that must not be null.
        weight, ts: the weight and timestamp columns.
        save: keeps the JSON-able result and says where it went.

    Returns:
        The JSON-able result (`success`, `failed`, and both GE validation results).

    Raises:
        QualityGateError: any expectation failed; the message names each failed expectation.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # A batch job's log is not a terminal: no tqdm bars between the step logs.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    rows = _validate(context, "interactions", interactions, _expectations(limits, key, ids, weight, ts))
    run = _validate(context, "run_summary", summary, _summary_expectations(limits))
    failed = _describe(rows) + _describe(run)
    document = {
        "success": not failed,
        "failed": failed,
        "limits": {
            "window_start": limits.window_start.isoformat(),
            "window_end": limits.window_end.isoformat(),
            "max_weight": limits.max_weight,
            "max_quarantine_rate": limits.max_quarantine_rate,
            "max_user_share": limits.max_user_share,
        },
        "interactions": rows.to_json_dict(),
        "run_summary": run.to_json_dict(),
    }
    where = save(document)
    if failed:
        raise QualityGateError(
            f"The data-quality gate failed on {', '.join(failed)}; see {where} and fix the input or "
            "the clean.* limits (the previous silver version stays current)."
        )
    log.info("quality gate passed: %s", where)
    return document


def window(as_of: datetime, window_days: int, future_tolerance_hours: float) -> tuple[datetime, datetime]:
    """The accepted event-time window [as_of - window_days, as_of + tolerance]."""
    return as_of - timedelta(days=window_days), as_of + timedelta(hours=future_tolerance_hours)


def ts_lit(moment: datetime) -> Column:
    """A naive UTC datetime as a Spark timestamp literal, independent of the Python process's time zone."""
    return F.lit(moment.strftime("%Y-%m-%d %H:%M:%S.%f")).cast("timestamp")


def reconcile(step: str, input_rows: int, accepted: int, quarantined: int, duplicates: int, filtered: int = 0) -> None:
    """Raise unless input = accepted + quarantined + duplicates removed (+ rows below min support).

    Raises:
        ReconciliationError: the counts do not add up (rows were lost or made up).
    """
    if input_rows != accepted + quarantined + duplicates + filtered:
        raise ReconciliationError(
            f"Step {step} does not reconcile: {input_rows} input rows != {accepted} accepted + {quarantined} "
            f"quarantined + {duplicates} duplicates removed + {filtered} filtered; report this as a bug."
        )


def run_metrics_frame(spark: SparkSession, run_id: str, step: str, counts: dict[str, float]) -> DataFrame:
    """One ops.run_metrics row per (run, step, metric)."""
    rows = [(run_id, step, metric, float(value)) for metric, value in sorted(counts.items())]
    return spark.createDataFrame(rows, RUN_METRICS_SCHEMA)


def write_run_metrics(
    spark: SparkSession, config: ShelfConfig, run_id: str, step: str, counts: dict[str, float], absent: bool = False
) -> None:
    """The step's counts -> ops.run_metrics, replacing the (run, step)'s rows (`absent`: none exist yet, append)."""
    frame = run_metrics_frame(spark, run_id, step, counts)
    tables.write_replacing(frame, config, "ops", "run_metrics", run_id, {RUN_ID: run_id, STEP: step}, absent=absent)
