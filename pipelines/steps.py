"""The one registry of steps: their names, modules and order. The entry points (pipelines.cli, pipelines.api,
pipelines.runner, the Airflow DAG and the Databricks bundle's tests) read it; a step module never does.

A step is a module of `pipelines` with `run(spark, config, ctx)` (see docs/DEVELOPMENT.md, "Adding a step").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pipelines.core.config import ShelfConfig
from pipelines.core.runs import RunContext

# Step name -> module in `pipelines/`, in pipeline order (docs/CONCEPTS.md's data flow).
STEPS: dict[str, str] = {
    "ingest": "pipelines.ingest",
    "clean": "pipelines.clean",
    "train": "pipelines.train",
    "similarities": "pipelines.similarities",
    "candidates": "pipelines.candidates",
    "rerank": "pipelines.rerank",
    "evaluate": "pipelines.evaluate",
}
TOOLS: dict[str, str] = {"generate": "pipelines.generate"}
# Long-running jobs: own subcommands, never part of `shelf run`.
STREAMING: dict[str, str] = {"stream": "pipelines.stream.job"}
# Analyses of the run's data that change no table the steps read: own subcommands, never part of `shelf run`.
ANALYSES: dict[str, str] = {"tune": "pipelines.tune"}
ADMIN = ("rollback", "forget", "prune")

EVALUATE = "evaluate"
GATE = "gate"  # not a module: pipelines.runner's publish gate, a command of its own
PUBLISHING = ("train", "similarities", "candidates", "rerank")
# What `shelf run` does, one command per orchestrator task: evaluate (with its rehearsal) and the gate before
# the publishing steps.
ORCHESTRATED = (*[s for s in STEPS if s not in PUBLISHING and s != EVALUATE], EVALUATE, GATE, *PUBLISHING)

StepRun = Callable[[Any, ShelfConfig, RunContext], Any]


def step_function(step: str) -> StepRun:
    """The `run` function of a step (its module is imported on first use, so `shelf generate` needs no Spark)."""
    module = importlib.import_module(STEPS.get(step) or STREAMING.get(step) or ANALYSES.get(step) or TOOLS[step])
    run: StepRun = module.run
    return run
