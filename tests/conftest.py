"""One Spark session for the whole test run, built by shelf's own session builder (conf/test.yaml)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from pipelines.core import tables
from pipelines.core.config import ShelfConfig, load_config
from pipelines.core.session import get_spark

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def make_test_config(tmp_path: Path, *overrides: str) -> ShelfConfig:
    """conf/test.yaml with tables, demo data and checkpoints under `tmp_path`."""
    return load_config(
        REPO / "conf" / "test.yaml",
        [
            f"storage.root={tmp_path / 'tables'}",
            f"source.path={tmp_path / 'demo' / 'events'}",
            f"source.catalog_path={tmp_path / 'demo' / 'catalog'}",
            f"spark.jars_dir={REPO / '.jars'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkSession]:
    root = tmp_path_factory.mktemp("spark")
    session = get_spark(make_test_config(root))
    yield session
    session.stop()


@pytest.fixture
def config(tmp_path: Path) -> ShelfConfig:
    return make_test_config(tmp_path)


def shared_data(name: str) -> Path:
    """Path of a dataset in ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (real datasets exist only on developer and CI machines)")
    return path


def write_factor_tables(
    spark: SparkSession,
    config: ShelfConfig,
    run_id: str,
    user_factors: Mapping[int, Sequence[float]],
    item_factors: Mapping[int, Sequence[float]],
) -> None:
    """gold.user_factors and gold.item_factors of one run: one row per user_idx / item_idx with its vector."""
    schema = "features array<float>, run_id string"
    for name, idx, factors in (("user_factors", "user_idx", user_factors), ("item_factors", "item_idx", item_factors)):
        rows = [(i, [float(v) for v in vec], run_id) for i, vec in sorted(factors.items())]
        tables.write(spark.createDataFrame(rows, f"{idx} int, {schema}"), config, "gold", name, run_id)
