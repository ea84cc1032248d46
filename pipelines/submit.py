"""spark-submit entry point for every step: `spark-submit [opts] submit.py <step> --conf ... --run-id ... --as-of ...`.

spark-submit needs the path of a .py file; this one ships inside the wheel (`pipelines/submit.py`) and
can be copied next to it, so a cluster job is the wheel on `--py-files` plus this file. `<step>` is
any `shelf` subcommand (`generate`, `ingest`, ..., `evaluate`, `run`), with the same options.
It reads and writes nothing itself: the step does (see the step's module docstring). On a cluster,
leave `spark.master` unset in the config so the session built by spark-submit (its master, Delta
jars and catalog) is used as it is.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the `shelf` subcommand named by the first argument; returns its exit code."""
    import logging

    import pipelines
    from pipelines.cli import main as cli_main
    from pipelines.core.logs import setup_logging

    args = sys.argv[1:] if argv is None else argv
    setup_logging()
    # Which copy of shelf runs (the wheel on --py-files or an installed one) is the first thing to check.
    logging.getLogger("shelf.submit").info("shelf package from %s", pipelines.__file__)
    return cli_main(args)


if __name__ == "__main__":
    # Run as a script, this file's folder (pipelines/) is sys.path[0]; drop it so `pipelines` is the package.
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if here.name == "pipelines" and sys.path and Path(sys.path[0] or ".").resolve() == here:
        sys.path.pop(0)
    raise SystemExit(main())
