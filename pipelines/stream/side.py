"""Side writes of a micro-batch on Spark-aware threads, so the lists and the MERGE get the cores first."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pyspark import InheritableThread
from pyspark.sql import SparkSession

from pipelines.core.session import SIDE_POOL

log = logging.getLogger("shelf.stream")


class SideWork:
    """Run `work` on a Spark-aware thread (it inherits the job group and local properties) in the FAIR pool
    session.SIDE_POOL, so the lists' jobs and the MERGE get the cores first; join() re-raises."""

    def __init__(self, spark: SparkSession, work: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self.thread = InheritableThread(target=self._run, args=(spark, work), daemon=True)
        self.thread.start()

    def _run(self, spark: SparkSession, work: Callable[[], None]) -> None:
        try:
            spark.sparkContext.setLocalProperty("spark.scheduler.pool", SIDE_POOL)
            work()
        except BaseException as exc:  # handed to the batch's thread by join()
            self.error = exc

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            log.error("[stream] side write failed while the batch was failing: %s", self.error)

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
