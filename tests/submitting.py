"""Helpers for the tests that deploy shelf as a cluster would get it: the wheel built from this repo, the
spark-submit entry file taken out of it, and a run config without `spark.master` (spark-submit sets it).

tests/test_airflow.py runs every step this way (Airflow's SparkSubmitOperator calls pyspark's real
spark-submit with the wheel in --py-files).
"""

from __future__ import annotations

import csv
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from pipelines.core.config import ShelfConfig
from pipelines.core.jars import delta_jars
from pipelines.core.runs import make_context
from tests.conftest import REPO


def build_wheel(out_dir: Path) -> Path:
    """`pip wheel --no-deps` of this repo into `out_dir`; returns the wheel."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out_dir), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = out_dir.glob("shelf_recommender-*.whl")
    return wheel


def extract_entry(wheel: Path, out_dir: Path) -> Path:
    """The spark-submit entry file, taken out of the wheel (that is where a cluster gets it)."""
    with zipfile.ZipFile(wheel) as archive:
        target = out_dir / "submit.py"
        target.write_bytes(archive.read("pipelines/submit.py"))
    return target


def write_run_config(tmp_path: Path, **sections: dict[str, object]) -> Path:
    """conf/test.yaml with data and tables under `tmp_path` and no master (spark-submit sets it).

    base.yaml is copied next to the overlay, as a deployment ships both.
    """
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "base.yaml").write_text((REPO / "conf" / "base.yaml").read_text())
    overlay = yaml.safe_load((REPO / "conf" / "test.yaml").read_text())
    overlay["spark"] = {**overlay.get("spark", {}), "master": None, "jars_dir": str(REPO / ".jars")}
    overlay["storage"] = {**overlay.get("storage", {}), "root": str(tmp_path / "tables")}
    overlay["source"] = {
        **overlay.get("source", {}),
        "path": str(tmp_path / "demo" / "events"),
        "catalog_path": str(tmp_path / "demo" / "catalog"),
    }
    for key, values in sections.items():
        overlay[key] = {**overlay.get(key, {}), **values}
    path = conf_dir / "run.yaml"
    path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    return path


def generate_demo(config: ShelfConfig) -> None:
    """Write the tiny demo shop (no Spark) where the config's source points."""
    from pipelines.generate import run as generate

    generate(None, config, make_context(None, None, config.generate.end))


def delta_jar_list() -> str:
    jars = delta_jars(REPO / ".jars")
    if not jars:
        pytest.fail(f"The Delta jars are missing in {REPO / '.jars'}; run 'make setup' to fetch them.")
    return ",".join(str(p.resolve()) for p in jars)


def source_rows(config: ShelfConfig) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for part in sorted(Path(config.source.path).glob("*.csv")):
        with part.open(newline="") as handle:
            rows.extend(csv.DictReader(handle))
    return rows
