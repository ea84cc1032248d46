"""`shelf ingest` on hand-written sources: every reason code, presets, mapping, errors, idempotence."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines import ingest
from pipelines.core import sources, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import ConfigError, InputDataError
from pipelines.core.runs import RunContext
from pipelines.core.schemas import BRONZE_EVENTS_SCHEMA
from pipelines.source_presets import movielens_items_path
from tests.conftest import make_test_config as make_config

AS_OF = datetime(2026, 11, 1)
HEADER = "user_id,item_id,event_type,event_ts,value,session_id"


def write_text(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_ingest(spark: SparkSession, config: ShelfConfig, run_id: str = "r1") -> RunContext:
    ctx = RunContext(run_id=run_id, as_of=AS_OF)
    ingest.run(spark, config, ctx)
    return ctx


def quarantine(spark: SparkSession, config: ShelfConfig, run_id: str = "r1") -> DataFrame:
    return tables.read(spark, config, "quarantine", "events").filter(F.col("run_id") == run_id)


def bronze_rows(spark: SparkSession, config: ShelfConfig) -> list[tuple[object, ...]]:
    df = tables.read(spark, config, "bronze", "events")
    return sorted((r.user_id, r.item_id, r.event_type, r.event_ts, r.value, r.session_id) for r in df.collect())


def metrics(spark: SparkSession, config: ShelfConfig, step: str, run_id: str = "r1") -> dict[str, float]:
    df = tables.read(spark, config, "ops", "run_metrics").filter((F.col("run_id") == run_id) & (F.col("step") == step))
    return {r.metric: r.value for r in df.collect()}


DIRTY_LINES = [
    HEADER,
    "u1,i1,view,2026-10-01T12:00:00,,s1",  # accepted
    "u1,i2,purchase,2026-10-02T08:30:00,2,s1",  # accepted
    "u2,i1,rating,2026-10-03T00:00:00,4.5,",  # accepted, no session
    "u3,i1,view,2026-10-01T12:00:00",  # too few fields
    "u3,i1,view,2026-10-01T12:00:00,1,s3,extra",  # too many fields
    ",i1,view,2026-10-01T12:00:00,,s4",  # null_user
    "u4,,view,2026-10-01T12:00:00,,s4",  # null_item
    "u4,i1,wishlist,2026-10-01T12:00:00,,s4",  # unknown_event_type
    "u4,i1,view,yesterday,,s4",  # bad_timestamp
    "u4,i1,view,2026-11-03T00:00:00,,s4",  # future_timestamp (tolerance 1h)
    "u4,i1,view,2010-01-01T00:00:00,,s4",  # stale_timestamp (window 3650 days)
    "u4,i1,purchase,2026-10-01T12:00:00,-3,s4",  # negative_value
    "u4,i1,purchase,2026-10-01T12:00:00,NaN,s4",  # bad_value
    "u4,i1,purchase,2026-10-01T12:00:00,1e12,s4",  # bad_value (above clean.max_value)
    "u4,i1,purchase,2026-10-01T12:00:00,lots,s4",  # bad_value (not a number)
]


@pytest.mark.steps
def test_every_ingest_reason_code_reconciliation_and_rerun(spark: SparkSession, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_text(Path(config.source.path) / "part-0.csv", DIRTY_LINES)
    run_ingest(spark, config)

    assert bronze_rows(spark, config) == [
        ("u1", "i1", "view", datetime(2026, 10, 1, 12), None, "s1"),
        ("u1", "i2", "purchase", datetime(2026, 10, 2, 8, 30), 2.0, "s1"),
        ("u2", "i1", "rating", datetime(2026, 10, 3), 4.5, None),
    ]
    rejected = quarantine(spark, config).collect()
    assert Counter(r.reason for r in rejected) == {
        "unparseable_row": 2,
        "null_user": 1,
        "null_item": 1,
        "unknown_event_type": 1,
        "bad_timestamp": 1,
        "future_timestamp": 1,
        "stale_timestamp": 1,
        "negative_value": 1,
        "bad_value": 3,
    }
    raw_by_reason = {r.raw: r.reason for r in rejected}
    assert raw_by_reason["u3,i1,view,2026-10-01T12:00:00,1,s3,extra"] == "unparseable_row"
    assert raw_by_reason["u4,i1,purchase,2026-10-01T12:00:00,NaN,s4"] == "bad_value"
    assert all(r.step == "ingest" and r.source_file.endswith("part-0.csv") for r in rejected)

    m = metrics(spark, config, "ingest")
    assert m["input_rows"] == len(DIRTY_LINES) - 1
    assert m["accepted"] == 3 and m["quarantined"] == 12 and m["duplicates_removed"] == 0
    assert m["input_rows"] == m["accepted"] + m["quarantined"] + m["duplicates_removed"]
    assert m["quarantined.bad_value"] == 3

    # A rerun with the same run id replaces its own rows: identical tables, nothing doubled.
    first_bronze = tables.read(spark, config, "bronze", "events").localCheckpoint()
    first_quarantine = quarantine(spark, config).localCheckpoint()
    run_ingest(spark, config)
    assert_df_equality(tables.read(spark, config, "bronze", "events"), first_bronze, ignore_row_order=True)
    assert_df_equality(quarantine(spark, config), first_quarantine, ignore_row_order=True)
    assert tables.read(spark, config, "ops", "run_metrics").filter("metric = 'input_rows'").count() == 1


@pytest.mark.steps
def test_generic_mapping_delimiter_no_header_and_timestamp_format(spark: SparkSession, tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        "source.preset=generic",
        "source.header=false",
        "source.delimiter=;",
        "source.timestamp_format=dd/MM/yyyy HH:mm",
        "source.columns={user_id: _c1, item_id: _c0, event_type: _c2, event_ts: _c3, value: null, session_id: null}",
        "source.event_types={v: view, buy: purchase}",
    )
    write_text(
        Path(config.source.path) / "a.txt",
        ["i9;u9;v;01/10/2026 13:05", "i9;u8;buy;02/10/2026 00:00", "i9;u8;view;02/10/2026 00:00"],
    )
    run_ingest(spark, config)
    assert bronze_rows(spark, config) == [
        ("u8", "i9", "purchase", datetime(2026, 10, 2), None, None),
        ("u9", "i9", "view", datetime(2026, 10, 1, 13, 5), None, None),
    ]
    # "view" is not a source value in this mapping: only v and buy are.
    assert [r.reason for r in quarantine(spark, config).collect()] == ["unknown_event_type"]


@pytest.mark.steps
def test_a_generic_csv_without_the_optional_session_id_column(spark: SparkSession, tmp_path: Path) -> None:
    """session_id is mapped by default but optional: a file without it ingests, its rows without a session; a
    missing required column still stops with the key to fix."""
    config = make_config(tmp_path, "source.preset=generic")
    write_text(
        Path(config.source.path) / "a.csv",
        [
            "user_id,item_id,event_type,event_ts,value",
            "u1,i1,view,2026-10-01 10:00:00,1",
            "u2,i1,purchase,2026-10-02,2",
        ],
    )
    run_ingest(spark, config)
    assert bronze_rows(spark, config) == [
        ("u1", "i1", "view", datetime(2026, 10, 1, 10), 1.0, None),
        ("u2", "i1", "purchase", datetime(2026, 10, 2), 2.0, None),
    ]
    no_item = make_config(tmp_path / "no-item", "source.preset=generic")
    write_text(Path(no_item.source.path) / "a.csv", ["user_id,event_type,event_ts,value", "u1,view,2026-10-01,1"])
    with pytest.raises(InputDataError, match="item_id.*source.columns"):
        run_ingest(spark, no_item)


def test_include_stream_events_adds_the_streams_accepted_events_inside_the_window(
    spark: SparkSession, tmp_path: Path
) -> None:
    """source.include_stream_events (a tracker on Kafka only): bronze.events gets the events shelf stream accepted,
    those inside the run's window; without it, the source's alone."""
    config = make_config(tmp_path, "source.preset=generic", "source.include_stream_events=true")
    write_text(Path(config.source.path) / "a.csv", [HEADER, "u1,i1,view,2026-10-01 10:00:00,1,s1"])
    streamed = [
        ("u2", "i2", "purchase", datetime(2026, 10, 31, 9), 1.0, "s2", "kafka:t:0:7", "stream-0", AS_OF),
        ("u3", "i3", "view", datetime(2026, 11, 5), 1.0, "s3", "kafka:t:0:8", "stream-1", AS_OF),  # after as_of
    ]
    tables.write(spark.createDataFrame(streamed, BRONZE_EVENTS_SCHEMA), config, "bronze", "stream_events", "stream-0")
    run_ingest(spark, config)
    assert bronze_rows(spark, config) == [
        ("u1", "i1", "view", datetime(2026, 10, 1, 10), 1.0, "s1"),
        ("u2", "i2", "purchase", datetime(2026, 10, 31, 9), 1.0, "s2"),
    ]
    got = metrics(spark, config, "ingest")
    assert (got["input_rows"], got["accepted"], got["stream_events"]) == (1, 1, 1)
    without = make_config(tmp_path, "source.preset=generic")
    run_ingest(spark, without, "r2")
    assert tables.read(spark, without, "bronze", "events").filter(F.col("run_id") == "r2").count() == 1


@pytest.mark.steps
def test_a_source_whose_every_row_is_quarantined_stops_ingest_with_its_reasons(
    spark: SparkSession, tmp_path: Path
) -> None:
    """--as-of before every event: ingest still writes the quarantine (nothing lost), then stops with the count,
    the top reasons and what to do, instead of leaving clean to report an empty bronze table."""
    config = make_config(tmp_path, "source.preset=generic")
    write_text(
        Path(config.source.path) / "a.csv",
        [HEADER, "u1,i1,view,2026-12-20 10:00:00,1,s1", "u2,i1,view,2026-12-21,1,s2", "u3,,view,2026-12-21,1,s3"],
    )
    with pytest.raises(InputDataError) as stopped:
        run_ingest(spark, config)
    assert str(stopped.value) == (
        f"All 3 rows of {config.source.path} were quarantined (future_timestamp 2, null_item 1; quarantine.events, "
        "run id r1); an --as-of before the events makes them future timestamps: pass a later --as-of."
    )
    assert Counter(r.reason for r in quarantine(spark, config).collect()) == {"future_timestamp": 2, "null_item": 1}


@pytest.mark.steps
def test_doubled_quotes_inside_a_quoted_csv_field_are_one_quote(spark: SparkSession, tmp_path: Path) -> None:
    """RFC 4180: "a ""b"" c" is the value a "b" c, delimiters inside quotes included."""
    config = make_config(tmp_path, "source.preset=generic")
    write_text(
        Path(config.source.path) / "a.csv",
        [HEADER, 'u1,"lamp ""7"", white",view,2026-10-01,1,s1', '"u ""2""",i2,view,2026-10-02,1,s2'],
    )
    run_ingest(spark, config)
    assert [(r[0], r[1]) for r in bronze_rows(spark, config)] == [('u "2"', "i2"), ("u1", 'lamp "7", white')]


@pytest.mark.steps
def test_json_lines_and_parquet_sources(spark: SparkSession, tmp_path: Path) -> None:
    config = make_config(tmp_path / "json", "source.format=json")
    write_text(
        Path(config.source.path) / "events.json",
        [
            '{"user_id": "u1", "item_id": 7, "event_type": "view", "event_ts": "2026-10-01T00:00:00"}',
            '{"user_id": "u1", "item_id": 8, "event_type": "purchase", "event_ts": "2026-10-01T00:00:00", "value": 2}',
            '{"user_id": "u1", "item_id": ',
        ],
    )
    run_ingest(spark, config)
    assert [(r[1], r[4]) for r in bronze_rows(spark, config)] == [("7", None), ("8", 2.0)]
    assert [r.reason for r in quarantine(spark, config).collect()] == ["unparseable_row"]

    config = make_config(tmp_path / "pq", "source.format=parquet")
    rows = [
        ("u1", "i1", "view", datetime(2026, 10, 1), None, "s"),
        ("u2", "i1", "click", datetime(2026, 10, 1), 1.0, "s"),
    ]
    schema = "user_id string, item_id string, event_type string, event_ts timestamp, value double, session_id string"
    spark.createDataFrame(rows, schema).write.parquet(config.source.path)
    run_ingest(spark, config)
    assert bronze_rows(spark, config) == [("u1", "i1", "view", datetime(2026, 10, 1), None, "s")]
    (bad,) = quarantine(spark, config).collect()
    assert bad.reason == "unknown_event_type" and '"event_type":"click"' in bad.raw


@pytest.mark.steps
def test_a_catalog_table_source_is_read_by_name(spark: SparkSession, tmp_path: Path) -> None:
    config = make_config(tmp_path, "source.preset=generic", "source.table=shelf_source_events")
    rows = [
        ("u1", "i1", "view", datetime(2026, 10, 1), None, "s"),
        ("u2", "i1", "click", datetime(2026, 10, 1), 1.0, "s"),
    ]
    schema = "user_id string, item_id string, event_type string, event_ts timestamp, value double, session_id string"
    spark.createDataFrame(rows, schema).write.format("delta").mode("overwrite").saveAsTable("shelf_source_events")
    try:
        run_ingest(spark, config)
    finally:
        spark.sql("DROP TABLE IF EXISTS shelf_source_events")
    assert bronze_rows(spark, config) == [("u1", "i1", "view", datetime(2026, 10, 1), None, "s")]
    (bad,) = quarantine(spark, config).collect()
    assert bad.reason == "unknown_event_type" and bad.source_file == "shelf_source_events"
    missing = make_config(tmp_path / "missing", "source.preset=generic", "source.table=no_such_schema.events")
    with pytest.raises(InputDataError, match=r"Source table no_such_schema\.events could not be read .*source\.table"):
        run_ingest(spark, missing)


def test_source_table_needs_the_generic_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="source.table reads columns named by source.columns"):
        make_config(tmp_path, "source.table=cat.schema.events")


@pytest.mark.parametrize(
    ("name", "lines"),
    [
        ("u.data", ["196\t242\t3\t881250949", "186\t302\t3.5\t891717742"]),
        ("ratings.dat", ["196::242::3::881250949", "186::302::3.5::891717742"]),
        ("ratings.csv", ["userId,movieId,rating,timestamp", "196,242,3,881250949", "186,302,3.5,891717742"]),
    ],
)
@pytest.mark.steps
def test_movielens_layouts(spark: SparkSession, tmp_path: Path, name: str, lines: list[str]) -> None:
    path = write_text(tmp_path / "ml" / name, lines)
    config = make_config(tmp_path, "source.preset=movielens", f"source.path={path}", "clean.window_days=20000")
    run_ingest(spark, config)
    assert bronze_rows(spark, config) == [
        ("186", "302", "rating", datetime(1998, 4, 4, 19, 22, 22), 3.5, None),
        ("196", "242", "rating", datetime(1997, 12, 4, 15, 55, 49), 3.0, None),
    ]


MOVIES_FILES = {
    "movies.csv": [
        "movieId,title,genres",
        '242,"Kolya (1996)",Comedy',
        '302,"L.A. Confidential (1997)",Crime|Film-Noir|Mystery|Thriller',
        '11,"American President, The (1995)",(no genres listed)',
    ],
    "movies.dat": [
        "242::Kolya (1996)::Comedy",
        "302::L.A. Confidential (1997)::Crime|Film-Noir|Mystery|Thriller",
        "11::American President, The (1995)::(no genres listed)",
    ],
    "u.item": [
        "242|Kolya (1996)|24-Jan-1997||http://x|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
        "302|L.A. Confidential (1997)|01-Jan-1997||http://x|0|0|0|0|0|0|1|0|0|0|1|0|0|1|0|0|1|0|0",
        "11|American President, The (1995)|01-Jan-1995||http://x|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0",
    ],
}
RATINGS_OF_MOVIES = {"movies.csv": "ratings.csv", "movies.dat": "ratings.dat", "u.item": "u.data"}


@pytest.mark.parametrize("movies", sorted(MOVIES_FILES))
@pytest.mark.steps
def test_movielens_titles_and_genres_from_the_movies_file(spark: SparkSession, tmp_path: Path, movies: str) -> None:
    ratings = RATINGS_OF_MOVIES[movies]
    sep = {"ratings.csv": ",", "ratings.dat": "::", "u.data": "\t"}[ratings]
    lines = (["userId,movieId,rating,timestamp"] if ratings == "ratings.csv" else []) + [
        sep.join(("196", "242", "3", "881250949"))
    ]
    path = write_text(tmp_path / "ml" / ratings, lines)
    write_text(tmp_path / "ml" / movies, MOVIES_FILES[movies])
    config = make_config(tmp_path, "source.preset=movielens", f"source.path={path}", "clean.window_days=20000")
    run_ingest(spark, config)
    items = {r.item_id: (r.title, r.category) for r in tables.read(spark, config, "bronze", "items").collect()}
    assert items == {
        "242": ("Kolya (1996)", "Comedy"),
        "302": ("L.A. Confidential (1997)", "Crime"),
        "11": ("American President, The (1995)", None),
    }


def test_the_movies_file_is_found_beside_the_ratings_by_uri(spark: SparkSession, tmp_path: Path) -> None:
    """Local paths are looked up on the driver's disk, remote URIs by a Spark listing (sources.listable, here on
    file: URIs, the same Hadoop call an s3a:// or abfss:// one takes); a URI keeps its scheme."""
    ratings = write_text(tmp_path / "ml" / "ratings.csv", ["userId,movieId,rating,timestamp"])
    assert movielens_items_path(spark, str(ratings)) is None
    movies = write_text(tmp_path / "ml" / "movies.csv", MOVIES_FILES["movies.csv"])
    assert movielens_items_path(spark, str(ratings)) == str(movies)
    assert movielens_items_path(spark, f"file://{ratings}") == f"file://{movies}"
    assert movielens_items_path(spark, str(tmp_path / "ml" / "events.csv")) is None  # not a MovieLens name
    assert sources.listable(spark, f"file://{movies}") and sources.listable(spark, f"file://{tmp_path / 'ml'}")
    assert not sources.listable(spark, f"file://{tmp_path / 'ml' / 'u.item'}")


RETAIL_HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
RETAIL_LINES = [
    RETAIL_HEADER,
    "536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-01 08:26:00,2.55,17850,United Kingdom",
    "536370,85123A,WHITE HANGING HEART T-LIGHT HOLDER,4,2010-12-02 09:00:00,2.55,17850,United Kingdom",
    "C536379,85123A,WHITE HANGING HEART T-LIGHT HOLDER,-5,2010-12-03 09:41:00,2.55,17850,United Kingdom",
    '536371,22086,"PAPER CHAIN KIT, 50\'S CHRISTMAS",12,2010-12-01 09:00:00,2.55,13047,United Kingdom',
    'C536372,22086,"PAPER CHAIN KIT, 50\'S CHRISTMAS",-12,2010-12-04 09:00:00,2.55,13047,United Kingdom',
    "536373,21730,GLASS STAR FROSTED T-LIGHT HOLDER,6,2010-12-01 09:02:00,4.25,,United Kingdom",
    "536374,POST,POSTAGE,3,2010-12-01 09:09:00,18.00,12583,France",
    "536375,BANK CHARGES,Bank Charges,1,2010-12-01 09:10:00,15.00,12583,France",
    "536376,22139,,56,2010-12-01 11:52:00,0,13047,United Kingdom",
    "536377,22139,amazon adjust,-20,2010-12-01 11:53:00,1.00,13047,United Kingdom",
    "A563185,B,Adjust bad debt,1,2011-08-12 14:50:00,-11062.06,13047,United Kingdom",
]


@pytest.mark.steps
def test_online_retail_cancellations_net_out_and_quarantine_codes(spark: SparkSession, tmp_path: Path) -> None:
    path = write_text(tmp_path / "retail" / "online_retail.csv", RETAIL_LINES)
    config = make_config(tmp_path, "source.preset=online_retail", f"source.path={path}")
    ingest.run(spark, config, RunContext("r1", datetime(2011, 12, 10)))
    # 17850 bought 6 then 4 and returned 5: the latest purchase (4) nets out, the first keeps 5.
    # 13047 bought 12 and returned 12: nothing of that pair is left.
    assert bronze_rows(spark, config) == [("17850", "85123A", "purchase", datetime(2010, 12, 1, 8, 26), 5.0, "536365")]
    reasons = Counter(r.reason for r in quarantine(spark, config).collect())
    assert reasons == {
        "netted_out": 2,
        "cancelled": 2,
        "null_user": 1,
        "non_product": 3,
        "zero_price": 1,
        "negative_value": 1,
    }
    m = metrics(spark, config, "ingest")
    assert m["input_rows"] == len(RETAIL_LINES) - 1 == m["accepted"] + m["quarantined"]

    # The invoice lines describe their products: every product code gets a catalog row, whatever
    # happened to the line (netted out, no customer, zero price); POST, BANK CHARGES and B do not.
    items = {
        r.item_id: (r.title, r.price, r.launched_at) for r in tables.read(spark, config, "bronze", "items").collect()
    }
    assert items == {
        "85123A": ("WHITE HANGING HEART T-LIGHT HOLDER", 2.55, datetime(2010, 12, 1, 8, 26)),
        "22086": ("PAPER CHAIN KIT, 50'S CHRISTMAS", 2.55, datetime(2010, 12, 1, 9, 0)),
        "21730": ("GLASS STAR FROSTED T-LIGHT HOLDER", 4.25, datetime(2010, 12, 1, 9, 2)),
        # the zero-priced line has no description and no usable price: the adjustment line gives both
        "22139": ("amazon adjust", 1.0, datetime(2010, 12, 1, 11, 52)),
    }


def test_bad_inputs_name_the_file_column_and_config_key(spark: SparkSession, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with pytest.raises(InputDataError, match=r"does not exist; set source\.path"):
        run_ingest(spark, config)
    write_text(
        Path(config.source.path) / "part-0.csv",
        ["user,item_id,event_type,event_ts,value,session_id", "a,b,c,d,,"],
    )
    with pytest.raises(InputDataError, match=r"no column 'user_id'.*fix source\.columns"):
        run_ingest(spark, config)
    retail = write_text(tmp_path / "retail.csv", ["InvoiceNo,StockCode", "1,2"])
    with pytest.raises(InputDataError, match=r"retail\.csv has no column 'Description'"):
        run_ingest(spark, make_config(tmp_path, "source.preset=online_retail", f"source.path={retail}"))
