"""Checks of `shelf serve` against a finished run (tests/test_end_to_end.py calls them on the session's demo run):
parity with the published lists and with the batch kernel, the HTTP contract, bad requests, the landing flush."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import reranking, tables
from pipelines.core.config import ShelfConfig
from pipelines.core.kernel_frames import rerank_frame
from pipelines.core.schemas import ITEM_IDX, RUN_ID, USER_ID, USER_IDX
from pipelines.serve.app import EventIn
from pipelines.serve.ranking import Ask, Event, rank_rows, recommend, recommend_many, with_events
from pipelines.serve.state import ServingState
from tests.conftest import REPO


def assert_every_list_is_the_kernel_on_the_stored_inputs(state: ServingState, config: ShelfConfig) -> int:
    """For every user with kernel inputs, the kernel re-run at as_of with no new event (in batches of 256 users,
    as the service's dynamic batching calls it) gives the published list exactly (items, ranks, scores,
    reasons): what the service loaded is what the batch re-ranked."""
    users = [str(u) for u in state.input_users]
    checked = 0
    for start in range(0, len(users), 256):
        batch = users[start : start + 256]
        rows = [with_events(state.user_row(u), state, config, [], state.as_of) for u in batch]  # type: ignore[arg-type]
        for user, ranked in zip(batch, rank_rows(state, rows, state.params.top_k), strict=True):
            published = state.published(user)
            assert published is not None, user
            expected = published.to_pandas()
            assert [i["item_id"] for i in ranked] == list(expected["item_id"]), user
            assert [i["rank"] for i in ranked] == list(expected["rank"])
            scores = np.array([i["score"] for i in ranked])
            assert np.allclose(scores, expected["score"].to_numpy(), rtol=1e-12, atol=0), user
            assert [i["reasons"] for i in ranked] == [list(r) for r in expected["reasons"]]
            checked += 1
    return checked


def batch_kernel_list(
    spark: SparkSession, state: ServingState, config: ShelfConfig, user: str, events: list[Event], now: datetime
) -> list[str]:
    """What the batch path (to_fresh_events -> to_capped_events -> to_user_rows -> the kernel) gives `user` at
    `now` with `events` added to silver.interactions: the reference the service must equal."""
    users = tables.read(spark, config, "silver", "user_index").filter(F.col(USER_ID) == user)
    items = tables.read(spark, config, "silver", "item_index")
    (user_idx,) = [r[USER_IDX] for r in users.collect()]
    idx = dict((r[0], r[1]) for r in items.filter(F.col("item_id").isin([e.item_id for e in events])).collect())
    added = spark.createDataFrame(
        [(user_idx, idx[e.item_id], e.event_type, e.event_ts) for e in events],
        "user_idx int, item_idx int, event_type string, event_ts timestamp",
    )
    mine = tables.read(spark, config, "silver", "interactions").filter(F.col(USER_IDX) == user_idx)
    history = mine.select(USER_IDX, ITEM_IDX, "event_type", "event_ts").unionByName(added)
    fresh = reranking.to_fresh_events(history, config.rerank, now, config.consumed_event_types)
    capped = reranking.to_capped_events(fresh, config.rerank.max_fresh_events)
    run = state.run_id
    candidates = tables.read(spark, config, "gold", "candidates").filter(
        (F.col(RUN_ID) == run) & (F.col(USER_IDX) == user_idx)
    )
    factors = tables.read(spark, config, "gold", "user_factors")
    rows = reranking.to_user_rows(
        reranking.to_capped_candidates(candidates, config.rerank.max_candidates), factors, capped
    )
    pdf = rows.toPandas()
    ranked = rerank_frame(pdf, state.items, replace(state.params, top_k=10), name_items=state.item_ids.of)
    return list(state.item_ids.of(ranked[ITEM_IDX].to_numpy(dtype=np.int64)))


def session_events(state: ServingState, user: str, now: datetime) -> list[Event]:
    """Three events a page might send: views and a cart of items the user's list does not start with."""
    listed = set(state.published(user).column("item_id").to_pylist())  # type: ignore[union-attr]
    others = [str(i) for i in state.item_ids.ids if str(i) not in listed][:3]
    kinds = ["view", "view", "add_to_cart"]
    return [
        Event(user, item, kind, now - timedelta(minutes=5 - n))
        for n, (item, kind) in enumerate(zip(others, kinds, strict=True))
    ]


def stored_and_new_event(state: ServingState, now: datetime) -> tuple[str, Event, Event]:
    """A user whose stored kernel row holds a fresh event: (user, that event as a page would post it, an event
    after the run's as_of)."""
    for user in state.input_users:
        row = state.user_row(str(user))
        assert row is not None
        items, ages = row.ev_items, row.ev_ages
        if len(items):
            item = str(state.item_ids.of(np.asarray(items[:1], dtype=np.int64))[0])
            ts = state.as_of - timedelta(seconds=round(float(ages[0]) * 86400))
            return str(user), Event(str(user), item, "view", ts), Event(str(user), item, "view", now)
    raise AssertionError("no user of the run has a fresh event")


def check_batches_answer_as_single_requests(state: ServingState, config: ShelfConfig, now: datetime) -> None:
    """One kernel call for several requests (known users with events at two list lengths, a new user, one with no
    event) answers each exactly as that request alone."""
    users = [str(u) for u in state.input_users[:4]]
    asks = [Ask(u, tuple(session_events(state, u, now)), 5 + 5 * (n % 2), now) for n, u in enumerate(users)]
    asks.append(Ask("someone-new", tuple(session_events(state, users[0], now)[:1]), 10, now))
    asks.append(Ask(users[0], (), 10, now))
    together = recommend_many(state, config, asks)
    alone = [recommend(state, config, a.user_id, list(a.events), a.k, now) for a in asks]
    assert together == alone
    assert [a.source for a in together] == ["reranked"] * 4 + ["cold_start", "published"]
    assert [len(a.items) for a in together] == [5, 10, 5, 10, 10, 10]


def check_serves_the_lists_from_a_bucket(
    config: ShelfConfig, local: DataFrame, victim: str, s3: Any, bucket: str
) -> None:
    """The serving state loaded from an s3a:// root holds the local run's published lists for every user but the
    forgotten one; a flush appends to the bucket's landing table."""
    from deltalake import DeltaTable

    from pipelines.serve.app import Service
    from pipelines.serve.main import flusher
    from pipelines.serve.state import load_state

    state = load_state(config)
    expected: dict[str, list[str]] = {}
    for row in local.orderBy(USER_ID, "rank").select(USER_ID, "item_id").collect():
        expected.setdefault(row[USER_ID], []).append(row["item_id"])
    served = {str(u): state.published(str(u)).column("item_id").to_pylist() for u in state.listed}  # type: ignore[union-attr]
    assert victim not in served and served == {u: items for u, items in expected.items() if u != victim}
    service = Service(config, state)
    user = next(iter(served))
    service.accept([EventIn(user_id=user, item_id=served[user][0], event_type="view", event_ts=state.as_of)])
    assert flusher(service)() == 1
    landed = DeltaTable(f"s3://{bucket}/shelf/landing/events", storage_options=s3.delta_rs_options()).to_pandas()
    assert landed["user_id"].tolist() == [user]


def check_http_contract(client: Any, state: ServingState, user: str, now: datetime) -> None:
    """GET answers the published list; posted events change the next GET at once; a new user gets a list."""
    first = client.get(f"/v1/users/{user}/recommendations", params={"k": 5})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["source"] == "published" and body["run_id"] == state.run_id
    assert [i["item_id"] for i in body["items"]] == state.published(user).column("item_id").to_pylist()[:5]  # type: ignore[union-attr]
    events = session_events(state, user, now)
    posted = {
        "events": [
            {"user_id": e.user_id, "item_id": e.item_id, "event_type": e.event_type, "event_ts": e.event_ts.isoformat()}
            for e in events
        ]
    }
    posted["events"].append({"user_id": user, "item_id": "x", "event_type": "teleport", "event_ts": now.isoformat()})
    posted["events"].append({"user_id": "", "item_id": "x", "event_type": "view", "event_ts": now.isoformat()})
    answer = client.post("/v1/events", json=posted)
    assert answer.status_code == 200 and answer.json() == {
        "accepted": 3,
        "rejected": [{"index": 3, "reason": "unknown_event_type"}, {"index": 4, "reason": "null_user"}],
    }, answer.text
    after = client.get(f"/v1/users/{user}/recommendations").json()
    assert after["source"] == "reranked" and len(after["items"]) == 10
    cold = client.get("/v1/users/someone-new/recommendations").json()
    assert cold["source"] == "cold_start" and len(cold["items"]) == 10
    metrics = client.get("/metrics").text
    assert 'shelf_requests_total{source="published"} 1' in metrics and "shelf_buffered_events 3" in metrics
    assert "shelf_kernel_calls_total 2" in metrics and "shelf_kernel_requests_total 2" in metrics  # re-ranked, cold
    assert client.get("/healthz").json() == {"status": "ok", "run_id": state.run_id}


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int]] = [
    ("get", "/v1/users/u1/recommendations?k=0", {}, 422),
    ("get", "/v1/users/u1/recommendations?k=100000", {}, 422),
    ("get", "/v1/users/u1/recommendations?k=ten", {}, 422),
    ("get", "/v1/users/bad%01id/recommendations", {}, 422),
    ("get", "/v1/users/u1/recommendations?k=%C2%B2", {}, 422),  # "²": a digit to str.isdigit, not to int()
    ("get", f"/v1/users/{'x' * 257}/recommendations", {}, 422),
    ("get", "/v1/users/u1%0A/recommendations", {}, 422),  # a final newline: `$` would match before it
    ("post", "/v1/events", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
    ("post", "/v1/events", {"json": {"events": "many"}}, 422),
    ("post", "/v1/events", {"json": {"events": [{"user_id": 5, "extra": 1}]}}, 422),
    ("post", "/v1/events", {"content": b"x" * 2_000_000, "headers": {"content-type": "application/json"}}, 413),
    ("post", "/v1/users/u1/recommendations", {"json": {"k": -1}}, 422),
]


def check_bad_requests(client: Any) -> None:
    for method, path, kwargs, status in BAD_REQUESTS:
        got = getattr(client, method)(path, **kwargs)
        assert got.status_code == status, (path, got.status_code, got.text)
        sentence = got.json()["error"]
        assert isinstance(sentence, str) and sentence.endswith(".") and "\n" not in sentence, sentence


def check_no_request_makes_it_answer_500(client: Any) -> None:
    """Property: whatever JSON arrives at /v1/events or a user's session, and whatever id and k a GET names, the
    answer is 2xx or a 4xx with one sentence (hypothesis, a few hundred cases)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=12,
    )
    event = st.fixed_dictionaries(
        {}, optional={k: values for k in ("user_id", "item_id", "event_type", "event_ts", "value", "session_id")}
    )
    bodies = values | st.fixed_dictionaries({"events": st.lists(event, max_size=5)}, optional={"k": values})
    quick = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

    @quick
    @given(body=bodies)
    def posts(body: Any) -> None:
        for path in ("/v1/events", "/v1/users/u000001/recommendations"):
            got = client.post(path, json=body)
            assert got.status_code < 500, (path, body, got.text)
            if got.status_code >= 400:
                assert isinstance(got.json()["error"], str)

    @quick
    @given(user=st.text(min_size=1, max_size=40), k=st.text(max_size=8))
    def gets(user: str, k: str) -> None:
        got = client.get(f"/v1/users/{quote(user, safe='')}/recommendations", params={"k": k})
        assert got.status_code < 500, (user, k, got.text)

    posts()
    gets()


@contextlib.contextmanager
def running_server(root: Path, port: int, log: Path, *sets: str) -> Iterator[subprocess.Popen[bytes]]:
    """`shelf serve` as users start it, on conf/test.yaml with tables under `root`; stopped (SIGKILL) if a check
    fails before the test stops it itself."""
    script = Path(sys.executable).parent / "shelf"
    args = [str(script), "serve", "--conf", str(REPO / "conf" / "test.yaml"), "--set", f"storage.root={root}"]
    args += ["--set", f"serve.port={port}", *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    with log.open("wb") as out:
        server = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            yield server
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
