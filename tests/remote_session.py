"""One user's session against a remote storage root, in its own process (tests/test_end_to_end.py runs it with a
scratch working directory): `shelf run`, `shelf rollback`, `shelf forget --vacuum`, `shelf prune` through the
CLI's entry function (one JVM for all of them, as a notebook would have), then the notebook API's report reader.

Prints one JSON line: the forgotten user and index, the rollback's exit code and the report's plots.

    python -m tests.remote_session CONF RUN_ID AS_OF
"""

from __future__ import annotations

import json
import sys
import time

from pyspark.sql import functions as F

from pipelines import api, cli
from pipelines.core import tables
from pipelines.core.schemas import USER_ID, USER_IDX


def main(conf: str, run_id: str, as_of: str) -> dict[str, object]:
    common = ["--conf", conf]
    started = time.monotonic()
    if cli.main(["run", *common, "--run-id", run_id, "--as-of", as_of]) != 0:
        raise SystemExit("shelf run failed")
    seconds = {"run": round(time.monotonic() - started)}
    config = api.load(conf)
    spark = api.session(config)
    victim = tables.read(spark, config, "gold", "recommendations").orderBy(USER_ID).first()[USER_ID]
    index = tables.read(spark, config, "silver", "user_index").filter(F.col(USER_ID) == victim).first()[USER_IDX]
    commands = {
        "rollback": ["rollback", *common, "--to-run", run_id],
        "forget": ["forget", *common, "--user", victim, "--vacuum"],
        "prune": ["prune", *common, "--keep", "1"],
    }
    codes = {}
    for name, argv in commands.items():
        started = time.monotonic()
        codes[name] = cli.main(argv)
        seconds[name] = round(time.monotonic() - started)
    plots = api.report_plots(spark, config, run_id)
    return {
        "victim": victim,
        "index": int(index),
        "codes": codes,
        "plots": len(plots),
        "png": all(p.startswith(b"\x89PNG") for p in plots),
        "seconds": seconds,
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
