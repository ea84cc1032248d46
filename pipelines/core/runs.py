"""Run identity and step logging: every run has a run id and an `as_of` passed in from outside."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pipelines.core.errors import ConfigError

log = logging.getLogger("shelf")


@dataclass(frozen=True)
class RunContext:
    """Who this run is: `run_id` names its rows and Delta commits, `as_of` is "now" for every transform."""

    run_id: str
    as_of: datetime
    metrics: dict[str, float] = field(default_factory=dict, compare=False)


def parse_as_of(text: str) -> datetime:
    """Parse an ISO date or timestamp (UTC when no zone is given) into a naive UTC datetime."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(
            f"--as-of '{text}' is not an ISO date or timestamp; pass e.g. 2026-11-01 or 2026-11-01T06:00:00."
        ) from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def make_context(run_id: str | None, as_of: str | None, default_as_of: str) -> RunContext:
    """Build the run context; the run id defaults to one derived from as_of, so reruns are idempotent."""
    stamp = parse_as_of(as_of or default_as_of)
    return RunContext(run_id=run_id or stamp.strftime("run-%Y%m%dT%H%M%S"), as_of=stamp)


@contextmanager
def step_log(step: str, ctx: RunContext) -> Iterator[dict[str, float]]:
    """Log a step's start, its row counts (put into the yielded dict) and its elapsed time."""
    counts: dict[str, float] = {}
    started = time.perf_counter()
    log.info("[%s] start run_id=%s as_of=%s", step, ctx.run_id, ctx.as_of.isoformat())
    yield counts
    elapsed = time.perf_counter() - started
    counts["seconds"] = round(elapsed, 3)
    shown = ", ".join(f"{k}={int(v) if float(v).is_integer() else v}" for k, v in counts.items())
    log.info("[%s] done in %.1fs: %s", step, elapsed, shown)
    ctx.metrics.update({f"{step}.{k}": float(v) for k, v in counts.items()})
