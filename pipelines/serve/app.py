"""The HTTP service: FastAPI routes over a ServingState, the events it was sent, and Prometheus metrics.

Every bad request is a 4xx with one sentence in `{"error": ...}`: FastAPI's validation errors are rewritten to
their first problem, bodies over `serve.max_body_bytes` are refused before they are read, ids with control
characters and unknown event types are rejected by field. The state is one reference swapped whole
(`Service.swap`), so a request sees one run from start to end.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path as LocalPath
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from pipelines.core.config import ShelfConfig
from pipelines.serve.batching import Batcher
from pipelines.serve.metrics import Metrics, render
from pipelines.serve.posted import PostedEvents
from pipelines.serve.ranking import Ask, Event, Ranked, held_by_run, horizon_days, published_list, recommend_many
from pipelines.serve.state import ServingState

MAX_K = 100
ID_PATTERN = r"^[^\x00-\x1f\x7f]{1,256}$"  # 1-256 characters, none of them a control character


class EventIn(BaseModel):
    """A tracker event: the ids as the source names them, a shelf event type, an ISO-8601 time (UTC if naive)."""

    model_config = ConfigDict(extra="forbid")
    user_id: str | None = Field(None, max_length=256)
    item_id: str | None = Field(None, max_length=256)
    event_type: str | None = Field(None, max_length=64)
    event_ts: datetime | None = None
    value: float | None = None
    session_id: str | None = Field(None, max_length=256)


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(max_length=1000)


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(default_factory=list, max_length=1000)
    k: int = Field(10, ge=1, le=MAX_K)


class ItemOut(BaseModel):
    item_id: str
    rank: int
    score: float
    reasons: list[str]


class ListOut(BaseModel):
    """A user's list (documentation only: answers are written with json.dumps, skipping FastAPI's encoder)."""

    user_id: str
    run_id: str
    source: str = Field(description="published | reranked | cold_start")
    items: list[ItemOut]


LIST_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"model": ListOut}}
Clock = Callable[[], datetime]
UserId = Annotated[str, Path(pattern=ID_PATTERN, description="the user id, as the source names it")]
ID_RE = re.compile(ID_PATTERN)
GET_LIST_PARAMETERS: dict[str, Any] = {  # the OpenAPI parameters of GET .../recommendations (parsed by hand)
    "parameters": [
        {
            "name": "user_id",
            "in": "path",
            "required": True,
            "description": "the user id, as the source names it",
            "schema": {"type": "string", "pattern": ID_PATTERN},
        },
        {
            "name": "k",
            "in": "query",
            "required": False,
            "description": "list length",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
        },
    ]
}


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Service:
    """The serving state, the events posted per user (bounded), the landing buffer and the metrics."""

    def __init__(
        self, config: ShelfConfig, state: ServingState, clock: Clock = utc_now, shared: LocalPath | None = None
    ) -> None:
        """`shared`: the SQLite file the workers of one replica share their posted events in (None: one worker,
        in memory)."""
        self.config, self.state, self.clock = config, state, clock
        self.lock = threading.Lock()
        self.posted = PostedEvents(config.rerank.max_fresh_events, shared)
        self.buffered: list[EventIn] = []  # accepted by this worker, not yet appended to the landing table
        self.metrics, self.worker = Metrics(), str(os.getpid())
        self.batcher = Batcher(self.rank_many, config.serve.max_batch, config.serve.batch_wait_ms / 1000.0)

    def snapshot(self) -> dict[str, Any]:
        """This worker's metrics; `share_metrics` stores them for the replica's other workers."""
        return self.metrics.snapshot(len(self.buffered), self.batcher.batches, self.batcher.batched)

    def share_metrics(self) -> None:
        self.posted.put_snapshot(self.worker, json.dumps(self.snapshot()))

    def rank_many(self, asks: list[Ask]) -> list[Ranked]:
        """One batch's lists, all on the state serving when the batch starts."""
        return recommend_many(self.state, self.config, asks)

    def swap(self, state: ServingState) -> None:
        """Serve `state` from the next request on (requests in flight finish on the one they started with), and
        forget the posted events the new run already holds, so none counts twice."""
        self.state = state
        posted = self.posted.by_user()
        self.posted.forget({user: held_by_run(state, self.config, user, events) for user, events in posted.items()})

    def prune(self, now: datetime) -> None:
        """Forget posted events past the fresh horizon at `now` (the kernel would drop them)."""
        self.posted.forget_before(now - timedelta(days=horizon_days(self.config)))

    def validate(self, event: EventIn, now: datetime) -> str | None:
        """The reason code ingest would give this event, or None when it is accepted."""
        if not event.user_id:
            return "null_user"
        if not event.item_id:
            return "null_item"
        if any(ord(c) < 32 or ord(c) == 127 for c in event.user_id + event.item_id):
            return "bad_id"
        if event.event_ts is None:
            return "bad_timestamp"
        if event.event_type not in self.config.source.event_types:
            return "unknown_event_type"
        if event.value is not None and event.value < 0:
            return "negative_value"
        if _naive(event.event_ts) > now + timedelta(hours=self.config.stream.max_hours_ahead):
            return "future_timestamp"
        return None

    def accept(self, events: list[EventIn], land: bool = True) -> list[dict[str, object]]:
        """Validate a batch; accepted events join their user's recent events and, when `land`, the landing buffer
        at once (events consumed from Kafka do not: shelf stream reads them from the topic)."""
        now = self.clock()
        rejected, accepted = [], []
        for at, event in enumerate(events):
            reason = self.validate(event, now)
            if reason is not None:
                rejected.append({"index": at, "reason": reason})
                continue
            accepted.append(event)
        self.posted.add(self.to_event(e) for e in accepted)
        if land:
            with self.lock:
                self.buffered.extend(accepted)
        self.metrics.accepted += len(events) - len(rejected)
        self.metrics.rejected += len(rejected)
        return rejected

    def to_event(self, event: EventIn) -> Event:
        kind = self.config.source.event_types[str(event.event_type)]
        return Event(str(event.user_id), str(event.item_id), kind, _naive(event.event_ts))  # type: ignore[arg-type]

    def drain(self) -> list[EventIn]:
        with self.lock:
            taken, self.buffered = self.buffered, []
        return taken


def create_app(service: Service, flush: Callable[[], int] | None = None) -> FastAPI:
    """The ASGI app. `flush` appends the buffered events to the landing table (called on shutdown too)."""
    app = FastAPI(title="shelf serve", version="1", description="Real-time re-ranking of the published lists.")
    app.state.service = service
    _errors(app, service)
    _routes(app, service, flush)
    return app


def _routes(app: FastAPI, service: Service, flush: Callable[[], int] | None) -> None:
    @app.get("/v1/users/{user_id}/recommendations", responses=LIST_RESPONSES, openapi_extra=GET_LIST_PARAMETERS)
    async def get_list(request: Request) -> Response:
        # The hot path parses its two parameters itself: FastAPI's parameter validation cost ~0.27 ms a request,
        # more than the HTTP stack around it (docs/BENCHMARKS.md, "Serving"). Same rules as `UserId` and `K`.
        user_id, k_text = request.path_params["user_id"], request.query_params.get("k", "10")
        if not ID_RE.fullmatch(user_id):  # not match: `$` also matches before a final newline
            return _error(422, "user_id: must be 1-256 characters, none a control character; see /docs.")
        if not (k_text.isascii() and k_text.isdigit() and 1 <= int(k_text) <= MAX_K):
            return _error(422, f"k: must be a whole number from 1 to {MAX_K}; see /docs for the request's schema.")
        return await _answer(service, user_id, service.posted.of(user_id), int(k_text))

    @app.post("/v1/users/{user_id}/recommendations", responses=LIST_RESPONSES)
    async def post_session(user_id: UserId, body: SessionIn) -> Response:
        events = [e.model_copy(update={"user_id": user_id}) for e in body.events]
        now = service.clock()
        bad = [{"index": i, "reason": r} for i, e in enumerate(events) if (r := service.validate(e, now))]
        if bad:
            return _error(422, f"Event {bad[0]['index']} of the session was rejected ({bad[0]['reason']}); fix it.")
        return await _answer(service, user_id, [service.to_event(e) for e in events], body.k)

    @app.post("/v1/events")
    def post_events(body: EventsIn) -> dict[str, Any]:
        rejected = service.accept(body.events)
        return {"accepted": len(body.events) - len(rejected), "rejected": rejected}

    @app.post("/v1/flush")
    def post_flush() -> dict[str, int]:
        return {"appended": flush() if flush else 0}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "run_id": service.state.run_id}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        others = [json.loads(s) for s in service.posted.snapshots(but=service.worker)]
        return render(service.state.run_id, [service.snapshot(), *others])


async def _answer(service: Service, user_id: str, events: list[Event], k: int) -> Response:
    """The published list straight away when no event is new, else the kernel's list from the next batch."""
    started = time.perf_counter()
    ranked = published_list(service.state, user_id, k) if not events else None
    if ranked is None:
        ranked = await service.batcher.rank(Ask(user_id, tuple(events), k, service.clock()))
    service.metrics.observe(ranked.source, time.perf_counter() - started)
    body = {"user_id": user_id, "run_id": ranked.run_id, "source": ranked.source, "items": ranked.items}
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


def _errors(app: FastAPI, service: Service) -> None:
    limit = service.config.serve.max_body_bytes

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "the body"
        return _error(422, f"{where}: {first.get('msg', 'invalid')}; see /docs for the request's schema.")

    app.add_middleware(BoundedBody, limit=limit)


class BoundedBody:
    """ASGI middleware: a body declared over `limit` bytes (or with a Content-Length that is not a number) is
    refused with 413 before it is read, and a body a route fails to parse as JSON answers 400. A plain ASGI
    class, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps every request and response in
    extra tasks and streams (a published list at 16 connections: ~1,470 -> ~1,575 requests/s without it)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length")
            if size is not None and (not size.isdigit() or int(size) > self.limit):
                refused = _error(413, f"The request body is over {self.limit} bytes; send fewer events per request.")
                await refused(scope, receive, send)
                return
        try:
            await self.app(scope, receive, send)
        except json.JSONDecodeError:
            await _error(400, "The request body is not valid JSON; send a JSON object.")(scope, receive, send)


def _error(status: int, sentence: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": sentence})


def _naive(ts: datetime) -> datetime:
    """UTC without tzinfo, as the tables hold it."""
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo is not None else ts
