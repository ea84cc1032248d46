"""The posted-event store of `shelf serve` (pipelines/serve/posted.py) and the metrics its workers share: what one
worker process accepts, another reads back equal; each user keeps its newest events; forgetting is exact."""

from __future__ import annotations

import json
import multiprocessing
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="shelf serve's extra is not installed: pip install -e '.[serve]'")

from pipelines.serve.metrics import Metrics, render  # noqa: E402
from pipelines.serve.posted import PostedEvents  # noqa: E402
from pipelines.serve.ranking import Event  # noqa: E402

T0 = datetime(2026, 11, 2, 8, 30, 15, 123456)


def events(user: str, n: int, start: int = 0) -> list[Event]:
    return [Event(user, f"i{k}", "view", T0 + timedelta(seconds=k, microseconds=k)) for k in range(start, start + n)]


def test_events_read_back_equal_and_each_user_keeps_its_newest() -> None:
    store = PostedEvents(keep=5)
    store.add(events("u1", 3))
    store.add(events("u2", 2))
    store.add(events("u1", 4, start=3))
    assert store.of("u1") == events("u1", 7)[-5:]  # oldest first, the two oldest dropped as a deque(maxlen) would
    assert store.of("u2") == events("u2", 2)
    assert store.of("nobody") == []
    assert store.by_user() == {"u1": events("u1", 7)[-5:], "u2": events("u2", 2)}


def test_forget_removes_every_copy_of_the_named_events_only() -> None:
    store = PostedEvents(keep=10)
    twice = events("u1", 1)[0]
    store.add([twice, *events("u1", 3, start=1), twice])
    store.forget({"u1": {twice, events("u1", 1, start=2)[0]}})
    assert store.of("u1") == [events("u1", 1, start=1)[0], events("u1", 1, start=3)[0]]
    store.forget_before(T0 + timedelta(seconds=3))
    assert store.of("u1") == [events("u1", 1, start=3)[0]]


def _post(path: str, user: str) -> None:
    """In another process: accept two events into the shared file, as a second worker would."""
    PostedEvents(keep=5, path=Path(path)).add(events(user, 2))


def test_another_worker_process_sees_what_one_accepted(tmp_path: Path) -> None:
    shared = tmp_path / "posted.sqlite"
    here = PostedEvents(keep=5, path=shared)
    here.add(events("u1", 1))
    child = multiprocessing.get_context("spawn").Process(target=_post, args=(str(shared), "u2"))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert here.of("u2") == events("u2", 2)
    assert here.of("u1") == events("u1", 1)


def test_metrics_are_summed_over_the_workers_snapshots(tmp_path: Path) -> None:
    one, two = Metrics(), Metrics()
    one.observe("published", 0.0004)
    one.observe("reranked", 0.003)
    two.observe("reranked", 0.02)
    one.accepted, two.accepted, two.rejected = 3, 4, 1
    store = PostedEvents(keep=5, path=tmp_path / "posted.sqlite")
    store.put_snapshot("worker-2", json.dumps(two.snapshot(buffered=2, kernel_calls=1, kernel_requests=1)))
    others = [json.loads(s) for s in store.snapshots(but="worker-1")]
    text = render("run-a", [one.snapshot(buffered=5, kernel_calls=1, kernel_requests=1), *others])
    lines = set(text.splitlines())
    expected = {
        'shelf_requests_total{source="published"} 1',
        'shelf_requests_total{source="reranked"} 2',
        'shelf_request_seconds_bucket{le="0.001"} 1',
        'shelf_request_seconds_bucket{le="0.005"} 2',
        'shelf_request_seconds_bucket{le="0.025"} 3',
        'shelf_request_seconds_bucket{le="+Inf"} 3',
        "shelf_request_seconds_count 3",
        "shelf_request_seconds_sum 0.023400",
        'shelf_events_total{outcome="accepted"} 7',
        'shelf_events_total{outcome="rejected"} 1',
        "shelf_buffered_events 7",
        "shelf_kernel_calls_total 2",
        "shelf_workers 2",
        'shelf_serving_run{run_id="run-a"} 1',
    }
    assert expected <= lines, sorted(expected - lines)
    assert store.snapshots(but="worker-2") == [] and len(store.snapshots(but="worker-1")) == 1


def test_a_worker_starting_after_its_serve_process_and_folder_are_gone_exits_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The race of `shelf serve` SIGKILLed while a worker still starts: a sibling that left first removed the folder.
    The late worker exits 0 with the orphan's line; a worker whose serve process lives gets the error."""
    from pipelines.serve.main import WORKER_ENV, worker_app

    gone = tmp_path / "shelf-serve-x"
    monkeypatch.setenv(WORKER_ENV, json.dumps({"folder": str(gone), "parent": os.getpid()}))  # not our parent
    with pytest.raises(SystemExit) as exited:
        worker_app()
    assert exited.value.code == 0
    assert f"the serve process {os.getpid()} is gone; this worker shuts down" in caplog.text
    monkeypatch.setenv(WORKER_ENV, json.dumps({"folder": str(gone), "parent": os.getppid()}))
    with pytest.raises(FileNotFoundError, match="config.json"):
        worker_app()
