"""Kafka as the stream's source (`stream.source: kafka`): Spark's own Kafka source, and its messages as the
canonical rows batch ingest validates.

A message's value is one event: a JSON object whose keys are `source.columns`' names (`stream.kafka.format:
json`), or one delimited line (`csv`, separator `source.delimiter`) whose fields are `stream.kafka.csv_columns`.
It is parsed with ingest's own parsers (`from_json` / `from_csv`, PERMISSIVE with a corrupt-record column), so a
message that is not one well-formed event is quarantined as `unparseable_row` with its value as raw text, and
bytes that are not UTF-8 as `bad_encoding`. Where it came from is the row's source_file,
`kafka:<topic>:<partition>:<offset>` (a topic name has no colon), in quarantine.events and bronze.stream_events.

Offsets live in the query's checkpoint: a micro-batch that ran but was not committed (a crash) is replayed with
the same offsets, and its writes replace the batch's own rows (pipelines/stream/__init__.py), so every message
is counted once. Secrets (`stream.kafka.secret_options_env`) are read from the environment when the query
starts; their values are in no config file and no log line.
"""

from __future__ import annotations

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import events
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import EnvironmentSetupError
from pipelines.core.schemas import RAW, SOURCE_FILE
from pipelines.source_presets import (
    TextLayout,
    mapped_columns,
    require_columns,
    with_corrupt_flag,
    with_csv_fields,
    with_json_fields,
)


def describe(config: ShelfConfig) -> str:
    """Where the stream reads, for logs (no option values: they may hold secrets)."""
    kafka = config.stream.kafka
    return f"kafka topic {kafka.topic} at {kafka.bootstrap_servers}"


def reader_options(config: ShelfConfig) -> dict[str, str]:
    """Spark's Kafka source options: the topic, where to start, then `options` and the secrets as kafka.<name>.

    Raises:
        EnvironmentSetupError: an environment variable named in secret_options_env is not set.
    """
    kafka = config.stream.kafka
    options = {
        "kafka.bootstrap.servers": kafka.bootstrap_servers,
        "subscribe": kafka.topic,
        "startingOffsets": kafka.starting_offsets,
        "failOnDataLoss": str(kafka.fail_on_data_loss).lower(),
    }
    if kafka.max_offsets_per_trigger is not None:
        options["maxOffsetsPerTrigger"] = str(kafka.max_offsets_per_trigger)
    options.update({f"kafka.{name}": value for name, value in kafka.options.items()})
    options.update({f"kafka.{name}": value for name, value in kafka.secret_options().items()})
    return options


def read_stream(spark: SparkSession, config: ShelfConfig) -> DataFrame:
    """A streaming read of `stream.kafka.topic` (key, value, topic, partition, offset, timestamp per message).

    Raises:
        EnvironmentSetupError: Spark's Kafka source is not on the session's classpath, or a secret is not set.
        InputDataError: csv values whose csv_columns lack a column source.columns maps.
    """
    kafka, source = config.stream.kafka, config.source
    if kafka.format == "csv":
        require_columns(tuple(kafka.csv_columns or ()), mapped_columns(source, optional=False),
                        f"kafka topic {kafka.topic}", "stream.kafka.csv_columns")  # fmt: skip
    try:
        frame = spark.readStream.format("kafka").options(**reader_options(config)).load()
        frame.schema  # noqa: B018 - resolves the source now, so a missing jar fails here
    except AnalysisException as exc:
        # Spark 4.1 raises it as _LEGACY_ERROR_TEMP_1140 ("Failed to find data source: kafka. ...")
        missing = exc.getCondition() == "DATA_SOURCE_NOT_FOUND" or "failed to find data source" in str(exc).lower()
        if not missing:
            raise
        raise EnvironmentSetupError(
            "Spark's Kafka source is not on the session's classpath; run "
            f"'python -m pipelines.core.jars {config.spark.jars_dir} --kafka' (on a cluster: install "
            "org.apache.spark:spark-sql-kafka-0-10 matching its Spark) and start the stream again."
        ) from exc
    return frame


def to_canonical(batch: DataFrame, config: ShelfConfig) -> DataFrame:
    """A micro-batch of Kafka messages -> ingest's canonical string columns (see module doc)."""
    kafka, source = config.stream.kafka, config.source
    lines = batch.select(
        # A null value (a tombstone) is an empty line: unparseable. Bytes that are not UTF-8 become U+FFFD.
        F.coalesce(F.make_valid_utf8(F.col("value").cast("string")), F.lit("")).alias(RAW),
        F.format_string("kafka:%s:%d:%d", F.col("topic"), F.col("partition"), F.col("offset")).alias(SOURCE_FILE),
    )
    if kafka.format == "json":
        parsed = lines.transform(lambda d: with_json_fields(d, mapped_columns(source)))
    else:
        layout = TextLayout(source.delimiter, False, tuple(kafka.csv_columns or ()))
        parsed = lines.transform(lambda d: with_csv_fields(d, layout))
    return parsed.transform(with_corrupt_flag).transform(lambda d: events.to_canonical(d, source))
