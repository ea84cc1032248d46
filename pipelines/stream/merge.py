"""Publishing a micro-batch's lists: one MERGE into the serving run's rows of gold.recommendations, where newer
information wins per user (see pipelines/stream/__init__.py), with the gate state that spares most batches the
gate's read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.core import publishing, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.quality import ts_lit
from pipelines.core.schemas import AS_OF, RANK, RUN_ID, USER_ID
from pipelines.core.session import session_conf
from pipelines.stream.recent import release
from pipelines.stream.serving import (
    EVENT_TIME,
    RECOMMENDATIONS,
    STREAM_BATCH,
    STREAM_COLUMNS,
    batch_tag,
    own_commits,
)
from pipelines.stream.users import NEW_LEN

_INFO, _BATCH = "_info", "_batch"


def _stream_column(frame: DataFrame, name: str) -> Column:
    return F.col(name) if name in frame.columns else F.lit(None)


def _with_list_lengths(recs: DataFrame) -> DataFrame:
    """New lists with `_new_len`, each user's list length (its largest rank: ranks are 1..length), which the MERGE's
    condition needs (see publish). The stream's batches compute it in the kernel pass instead (RANKED_SCHEMA)."""
    return recs.withColumn(NEW_LEN, F.max(RANK).over(Window.partitionBy(USER_ID)))


def to_merge_source(
    recs: DataFrame, current: DataFrame, run_id: str, batch_id: int, event_time: datetime
) -> tuple[DataFrame, DataFrame]:
    """The rows of `recs` (with `_new_len`) of the users whose information is newer than their rows in `current`,
    and the gate (those users: a local checkpoint, to release once the MERGE is done).

    Reads `current` now (the gate is materialised: one Spark job), not when the MERGE evaluates its source.
    """
    info = F.coalesce(_stream_column(current, EVENT_TIME).cast("timestamp"), F.col(AS_OF))
    users = recs.select(USER_ID).distinct()
    existing = (
        current.filter(F.col(RUN_ID) == run_id)
        .join(F.broadcast(users), on=USER_ID, how="inner")
        .groupBy(USER_ID)
        .agg(F.max(info).alias(_INFO), F.max(_stream_column(current, STREAM_BATCH).cast("long")).alias(_BATCH))
    )
    newer = (
        F.col(_INFO).isNull()
        | (ts_lit(event_time) > F.col(_INFO))
        | (F.col(_BATCH).isNotNull() & (F.lit(batch_id) > F.col(_BATCH)))
    )
    gate = users.join(existing, on=USER_ID, how="left").filter(newer).select(USER_ID)
    gate = gate.localCheckpoint(eager=True)  # one read of the table now (one small job)
    return recs.join(gate, on=USER_ID, how="left_semi"), gate


@dataclass
class GateState:
    """What this stream knows of the serving run's rows in gold.recommendations, so most MERGEs need no gate read.

    Set by a full gate read (publish) and by the stream's own MERGEs: `version` is the table version at the last
    look; `max_batch` is the largest stream_batch of the run's rows then (or of the stream's MERGEs since). While
    only this stream commits to the table (its Delta log says so: no Spark job), a batch with a larger id than
    `max_batch` and an event time after the run's as_of is newer than every row of the run, so every user of the
    batch passes the gate. Any other commit (a nightly rerun, `shelf forget`, a second writer) means a full read.
    """

    run_id: str | None = None
    version: int | None = None
    max_batch: int = -1

    def trusted(self, run_id: str, batch_id: int, event_time: datetime, as_of: datetime, others: bool) -> bool:
        return self.run_id == run_id and not others and batch_id > self.max_batch and event_time > as_of

    def read_run(self, current: DataFrame, run_id: str, version: int) -> None:
        """Refresh from the run's rows in `current` (one small aggregation job)."""
        row = (
            current.filter(F.col(RUN_ID) == run_id)
            .agg(F.max(_stream_column(current, STREAM_BATCH).cast("long")).alias(_BATCH))
            .first()
        )
        self.run_id, self.version = run_id, version
        self.max_batch = int(row[_BATCH]) if row is not None and row[_BATCH] is not None else -1


@dataclass
class MergeOptions:
    """What publish needs beyond the lists. `state` (the stream's GateState) with the serving run's `as_of` lets it
    skip the gate's read (see GateState). Hooks (StreamJob passes its own methods; tests override them):
    `before_attempt(n)` runs at the start of MERGE attempt n, `wrap_source(source)` is applied to the MERGE's
    source (the race test pauses it there, inside the MERGE's transaction)."""

    state: GateState | None = None
    as_of: datetime | None = None
    before_attempt: Callable[[int], None] | None = None
    wrap_source: Callable[[DataFrame], DataFrame] | None = None


RECOMMENDATIONS_PROPERTIES = {"delta.enableDeletionVectors": "true", "delta.autoOptimize.autoCompact": "true"}


def prepare_recommendations(spark: SparkSession, config: ShelfConfig) -> None:
    """Once per stream: add the stream columns to gold.recommendations and set its properties: deletion vectors,
    so a MERGE that touches a few users marks their old rows deleted instead of rewriting whole files, and Delta's
    auto compaction, so the small files every MERGE adds (a few a batch, hundreds an hour) are compacted after a
    write once enough of them gathered (spark.databricks.delta.autoCompact.minNumFiles), and the MERGEs' file
    scans stay bounded over a long-running stream."""
    tables.add_columns(spark, config, *RECOMMENDATIONS, STREAM_COLUMNS)
    tables.set_properties(spark, config, *RECOMMENDATIONS, RECOMMENDATIONS_PROPERTIES)


def publish(
    spark: SparkSession,
    config: ShelfConfig,
    recs: DataFrame,
    run_id: str,
    batch_id: int,
    event_time: datetime,
    options: MergeOptions | None = None,
) -> int:
    """MERGE the users' new lists (`recs`: gold.recommendations' rows with the stream's columns, materialised, and
    `_new_len`, each user's list length, which is added when missing) into the serving run's rows of
    gold.recommendations (one commit, retried).

    The source is the lists themselves: a target row matches its user's row of the same rank (replaced), or, past
    the new list's length, the user's last row (deleted), so every old list loses all of its tail whatever its
    length, and each target row matches one source row (lists have ranks 1..length). Ranks of the new list that
    the old one lacks are inserted.

    The newer-wins gate (to_merge_source) reads the table just before the MERGE and is materialised, so the MERGE
    plans and reads a small in-memory source (with the read inside the MERGE, Delta listed the table's files again
    each time it evaluated its source: about 6 s a batch). A commit between that read and the MERGE cannot make an
    older list win over its matched rows: the MERGE's own conditions compare each matched row's information with
    the batch's on the table as the MERGE sees it. A commit during the MERGE is a Delta conflict: the MERGE is
    retried with a fresh read.

    With `options.state` (the stream's GateState) and the serving run's `options.as_of`, the gate's read is skipped
    when the state says every user of the batch is newer (the Delta log shows no commit but the stream's own since
    its last look); the state is kept up to date here. Returns the number of attempts.
    """
    opts = options or MergeOptions()
    if NEW_LEN not in recs.columns:
        recs = _with_list_lengths(recs)
    attempts = 0
    gates: list[DataFrame] = []  # each attempt's gate read, released after the MERGE

    def apply(target: DeltaTable) -> None:  # rebuilt per attempt: reads the table as it is now
        nonlocal attempts
        attempts += 1
        if opts.before_attempt is not None:
            opts.before_attempt(attempts)
        source = _attempt_source(spark, config, recs, run_id, batch_id, event_time, opts, gates)
        if opts.wrap_source is not None:
            source = opts.wrap_source(source)
        _merge(target, source, run_id)

    tag = batch_tag(config, batch_id)
    try:
        with session_conf(spark, _merge_conf(config, tag)):
            tables.merge(spark, config, *RECOMMENDATIONS, tag, apply)
    finally:
        release(*gates)
    if opts.state is not None:
        opts.state.max_batch = max(opts.state.max_batch, batch_id)
    return attempts


def _attempt_source(
    spark: SparkSession,
    config: ShelfConfig,
    recs: DataFrame,
    run_id: str,
    batch_id: int,
    event_time: datetime,
    opts: MergeOptions,
    gates: list[DataFrame],
) -> DataFrame:
    """One MERGE attempt's source: `recs` behind the newer-wins gate, read now (appended to `gates`), or `recs`
    itself when the GateState says every user of the batch is newer."""
    state = opts.state
    if state is None:
        current = tables.read(spark, config, *RECOMMENDATIONS)
    else:
        version, others = tables.commits_since(
            spark, config, *RECOMMENDATIONS, state.version, own_metadata=own_commits(config)
        )
        if opts.as_of is not None and state.trusted(run_id, batch_id, event_time, opts.as_of, others):
            return recs
        current = tables.read(spark, config, *RECOMMENDATIONS, version)
        state.read_run(current, run_id, version)
    source, gate = to_merge_source(recs, current, run_id, batch_id, event_time)
    gates.append(gate)
    return source


def _merge(target: DeltaTable, source: DataFrame, run_id: str) -> None:
    """The MERGE itself (see publish): replace same-rank rows, delete the old tail, insert new ranks, each matched
    row only if the batch's information is newer than the row's (as the gate)."""
    columns = [*[f.name for f in publishing.RECOMMENDATIONS_SCHEMA.fields], STREAM_BATCH, EVENT_TIME]
    assignments: dict[str, str | Column] = {c: F.col(f"s.{c}") for c in columns}
    # The run_id literal lets Delta skip the files of other runs (min/max stats) when it looks for matches.
    on = (
        f"t.{RUN_ID} = '{run_id}' AND t.{RUN_ID} = s.{RUN_ID} AND t.{USER_ID} = s.{USER_ID} "
        f"AND (t.{RANK} = s.{RANK} OR (s.{RANK} = s.{NEW_LEN} AND t.{RANK} > s.{RANK}))"
    )
    tail = F.col(f"t.{RANK}") > F.col(f"s.{RANK}")
    held = F.coalesce(F.col(f"t.{EVENT_TIME}"), F.col(f"t.{AS_OF}"))
    newer = (held < F.col(f"s.{EVENT_TIME}")) | (
        F.col(f"t.{STREAM_BATCH}").isNotNull() & (F.col(f"t.{STREAM_BATCH}") < F.col(f"s.{STREAM_BATCH}"))
    )
    (
        target.alias("t")
        .merge(source.alias("s"), on)
        .whenMatchedDelete(condition=tail & newer)
        .whenMatchedUpdate(condition=~tail & newer, set=assignments)
        .whenNotMatchedInsert(values=assignments)
        .execute()
    )


def _merge_conf(config: ShelfConfig, tag: str) -> dict[str, str]:
    """Session settings while the MERGE runs."""
    conf = {
        # The commit carries run_id=<tag> like every other write (DESCRIBE HISTORY: which batch wrote which version).
        "spark.databricks.delta.commitInfo.userMetadata": f"run_id={tag}",
        # The source is already materialised and deterministic (the lists' local checkpoint; after a gate read,
        # semi-joined with the gate's): Delta's own copy would be one more Spark job a batch.
        "spark.databricks.delta.merge.materializeSource": "none",
    }
    if config.stream.merge_broadcast_mb > 0:
        # The source (a micro-batch's lists) is small: broadcast, Delta's passes over it and the target (find the
        # touched files, write the new rows, mark the old ones deleted) need no shuffle. Measured: Delta's MERGE
        # 4.1 -> 2.8 s a batch on local[2] (benchmarks.stream_profile), for a broadcast job of its own.
        threshold = int(config.stream.merge_broadcast_mb * 1024 * 1024)
        conf["spark.sql.autoBroadcastJoinThreshold"] = str(threshold)
    return conf
