"""The log format every shelf process uses (the CLI, spark-submit's entry, `shelf serve`'s workers): time, level,
logger, message, on stderr; the chattiest libraries at WARNING."""

from __future__ import annotations

import logging
import sys


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("py4j", "great_expectations", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
