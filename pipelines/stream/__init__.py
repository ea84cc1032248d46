"""`shelf stream`: new events -> the affected users' lists in gold.recommendations, within seconds.

A Structured Streaming query reads the Delta table a tracker appends raw events to (`stream.source_path`,
default `<storage.root>/landing/events`; the columns batch ingest reads, mapped by `source.columns`), or with
`stream.source: kafka` the topic it publishes them to (pipelines/stream/kafka.py: JSON or CSV values), with
its checkpoint at `stream.checkpoint` and a `processing_time` (every `stream.interval_seconds`) or
`available_now` trigger. Each micro-batch (`foreachBatch`, batch id N, tag `<stream.name>-<N>`), with
`stream.shuffle_partitions` shuffle partitions:

1. validates the rows with batch ingest's own parsing and rules (`pipelines.core.events.classify`, stream.validate) and counts
   them by reason code, with the batch's event time T = its latest accepted event_ts, in one Spark job (no wall
   clock anywhere); input = accepted + quarantined is checked. The kernel's "now" is T + 1 s (fresh events must
   be strictly older than now). Events later than the serving run's as_of + `stream.max_hours_ahead` are
   quarantined as future_timestamp;
2. takes the serving run: the run of gold.recommendations with the latest as_of (the nightly publish),
   and its model: gold.candidates, gold.*_factors, gold.item_similarities of that run, silver indexes,
   silver.catalog; loaded once per serving run and cached (looked up again only when the table's Delta log
   shows a commit other than this stream's MERGEs);
3. for each user with accepted events: candidates = the stored gold.candidates of the serving run, plus
   the top `recommend.neighbours_per_item` neighbours of the items the batch touched, plus the
   `stream.popular_k` most popular items for users without ALS factors (users absent from
   silver.user_index get a batch-local negative user_idx: the kernel folds them in from their session);
   fresh events = silver.interactions of the serving run, the stream's earlier accepted events (kept in
   executor memory by RecentEvents, filled from bronze.stream_events on start) and this batch's rows, within
   max(rerank.fresh_days, rerank.bought_window_days) before now, for known items;
   Every join against the serving run's cached frames broadcasts the batch side (users, touched items,
   streamed events: bounded by the micro-batch), so those frames are never shuffled per batch;
4. re-ranks them with the batch kernel (`udfs.rerank` via `pipelines.core.reranking.rerank_frame` in
   `mapInPandas`, the item table broadcast), gives the rows the source's ids in the same pass (the item ids
   broadcast once per serving run: publishing.to_recommendations_pandas), materialises the new lists in one
   Spark job, and MERGEs each user's whole new list into the serving run's rows of gold.recommendations
   (deletion vectors on: a few users' rows are marked deleted, files are not rewritten): ranks beyond the new
   list's length are deleted; only inside the MERGE, broadcast joins are on (stream.merge_broadcast_mb), so
   the small source is broadcast and no pass shuffles. The batch's local checkpoints (users, lists, gate)
   are released once the MERGE is done (release). Stream rows keep the run's run_id and as_of
   and carry `stream_batch` (N) and `event_time` (T); nightly rows have them null. The lists are readable
   from this commit on;
5. the side writes, each replacing the tag's rows: rejected rows -> quarantine.events (step "stream",
   run_id = the tag) with their reason codes and accepted rows -> bronze.stream_events (BRONZE_EVENTS_SCHEMA),
   on a second thread from the batch's start; the counts -> ops.run_metrics and the batch's slice of the recent
   events, on a third thread while the MERGE runs. The batch ends when all are done. A crash anywhere is
   repaired by Spark's replay of the batch: its MERGE is a no-op (below), its side writes happen again. A batch
   id running for the first time (the one after a batch this process finished: StreamJob.next_fresh) has no
   rows to replace, so its side writes are blind appends, which read none of the table's files.

Newer information wins per user: a user's list has an information time, `event_time` for a stream list
and `as_of` for a nightly one. A micro-batch replaces the list only when T is later than that, or the
list was written by an earlier batch id (a later batch has seen every event an earlier one saw). So a
replayed batch id (after a crash) finds its own rows and changes nothing, a batch holding only events the
nightly already saw changes nothing, and a new nightly run takes over as the serving run. Users whose new
list is empty keep their list. The gate reads the table just before the MERGE (outside it: see publish), but
only when it must: the stream keeps what it knows of the serving run's rows (GateState), and while the Delta
log shows no commit but its own MERGEs since, a later batch id with T after the run's as_of is newer than
every row, so the read is skipped. The MERGE's conditions check each matched row again. Commits that lose to a
concurrent writer are retried (tables.merge): each attempt reads the log again, and the table when another
writer committed, so the gate sees the winner's rows.

Hooks: StreamJob's no-op methods before_merge_attempt, merge_source and after_batch_writes are where tests
step in (subclasses force a MERGE conflict, pause the MERGE's source inside its transaction, stop a batch after
its writes for a SIGKILL); production code reads no test switch.

Modules: serving (names, paths, the serving run and its cached model), kafka (the Kafka source and its messages
as canonical rows), validate (ingest's rules on a batch, counts), recent (the stream's recent events, local checkpoints), users (a batch's users, events, candidates and the
kernel pass), merge (the newer-wins MERGE and its gate state), side (side-write threads), job (StreamJob, the
query, `run`).

Output grain: gold.recommendations, one row per (run_id, user_id, rank).
"""
