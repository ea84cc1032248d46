"""`shelf run` end to end at several generated data sizes: wall time per step and peak memory.

For each size the demo shop is scaled to about N events (users = N / 32, the generator's mean events
per user; items grow with the square root of users; bot events in proportion to users), generated once (timed apart from the run),
then `shelf run` runs as one subprocess on `conf/local.yaml` (local[*]) under a fresh storage root.
A sampler reads the resident memory of the whole process tree (Python driver, its JVM, the Python
workers) every 0.2 s and books each sample to the step whose "[step] start" line came last, so the
table shows each step's wall time (from the step's own "done in" log line) and the peak memory of
the tree while it ran. The JVM's heap is capped by `spark.driver_memory` (default 4g);
the peak RSS includes it and the Python workers.

    .venv/bin/python -u -m benchmarks.e2e --events 100000 1000000 3000000
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

EVENTS_PER_USER = 32  # generate's mean: 6 sessions x (4 views + carts + purchases), measured on the default shop
STEP_LINE = re.compile(r"\[(\w+)\] (start|done in ([0-9.]+)s)")


def shape(events: int) -> tuple[int, int]:
    """(users, items) of a demo shop with about `events` events."""
    users = max(200, events // EVENTS_PER_USER)
    items = max(400, int(20 * math.sqrt(users)))
    return users, items


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (vanished children count 0)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def shelf(args: list[str], root: Path, users: int, items: int, seed: int) -> list[str]:
    overrides = {
        "storage.root": root / "tables",
        "source.path": root / "events",
        "source.catalog_path": root / "catalog",
        "generate.users": users,
        "generate.items": items,
        "generate.seed": seed,
        # Bots keep the default shop's share of events (3 bots x 3,000 events per 2,000 users), so the
        # quality gate's quarantine-rate ceiling sees the same mix at every size.
        "generate.bot_events": max(100, 3000 * users // 2000),
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    return [str(Path(sys.executable).parent / "shelf"), *args, "--conf", "conf/local.yaml", *sets]


def run_measured(cmd: list[str]) -> tuple[dict[str, float], dict[str, int], float, int]:
    """Run `cmd`; returns (seconds per step, peak tree RSS per step, wall seconds, overall peak RSS)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    current = ["(start-up)"]
    peaks: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                rss = tree_rss(ps)
            except psutil.NoSuchProcess:
                return
            peaks[current[0]] = max(peaks[current[0]], rss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tail: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        tail = [*tail[-30:], line]
        match = STEP_LINE.search(line)
        if match and match.group(2) == "start":
            current[0] = match.group(1)
        elif match:  # a step that runs twice (the holdout rehearsal, then the publish) counts both
            seconds[match.group(1)] = seconds.get(match.group(1), 0.0) + float(match.group(3))
    code = proc.wait()
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    if code != 0:
        sys.stderr.write("".join(tail))
        raise SystemExit(f"shelf {cmd[1]} failed with exit code {code}")
    return seconds, dict(peaks), wall, max(peaks.values(), default=0)


def count_events(root: Path) -> int:
    import pyarrow.dataset as ds

    return int(ds.dataset(str(root / "events"), format="csv").count_rows())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, nargs="+", default=[100_000, 1_000_000, 3_000_000])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workdir", default=None, help="where to put data (default: a temporary directory)")
    args = p.parse_args(argv)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="shelf-e2e-"))
    gib = 1024**3
    rows = []
    for target in args.events:
        users, items = shape(target)
        root = base / f"n{target}"
        gen_s, _, _, gen_peak = run_measured(shelf(["generate"], root, users, items, args.seed))
        events = count_events(root)
        seconds, peaks, wall, peak = run_measured(shelf(["run"], root, users, items, args.seed))
        steps = [s for s in seconds if s != "generate"]
        print(
            f"{events:>10,} events ({users:,} users x {items:,} items) | generate {gen_s.get('generate', 0):.1f}s "
            f"| run {wall:.1f}s wall, peak {peak / gib:.2f} GiB",
            flush=True,
        )
        for step in steps:
            print(f"    {step:<13} {seconds[step]:8.1f}s   peak {peaks.get(step, 0) / gib:5.2f} GiB", flush=True)
        rows.append((events, users, items, seconds, peaks, wall, peak, gen_s.get("generate", 0.0), gen_peak))
    print("\n| events | users x items | " + " | ".join(rows[0][3]) + " | run wall | peak RSS |")
    print("|---:|---:|" + "---:|" * (len(rows[0][3]) + 2))
    for events, users, items, seconds, peaks, wall, peak, _, _ in rows:
        cells = [f"{seconds[s]:.1f} s / {peaks.get(s, 0) / gib:.1f} GiB" for s in rows[0][3]]
        print(
            f"| {events:,} | {users:,} x {items:,} | " + " | ".join(cells) + f" | {wall:.0f} s | {peak / gib:.2f} GiB |"
        )


if __name__ == "__main__":
    main()
