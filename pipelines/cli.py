"""`shelf <step>`: one subcommand per pipeline step, `shelf run` for all of them in order.

Common options: --conf (an overlay on the packaged defaults; default none), --set KEY=VALUE (repeatable), --run-id, --as-of.
Maintenance: `shelf rollback --to-version N | --to-run RUN_ID [--table layer.name]` and
`shelf forget --user ID [--user ID ...] [--vacuum]` (pipelines/maintenance.py).
`shelf prune --keep N [--retain-hours H]` keeps the last N runs' rows of the per-run tables (pipelines/retention.py).
`shelf report [--run-id ID] [--out DIR]` prints a run's evaluation report (ops.reports) or exports its files.
`shelf show --user ID` explains one user's list; `shelf tables` lists every table (pipelines/inspection.py).
`shelf run` ends with a summary: tables written, the report, NDCG against popularity, three users' lists.
`shelf gate --run-id ID` is `shelf run`'s publish gate on its own, for orchestrators that run each step as a task
(evaluate, gate, then the publishing steps): exit 6 when the run's evaluation refuses the publish.
`shelf tune` tunes the re-rank on replay validation windows of the run's data (pipelines/tune.py; writes
gold.rerank_tuning, logs the tuned overlay).
A user's mistake ends with one sentence and a non-zero exit code, never a JVM stack trace.
"""

from __future__ import annotations

import argparse
import sys
from typing import Protocol

from pipelines.core import uris
from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import load_config
from pipelines.core.errors import ShelfError
from pipelines.core.logs import setup_logging
from pipelines.core.runs import RunContext, make_context
from pipelines.steps import ADMIN, ANALYSES, GATE, STEPS, STREAMING, TOOLS, step_function

EXIT_CODES = """exit codes:
  0  done
  1  an unexpected failure (a bug or the engine: the traceback is printed)
  2  the command line is wrong (usage)
  3  the data-quality gate failed: nothing downstream was written
  4  row counts do not reconcile (input != accepted + quarantined + duplicates removed)
  5  another writer kept committing to the same table: this write gave up after its retries
  6  the publish gate refused the run: the previous run stays the serving run
  7  a mistake you can fix (config, input data, environment): the one-sentence message says what and how"""


DISTRIBUTION = "shelf-recommender"  # the name on PyPI ("shelf" is taken); the command stays `shelf`


def package_version() -> str:
    """The installed distribution's version (a checkout that is not installed: unknown)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed)"


class StepMain(Protocol):
    """A step's console-script entry point: argv defaults to sys.argv[1:]."""

    def __call__(self, argv: list[str] | None = None) -> int: ...


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shelf",
        description="Distributed batch recommender on Spark + Delta.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"shelf {package_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--conf",
        default=None,
        help="config file overlaid on the packaged defaults (and on conf/base.yaml beside it, when present); "
        "default: none, the defaults alone (local[*], tables under .data/tables, the demo shop)",
    )
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set rerank.top_k=20 (repeatable)",
    )
    common.add_argument("--run-id", default=None, help="run id (default: derived from --as-of)")
    common.add_argument("--as-of", default=None, help="the run's 'now' (ISO; default: generate.end)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in [*TOOLS, *STEPS, *STREAMING, *ANALYSES, "run"]:
        sub.add_parser(name, parents=[common], help=f"run the {name} step" if name != "run" else "run every step")
    sub.add_parser(
        "gate", parents=[common], help="exit 6 when the run's evaluation refuses the publish (evaluate.gate)"
    )
    rollback = sub.add_parser("rollback", parents=[common], help="restore a table to an earlier version or run")
    rollback.add_argument("--table", default="gold.recommendations", help="layer.name (default gold.recommendations)")
    target = rollback.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-version", type=int, default=None, help="the Delta version to restore")
    target.add_argument("--to-run", default=None, help="restore the latest version written by this run id")
    forget = sub.add_parser("forget", parents=[common], help="delete users from every table and saved model")
    forget.add_argument("--user", dest="users", action="append", required=True, help="a user id (repeatable)")
    forget.add_argument("--vacuum", action="store_true", help="also VACUUM with zero retention (ends time travel)")
    prune = sub.add_parser("prune", parents=[common], help="keep the last N runs' rows of the per-run tables, VACUUM")
    prune.add_argument("--keep", type=int, required=True, help="runs kept per table, the newest first (at least 1)")
    prune.add_argument(
        "--retain-hours", type=float, default=None, help="VACUUM retention (default Delta's 168: a week of time travel)"
    )
    show = sub.add_parser(
        "show", parents=[common], help="one user's list, reasons, fresh events and where each candidate came from"
    )
    show.add_argument("--user", required=True, help="the user id, as in the source data")
    sub.add_parser("tables", parents=[common], help="every table with its version, last run and row count")
    serve = sub.add_parser(
        "serve", parents=[common], help="re-rank the published lists at request time over HTTP (needs .[serve])"
    )
    serve.add_argument("--port", type=int, default=None, help="the port to listen on (serve.port; default 8000)")
    serve.add_argument("--workers", type=int, default=None, help="worker processes (serve.workers; default 1)")
    report = sub.add_parser("report", parents=[common], help="print a run's evaluation report (ops.reports)")
    report.add_argument("--out", default=None, help="also write summary.md and the PNG plots into this local folder")
    return parser


def serve_overrides(args: argparse.Namespace) -> dict[str, str]:
    """`shelf serve --port/--workers` as the config overrides they stand for (they win over --set), each mapped to
    the flag it came from (named in a config error)."""
    given = {"port": getattr(args, "port", None), "workers": getattr(args, "workers", None)}
    return {f"serve.{key}={value}": f"--{key} {value}" for key, value in given.items() if value is not None}


def execute(command: str, config: ShelfConfig, ctx: RunContext) -> int:
    """Run one step, or every step in order for `run`. Returns the exit code."""
    if command in TOOLS:  # generating demo data needs no Spark: pyspark is not even imported
        step_function(command)(None, config, ctx)
        return 0
    from pipelines.core.session import get_spark

    spark = get_spark(config)
    if command == "run":
        if config.source.preset == "synthetic" and uris.local_missing(config.source.path):
            step_function("generate")(spark, config, ctx)
        names = list(STEPS)
    else:
        names = [command]
    if command in STREAMING or command in ANALYSES:
        step_function(command)(spark, config, ctx)
        return 0
    from pipelines import runner  # imports pyspark: `shelf generate` never gets here

    if command == GATE:
        runner.gate_evaluated_run(spark, config, ctx)
        return 0
    runner.run_steps(spark, config, ctx, names)
    if command == "run":
        from pipelines import inspection

        print(inspection.render_summary(inspection.summarize(spark, config, ctx)))
    return 0


def execute_admin(args: argparse.Namespace, config: ShelfConfig) -> int:
    """`shelf rollback` / `shelf forget` (pipelines/maintenance.py), `shelf prune` (pipelines/retention.py)."""
    from pipelines import maintenance, retention
    from pipelines.core.session import get_spark

    spark = get_spark(config)
    if args.command == "rollback":
        maintenance.rollback(spark, config, args.table, args.to_version, args.to_run)
    elif args.command == "prune":
        retention.prune(spark, config, args.keep, args.retain_hours)
    else:
        maintenance.forget(spark, config, args.users, vacuum=args.vacuum)
    return 0


def execute_report(args: argparse.Namespace, config: ShelfConfig, ctx: RunContext) -> int:
    """`shelf report`: the run's summary.md on stdout; with --out, every report file into that folder."""
    from pipelines.core import reports
    from pipelines.core.session import get_spark

    files = reports.read(get_spark(config), config, ctx.run_id)
    print(files[reports.SUMMARY].decode("utf-8"))
    if args.out:
        for path in reports.export(files, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def execute_inspection(args: argparse.Namespace, config: ShelfConfig) -> int:
    """`shelf tables`; `shelf show --user ID` (of --run-id / --as-of when given, else of the serving run)."""
    from pipelines import inspection
    from pipelines.core.session import get_spark

    spark = get_spark(config)
    if args.command == "tables":
        states = inspection.table_states(spark, config)
        print(states.to_string(index=False) if not states.empty else f"No table under {config.storage.root} yet.")
        return 0
    if args.run_id is None and args.as_of is None:
        from pipelines.stream.serving import serving_run

        run_id, as_of = serving_run(spark, config)
        ctx = make_context(run_id, as_of.isoformat(), config.generate.end)
    else:
        ctx = make_context(args.run_id, args.as_of, config.generate.end)
    print(inspection.render_user(spark, config, ctx, args.user))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        flags = serve_overrides(args)
        config = load_config(args.conf, [*args.overrides, *flags], flags)
        if args.command in ADMIN:
            return execute_admin(args, config)
        if args.command in ("show", "tables"):
            return execute_inspection(args, config)
        if args.command == "serve":  # no Spark: delta-rs reads the tables
            from pipelines.serve.main import serve

            serve(config)
            return 0
        ctx = make_context(args.run_id, args.as_of, config.generate.end)
        if args.command == "report":
            return execute_report(args, config, ctx)
        return execute(args.command, config, ctx)
    except ShelfError as exc:
        print(f"shelf {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


def step_main(step: str) -> StepMain:
    """A spark-submit / console-script entry point for one step: `shelf <step> ARGS`."""

    def entry(argv: list[str] | None = None) -> int:
        return main([step, *(sys.argv[1:] if argv is None else argv)])

    return entry


# Console scripts (pyproject.toml, the Databricks bundle's python_wheel_task entry points): `shelf-<command> ARGS`
# is `shelf <command> ARGS`.
generate_main = step_main("generate")
ingest_main = step_main("ingest")
clean_main = step_main("clean")
train_main = step_main("train")
similarities_main = step_main("similarities")
candidates_main = step_main("candidates")
rerank_main = step_main("rerank")
evaluate_main = step_main("evaluate")
gate_main = step_main(GATE)
stream_main = step_main("stream")
tune_main = step_main("tune")


if __name__ == "__main__":
    raise SystemExit(main())
