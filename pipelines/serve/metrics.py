"""Prometheus text for `GET /metrics`: requests by list source, a latency histogram, accepted and rejected
events, the serving run, the events waiting for the landing table and the kernel's batches; summed over the
workers of a replica (`serve.workers`: each worker stores its snapshot where the others read it, every second)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import Any

import numpy as np

BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
SUMMED = ("seconds", "accepted", "rejected", "buffered", "kernel_calls", "kernel_requests")


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.buckets = [0] * (len(BUCKETS_S) + 1)
        self.seconds = 0.0
        self.accepted = 0
        self.rejected = 0

    def observe(self, source: str, seconds: float) -> None:
        with self.lock:
            self.requests[source] += 1
            self.buckets[bisect.bisect_left(BUCKETS_S, seconds)] += 1
            self.seconds += seconds

    def snapshot(self, buffered: int, kernel_calls: int = 0, kernel_requests: int = 0) -> dict[str, Any]:
        """This worker's figures as a JSON-able dict; `kernel_calls` / `kernel_requests`: the dynamic batcher's calls
        and the requests they answered (their ratio is the mean batch size)."""
        with self.lock:
            return {"requests": dict(self.requests), "buckets": list(self.buckets), "seconds": self.seconds,
                    "accepted": self.accepted, "rejected": self.rejected, "buffered": buffered,
                    "kernel_calls": kernel_calls, "kernel_requests": kernel_requests}  # fmt: skip


def render(run_id: str, snapshots: list[dict[str, Any]]) -> str:
    """The exposition text of the workers' snapshots summed (one replica's figures, whichever worker answers)."""
    requests: Counter[str] = Counter()
    for snap in snapshots:
        requests.update(snap["requests"])
    buckets = np.sum([snap["buckets"] for snap in snapshots], axis=0).tolist()
    total = {key: sum(snap[key] for snap in snapshots) for key in SUMMED}
    lines = ["# TYPE shelf_requests_total counter"]
    lines += [f'shelf_requests_total{{source="{s}"}} {n}' for s, n in sorted(requests.items())]
    lines.append("# TYPE shelf_request_seconds histogram")
    count = 0
    for bound, n in zip((*BUCKETS_S, float("inf")), buckets, strict=True):
        count += n
        lines.append(f'shelf_request_seconds_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}} {count}')
    lines += [f"shelf_request_seconds_sum {total['seconds']:.6f}", f"shelf_request_seconds_count {count}"]
    lines += ["# TYPE shelf_events_total counter", f'shelf_events_total{{outcome="accepted"}} {total["accepted"]}']
    lines.append(f'shelf_events_total{{outcome="rejected"}} {total["rejected"]}')
    lines += ["# TYPE shelf_buffered_events gauge", f"shelf_buffered_events {total['buffered']}"]
    lines += ["# TYPE shelf_kernel_calls_total counter", f"shelf_kernel_calls_total {total['kernel_calls']}"]
    lines += ["# TYPE shelf_kernel_requests_total counter", f"shelf_kernel_requests_total {total['kernel_requests']}"]
    lines += ["# TYPE shelf_workers gauge", f"shelf_workers {len(snapshots)}"]
    lines += ["# TYPE shelf_serving_run gauge", f'shelf_serving_run{{run_id="{run_id}"}} 1']
    return "\n".join(lines) + "\n"
