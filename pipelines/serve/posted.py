"""The events a replica was posted (or consumed from Kafka), per user: the newest `rerank.max_fresh_events` of each
user, in SQLite, so that every worker process of a replica (`serve.workers`) sees what any of them accepted.

One worker keeps the database in memory; several share a file in the temporary folder `shelf serve` creates for
them, in WAL mode (readers never wait for a writer; a write waits at most `BUSY_MS` for another worker's). A GET
reads one user's rows by index (~45 us for 20 events, with the Event objects); a POST appends and trims that user
to the newest `keep`. Times are stored as integer microseconds since the epoch (naive UTC, as the tables hold
them), so a stored event reads back equal to the one posted.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

from pipelines.serve.ranking import Event

BUSY_MS = 5000
EPOCH = datetime(1970, 1, 1)
MICROSECOND = timedelta(microseconds=1)
SCHEMA = """
CREATE TABLE IF NOT EXISTS posted (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, item_id TEXT NOT NULL,
    event_type TEXT NOT NULL, event_us INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS posted_user ON posted (user_id, seq);
CREATE TABLE IF NOT EXISTS worker_metrics (worker TEXT PRIMARY KEY, snapshot TEXT NOT NULL);
"""


def _us(ts: datetime) -> int:
    return (ts - EPOCH) // MICROSECOND


class PostedEvents:
    """Per-user recent events in SQLite (see the module doc). `path` None: in this process's memory only."""

    def __init__(self, keep: int, path: Path | None = None) -> None:
        self.keep, self.lock = keep, threading.Lock()  # one connection per process, shared by its threads
        self.db = sqlite3.connect(
            ":memory:" if path is None else str(path), check_same_thread=False, timeout=BUSY_MS / 1000
        )
        if path is not None:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # a replica's posted events do not outlive it anyway
        with self.lock, self.db:
            self.db.executescript(SCHEMA)

    def add(self, events: Iterable[Event]) -> None:
        """Append events (in order); each user keeps only its newest `keep`."""
        rows = [(e.user_id, e.item_id, e.event_type, _us(e.event_ts)) for e in events]
        if not rows:
            return
        with self.lock, self.db:
            self.db.executemany("INSERT INTO posted (user_id, item_id, event_type, event_us) VALUES (?, ?, ?, ?)", rows)
            for user in {r[0] for r in rows}:
                self.db.execute(
                    "DELETE FROM posted WHERE user_id = ?1 AND seq <= (SELECT seq FROM posted WHERE user_id = ?1"
                    " ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                    (user, self.keep),
                )

    def of(self, user_id: str) -> list[Event]:
        """The user's posted events, oldest first."""
        with self.lock:
            rows = self.db.execute(
                "SELECT item_id, event_type, event_us FROM posted WHERE user_id = ? ORDER BY seq DESC LIMIT ?",
                (user_id, self.keep),
            ).fetchall()
        return [Event(user_id, item, kind, EPOCH + us * MICROSECOND) for item, kind, us in reversed(rows)]

    def by_user(self) -> dict[str, list[Event]]:
        """Every user's posted events, oldest first (for a swap or a prune, not per request)."""
        with self.lock:
            rows = self.db.execute("SELECT user_id, item_id, event_type, event_us FROM posted ORDER BY seq").fetchall()
        found: dict[str, list[Event]] = {}
        for user, item, kind, us in rows:
            found.setdefault(user, []).append(Event(user, item, kind, EPOCH + us * MICROSECOND))
        return found

    def forget(self, gone: dict[str, set[Event]]) -> None:
        """Delete these events of these users (every stored copy of each)."""
        rows = [(e.user_id, e.item_id, e.event_type, _us(e.event_ts)) for events in gone.values() for e in events]
        with self.lock, self.db:
            self.db.executemany(
                "DELETE FROM posted WHERE user_id = ? AND item_id = ? AND event_type = ? AND event_us = ?", rows
            )

    def forget_before(self, ts: datetime) -> None:
        """Delete every event older than `ts`."""
        with self.lock, self.db:
            self.db.execute("DELETE FROM posted WHERE event_us < ?", (_us(ts),))

    def close(self) -> None:
        self.db.close()

    def put_snapshot(self, worker: str, snapshot: str) -> None:
        """This worker's metrics (JSON), for the others' GET /metrics."""
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO worker_metrics VALUES (?, ?)", (worker, snapshot))

    def leave(self, worker: str) -> list[str]:
        """Remove this worker's metrics snapshot; returns the workers whose snapshots remain."""
        with self.lock, self.db:
            self.db.execute("DELETE FROM worker_metrics WHERE worker = ?", (worker,))
            return [w for (w,) in self.db.execute("SELECT worker FROM worker_metrics")]

    def snapshots(self, but: str) -> list[str]:
        """Every other worker's last metrics snapshot."""
        with self.lock:
            return [s for (s,) in self.db.execute("SELECT snapshot FROM worker_metrics WHERE worker != ?", (but,))]
