"""`shelf clean`: dedup, bots, min support, weights, decay, stable ids, the quality gate, idempotence."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession

from pipelines import clean
from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.config_sections import CleanConfig
from pipelines.core.errors import InputDataError, QualityGateError
from pipelines.core.quality import read_gate
from pipelines.core.runs import RunContext
from pipelines.core.schemas import BRONZE_EVENTS_SCHEMA, INDEX_SCHEMA_USER
from tests.conftest import make_test_config as make_config

AS_OF = datetime(2026, 11, 1)
T0 = datetime(2026, 10, 2)  # 30 days before AS_OF: one half-life


def bronze_frame(spark: SparkSession, rows: list[tuple[object, ...]], run_id: str) -> DataFrame:
    """Rows of (user, item, event_type, event_ts, value) as bronze.events of `run_id`."""
    full = [(u, i, t, ts, v, "s", "f.csv", run_id, AS_OF) for (u, i, t, ts, v) in rows]
    return spark.createDataFrame(full, BRONZE_EVENTS_SCHEMA)


def loose_config(tmp_path: Path, *overrides: str) -> ShelfConfig:
    # Hand-built data has a handful of users, so one user's share is naturally high.
    return make_config(tmp_path, "clean.max_user_share=1.0", "clean.max_quarantine_rate=1.0", *overrides)


def run_clean(spark: SparkSession, config: ShelfConfig, rows: list[tuple[object, ...]], run_id: str) -> None:
    tables.write(bronze_frame(spark, rows, run_id), config, "bronze", "events", run_id)
    clean.run(spark, config, RunContext(run_id, AS_OF))


def index(spark: SparkSession, config: ShelfConfig, name: str) -> dict[str, int]:
    return {r[0]: r[1] for r in tables.read(spark, config, "silver", name).collect()}


def test_filter_duplicates_keeps_one_row_per_key_with_the_largest_value(spark: SparkSession) -> None:
    rows = [("a", "x", "rating", T0, 3.0), ("a", "x", "rating", T0, 4.0), ("a", "x", "view", T0, None)]
    out = bronze_frame(spark, rows, "r").transform(clean.filter_duplicates)
    assert sorted((r.event_type, r.value) for r in out.collect()) == [("rating", 4.0), ("view", None)]


def test_classify_shuffles_by_user_once_and_by_item_once(spark: SparkSession) -> None:
    rows = [("a", "x", "view", T0, None), ("a", "y", "view", T0, None), ("b", "x", "view", T0, None)]
    settings = CleanConfig(min_user_events=2, min_item_events=1)
    flagged = clean.classify(bronze_frame(spark, rows, "r"), settings)
    plan = flagged._jdf.queryExecution().executedPlan().toString()  # classic session (the suite's)
    exchanges = [line.strip() for line in plan.splitlines() if "Exchange" in line]
    # by user (the duplicate check, the bot check's join sides: one exchange, reused) and by item (support)
    assert len(exchanges) == 3 and sum("hashpartitioning(item_id" in e for e in exchanges) == 1, plan
    assert {(r.user_id, r.item_id, r._status) for r in flagged.collect()} == {
        ("a", "x", "accepted"),
        ("a", "y", "accepted"),
        ("b", "x", "rare"),  # one event, under min_user_events
    }


def test_bot_and_support_flags(spark: SparkSession) -> None:
    day = [("bot", f"i{k % 2}", "view", T0 + timedelta(minutes=k), None) for k in range(6)]
    rows = [*day, ("a", "i0", "view", T0, None), ("a", "i1", "view", T0, None), ("b", "i0", "view", T0, None)]
    flagged = bronze_frame(spark, rows, "r").transform(lambda d: clean.with_bot_flag(d, 5.0))
    flagged = flagged.transform(lambda d: clean.with_support_flag(d, 2, 1))
    status = {(r.user_id, r.item_id, r._status) for r in flagged.collect()}
    # bot: 6 events on one active day > 5; b has one non-bot event < min_user_events 2.
    assert status == {
        ("bot", "i0", "bot"),
        ("bot", "i1", "bot"),
        ("a", "i0", "accepted"),
        ("a", "i1", "accepted"),
        ("b", "i0", "rare"),
    }


def test_weight_and_decay(spark: SparkSession) -> None:
    rows = [
        ("a", "x", "purchase", T0, 2.0),
        ("a", "y", "rating", AS_OF, 4.5),
        ("a", "z", "view", AS_OF + timedelta(minutes=5), None),
    ]
    out = (
        bronze_frame(spark, rows, "r")
        .transform(lambda d: clean.with_weight(d, {"view": 1.0, "purchase": 5.0}))
        .transform(lambda d: clean.with_decay(d, AS_OF, 30.0))
    )
    got = {r.item_id: (r.weight, round(r.decay, 9)) for r in out.collect()}
    assert got == {"x": (5.0, 0.5), "y": (4.5, 1.0), "z": (1.0, 1.0)}


def test_assign_index_keeps_known_ids_and_numbers_new_ones_in_order(spark: SparkSession) -> None:
    existing = spark.createDataFrame([("b", 0), ("zz", 1)], INDEX_SCHEMA_USER)
    ids = spark.createDataFrame([("c",), ("b",), ("a",), ("c",)], "user_id string")
    got = clean.assign_index(ids, existing, "user_id", "user_idx")
    assert sorted(tuple(r) for r in got.collect()) == [("a", 2), ("b", 0), ("c", 3), ("zz", 1)]
    fresh = clean.assign_index(ids, None, "user_id", "user_idx")
    assert sorted(tuple(r) for r in fresh.collect()) == [("a", 0), ("b", 1), ("c", 2)]


BASE_ROWS = [
    ("u1", "i1", "view", T0, None),
    ("u1", "i1", "view", T0, None),  # duplicate
    ("u1", "i2", "purchase", T0, 1.0),
    ("u2", "i1", "add_to_cart", T0, None),
    ("u2", "i2", "rating", T0, 4.0),
    ("u3", "i1", "view", T0, None),  # u3 has one event: below min_user_events
    ("u2", "i9", "view", T0, None),  # i9 has one event: below min_item_events
    *[("bot", "i1", "view", T0 + timedelta(seconds=k), None) for k in range(12)],
]


@pytest.mark.steps
def test_clean_run_reconciles_writes_silver_and_quality_json(spark: SparkSession, tmp_path: Path) -> None:
    config = loose_config(tmp_path, "clean.bot_max_events_per_day=10")
    catalog = Path(config.source.catalog_path or "") / "catalog.csv"
    catalog.parent.mkdir(parents=True)
    catalog.write_text(
        "item_id,category,price,in_stock,promo,launched_at,title\n"
        "i1,toys,9.5,true,false,2026-09-01T00:00:00,Ball\ni2,books,oops,0,1,,Atlas\n",
        encoding="utf-8",
    )
    run_clean(spark, config, BASE_ROWS, "r1")

    users, items = index(spark, config, "user_index"), index(spark, config, "item_index")
    assert users == {"u1": 0, "u2": 1} and items == {"i1": 0, "i2": 1}
    got = sorted(
        (r.user_idx, r.item_idx, r.event_type, r.weight, round(r.decay, 9), r.run_id)
        for r in tables.read(spark, config, "silver", "interactions").collect()
    )
    assert got == [
        (0, 0, "view", 1.0, 0.5, "r1"),
        (0, 1, "purchase", 5.0, 0.5, "r1"),
        (1, 0, "add_to_cart", 3.0, 0.5, "r1"),
        (1, 1, "rating", 4.0, 0.5, "r1"),
    ]
    bots = tables.read(spark, config, "quarantine", "events").collect()
    assert {(r.step, r.reason) for r in bots} == {("clean", "bot_user")} and len(bots) == 12
    assert json.loads(bots[0].raw)["user_id"] == "bot"

    m = {r.metric: r.value for r in tables.read(spark, config, "ops", "run_metrics").collect()}
    assert (
        m["input_rows"],
        m["duplicates_removed"],
        m["quarantined"],
        m["filtered_min_support"],
        m["accepted"],
    ) == (
        19,
        1,
        12,
        2,
        4,
    )
    assert m["input_rows"] == m["accepted"] + m["quarantined"] + m["duplicates_removed"] + m["filtered_min_support"]

    result = read_gate(spark, config, "r1", "clean")
    assert result is not None and result["success"] is True and result["failed"] == []

    cat = {r.item_id: r for r in tables.read(spark, config, "silver", "catalog").collect()}
    assert (cat["i1"].price, cat["i1"].in_stock, cat["i1"].launched_at) == (9.5, True, datetime(2026, 9, 1))
    assert (cat["i2"].price, cat["i2"].in_stock, cat["i2"].promo) == (None, False, True)


@pytest.mark.steps
def test_rerun_same_run_id_identical_and_ids_stable_across_runs(spark: SparkSession, tmp_path: Path) -> None:
    config = loose_config(tmp_path)
    rows = [
        ("b", "x", "view", T0, None),
        ("b", "y", "view", T0, None),
        ("c", "x", "view", T0, None),
        ("c", "y", "view", T0, None),
    ]
    run_clean(spark, config, rows, "r1")
    first = tables.read(spark, config, "silver", "interactions").localCheckpoint()
    run_clean(spark, config, rows, "r1")
    assert_df_equality(tables.read(spark, config, "silver", "interactions"), first, ignore_row_order=True)
    assert index(spark, config, "user_index") == {"b": 0, "c": 1}

    later = [("a", "x", "view", T0, None), ("a", "z", "view", T0, None), ("c", "z", "view", T0, None), *rows]
    run_clean(spark, config, later, "r2")
    assert index(spark, config, "user_index") == {"b": 0, "c": 1, "a": 2}
    assert index(spark, config, "item_index") == {"x": 0, "y": 1, "z": 2}


@pytest.mark.steps
def test_failing_gate_blocks_the_write_and_keeps_previous_silver(spark: SparkSession, tmp_path: Path) -> None:
    config = loose_config(tmp_path)
    rows = [
        ("a", "x", "view", T0, None),
        ("a", "y", "view", T0, None),
        ("b", "x", "view", T0, None),
        ("b", "y", "view", T0, None),
    ]
    run_clean(spark, config, rows, "r1")
    versions = tables.history(spark, config, "silver", "interactions").count()

    strict = make_config(tmp_path, "clean.max_user_share=0.3", "clean.max_quarantine_rate=1.0")
    with pytest.raises(
        QualityGateError, match=r"expect_column_values_to_be_between\(max_user_share\).*ops\.quality_gates"
    ):
        run_clean(spark, strict, [*rows, ("a", "z", "view", T0, None), ("b", "z", "view", T0, None)], "r2")

    assert tables.history(spark, config, "silver", "interactions").count() == versions
    current = tables.read(spark, config, "silver", "interactions")
    assert {r.run_id for r in current.collect()} == {"r1"} and current.count() == 4
    failed = read_gate(spark, config, "r2", "clean")
    assert (
        failed is not None
        and failed["success"] is False
        and failed["failed"] == ["expect_column_values_to_be_between(max_user_share)"]
    )


def test_missing_bronze_run_is_an_input_error(spark: SparkSession, tmp_path: Path) -> None:
    config = loose_config(tmp_path)
    with pytest.raises(InputDataError, match="does not exist"):
        clean.run(spark, config, RunContext("r1", AS_OF))
    tables.write(bronze_frame(spark, [("a", "x", "view", T0, None)], "r0"), config, "bronze", "events", "r0")
    with pytest.raises(InputDataError, match="no rows for run id r1"):
        clean.run(spark, config, RunContext("r1", AS_OF))
    assert not tables.exists(spark, config, "silver", "interactions")
