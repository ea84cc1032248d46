"""One Spark session for the whole test run, built by shelf's own session builder (conf/test.yaml)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from chispa import assert_approx_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core import tables
from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import load_config
from pipelines.core.jars import KAFKA_BROKER_FOLDER, kafka_jars
from pipelines.core.schemas import RUN_ID
from pipelines.core.session import get_spark

if TYPE_CHECKING:
    from tests.servers import S3, Kafka

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# The files that take longest (minutes each: real servers, whole runs), longest first. make test's two workers
# take files in collection order (pytest-xdist --dist loadfile --no-loadscope-reorder), so these start first
# and the short files fill in around them; ordered by test count instead, they came last and one worker ran
# them alone for 26 minutes. xdist hands each worker two files to start with (the 1st and 3rd to one, the 2nd
# and 4th to the other): test_clusters and test_end_to_end, which share `demo_run`, go to the same worker, so
# the other does not wait for that run.
SLOWEST_FILES = (
    "test_clusters.py",
    "test_airflow.py",
    "test_end_to_end.py",
    "test_stream.py",
    "test_faults.py",
    "test_notebooks.py",
    "test_kafka.py",
)


# Module fixtures that build whole runs (a nightly publish, a streamed day, a re-rank world): every test that uses
# one is in the `steps` tier, whatever it does itself.
RUN_FIXTURES = frozenset({"nightly", "streamed", "world", "per_user", "demo_run", "prefix"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest files first, every file's tests in their own order; tests on run-building fixtures marked
    `steps` (make test-fast leaves them out)."""
    for item in items:
        if RUN_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.steps)
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))


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
    # With Spark's Kafka source fetched (make test does), the shared session loads it, for tests/test_kafka.py.
    kafka_source = ["stream.source=kafka"] if kafka_jars(REPO / ".jars") else []
    session = get_spark(make_test_config(root, *kafka_source))
    yield session
    session.stop()


@pytest.fixture
def config(tmp_path: Path) -> ShelfConfig:
    return make_test_config(tmp_path)


DEMO_RUN_ID = "e2e"
DEMO_AS_OF = "2026-11-01"
# The tables a run on another engine (Spark Connect, a standalone cluster) must write exactly as a local run does.
COMPARED_TABLES = (("silver", "interactions"), ("gold", "candidates"), ("gold", "recommendations"))


def demo_run_args(root: Path, *extra: str) -> list[str]:
    """`shelf run` on conf/test.yaml's demo shop with tables and data under `root`, run id e2e, as of 2026-11-01."""
    return [
        "run", "--conf", str(REPO / "conf/test.yaml"),
        "--set", f"storage.root={root / 'tables'}",
        "--set", f"source.path={root / 'demo' / 'events'}",
        "--set", f"source.catalog_path={root / 'demo' / 'catalog'}",
        "--set", f"spark.jars_dir={REPO / '.jars'}",
        "--run-id", DEMO_RUN_ID, "--as-of", DEMO_AS_OF,
        *extra,
    ]  # fmt: skip


@dataclass(frozen=True)
class DemoRun:
    """One local `shelf run` (demo_run_args) and the Delta version of each compared table right after it: tests
    that change its tables later do not change what `read` returns."""

    root: Path
    config: ShelfConfig
    versions: dict[tuple[str, str], int]
    printed: str  # what `shelf run` printed on stdout: its end-of-run summary
    pristine: Path  # a copy of `root` (tables and source files) made right after the run, for tests to copy from

    def read(self, spark: SparkSession, layer: str, name: str) -> DataFrame:
        return tables.read(spark, self.config, layer, name, version=self.versions[(layer, name)])

    def assert_same_tables(self, spark: SparkSession, config: ShelfConfig, run_id: str) -> None:
        """Run `run_id` of the tables `config` points at wrote what this run wrote to each of COMPARED_TABLES (chispa,
        to 1e-6, in any row order; the run ids aside): another engine, process or cluster changed nothing."""
        for layer, name in COMPARED_TABLES:
            local = self.read(spark, layer, name).filter(F.col(RUN_ID) == DEMO_RUN_ID).drop(RUN_ID)
            other = tables.read(spark, config, layer, name).filter(F.col(RUN_ID) == run_id)
            assert other.count() > 0, f"{layer}.{name} holds no row of run {run_id}"
            assert_approx_df_equality(local, other.drop(RUN_ID), 1e-6, ignore_nullable=True, ignore_row_order=True)


@pytest.fixture(scope="session")
def demo_run(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> DemoRun:
    """The local run shared by the end-to-end test and the runs on other engines that must equal it: one run per
    `pytest` invocation, whichever xdist worker asks first makes it while another waits (each worker that ran
    test_end_to_end.py or test_clusters.py used to make its own, ~7 minutes of a busy CI machine).
    Tests change its tables later (a gated run, forget without VACUUM, ...); `DemoRun.read` pins each compared
    table's version as it was right after the run, and `DemoRun.pristine` is a copy of the whole run made then
    (tests/test_faults.py starts its crashes from it instead of running the steps once more)."""
    from pipelines import cli

    shared = tmp_path_factory.getbasetemp()
    shared = shared if worker_id == "master" else shared.parent  # pytest-N/, the workers' common base
    root, pristine = shared / "demo-run", shared / "demo-run-pristine"
    config = make_test_config(root)
    with _exclusive(shared / "demo-run.lock"):
        made = shared / "demo-run.json"
        if not made.exists():
            for folder in (root, pristine):
                shutil.rmtree(folder, ignore_errors=True)
            root.mkdir()
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert cli.main(demo_run_args(root)) == 0
            versions = [[*t, tables.latest_version(spark, config, *t)] for t in (*COMPARED_TABLES, ("gold", "metrics"))]
            shutil.copytree(root, pristine, dirs_exist_ok=True)
            made.write_text(json.dumps({"versions": versions, "printed": printed.getvalue()}))
    state = json.loads(made.read_text())
    versions = {(layer, name): int(v) for layer, name, v in state["versions"]}
    return DemoRun(root, config, versions, state["printed"], pristine)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (created if absent) while the block runs: xdist workers are
    processes."""
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def shelf_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this repo (`pip wheel --no-deps`), as a cluster gets shelf."""
    from tests.submitting import build_wheel

    return build_wheel(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def connect_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Spark Connect server (own JVM, Delta, local[2]) on 127.0.0.1 for the whole session; its sc:// URL."""
    from tests.servers import start_connect_server

    server, url = start_connect_server(tmp_path_factory.mktemp("connect-server"))
    yield url
    server.stop()


@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A standalone Spark cluster (master and one 2-core worker, own JVMs) on 127.0.0.1; its spark:// URL."""
    from tests.servers import start_standalone_cluster

    cluster = start_standalone_cluster(tmp_path_factory.mktemp("standalone"))
    yield cluster.url
    cluster.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """An S3 API (moto's server, own process) on 127.0.0.1 for the whole session; stopped when it ends."""
    from tests.servers import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3-server"))
    yield server
    server.server.stop()


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


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kafka]:
    """An Apache Kafka broker (KRaft, own JVM) on 127.0.0.1 for the whole session; stopped when it ends."""
    from tests.servers import start_kafka_broker

    broker = start_kafka_broker(tmp_path_factory.mktemp("kafka"), REPO / ".jars" / KAFKA_BROKER_FOLDER)
    yield broker
    broker.server.stop()
