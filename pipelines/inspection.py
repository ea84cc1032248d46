"""What shelf wrote, for people: the end-of-run summary, `shelf show --user ID` and `shelf tables`.

Reads only. Each function returns small pandas frames (a few dozen rows: one per table, per model, per list
entry of a handful of users), never anything that grows with users or items; `render_*` turns them into the
text the CLI prints, and the notebook API (pipelines.api) displays the frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import cast

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import reports, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.errors import InputDataError
from pipelines.core.runs import RunContext
from pipelines.core.schemas import (
    ALS_SCORE,
    CATEGORY,
    EVENT_TS,
    EVENT_TYPE,
    ITEM_ID,
    ITEM_IDX,
    POPULARITY,
    PUBLISHED,
    RANK,
    REASONS,
    RUN_ID,
    SCORE,
    SOURCES,
    TITLE,
    USER_ID,
    USER_IDX,
)
from pipelines.runner import gate_figures

SAMPLE_USERS = 3  # users whose lists the end-of-run summary shows
SHOWN_CANDIDATES = 30  # candidates `shelf show --user` lists, best ALS score first
SHOWN_EVENTS = 20  # fresh events `shelf show --user` lists, newest first


def run_of(commit_metadata: str | None) -> str | None:
    """The run id a commit's userMetadata names (`run_id=...`, tables.write), None for commits of no run."""
    prefix = "run_id="
    return commit_metadata[len(prefix) :] if commit_metadata and commit_metadata.startswith(prefix) else None


def table_states(spark: SparkSession, config: ShelfConfig) -> pd.DataFrame:
    """`shelf tables`: every table shelf writes that exists: its version, the last run that wrote it and when, and
    its row count (maintenance commits such as COMMENT or OPTIMIZE name no run)."""
    rows = []
    for layer, name in tables.KNOWN_TABLES:
        if not tables.exists(spark, config, layer, name):
            continue
        commits = tables.history(spark, config, layer, name)
        last = commits.select("version").first()  # newest first
        by_run = commits.filter(F.col("userMetadata").startswith("run_id=")).select("userMetadata", "timestamp").first()
        assert last is not None  # an existing Delta table has at least one commit
        rows.append(
            {
                "table": f"{layer}.{name}",
                "version": int(last["version"]),
                "last run": run_of(by_run["userMetadata"]) if by_run else None,
                "written (UTC)": str(by_run["timestamp"])[:19] if by_run else None,
                "rows": tables.read(spark, config, layer, name).count(),  # from the Delta log's file statistics
                "location": tables.location(config, layer, name),
            }
        )
    return pd.DataFrame(rows, columns=["table", "version", "last run", "written (UTC)", "rows", "location"])


def run_tables(spark: SparkSession, config: ShelfConfig, run_id: str) -> pd.DataFrame:
    """The tables `run_id` wrote, with the rows its latest commit to each wrote (Delta's operation metrics)."""
    rows = []
    for layer, name in tables.KNOWN_TABLES:
        if not tables.exists(spark, config, layer, name):
            continue
        commit = tables.last_commit_of_run(spark, config, layer, name, run_id)
        if commit is not None:
            rows_out = (commit["operationMetrics"] or {}).get("numOutputRows")
            written = None if rows_out is None else int(rows_out)
            rows.append({"table": f"{layer}.{name}", "version": int(commit["version"]), "rows written": written})
    return pd.DataFrame(rows, columns=["table", "version", "rows written"])


def headline(spark: SparkSession, config: ShelfConfig, run_id: str) -> pd.DataFrame:
    """NDCG@evaluate.k of every model the run evaluated, `published` first, with its ratio to popularity."""
    if not tables.exists(spark, config, "gold", "metrics"):
        return pd.DataFrame(columns=["model", "ndcg", "x popularity"])
    figures = gate_figures(spark, config, run_id)
    order = sorted(figures, key=lambda m: (m != PUBLISHED, -figures[m], m))
    popular = figures.get(POPULARITY)
    return pd.DataFrame(
        [{"model": m, "ndcg": figures[m], "x popularity": figures[m] / popular if popular else None} for m in order],
        columns=["model", "ndcg", "x popularity"],
    )


def sample_lists(spark: SparkSession, config: ShelfConfig, ctx: RunContext, users: int = SAMPLE_USERS) -> pd.DataFrame:
    """The published lists of `users` users of the run: those with the most fresh events (ties: smallest id)."""
    chosen = pick_users(spark, config, ctx, users)
    recs = read_run(spark, config, "gold", "recommendations", ctx.run_id).filter(F.col(USER_ID).isin(chosen))
    frame = _with_catalog(spark, config, recs).select(USER_ID, RANK, ITEM_ID, *_titles(spark, config), SCORE, REASONS)
    return _pandas(frame.orderBy(USER_ID, RANK))  # users x rerank.top_k rows


@dataclass(frozen=True, repr=False)
class RunSummary:
    """What a run left behind: its tables, where its report is, how good its lists are, and a few of them."""

    run_id: str
    tables: pd.DataFrame  # run_tables
    report: str | None  # where the evaluation report is (None: the run did not evaluate)
    headline: pd.DataFrame  # headline
    lists: pd.DataFrame  # sample_lists

    def text(self) -> str:
        return render_summary(self)

    def __repr__(self) -> str:
        return self.text()

    def _repr_markdown_(self) -> str:  # Jupyter and Databricks show the summary inline
        return f"```text\n{self.text()}\n```"


def summarize(spark: SparkSession, config: ShelfConfig, ctx: RunContext) -> RunSummary:
    """The end-of-run summary of `shelf run` / `make demo` (and of the quick-start notebook)."""
    reported = tables.exists(spark, config, *reports.TABLE) and not (
        read_run(spark, config, *reports.TABLE, ctx.run_id).limit(1).isEmpty()
    )
    report = (
        f"shelf report --run-id {ctx.run_id}   ({'.'.join(reports.TABLE)} at {tables.location(config, *reports.TABLE)})"
    )
    published = tables.exists(spark, config, "gold", "recommendations")
    return RunSummary(
        run_id=ctx.run_id,
        tables=run_tables(spark, config, ctx.run_id),
        report=report if reported else None,
        headline=headline(spark, config, ctx.run_id),
        lists=sample_lists(spark, config, ctx) if published else pd.DataFrame(),
    )


def render_summary(summary: RunSummary) -> str:
    lines = [f"Run {summary.run_id}: tables written (rows of this run's last commit to each)"]
    for row in summary.tables.itertuples(index=False):
        written = "-" if pd.isna(row[2]) else f"{int(row[2]):,}"
        lines.append(f"  {row[0]:<26} {written:>12}   version {row[1]}")
    if summary.report:
        lines.append(f"Evaluation report: {summary.report}")
    if not summary.headline.empty:
        figures = ", ".join(
            f"{r.model} {r.ndcg:.4f}"
            + (f" ({r[2]:.2f}x popularity)" if r.model == PUBLISHED and pd.notna(r[2]) else "")
            for r in summary.headline.itertuples(index=False)
        )
        lines.append(f"NDCG on the holdout: {figures}")
    if not summary.lists.empty:
        lines.append(f"Lists of {summary.lists[USER_ID].nunique()} users (shelf show --user ID explains one):")
        lines.extend(render_list(summary.lists, by_user=True))
    return "\n".join(lines)


def render_list(frame: pd.DataFrame, by_user: bool = False) -> list[str]:
    """One line per list entry: rank, item (title), score, reasons; a header line per user when `by_user`."""
    lines: list[str] = []
    for row in frame.to_dict("records"):
        if by_user and int(row[RANK]) == 1:
            lines.append(f"  user {row[USER_ID]}")
        title = f" {row[TITLE]!r}" if row.get(TITLE) is not None and pd.notna(row.get(TITLE)) else ""
        reasons = ", ".join(list(row[REASONS] if row[REASONS] is not None else []))
        lines.append(f"    {int(row[RANK]):>3}. {row[ITEM_ID]}{title}  score {float(row[SCORE]):.3f}  [{reasons}]")
    return lines


@dataclass(frozen=True)
class UserExplanation:
    """Everything behind one user's list: what they did, what was fresh, what was proposed, what was kept."""

    user_id: str
    history: DataFrame  # their silver.interactions rows, newest first
    fresh: DataFrame  # the rows in [as_of - rerank.fresh_days, as_of): the session the re-rank used
    candidates: DataFrame  # gold.candidates of the run, best ALS score first, with the sources that proposed each
    recommendations: DataFrame  # gold.recommendations of the run, by rank, with reasons


def pick_users(spark: SparkSession, config: ShelfConfig, ctx: RunContext, n: int) -> list[str]:
    """Up to `n` users with a list in the run, deterministically: the most fresh events first, then the smallest id."""
    fresh = (
        _with_items(spark, config, read_run(spark, config, "silver", "interactions", ctx.run_id), ctx.run_id)
        .filter(_fresh_window(config, ctx))
        .groupBy(USER_ID)
        .agg(F.count(F.lit(1)).alias("fresh"))
    )
    listed = read_run(spark, config, "gold", "recommendations", ctx.run_id).select(USER_ID).distinct()
    best = listed.join(fresh, on=USER_ID, how="left").orderBy(F.col("fresh").desc_nulls_last(), F.col(USER_ID))
    return [str(r[USER_ID]) for r in best.limit(n).collect()]


def explain_user(spark: SparkSession, config: ShelfConfig, ctx: RunContext, user_id: str) -> UserExplanation:
    """One user's history, fresh events, candidates and final list (string ids, catalogue titles when known)."""
    user_index = read_run(spark, config, "silver", "user_index", ctx.run_id).filter(F.col(USER_ID) == user_id)
    if user_index.limit(1).isEmpty():
        raise InputDataError(f"User '{user_id}' is not in silver.user_index of run {ctx.run_id}; pick another user_id.")
    mine = read_run(spark, config, "silver", "interactions", ctx.run_id).join(user_index.select(USER_IDX), USER_IDX)
    history = _with_items(spark, config, mine, ctx.run_id).orderBy(F.col(EVENT_TS).desc())
    candidates = (
        read_run(spark, config, "gold", "candidates", ctx.run_id)
        .join(user_index.select(USER_IDX), on=USER_IDX, how="inner")
        .transform(lambda df: _with_items(spark, config, df, ctx.run_id))
        .drop(USER_IDX, ITEM_IDX, RUN_ID)
        .orderBy(F.col(ALS_SCORE).desc_nulls_last(), F.col(ITEM_ID))
    )
    recommendations = _with_catalog(
        spark, config, read_run(spark, config, "gold", "recommendations", ctx.run_id).filter(F.col(USER_ID) == user_id)
    ).orderBy(RANK)
    return UserExplanation(user_id, history, history.filter(_fresh_window(config, ctx)), candidates, recommendations)


def render_user(spark: SparkSession, config: ShelfConfig, ctx: RunContext, user_id: str) -> str:
    """`shelf show --user ID`: the list with reasons, the fresh events, and where each candidate came from."""
    found = explain_user(spark, config, ctx, user_id)
    titles = _titles(spark, config)
    listed = _pandas(found.recommendations.select(RANK, ITEM_ID, *titles, SCORE, REASONS))  # rerank.top_k rows
    fresh = _pandas(found.fresh.select(EVENT_TS, EVENT_TYPE, ITEM_ID).limit(SHOWN_EVENTS + 1))
    kept = found.recommendations.select(ITEM_ID, F.col(RANK).alias("in list at"))
    proposed = (
        found.candidates.join(kept, on=ITEM_ID, how="left")
        .orderBy(F.col(ALS_SCORE).desc_nulls_last(), F.col(ITEM_ID))
        .limit(SHOWN_CANDIDATES)
    )
    shown = [c for c in (ITEM_ID, *titles, SOURCES, ALS_SCORE, "in list at") if c in proposed.columns]
    candidates = _pandas(proposed.select(*shown))
    candidates["in list at"] = [("-" if pd.isna(v) else str(int(v))) for v in candidates["in list at"]]
    lines = [f"User {user_id}, run {ctx.run_id} (as_of {ctx.as_of:%Y-%m-%d %H:%M}):", "List, with the reasons shown:"]
    lines += render_list(listed) or ["    (no list: the user has no row in gold.recommendations of this run)"]
    lines.append(f"Events in the fresh window ({config.rerank.fresh_days} days before as_of), newest first:")
    lines += [
        f"    {r[EVENT_TS]:%Y-%m-%d %H:%M}  {r[EVENT_TYPE]:<12} {r[ITEM_ID]}"
        for r in fresh.head(SHOWN_EVENTS).to_dict("records")
    ]
    if len(fresh) > SHOWN_EVENTS:
        lines.append("    ... (more: api.explain_user(...).fresh has them all)")
    lines.append(f"Candidates (best ALS score first, up to {SHOWN_CANDIDATES}) and the sources that proposed them:")
    lines += ["    " + line for line in candidates.to_string(index=False, na_rep="-").splitlines()]
    return "\n".join(lines)


def read_run(spark: SparkSession, config: ShelfConfig, layer: str, name: str, run_id: str | None = None) -> DataFrame:
    """A pipeline table; with `run_id`, only that run's rows (tables without a run_id column are returned whole)."""
    df = tables.read(spark, config, layer, name)
    if run_id is not None and RUN_ID in df.columns:
        df = df.filter(F.col(RUN_ID) == run_id)
    return df


def _pandas(df: DataFrame) -> pd.DataFrame:
    """A small frame (a few users' rows) on the driver."""
    return cast(pd.DataFrame, df.toPandas())


def _fresh_window(config: ShelfConfig, ctx: RunContext) -> Column:
    start = ctx.as_of - timedelta(days=config.rerank.fresh_days)
    return (F.col(EVENT_TS) >= F.lit(start)) & (F.col(EVENT_TS) < F.lit(ctx.as_of))


def _with_items(spark: SparkSession, config: ShelfConfig, df: DataFrame, run_id: str) -> DataFrame:
    """Dense ids -> the source's string ids (user when present, item), plus catalogue title and category."""
    items = read_run(spark, config, "silver", "item_index", run_id).select(ITEM_ID, ITEM_IDX)
    out = df.join(items, on=ITEM_IDX, how="left")
    if USER_IDX in df.columns:
        users = read_run(spark, config, "silver", "user_index", run_id).select(USER_ID, USER_IDX)
        out = out.join(users, on=USER_IDX, how="left")
    return _with_catalog(spark, config, out)


def _catalog_columns(spark: SparkSession, config: ShelfConfig) -> list[str]:
    if not tables.exists(spark, config, "silver", "catalog"):
        return []
    return [c for c in (TITLE, CATEGORY) if c in tables.read(spark, config, "silver", "catalog").columns]


def _titles(spark: SparkSession, config: ShelfConfig) -> list[str]:
    return [c for c in _catalog_columns(spark, config) if c == TITLE]


def _with_catalog(spark: SparkSession, config: ShelfConfig, df: DataFrame) -> DataFrame:
    wanted = [c for c in _catalog_columns(spark, config) if c not in df.columns]
    if not wanted:
        return df
    catalog = tables.read(spark, config, "silver", "catalog").select(ITEM_ID, *wanted)
    return df.join(catalog, on=ITEM_ID, how="left")
