"""Prometheus text for `GET /metrics`: requests by list source, a latency histogram, accepted and rejected
events, the serving run, the events waiting for the landing table and the kernel's batches."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


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

    def render(self, run_id: str, buffered: int, kernel_calls: int = 0, kernel_requests: int = 0) -> str:
        """The exposition text; `kernel_calls` / `kernel_requests`: the dynamic batcher's calls and the requests
        they answered (their ratio is the mean batch size)."""
        with self.lock:
            lines = ["# TYPE shelf_requests_total counter"]
            lines += [f'shelf_requests_total{{source="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines.append("# TYPE shelf_request_seconds histogram")
            total = 0
            for bound, n in zip((*BUCKETS_S, float("inf")), self.buckets, strict=True):
                total += n
                lines.append(
                    f'shelf_request_seconds_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}} {total}'
                )
            lines += [f"shelf_request_seconds_sum {self.seconds:.6f}", f"shelf_request_seconds_count {total}"]
            lines += ["# TYPE shelf_events_total counter", f'shelf_events_total{{outcome="accepted"}} {self.accepted}']
            lines.append(f'shelf_events_total{{outcome="rejected"}} {self.rejected}')
            lines += ["# TYPE shelf_buffered_events gauge", f"shelf_buffered_events {buffered}"]
            lines += ["# TYPE shelf_kernel_calls_total counter", f"shelf_kernel_calls_total {kernel_calls}"]
            lines += ["# TYPE shelf_kernel_requests_total counter", f"shelf_kernel_requests_total {kernel_requests}"]
            lines += ["# TYPE shelf_serving_run gauge", f'shelf_serving_run{{run_id="{run_id}"}} 1']
        return "\n".join(lines) + "\n"
