"""Real servers the tests start and stop themselves, each a separate JVM bound to 127.0.0.1: a Spark Connect
server (with Delta's jars and SQL extensions), a standalone cluster (one master, one worker), an S3 API (moto) and
an Apache Kafka broker (KRaft mode).

Each is started once per test session by a fixture in tests/conftest.py and stopped (its process group
killed) when the session ends, so every test that needs one shares it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyspark
import pytest

from tests.submitting import delta_jar_list

SPARK_HOME = Path(pyspark.__file__).parent
START_TIMEOUT_S = 300  # a cold JVM on two shared cores: about 20 s idle


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spark_env() -> dict[str, str]:
    """The servers' environment: this interpreter for Python workers, every address on 127.0.0.1."""
    return {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_HOME": str(SPARK_HOME),
    }


@dataclass
class Server:
    """One server process (its own process group) and the log it writes."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def wait_for_port(self, port: int) -> None:
        """Block until 127.0.0.1:`port` accepts connections; fail with the log's tail if the JVM dies or hangs."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"{self.name} did not listen on 127.0.0.1:{port} in {START_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start(name: str, cmd: list[str], workdir: Path) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd, cwd=workdir, env=spark_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(name, process, log)


def start_connect_server(workdir: Path) -> tuple[Server, str]:
    """A Spark Connect server from the installed pyspark (local[2], Delta); returns it and its sc:// URL."""
    port = free_port()
    cmd = [
        str(SPARK_HOME / "bin" / "spark-submit"),
        "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
        "--master", "local[2]",
        "--jars", delta_jar_list(),
        "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
        "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
        "--conf", f"spark.connect.grpc.binding.port={port}",
        "--conf", "spark.sql.session.timeZone=UTC",
        "--conf", "spark.ui.enabled=false",
        "--conf", f"spark.pyspark.python={sys.executable}",
        "--driver-memory", "2g",
    ]  # fmt: skip
    server = start("connect-server", cmd, workdir)
    server.wait_for_port(port)
    return server, f"sc://127.0.0.1:{port}"


@dataclass
class Cluster:
    master: Server
    worker: Server
    url: str

    def stop(self) -> None:
        self.worker.stop()
        self.master.stop()


def start_standalone_cluster(workdir: Path) -> Cluster:
    """A standalone master and one 2-core worker, separate JVMs on 127.0.0.1; returns them and spark://..."""
    port, ui, worker_ui = free_port(), free_port(), free_port()
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    master = start(
        "master",
        [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
         "--webui-port", str(ui)],
        workdir,
    )  # fmt: skip
    master.wait_for_port(port)
    url = f"spark://127.0.0.1:{port}"
    worker = start(
        "worker",
        [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "2",
         "--memory", "3g", "--webui-port", str(worker_ui), "--work-dir", str(workdir / "work"), url],
        workdir,
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while "Successfully registered with master" not in worker.tail(100_000):
        if worker.process.poll() is not None or time.monotonic() > deadline:
            worker.stop()
            master.stop()
            pytest.fail(f"The standalone worker did not register with {url}:\n{worker.tail()}")
        time.sleep(0.5)
    return Cluster(master, worker, url)


S3_KEY = "testing"  # moto accepts any key; these are nobody's credentials
S3_REGION = "us-east-1"


@dataclass
class S3:
    """An S3 API (moto's server, own process) on 127.0.0.1 and the settings each client needs for it."""

    server: Server
    endpoint: str

    def spark_settings(self) -> dict[str, str]:
        """S3A's settings for `spark.extra` (path-style, plain HTTP, static test credentials)."""
        return {
            "spark.hadoop.fs.s3a.endpoint": self.endpoint,
            "spark.hadoop.fs.s3a.endpoint.region": S3_REGION,
            "spark.hadoop.fs.s3a.path.style.access": "true",
            "spark.hadoop.fs.s3a.connection.ssl.enabled": "false",
            "spark.hadoop.fs.s3a.aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
            "spark.hadoop.fs.s3a.access.key": S3_KEY,
            "spark.hadoop.fs.s3a.secret.key": S3_KEY,
        }

    def delta_rs_options(self) -> dict[str, str]:
        """The same bucket for delta-rs (`deltalake`), the second client that reads the tables back."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_KEY,
            "AWS_REGION": S3_REGION,
            "AWS_ALLOW_HTTP": "true",
        }

    def client(self):  # type: ignore[no-untyped-def]  # boto3 has no stubs here
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY,
            region_name=S3_REGION,
        )  # fmt: skip

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def start_s3_server(workdir: Path) -> S3:
    """moto's S3 server (`moto[server]`, a real HTTP S3 API in its own process) on a free 127.0.0.1 port."""
    port = free_port()
    server = start("s3-server", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], workdir)
    server.wait_for_port(port)
    return S3(server, f"http://127.0.0.1:{port}")


@dataclass
class Kafka:
    """An Apache Kafka broker in KRaft mode (one JVM, broker and controller) on 127.0.0.1."""

    server: Server
    bootstrap: str

    def create_topic(self, name: str, partitions: int = 2) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})  # kept alive until the futures resolve
        futures = admin.create_topics([NewTopic(name, partitions, 1)])
        for future in futures.values():
            future.result(timeout=60)

    def produce(self, topic: str, values: list[bytes | None], partition: int = 0) -> list[tuple[int, int]]:
        """Send `values` to one partition in order; returns each one's (partition, offset), from the broker's
        delivery reports."""
        from confluent_kafka import Producer

        delivered: list[tuple[int, int]] = []

        def report(error, message) -> None:  # type: ignore[no-untyped-def]
            assert error is None, f"Kafka did not take a message: {error}"
            delivered.append((message.partition(), message.offset()))

        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True})
        for value in values:
            producer.produce(topic, value=value, partition=partition, on_delivery=report)
        assert producer.flush(60) == 0, "Kafka did not acknowledge every message in 60 s"
        return delivered


def start_kafka_broker(workdir: Path, jars: Path) -> Kafka:
    """Apache Kafka (the jars `python -m pipelines.core.jars .jars --kafka-broker` fetched to `jars`) as one KRaft
    node on two free 127.0.0.1 ports: its storage formatted, then the broker started; returns it and its address."""
    if not any(jars.glob("kafka_2.13-*.jar")):
        pytest.fail(f"No Kafka broker jars in {jars}: run `python -m pipelines.core.jars .jars --kafka-broker`.")
    port, controller = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    properties = workdir / "server.properties"
    properties.write_text(
        "\n".join([
            "process.roles=broker,controller", "node.id=1", f"controller.quorum.voters=1@127.0.0.1:{controller}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}", "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT", f"log.dirs={workdir / 'data'}", "num.partitions=2",
            "offsets.topic.replication.factor=1", "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1", "group.initial.rebalance.delay.ms=0",
        ]) + "\n"
    )  # fmt: skip
    java = ["java", "-Xmx512m", "-cp", f"{jars}/*"]
    cluster_id = "c2hlbGYtdGVzdC1rYWZrYQ"  # any 16 bytes, base64url: the broker's storage is new each session
    subprocess.run(
        [*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(properties)],
        cwd=workdir, check=True, capture_output=True,
    )  # fmt: skip
    server = start("kafka", [*java, "kafka.Kafka", str(properties)], workdir)
    server.wait_for_port(port)
    return Kafka(server, f"127.0.0.1:{port}")
