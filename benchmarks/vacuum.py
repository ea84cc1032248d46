"""Benchmark: `tables.vacuum` (what `shelf prune` and `shelf forget --vacuum` run per table) against a plain
`VACUUM` with Spark's default listing parallelism, in the same session on the same tables.

Delta's VACUUM lists a table's folders in a Spark stage of `spark.sql.sources.parallelPartitionDiscovery.
parallelism` tasks (Spark's default: 10,000, almost all empty on a small table); `tables.vacuum` sets it to 2
per core of the session when the user has not set it. Each round overwrites --tables small Delta tables
twice (so every VACUUM has a file to delete), then vacuums them with RETAIN 0 HOURS: once as Spark's
default would, once through `tables.vacuum`, the order alternating by round.

    .venv/bin/python -u -m benchmarks.vacuum --tables 3 --rounds 2
"""

from __future__ import annotations

import argparse

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from benchmarks._common import bench_session, timed
from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.schemas import RUN_ID

LAYER = "bench"


def rewrite(spark: SparkSession, config: ShelfConfig, names: list[str]) -> None:
    """Each table written twice by one run id: the second write leaves the first one's file to vacuum."""
    for name in names:
        for _ in range(2):
            tables.write(spark.range(1000).withColumn(RUN_ID, F.lit("b")), config, LAYER, name, "b")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    spark, config = bench_session()
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    names = [f"t{i}" for i in range(args.tables)]

    def plain() -> None:
        for name in names:
            spark.sql(f"VACUUM {tables.target(config, LAYER, name)} RETAIN 0 HOURS")

    def shelf() -> None:
        for name in names:
            tables.vacuum(spark, config, LAYER, name, 0.0)

    totals = {"spark default": 0.0, "shelf": 0.0}
    for r in range(args.rounds):
        order = [("spark default", plain), ("shelf", shelf)]
        for label, fn in order if r % 2 == 0 else order[::-1]:
            rewrite(spark, config, names)
            totals[label] += timed(fn)
    per = {k: v / (args.rounds * args.tables) for k, v in totals.items()}
    print(
        f"VACUUM per table ({args.tables} tables x {args.rounds} rounds, {spark.conf.get('spark.master')}): "
        f"spark default {per['spark default']:.2f} s, shelf {per['shelf']:.2f} s, "
        f"ratio {per['spark default'] / per['shelf']:.1f}x"
    )


if __name__ == "__main__":
    main()
