"""`shelf serve`: load the serving run, start uvicorn, append accepted events to the landing table in
micro-batches (delta-rs), swap to a newly published run when one appears, and flush on shutdown (SIGTERM)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path as LocalPath

import pyarrow as pa
from deltalake import write_deltalake
from fastapi import FastAPI

from pipelines.core import uris
from pipelines.core.config import ShelfConfig
from pipelines.core.logs import setup_logging
from pipelines.serve.app import Clock, EventIn, Service, create_app, utc_now
from pipelines.serve.posted import PostedEvents
from pipelines.serve.state import ServingState, load_state, serving_run
from pipelines.serve.storage import delta_rs_location

log = logging.getLogger("shelf.serve")
WORKER_ENV = "SHELF_SERVE_WORKER"  # serve -> its worker processes: its temporary folder and its pid
ORPHANED = "[serve] the serve process %d is gone; this worker shuts down"
WORKER_CONFIG = "config.json"  # in that folder (mode 0600): the config, secrets included, never in the environment


def landing_uri(config: ShelfConfig) -> str:
    """The landing table `shelf stream` reads (stream.source_path, else <storage.root>/landing/events)."""
    return config.stream.source_path or uris.join(config.storage.root, "landing", "events")


def to_landing(config: ShelfConfig, events: list[EventIn]) -> pa.Table:
    """Accepted events as landing rows: string columns named as the source names them (source.columns)."""
    names = config.source.columns  # event_type stays the source's own value (source.event_types maps it)

    def text(values: list[object]) -> list[str | None]:
        return [None if v is None else str(v) for v in values]

    columns = {
        names.user_id: text([e.user_id for e in events]),
        names.item_id: text([e.item_id for e in events]),
        names.event_type: text([e.event_type for e in events]),
        names.event_ts: [e.event_ts.isoformat() if e.event_ts else None for e in events],
    }
    if names.value:
        columns[names.value] = text([e.value for e in events])
    if names.session_id:
        columns[names.session_id] = text([e.session_id for e in events])
    return pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})


def flusher(service: Service) -> Callable[[], int]:
    """A function that appends the buffered events to the landing table as one Delta commit; returns how many."""
    target, options = delta_rs_location(landing_uri(service.config), service.config.spark.extra)

    def flush() -> int:
        events = service.drain()
        if events:
            write_deltalake(target, to_landing(service.config, events), mode="append", storage_options=options or None)
            log.info("[serve] appended %d events to %s", len(events), target)
        return len(events)

    return flush


def reloader(service: Service) -> Callable[[], bool]:
    """A function that swaps to the latest published run when it changed; returns whether it swapped."""

    def reload() -> bool:
        run_id, _ = serving_run(service.config)
        if run_id == service.state.run_id:
            return False
        service.swap(load_state(service.config, run_id))
        log.info("[serve] now serving run %s", run_id)
        return True

    return reload


@dataclass(frozen=True)
class Replica:
    """What each worker of a multi-worker `shelf serve` gets from it: its temporary folder (the SQLite file they
    share, the config) and the pid of the `shelf serve` process (a worker whose parent is no longer that pid shuts
    down)."""

    folder: LocalPath
    parent: int

    @property
    def shared(self) -> LocalPath:
        return self.folder / "posted.sqlite"

    def orphaned(self) -> bool:
        return os.getppid() != self.parent


def leave_replica(service: Service, replica: Replica) -> None:
    """A worker's last act when `shelf serve` was killed under it: the last worker alive removes the temporary folder
    `shelf serve` could not (each first removes its own metrics snapshot, then looks for live others)."""
    try:
        others = [int(w) for w in service.posted.leave(service.worker) if w.isdigit()]
    except sqlite3.Error:  # the folder is already gone: a sibling left first
        return
    if any(_alive(pid) for pid in others):
        return
    service.posted.close()
    claimed = replica.folder.with_name(replica.folder.name + ".gone")
    try:
        replica.folder.rename(claimed)  # atomic: of two workers leaving at once, one removes it
    except OSError:
        return
    shutil.rmtree(claimed, ignore_errors=True)
    log.info("[serve] removed %s: the last worker of a killed serve process", replica.folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def housekeeping(service: Service, replica: Replica | None, flush: Callable[[], int], stop: threading.Event) -> None:
    """Every 0.2 s until `stop`: flush every serve.flush_every_seconds (or at serve.flush_max_events) and forget
    events past the horizon; with a replica, store this worker's metrics every second, and shut down (SIGTERM to
    itself: uvicorn's shutdown flushes, then exits) once `shelf serve` is gone (killed under its workers)."""
    config, waited, ticks = service.config, 0.0, 0
    while not stop.wait(0.2):
        waited, ticks = waited + 0.2, ticks + 1
        if replica is not None and replica.orphaned():
            log.error(ORPHANED, replica.parent)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if replica is not None and ticks % 5 == 0:
            service.share_metrics()
        if len(service.buffered) >= config.serve.flush_max_events or waited >= config.serve.flush_every_seconds:
            flush()
            service.prune(service.clock())
            waited = 0.0


def build(
    config: ShelfConfig, replica: Replica | None = None, state: ServingState | None = None, clock: Clock = utc_now
) -> FastAPI:
    """The app with its background loops (`housekeeping`; a new run looked for every serve.reload_every_seconds;
    the Kafka consumer), flushing once more on shutdown. `replica`: this is one of several workers. `state` and
    `clock`: serve this state at this time (benchmarks) instead of the serving run now."""
    state = state or load_state(config)
    service = Service(config, state, clock, replica.shared if replica else None)
    if config.serve.kafka_consume:
        from pipelines.serve.consumer import consumer_settings

        consumer_settings(config)  # a missing secret stops the start here, with the variable's name
    flush, reload = flusher(service), reloader(service)
    stop = threading.Event()

    def loop() -> None:
        housekeeping(service, replica, flush, stop)

    def watch() -> None:
        while not stop.wait(config.serve.reload_every_seconds):
            try:
                reload()
            except Exception:  # a half-written run or a storage hiccup: keep serving the current one
                log.exception("[serve] reload failed; still serving run %s", service.state.run_id)

    def kafka() -> None:
        from pipelines.serve.consumer import consume

        try:
            consume(service, stop)
        except Exception:  # the service still answers from the published lists and POST /v1/events
            log.exception("[serve] the Kafka consumer stopped; lists no longer follow the topic")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loops = [loop, watch] + ([kafka] if config.serve.kafka_consume else [])
        threads = [threading.Thread(target=f, daemon=True, name=f"shelf-{f.__name__}") for f in loops]
        for thread in threads:
            thread.start()
        log.info("[serve] serving run %s (as_of %s)", state.run_id, state.as_of.isoformat())
        yield
        stop.set()
        appended = flush()
        log.info("[serve] shut down: %d buffered events appended", appended)
        if replica is not None and replica.orphaned():
            leave_replica(service, replica)

    app = create_app(service, flush)
    app.router.lifespan_context = lifespan
    return app


def serve(config: ShelfConfig, factory: str = "pipelines.serve.main:worker_app") -> None:
    """Run the service: one process, or `serve.workers` uvicorn worker processes on one port, each with its own copy
    of the serving run, sharing their posted events and metrics through a SQLite file in a temporary folder that
    lives as long as this process. `factory`: the import path of the workers' app factory (benchmarks pass theirs).
    """
    import uvicorn

    where = {"host": config.serve.host, "port": config.serve.port, "log_level": "info",
             "access_log": config.serve.access_log}  # fmt: skip
    if config.serve.workers == 1:
        uvicorn.run(build(config), **where)  # type: ignore[arg-type]
        return
    with tempfile.TemporaryDirectory(prefix="shelf-serve-") as folder:  # mode 0700
        replica = Replica(LocalPath(folder), os.getpid())
        PostedEvents(config.rerank.max_fresh_events, replica.shared).close()  # the schema and WAL mode, first
        opened = os.open(replica.folder / WORKER_CONFIG, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(opened, "w") as out:
            json.dump(config.model_dump(mode="json"), out)
        os.environ[WORKER_ENV] = json.dumps({"folder": folder, "parent": replica.parent})
        log.info("[serve] starting %d workers sharing %s", config.serve.workers, replica.shared)
        uvicorn.run(factory, factory=True, workers=config.serve.workers, **where)  # type: ignore[arg-type]


def handed_over() -> Replica:
    """In a worker process: the replica `shelf serve` handed over in the environment (its folder and its pid)."""
    given = json.loads(os.environ[WORKER_ENV])
    return Replica(LocalPath(given["folder"]), int(given["parent"]))


def worker_context() -> tuple[ShelfConfig, Replica]:
    """In a worker process: the config (in a file of the replica's folder) and the replica."""
    setup_logging()
    replica = handed_over()
    return ShelfConfig.model_validate_json((replica.folder / WORKER_CONFIG).read_text()), replica


def worker_app() -> FastAPI:
    """The app of one of `serve.workers` worker processes (uvicorn calls this in each). A worker still starting when
    `shelf serve` was killed may find the folder already removed by a sibling that left first: it then exits as an
    orphaned worker does."""
    try:
        return build(*worker_context())
    except (OSError, sqlite3.Error):
        replica = handed_over()
        if replica.orphaned() and not replica.folder.exists():
            log.error(ORPHANED, replica.parent)
            raise SystemExit(0) from None
        raise
