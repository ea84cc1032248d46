"""Benchmark: `shelf serve` on a finished run: load time and memory, one user's list in process (the published
lookup against the kernel re-run with 20 fresh events), and HTTP through uvicorn on 127.0.0.1 at 1, 16 and 64
concurrent clients (GETs of users who posted 20 events, so every answer runs the kernel).

    make demo   # or any shelf run; then:
    .venv/bin/python -u -m benchmarks.serve --root .data/tables --requests 2000 --seconds 10

The figures print with the command; docs/BENCHMARKS.md ("Serving") keeps the current ones.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import threading
import time
from datetime import timedelta

import httpx
import numpy as np

from pipelines.core.config_loading import load_config
from pipelines.serve.app import Service, create_app
from pipelines.serve.ranking import Event, recommend
from pipelines.serve.state import ServingState, load_state


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


def over_http(service: Service, users: list[str], events: int, seconds: float, rng: np.random.Generator) -> None:
    import uvicorn

    from tests.servers import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    for user in users:
        body = [
            {"user_id": e.user_id, "item_id": e.item_id, "event_type": e.event_type, "event_ts": e.event_ts.isoformat()}
            for e in session(service.state, user, events, rng)
        ]
        httpx.post(f"{base}/v1/events", json={"events": body})
    for clients in (1, 16, 64):
        latencies, errors = asyncio.run(load(base, users, clients, seconds))
        print(
            f"HTTP, {clients:>2} clients, {seconds:.0f} s: {len(latencies) / seconds:,.0f} requests/s, {percentiles(latencies)}, {errors} errors"
        )
    server.should_exit = True
    thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".data/tables")
    p.add_argument("--conf", default=None)
    p.add_argument("--requests", type=int, default=1000, help="users timed in process")
    p.add_argument("--events", type=int, default=20, help="fresh events per user")
    p.add_argument("--seconds", type=float, default=10.0, help="load per concurrency level")
    args = p.parse_args()
    config = load_config(args.conf, [f"storage.root={args.root}"])
    before, started = rss_mb(), time.perf_counter()
    state = load_state(config)
    loaded = time.perf_counter() - started
    users = [str(u) for u in state.input_users]
    candidates = len(state.inputs.column("cand_items").combine_chunks().values)
    print(
        f"run {state.run_id}: {len(users):,} users with kernel inputs, {candidates:,} candidates, {state.items.ids.size:,} items"
    )
    print(
        f"load {loaded:.2f} s, peak RSS +{rss_mb() - before:.0f} MB; kernel inputs {state.inputs.nbytes / 1e6:.1f} MB in Arrow "
        f"({state.inputs.nbytes / max(candidates, 1):.1f} bytes per candidate; 1M users x 300 candidates: "
        f"{state.inputs.nbytes / max(candidates, 1) * 3e8 / 1e9:.1f} GB), lists {state.lists.nbytes / 1e6:.1f} MB"
    )
    rng = np.random.default_rng(7)
    sample = [str(u) for u in rng.choice(users, size=min(args.requests, len(users)), replace=False)]
    in_process(state, config, sample, args.events, rng)
    over_http(Service(config, state, clock=lambda: state.as_of), sample, args.events, args.seconds, rng)


if __name__ == "__main__":
    main()
