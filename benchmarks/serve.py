"""Benchmark: `shelf serve` on a finished run: load time and memory, one user's list in process (the published
lookup against the kernel re-run with 20 fresh events, alone and in batches), and HTTP through uvicorn on
127.0.0.1 at 1, 16 and 64 concurrent connections (GETs of users who posted 20 events, so every answer runs the
kernel), with dynamic batching off (`serve.max_batch` 1: the baseline) and on, in the same run; then the same load
against `--workers N` worker processes (`serve.workers`: each loads and tiles the run itself; the sessions are
POSTed to /v1/events first, so they reach every worker through the shared store), against the one process.

    make demo   # or any shelf run; then:
    .venv/bin/python -u -m benchmarks.serve --root .data/tables --users 200000 --seconds 10

The load comes from `wrk` in its own process when it is installed (`apt-get install wrk`), else from an httpx
client in this process (which then shares the server's GIL: a floor, not the capacity). `--users N` tiles the
run's kernel inputs to N users (new ids, same rows) to measure memory and lookups at that size. The figures
print with the command; docs/BENCHMARKS.md ("Serving") keeps the current ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pandas as pd

from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import load_config
from pipelines.serve.app import Service, create_app
from pipelines.serve.main import build, serve, worker_context
from pipelines.serve.ranking import Ask, Event, recommend, recommend_many
from pipelines.serve.state import ServingState, load_state

BENCH_ENV = "SHELF_BENCH_SERVE"  # this benchmark -> its multi-worker server: the config and the users to tile to


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def session(state: ServingState, user: str, n: int, rng: np.random.Generator) -> list[Event]:
    items = rng.choice(state.item_ids.ids, size=n)
    kinds = rng.choice(["view", "view", "view", "add_to_cart"], size=n)
    return [
        Event(user, str(i), str(k), state.as_of - timedelta(minutes=n - j))
        for j, (i, k) in enumerate(zip(items, kinds, strict=True))
    ]


def percentiles(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000.0
    return f"p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms"


def in_process(state: ServingState, config: object, users: list[str], events: int, rng: np.random.Generator) -> None:
    now = state.as_of
    lookup, kernel = [], []
    for user in users:
        started = time.perf_counter()
        recommend(state, config, user, [], 10, now)  # type: ignore[arg-type]
        lookup.append(time.perf_counter() - started)
        fresh = session(state, user, events, rng)
        started = time.perf_counter()
        recommend(state, config, user, fresh, 10, now)  # type: ignore[arg-type]
        kernel.append(time.perf_counter() - started)
    print(f"in process, {len(users)} users: published lookup {percentiles(lookup)}")
    print(f"in process, {len(users)} users: kernel with {events} fresh events {percentiles(kernel)}")
    print(f"ratio kernel / lookup at p50: {np.median(kernel) / np.median(lookup):.1f}x")
    for size in (1, 16, 64):
        asks = [Ask(u, tuple(session(state, u, events, rng)), 10, now) for u in users[: size * (len(users) // size)]]
        started = time.perf_counter()
        for at in range(0, len(asks), size):
            recommend_many(state, config, asks[at : at + size])  # type: ignore[arg-type]
        per = (time.perf_counter() - started) / max(len(asks), 1)
        print(f"in process, kernel in batches of {size:>2}: {per * 1000:.2f} ms per request")


async def load(base: str, users: list[str], clients: int, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def client(offset: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            n = offset
            while time.monotonic() < deadline:
                started = time.perf_counter()
                got = await http.get(f"/v1/users/{users[n % len(users)]}/recommendations")
                latencies.append(time.perf_counter() - started)
                errors += got.status_code != 200
                n += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, errors


def with_events(service: Service, users: list[str], events: int, rng: np.random.Generator) -> None:
    """Each user has posted `events` events (held by the service, as POST /v1/events leaves them)."""
    service.posted.add(e for user in users for e in session(service.state, user, events, rng))


def run_wrk(base: str, users: list[str], clients: int, seconds: float) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, errors) of `wrk` GETting the users' lists round-robin."""
    script = "local users = {" + ",".join(f'"{quote(u, safe="")}"' for u in users) + "}\nlocal n = 0\n"
    script += 'request = function()\n  n = n + 1\n  return wrk.format("GET", "/v1/users/" .. users[(n % #users) + 1] .. "/recommendations")\nend\n'
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{seconds:.0f}s", "--latency", "-s", lua.name, base],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    Path(lua.name).unlink()
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, _ms(out, "50%"), _ms(out, "99%"), int(errors.group(1)) if errors else 0


def _ms(out: str, label: str) -> float:
    value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def over_http(service: Service, users: list[str], seconds: float) -> dict[int, float]:
    """Requests/s at 1, 16, 64 connections against a uvicorn server in this process; prints each level."""
    import uvicorn

    from tests.servers import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base, rates = f"http://127.0.0.1:{port}", {}
    for clients in (1, 16, 64):
        if shutil.which("wrk"):
            rate, p50, p99, errors = run_wrk(base, users, clients, seconds)
            figures = f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        else:
            latencies, errors = asyncio.run(load(base, users, clients, seconds))
            rate, figures = len(latencies) / seconds, percentiles(latencies)
        rates[clients] = rate
        label = f"max_batch {service.config.serve.max_batch}"
        print(
            f"HTTP, {label}, {clients:>2} connections, {seconds:.0f} s: {rate:,.0f} requests/s, {figures}, {errors} errors"
        )
    print(
        f"  kernel calls {service.batcher.batches:,}, {service.batcher.batched / max(service.batcher.batches, 1):.1f} requests per call"
    )
    server.should_exit = True
    thread.join()
    return rates


def bench_worker() -> Any:
    """uvicorn's app factory in each worker of the multi-worker server: the parent's tiled state, its clock."""
    config, replica = worker_context()
    state = scaled(load_state(config), int(json.loads(os.environ[BENCH_ENV])["users"]))
    return build(config, replica, state, clock=lambda: state.as_of)


def workers_server() -> None:
    """In a child process: `shelf serve` with serve.workers processes whose app is `bench_worker`'s."""
    serve(ShelfConfig.model_validate(json.loads(os.environ[BENCH_ENV])["config"]), "benchmarks.serve:bench_worker")


def over_workers(
    config: ShelfConfig, state: ServingState, users: list[str], events: int, seconds: float
) -> dict[int, float]:
    """Requests/s at 1, 16, 64 connections against `serve.workers` processes; prints each level."""
    from tests.servers import free_port

    port, landing = free_port(), tempfile.mkdtemp(prefix="shelf-bench-landing-")
    quiet = {"port": port, "access_log": False}  # as the in-process server, which logs warnings only
    tuned = config.model_copy(update={"serve": config.serve.model_copy(update=quiet),
                                      "stream": config.stream.model_copy(update={"source_path": landing})})  # fmt: skip
    given = {"config": tuned.model_dump(mode="json"), "users": len(state.input_users)}
    code = "from benchmarks.serve import workers_server; workers_server()"
    server = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, BENCH_ENV: json.dumps(given)})
    base, rates = f"http://127.0.0.1:{port}", {}
    try:
        wait_for_workers(base, config.serve.workers, server)
        post_sessions(base, config, state, users, events)
        for clients in (1, 16, 64):
            rate, p50, p99, errors = run_wrk(base, users, clients, seconds)
            rates[clients] = rate
            print(f"HTTP, {config.serve.workers} workers, {clients:>2} connections, {seconds:.0f} s: {rate:,.0f} "
                  f"requests/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms, {errors} errors")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=120)
        shutil.rmtree(landing, ignore_errors=True)
    return rates


def wait_for_workers(base: str, workers: int, server: subprocess.Popen[bytes]) -> None:
    """Until /metrics counts every worker (each stores its metrics a second after it has loaded the run)."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if f"shelf_workers {workers}" in httpx.get(f"{base}/metrics").text.splitlines():
                return
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the {workers} workers did not all start (exit code {server.poll()})")


def post_sessions(base: str, config: ShelfConfig, state: ServingState, users: list[str], events: int) -> None:
    """Each user's session through POST /v1/events (in the source's event type names), as a tracker sends them."""
    source_type = {kind: name for name, kind in config.source.event_types.items()}
    rng = np.random.default_rng(7)
    posted = [
        {
            "user_id": e.user_id,
            "item_id": e.item_id,
            "event_type": source_type[e.event_type],
            "event_ts": e.event_ts.isoformat(),
        }  # fmt: skip
        for user in users
        for e in session(state, user, events, rng)
    ]
    with httpx.Client(base_url=base, timeout=60) as client:
        for at in range(0, len(posted), 1000):
            answer = client.post("/v1/events", json={"events": posted[at : at + 1000]}).json()
            assert answer["rejected"] == [], answer["rejected"][:3]


def scaled(state: ServingState, users: int) -> ServingState:
    """The state with its kernel inputs tiled to `users` rows (copies get new ids: '<id>~<copy>')."""
    if users <= len(state.input_users):
        return state
    base = len(state.input_users)
    ids = [
        f"{state.input_users[n % base]}~{n // base}" if n >= base else str(state.input_users[n]) for n in range(users)
    ]
    copies = np.arange(users) % base
    listed = state.listed.get_indexer(state.input_users[copies])  # each copy's published list is its original's
    assert (listed >= 0).all(), "every user with kernel inputs has a published list"
    lengths = np.diff(state.list_offsets)[listed]
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    rows = np.repeat(state.list_offsets[listed] - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
    return replace(
        state,
        rows=state.rows.take(copies),
        input_users=pd.Index(ids, dtype=object),
        listed=pd.Index(ids, dtype=object),
        list_offsets=offsets,
        lists=state.lists.take(rows),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".data/tables")
    p.add_argument("--conf", default=None)
    p.add_argument("--requests", type=int, default=1000, help="users timed in process")
    p.add_argument("--events", type=int, default=20, help="fresh events per user")
    p.add_argument("--seconds", type=float, default=10.0, help="load per concurrency level")
    p.add_argument("--users", type=int, default=0, help="tile the kernel inputs to this many users (0: as run)")
    p.add_argument("--workers", type=int, default=2, help="also measure this many worker processes (1: not)")
    args = p.parse_args()
    config = load_config(args.conf, [f"storage.root={args.root}"])
    before, started = rss_mb(), time.perf_counter()
    state = scaled(load_state(config), args.users)
    loaded = time.perf_counter() - started
    users = [str(u) for u in state.input_users]
    candidates = len(state.rows.values["cand_items"])
    print(
        f"run {state.run_id}: {len(users):,} users with kernel inputs, {candidates:,} candidates, {state.items.ids.size:,} items"
    )
    print(
        f"load {loaded:.2f} s, peak RSS +{rss_mb() - before:.0f} MB; kernel inputs {state.rows.nbytes / 1e6:.1f} MB as numpy "
        f"({state.rows.nbytes / max(candidates, 1):.1f} bytes per candidate; 1M users x 300 candidates: "
        f"{state.rows.nbytes / max(candidates, 1) * 3e8 / 1e9:.1f} GB), lists {state.lists.nbytes / 1e6:.1f} MB"
    )
    rng = np.random.default_rng(7)
    sample = [str(u) for u in rng.choice(users, size=min(args.requests, len(users)), replace=False)]
    in_process(state, config, sample, args.events, rng)
    rates = {}
    for max_batch in (1, config.serve.max_batch):
        tuned = config.model_copy(update={"serve": config.serve.model_copy(update={"max_batch": max_batch})})
        service = Service(tuned, state, clock=lambda: state.as_of)
        with_events(service, sample, args.events, rng)
        rates[max_batch] = over_http(service, sample, args.seconds)
    batched = rates[config.serve.max_batch]
    print(
        "dynamic batching / none, requests/s: "
        + ", ".join(f"{c} connections {batched[c] / rates[1][c]:.2f}x" for c in batched)
    )
    if args.workers > 1 and shutil.which("wrk"):
        spread = config.model_copy(update={"serve": config.serve.model_copy(update={"workers": args.workers})})
        several = over_workers(spread, state, sample, args.events, args.seconds)
        print(
            f"{args.workers} workers / one process (both batching), requests/s: "
            + ", ".join(f"{c} connections {several[c] / batched[c]:.2f}x" for c in several)
        )


if __name__ == "__main__":
    main()
