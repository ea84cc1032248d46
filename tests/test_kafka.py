"""`shelf stream` reading a Kafka topic (`stream.source: kafka`) from a real Apache Kafka broker on 127.0.0.1
(KRaft mode, started by the session fixture `kafka`, stopped when the session ends).

The world is tests/test_stream.py's: its nightly publish, its two batches of tracker events (good rows and one
bad row per reason code), here sent as JSON messages, plus messages that are no event at all (not JSON, a cut
JSON object, a tombstone, bytes that are not UTF-8). Every message is checked by its (partition, offset), as the
broker's delivery reports give them: each good one in bronze.stream_events exactly once, each bad one in
quarantine.events with its reason code, across an `available_now` run and a SIGKILL of a processing-time query
after a micro-batch's writes, before its commit, and a restart from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import EnvironmentSetupError, InputDataError
from pipelines.core.schemas import STEP
from pipelines.stream import kafka as kafka_source
from pipelines.stream.job import StreamJob, start
from pipelines.stream.serving import checkpoint_path
from pipelines.stream.validate import to_classified
from tests.conftest import REPO, DemoRun, make_test_config
from tests.servers import Kafka
from tests.test_stream import (
    BATCH_0,
    BATCH_1,
    LANDING,
    OVERRIDES,
    category,
    kill_at_marker,
    lists,
    stream_cli,
    user_id,
    write_nightly,
)

COLUMNS = [c.split()[0] for c in LANDING.split(", ")]
GOOD_0, BAD_0 = BATCH_0[:9], BATCH_0[9:]  # tests/test_stream.py: nine good rows, then one bad row per reason
BAD_REASONS = ["null_user", "unknown_event_type", "bad_timestamp", "future_timestamp", "negative_value"]
SECRET = "kafka-secret-4f9c2e"  # a password that must appear in no log line and no plan
NOT_EVENTS: list[tuple[bytes | None, str]] = [
    (b"not json at all", "unparseable_row"),
    (b'{"user_id": "u05", "item_id": "sku-01", "event_type"', "unparseable_row"),
    (None, "unparseable_row"),  # a tombstone: no value
    (b'{"user_id": "u0\xff5", "item_id": "sku-01", "event_type": "view", "event_ts": "2026-11-01 01:00:00"}',
     "bad_encoding"),
]  # fmt: skip


def message(row: Sequence[str | None]) -> bytes:
    return json.dumps(dict(zip(COLUMNS, row, strict=True))).encode()


def kafka_config(root: Path, kafka: Kafka, topic: str, *extra: str) -> list[str]:
    return [
        *OVERRIDES,
        "stream.source=kafka",
        f"stream.kafka.bootstrap_servers={kafka.bootstrap}",
        f"stream.kafka.topic={topic}",
        *extra,
    ]


def where(topic: str, delivered: list[tuple[int, int]]) -> list[str]:
    return [f"kafka:{topic}:{partition}:{offset}" for partition, offset in delivered]


def stream_rows(spark: SparkSession, config: ShelfConfig) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """bronze.stream_events as {source_file: (user, item, type)} and the stream's quarantine as {source_file: reason},
    failing on any source_file seen twice."""
    bronze = tables.read(spark, config, "bronze", "stream_events").collect()
    quarantine = tables.read(spark, config, "quarantine", "events").filter(F.col(STEP) == "stream").collect()
    for rows in (bronze, quarantine):
        places = [r["source_file"] for r in rows]
        assert len(places) == len(set(places)), f"a message counted twice: {sorted(places)}"
    events = {r["source_file"]: (r["user_id"], r["item_id"], r["event_type"]) for r in bronze}
    return events, {r["source_file"]: r["reason"] for r in quarantine}


@pytest.fixture(scope="module")
def nightly(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kafka_nightly")
    write_nightly(spark, make_test_config(root, *OVERRIDES))
    return root


def copy_of(nightly: Path, root: Path, sets: list[str]) -> ShelfConfig:
    shutil.copytree(nightly / "tables", root / "tables")
    return make_test_config(root, *sets)


@pytest.mark.servers
def test_every_message_lands_once_in_bronze_or_quarantine_and_the_lists_follow(
    spark: SparkSession,
    kafka: Kafka,
    nightly: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = "events-once"
    kafka.create_topic(topic)
    good = kafka.produce(topic, [message(r) for r in GOOD_0]) + kafka.produce(topic, [message(BATCH_1[0])], 1)
    bad = kafka.produce(topic, [message(r) for r in BAD_0] + [value for value, _ in NOT_EVENTS])
    monkeypatch.setenv("SHELF_TEST_KAFKA_JAAS", f'org.apache.kafka.common.security.plain.PlainLoginModule '
                                                f'required username="shelf" password="{SECRET}";')  # fmt: skip
    secret = "stream.kafka.secret_options_env={sasl.jaas.config: SHELF_TEST_KAFKA_JAAS}"
    config = copy_of(nightly, tmp_path, kafka_config(tmp_path, kafka, topic, secret))
    caplog.set_level(logging.INFO)
    job = StreamJob(spark, config)
    query = start(spark, config, job, available_now=True)
    try:
        query.awaitTermination()
        query.explain(extended=True)
        plans = str(query.recentProgress) + capsys.readouterr().out
    finally:
        job.close()
    events, reasons = stream_rows(spark, config)
    want = [(r[0], r[1], r[2]) for r in [*GOOD_0, *BATCH_1]]
    assert sorted(events) == sorted(where(topic, good))
    assert sorted(events.values()) == sorted(want)
    want_reasons = [*BAD_REASONS, *(reason for _, reason in NOT_EVENTS)]
    assert reasons == dict(zip(where(topic, bad), want_reasons, strict=True))
    raw = tables.read(spark, config, "quarantine", "events").filter(F.col("source_file") == where(topic, bad)[5])
    assert [r["raw"] for r in raw.collect()] == ["not json at all"]
    after = lists(spark, config)
    assert category(after[user_id(1)][0]) == "A"  # u01 viewed three A items
    assert any(category(i) == "A" for i in after[user_id(3)])  # u03 put an A item in its cart
    assert all(category(i) == "A" for i in after["new-a"])  # first seen today, folded in from its session
    # The secret reached the Kafka consumer's settings, and no log line, progress report or plan.
    assert SECRET in kafka_source.reader_options(config)["kafka.sasl.jaas.config"]
    assert SECRET not in caplog.text and SECRET not in plans
    assert f"kafka topic {topic}" in caplog.text


@pytest.mark.servers
@pytest.mark.slow
def test_sigkill_of_a_processing_time_query_then_restart_counts_every_message_once(
    spark: SparkSession, kafka: Kafka, nightly: Path, tmp_path: Path
) -> None:
    topic = "events-kill"
    kafka.create_topic(topic)
    first = kafka.produce(topic, [message(r) for r in BATCH_0])
    sets = kafka_config(tmp_path, kafka, topic, "stream.trigger=processing_time", "stream.interval_seconds=1")
    config = copy_of(nightly, tmp_path, sets)
    marker = tmp_path / "written-0"
    # Batch 0 holds every message sent so far; the child writes the marker once its MERGE and side writes are
    # done, before Spark commits the batch to the checkpoint, and is killed there (tests/stream_child.py).
    kill_at_marker(stream_cli(config, f"0:{marker}", *sets[len(OVERRIDES) :]), marker, tmp_path / "stream.log")
    checkpoint = Path(checkpoint_path(config))
    assert (checkpoint / "offsets" / "0").exists() and not (checkpoint / "commits" / "0").exists()
    later = kafka.produce(topic, [message(BATCH_1[0])], partition=1)
    # Restart from the checkpoint: Spark replays batch 0 with the same offsets (its writes replace its own rows),
    # then reads what came since.
    job = StreamJob(spark, config)
    try:
        start(spark, config, job, available_now=True).awaitTermination()
    finally:
        job.close()
    events, reasons = stream_rows(spark, config)
    assert sorted(events) == sorted(where(topic, first[: len(GOOD_0)] + later))
    assert reasons == dict(zip(where(topic, first[len(GOOD_0) :]), BAD_REASONS, strict=True))
    assert any(category(i) == "A" for i in lists(spark, config)[user_id(3)])


def test_csv_messages_map_by_position_and_every_bad_message_gets_a_reason(spark: SparkSession, tmp_path: Path) -> None:
    """Kafka's row shape without a broker: csv values mapped by stream.kafka.csv_columns, then ingest's rules."""
    columns = "[uid, sku, kind, at, qty]"
    config = make_test_config(
        tmp_path, "stream.source=kafka", "stream.kafka.format=csv", f"stream.kafka.csv_columns={columns}",
        "source.columns={user_id: uid, item_id: sku, event_type: kind, event_ts: at, value: qty, session_id: null}",
    )  # fmt: skip
    values = [
        b"u1,sku-1,view,2026-11-01 01:00:00,1",
        b"u1,sku-2,view,2026-11-01 01:00:00",  # a field short
        b"u1,sku-2,wink,2026-11-01 01:00:00,1",
        b"u\xff2,sku-2,view,2026-11-01 01:00:00,1",
        None,
    ]
    batch = spark.createDataFrame(
        [(v, "t", 3, 40 + n) for n, v in enumerate(values)], "value binary, topic string, partition int, offset long"
    )
    classified = to_classified(batch, config, datetime(2026, 11, 2))
    got = {r["source_file"]: (r["reason"], r["user_id"], r["item_id"]) for r in classified.collect()}
    assert got == {
        "kafka:t:3:40": (None, "u1", "sku-1"),
        "kafka:t:3:41": ("unparseable_row", "u1", "sku-2"),  # the fields it has are kept, not accepted
        "kafka:t:3:42": ("unknown_event_type", "u1", "sku-2"),
        "kafka:t:3:43": ("bad_encoding", "u\ufffd2", "sku-2"),
        "kafka:t:3:44": ("unparseable_row", None, None),
    }


def test_json_messages_take_numbers_as_well_as_strings_and_ignore_unmapped_keys(
    spark: SparkSession, tmp_path: Path
) -> None:
    config = make_test_config(tmp_path, "stream.source=kafka")
    values = [
        b'{"user_id": 7, "item_id": "sku-1", "event_type": "view", "event_ts": "2026-11-01 01:00:00", "value": 2,'
        b' "page": {"url": "/p/1"}}',
        b'[{"user_id": "u1"}]',
    ]
    batch = spark.createDataFrame(
        [(v, "t", 0, n) for n, v in enumerate(values)], "value binary, topic string, partition int, offset long"
    )
    rows = {r["source_file"]: r for r in to_classified(batch, config, datetime(2026, 11, 2)).collect()}
    first = rows["kafka:t:0:0"]
    assert (first["reason"], first["user_id"], first["item_id"], first["value"]) == (None, "7", "sku-1", 2.0)
    assert rows["kafka:t:0:1"]["reason"] == "unparseable_row"  # an array is not one event


@pytest.mark.servers
def test_shelf_serve_consumes_the_topic_so_a_list_follows_events_it_was_not_sent(
    demo_run: DemoRun, kafka: Kafka, tmp_path: Path
) -> None:
    """`shelf serve` with serve.kafka_consume: events produced to the topic (never posted to the service) make the
    user's GET answer the kernel's list for them: the same list a POST of the same session gives."""
    import httpx

    from tests import serve_checks
    from tests.servers import free_port

    topic = "events-serve"
    kafka.create_topic(topic)
    shutil.copytree(demo_run.root / "tables", tmp_path / "tables")
    shutil.rmtree(tmp_path / "tables" / "landing", ignore_errors=True)
    port, log = free_port(), tmp_path / "serve.log"
    sets = ("serve.kafka_consume=true", "serve.kafka_offset_reset=earliest", "serve.flush_every_seconds=600",
            f"stream.kafka.bootstrap_servers={kafka.bootstrap}", f"stream.kafka.topic={topic}")  # fmt: skip
    with serve_checks.running_server(tmp_path / "tables", port, log, *sets):
        base = f"http://127.0.0.1:{port}/v1/users/u000001/recommendations"
        published = httpx.get(base).json()
        assert published["source"] == "published"
        session = [
            {"user_id": "u000001", "item_id": f"i0000{n}", "event_type": "view", "event_ts": f"2026-11-01 0{n}:00:00"}
            for n in (1, 2, 3)
        ]
        bad = [b"not json", json.dumps({**session[0], "event_type": "wink"}).encode()]
        kafka.produce(topic, [json.dumps(e).encode() for e in session] + bad)
        deadline = time.monotonic() + 60
        while (got := httpx.get(base).json())["source"] != "reranked":
            assert time.monotonic() < deadline, f"the service never saw the topic's events: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        posted = httpx.post(base, json={"events": session}).json()
        assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in posted["items"]]
        assert [i["item_id"] for i in got["items"]] != [i["item_id"] for i in published["items"]]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'shelf_events_total{outcome="accepted"} 3' in metrics
        assert 'shelf_events_total{outcome="rejected"} 2' in metrics
        assert "shelf_buffered_events 0" in metrics  # the topic's events are not appended to the landing table


@pytest.mark.steps
def test_without_the_kafka_jars_shelf_stream_says_how_to_fetch_them(tmp_path: Path) -> None:
    jars = tmp_path / "jars"
    jars.mkdir()
    for jar in (REPO / ".jars").glob("delta-*.jar"):
        shutil.copy2(jar, jars)
    sets = [f"storage.root={tmp_path / 'tables'}", f"spark.jars_dir={jars}", "stream.source=kafka"]
    command = [str(Path(sys.executable).parent / "shelf"), "stream", "--conf", str(REPO / "conf" / "test.yaml")]
    done = subprocess.run(
        [*command, *[arg for value in sets for arg in ("--set", value)]],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYSPARK_PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode != 0
    assert f"Kafka source is not on the session's classpath; run 'python -m pipelines.core.jars {jars} --kafka'" in (
        done.stderr
    ), done.stderr[-2000:]


def test_csv_columns_without_a_mapped_column_name_the_key_to_fix(spark: SparkSession, tmp_path: Path) -> None:
    config = make_test_config(
        tmp_path, "stream.source=kafka", "stream.kafka.format=csv", "stream.kafka.csv_columns=[user_id, item_id]"
    )
    with pytest.raises(InputDataError, match="kafka topic shelf-events has no column 'event_type'.*csv_columns"):
        kafka_source.read_stream(spark, config)


def test_a_secret_reaches_both_consumers_from_the_environment_or_stops_their_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream's Kafka options and shelf serve's consumer settings take secret_options_env the same way."""
    from pipelines.serve.consumer import consumer_settings

    config = make_test_config(tmp_path, "stream.kafka.secret_options_env={sasl.password: SHELF_TEST_KAFKA_PASSWORD}")
    monkeypatch.delenv("SHELF_TEST_KAFKA_PASSWORD", raising=False)
    for settings in (kafka_source.reader_options, consumer_settings):
        with pytest.raises(EnvironmentSetupError, match="names SHELF_TEST_KAFKA_PASSWORD for sasl.password"):
            settings(config)
    monkeypatch.setenv("SHELF_TEST_KAFKA_PASSWORD", SECRET)
    assert kafka_source.reader_options(config)["kafka.sasl.password"] == SECRET
    assert consumer_settings(config)["sasl.password"] == SECRET
