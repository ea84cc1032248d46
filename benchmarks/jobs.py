"""Where a `shelf run` spends its time, in Spark jobs: one run with Spark's event log on, read back per step.

Runs `shelf run` on the demo shop (conf/test.yaml's sizes unless --conf says otherwise) as one subprocess with
`spark.eventLog.enabled`, then books every Spark job to the step whose "[step] start" line came last before it
was submitted ("between" for the gaps: the gate, the summary) and prints per step: wall time (the step's own
"done in"), jobs, the sum of the jobs' durations and their tasks; then the call sites whose jobs took longest.
On tiny data most of a step is fixed cost: many small jobs (Delta snapshots, counts, AQE stages) rather than
work that grows with rows; this shows how many and where (issue 25).

    .venv/bin/python -u -m benchmarks.jobs                # the test shop, about 10k events
    .venv/bin/python -u -m benchmarks.jobs --set generate.users=3000
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^(\S+ \S+),(\d+) INFO shelf \[(\w+)\] (start|done in ([0-9.]+)s)")


def run(root: Path, conf: str, extra: list[str]) -> tuple[Path, str]:
    """`shelf run` under `root` with the event log in root/events; returns the log folder and shelf's stderr."""
    events = root / "events"
    events.mkdir(parents=True)
    settings = json.dumps(
        {"spark.eventLog.enabled": "true", "spark.eventLog.dir": str(events), "spark.eventLog.compress": "false"}
    )
    args = [
        str(Path(sys.executable).parent / "shelf"), "run", "--conf", conf,
        "--set", f"storage.root={root / 'tables'}",
        "--set", f"source.path={root / 'demo' / 'events'}",
        "--set", f"source.catalog_path={root / 'demo' / 'catalog'}",
        "--set", f"spark.extra={settings}",
        "--run-id", "jobs", "--as-of", "2026-11-01", *extra,
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return events, done.stderr


def read_events(folder: Path) -> list[dict]:
    """The event log's JSON events (written uncompressed, see `run`; Spark 4 rolls it into events_* files)."""
    return [
        json.loads(line)
        for part in sorted(folder.rglob("events_*"))
        for line in part.read_text().splitlines()
        if line.strip()
    ]


def step_windows(stderr: str) -> tuple[list[tuple[float, str]], dict[str, float]]:
    """(time in ms, step or "between") at every step start and end, and each step's own total "done in"."""
    marks: list[tuple[float, str]] = []
    walls: dict[str, float] = defaultdict(float)
    for line in stderr.splitlines():
        m = STEP_LINE.match(line)
        if not m:
            continue
        moment = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp() * 1000  # the log writes local time
        marks.append((moment + int(m[2]), m[3] if m[4] == "start" else "between"))
        if m[5]:
            walls[m[3]] += float(m[5])
    return marks, walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conf", default=str(REPO / "conf" / "test.yaml"))
    parser.add_argument("--set", action="append", default=[], help="a config override passed to shelf run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, stderr = run(Path(tmp), args.conf, [a for s in args.set for a in ("--set", s)])
        events = read_events(folder)
    marks, walls = step_windows(stderr)
    jobs: dict[int, list] = {}
    for e in events:
        if e["Event"] == "SparkListenerJobStart":
            site = e.get("Properties", {}).get("callSite.short", "") or "(no call site: Delta, AQE, ...)"
            tasks = sum(s["Number of Tasks"] for s in e.get("Stage Infos", []))
            jobs[e["Job ID"]] = [e["Submission Time"], e["Submission Time"], site.replace(str(REPO) + "/", ""), tasks]
        elif e["Event"] == "SparkListenerJobEnd":
            jobs[e["Job ID"]][1] = e["Completion Time"]
    per_step: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    per_site: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for start, end, site, tasks in jobs.values():
        step = next((s for t, s in reversed(marks) if t <= start), "session")
        seconds = (end - start) / 1000
        per_step[step][0] += 1
        per_step[step][1] += seconds
        per_step[step][2] += tasks
        per_site[site][0] += 1
        per_site[site][1] += seconds
    print(f"{len(jobs)} Spark jobs, {sum(v[1] for v in per_step.values()):.1f} job-seconds")
    print(f"{'step':14s} {'wall s':>7s} {'jobs':>5s} {'job s':>7s} {'tasks':>6s}")
    for step, (count, seconds, tasks) in sorted(per_step.items(), key=lambda x: -x[1][1]):
        print(f"{step:14s} {walls.get(step, 0.0):7.1f} {int(count):5d} {seconds:7.1f} {int(tasks):6d}")
    print("call sites by job time:")
    for site, (count, seconds) in sorted(per_site.items(), key=lambda x: -x[1][1])[:15]:
        print(f"  {int(count):4d} jobs {seconds:6.1f}s  {site}")


if __name__ == "__main__":
    main()
