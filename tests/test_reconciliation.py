"""Ingest + clean on generated data carrying every kind of dirt: each row is accounted for exactly.

The expected counts come from the generated pandas frame itself (the generator damages disjoint rows,
one defect each), not from shelf's tables, so a lost, double-counted or misclassified row fails.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines import clean, generate, ingest
from pipelines.core import tables
from pipelines.core.runs import RunContext
from pipelines.generate import BAD_TIMESTAMPS, UNKNOWN_EVENT_TYPES
from tests.conftest import make_test_config

KEY = ["user_id", "item_id", "event_type", "event_ts"]


def expected_counts(
    events: pd.DataFrame, as_of: datetime, bot_limit: float, min_user: int, min_item: int
) -> dict[str, int]:
    """Every count ingest and clean should report, computed with pandas from the generated frame."""
    ts = pd.to_datetime(events["event_ts"], format="%Y-%m-%dT%H:%M:%S", errors="coerce")
    null_user = events["user_id"].isna() | (events["user_id"] == "")
    unknown = events["event_type"].isin(UNKNOWN_EVENT_TYPES)
    bad_ts = events["event_ts"].isin(BAD_TIMESTAMPS)
    future = ts > pd.Timestamp(as_of) + pd.Timedelta(hours=1)
    negative = events["value"] < 0
    accepted = events[~(null_user | unknown | bad_ts | future | negative)].assign(ts=ts)
    distinct = accepted.drop_duplicates(subset=KEY)
    per_day = distinct.groupby(["user_id", distinct["ts"].dt.date]).size().groupby("user_id").mean()
    bots = set(per_day[per_day > bot_limit].index)
    humans = distinct[~distinct["user_id"].isin(bots)]
    user_n = humans.groupby("user_id")["item_id"].transform("size")
    item_n = humans.groupby("item_id")["user_id"].transform("size")
    kept = humans[(user_n >= min_user) & (item_n >= min_item)]
    return {
        "ingest.input_rows": len(events),
        "ingest.quarantined.null_user": int(null_user.sum()),
        "ingest.quarantined.unknown_event_type": int(unknown.sum()),
        "ingest.quarantined.bad_timestamp": int(bad_ts.sum()),
        "ingest.quarantined.future_timestamp": int(future.sum()),
        "ingest.quarantined.negative_value": int(negative.sum()),
        "ingest.accepted": len(accepted),
        "clean.input_rows": len(accepted),
        "clean.duplicates_removed": len(accepted) - len(distinct),
        "clean.quarantined.bot_user": len(distinct) - len(humans),
        "clean.filtered_min_support": len(humans) - len(kept),
        "clean.accepted": len(kept),
    }


@pytest.mark.steps
def test_generated_dirt_is_quarantined_by_reason_and_every_row_reconciles(spark: SparkSession, tmp_path: Path) -> None:
    config = make_test_config(tmp_path)
    as_of = datetime.fromisoformat(config.generate.end)
    events, _ = generate.generate(config.generate)
    assert min(int(events["user_id"].isna().sum()), int(events.duplicated().sum())) > 0  # the dirt is there
    ctx = RunContext("dirty", as_of)
    generate.run(spark, config, ctx)
    ingest.run(spark, config, ctx)
    clean.run(spark, config, ctx)

    rows = tables.read(spark, config, "ops", "run_metrics").filter(F.col("run_id") == "dirty").collect()
    got = {
        f"{r.step}.{r.metric}": int(r.value)
        for r in rows
        if r.metric != "quarantine_rate" and r.metric != "max_user_share"
    }
    expected = expected_counts(
        events,
        as_of,
        config.clean.bot_max_events_per_day,
        config.clean.min_user_events,
        config.clean.min_item_events,
    )
    assert {k: got.get(k) for k in expected} == expected
    # Nothing else was quarantined, and both identities hold.
    assert {k for k in got if ".quarantined." in k} == {k for k in expected if ".quarantined." in k}
    assert got["ingest.input_rows"] == got["ingest.accepted"] + got["ingest.quarantined"]
    assert got["clean.input_rows"] == (
        got["clean.accepted"]
        + got["clean.quarantined"]
        + got["clean.duplicates_removed"]
        + got["clean.filtered_min_support"]
    )
    assert tables.read(spark, config, "silver", "interactions").count() == expected["clean.accepted"]
