"""`shelf stream` in a child process that stops at a named point: the SIGKILL test's subject (tests/test_stream.py).

    python -m tests.stream_child --conf conf/test.yaml --set KEY=VALUE ... --pause-after BATCH:MARKER

Runs the stream as `shelf stream` does, with a StreamJob whose after_batch_writes hook, in batch BATCH, writes
MARKER once the batch's MERGE and side writes are done and then waits there (before Spark commits the batch to
its checkpoint) until the test kills the process.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from pyspark.sql import SparkSession

from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import load_config
from pipelines.core.logs import setup_logging
from pipelines.core.session import get_spark
from pipelines.stream.job import StreamJob, start


class PausingJob(StreamJob):
    def __init__(self, spark: SparkSession, config: ShelfConfig, batch_id: int, marker: Path) -> None:
        super().__init__(spark, config)
        self.pause_batch, self.marker = batch_id, marker

    def after_batch_writes(self, batch_id: int) -> None:
        if batch_id == self.pause_batch:
            self.marker.write_text(str(batch_id))
            threading.Event().wait()  # until SIGKILL


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conf", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--pause-after", required=True, metavar="BATCH:MARKER")
    args = parser.parse_args()
    setup_logging()
    config = load_config(args.conf, args.overrides)
    spark = get_spark(config)
    batch, marker = args.pause_after.split(":", 1)
    start(spark, config, PausingJob(spark, config, int(batch), Path(marker))).awaitTermination()


if __name__ == "__main__":
    main()
