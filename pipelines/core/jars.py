"""Fetch the Delta Lake jars (and, on request, the S3A connector) with Maven into a local folder.

`spark.jars.packages` resolves through Ivy, which on some networks cannot download Spark's own
transitive artifacts; Maven can. The set-up command runs `python -m pipelines.core.jars` once and
the session builder then points `spark.jars` at the folder.

`python -m pipelines.core.jars .jars --s3a` also fetches hadoop-aws at pyspark's own Hadoop version and
the AWS SDK bundle that Hadoop release was built against (read from its `hadoop-project` pom), so a local
session can read and write `s3a://` roots; the S3A settings (endpoint, credentials provider, path-style
access) go in `spark.extra` (see docs/DEPLOYMENT.md, "Remote storage from a local session").

`--kafka` fetches Spark's Kafka source (spark-sql-kafka-0-10 at pyspark's version, or the newest earlier patch
release Maven Central serves, and the jars it needs that pyspark lacks: kafka-clients, the token provider,
commons-pool2: see fetch_kafka_jars) for `stream.source: kafka`; `--kafka-broker` fetches an Apache Kafka broker (KRaft mode, its jars
only: `java -cp '<folder>/kafka-broker/*' kafka.Kafka server.properties`) for the tests and benchmarks/stream.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from pipelines.core.errors import EnvironmentSetupError

SCALA_VERSION = "2.13"
KAFKA_BROKER = "org.apache.kafka:kafka_2.13:4.1.1"  # KRaft broker for tests and benchmarks (Java 17)
KAFKA_BROKER_FOLDER = "kafka-broker"
# Spark's own Kafka source; the jars its pom brings that pyspark already ships are left out.
_KAFKA_SOURCE = ("spark-sql-kafka-0-10", "spark-token-provider-kafka-0-10", "kafka-clients", "commons-pool2")
# Spark's parent pom lists a mirror of Central (Google's) that some networks cannot reach: ask Central only.
_CENTRAL_ONLY = (
    "<settings><mirrors><mirror><id>central-only</id><mirrorOf>*</mirrorOf>"
    "<url>https://repo.maven.apache.org/maven2</url></mirror></mirrors></settings>"
)


def delta_artifacts() -> list[str]:
    """Maven coordinates of the Delta jars that match the installed pyspark and delta-spark."""
    import pyspark

    delta_version = metadata.version("delta-spark")
    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    return [
        f"io.delta:delta-spark_{spark_minor}_{SCALA_VERSION}:{delta_version}",
        f"io.delta:delta-storage:{delta_version}",
    ]


def jar_name(coordinate: str) -> str:
    _, artifact, version = coordinate.split(":")
    return f"{artifact}-{version}.jar"


def delta_jars(jars_dir: str | Path) -> list[Path] | None:
    """The Delta jars in `jars_dir`, or None when any is missing."""
    folder = Path(jars_dir)
    paths = [folder / jar_name(c) for c in delta_artifacts()]
    return paths if all(p.is_file() for p in paths) else None


def fetch_delta_jars(jars_dir: str | Path) -> list[Path]:
    """Copy the Delta jars into `jars_dir` with `mvn dependency:copy` (cached in ~/.m2 after the first run).

    Raises:
        EnvironmentSetupError: Maven is missing or could not download an artifact.
    """
    found = delta_jars(jars_dir)
    if found:
        return found
    for coordinate in delta_artifacts():
        _maven_copy(coordinate, Path(jars_dir))
    result = delta_jars(jars_dir)
    assert result is not None
    return result


def hadoop_version() -> str:
    """The Hadoop release pyspark ships (from its `hadoop-client-api-<version>.jar`).

    Raises:
        EnvironmentSetupError: the pyspark installation has no Hadoop client jar.
    """
    import pyspark

    found = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    if not found:
        raise EnvironmentSetupError(
            "pyspark's jars folder has no hadoop-client-api jar, so the matching hadoop-aws cannot be chosen; "
            "reinstall pyspark (pip install --force-reinstall pyspark)."
        )
    return found[-1].name.removeprefix("hadoop-client-api-").removesuffix(".jar")


def aws_sdk_version(hadoop: str) -> str:
    """The AWS SDK v2 version Hadoop `hadoop` was built against, read from its `hadoop-project` pom."""
    with tempfile.TemporaryDirectory() as scratch:
        _maven_copy(f"org.apache.hadoop:hadoop-project:{hadoop}:pom", Path(scratch))
        pom = next(Path(scratch).glob("*.pom")).read_text()
    match = re.search(r"<aws-java-sdk-v2\.version>([^<]+)<", pom)
    if match is None:
        raise EnvironmentSetupError(
            f"hadoop-project {hadoop}'s pom names no AWS SDK v2 version; fetch the S3A jars by hand."
        )
    return match.group(1)


def s3a_jars(jars_dir: str | Path) -> list[Path]:
    """The S3A connector's jars in `jars_dir` (hadoop-aws and the AWS SDK bundle), or [] when not fetched."""
    folder = Path(jars_dir)
    found = sorted(folder.glob("hadoop-aws-*.jar")) + sorted(folder.glob("bundle-*.jar"))
    return found if len(found) == 2 else []


def fetch_s3a_jars(jars_dir: str | Path) -> list[Path]:
    """Copy hadoop-aws (pyspark's Hadoop version) and its AWS SDK bundle into `jars_dir` (about 650 MB once).

    Raises:
        EnvironmentSetupError: Maven is missing or could not download an artifact.
    """
    found = s3a_jars(jars_dir)
    if found:
        return found
    hadoop = hadoop_version()
    folder = Path(jars_dir)
    _maven_copy(f"org.apache.hadoop:hadoop-aws:{hadoop}", folder)
    _maven_copy(f"software.amazon.awssdk:bundle:{aws_sdk_version(hadoop)}", folder)
    return s3a_jars(folder)


def kafka_jars(jars_dir: str | Path) -> list[Path]:
    """Spark's Kafka source and the jars it needs in `jars_dir`, or [] when not fetched."""
    folder = Path(jars_dir)
    found = [p for name in _KAFKA_SOURCE for p in sorted(folder.glob(f"{name}*.jar"))[-1:]]
    return found if len(found) == len(_KAFKA_SOURCE) else []


def fetch_kafka_jars(jars_dir: str | Path) -> list[Path]:
    """Copy Spark's Kafka source into `jars_dir`: the newest spark-sql-kafka-0-10 of pyspark's minor release up to
    its own patch that Central serves (4.1.3 with pyspark 4.1.4: it fixes SPARK-57438, a restart from a checkpoint
    failing in 4.1.1's source metrics), and the jars it needs from the newest patch whose whole tree resolves.

    Raises:
        EnvironmentSetupError: Maven is missing or no patch release of this Spark minor could be downloaded.
    """
    import pyspark

    found = kafka_jars(jars_dir)
    if found:
        return found
    major, minor, patch = (int(re.sub(r"\D.*", "", p)) for p in pyspark.__version__.split(".")[:3])
    versions = [f"{major}.{minor}.{p}" for p in range(patch, -1, -1)]
    folder = Path(jars_dir)
    with tempfile.TemporaryDirectory() as scratch:
        newest = next((v for v in versions if _maven_copy(_kafka_source(v), Path(scratch), required=False)), None)
        tree = next((v for v in versions if _maven_copy_with_dependencies(_kafka_source(v), Path(scratch) / "tree",
                                                                          required=False)), None)  # fmt: skip
        if newest is None or tree is None:
            raise EnvironmentSetupError(
                f"Maven could not download spark-sql-kafka-0-10 for Spark {major}.{minor} from Maven Central; check "
                'the network, or put the jars in spark.jars_dir by hand (docs/STREAMING.md, "Kafka").'
            )
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(scratch) / jar_name(_kafka_source(newest)), folder)
        for jar in (Path(scratch) / "tree").glob("*.jar"):
            if jar.name.startswith(_KAFKA_SOURCE[1:]):
                shutil.copy2(jar, folder / jar.name)
    return kafka_jars(folder)


def _kafka_source(version: str) -> str:
    return f"org.apache.spark:spark-sql-kafka-0-10_{SCALA_VERSION}:{version}"


def fetch_kafka_broker(jars_dir: str | Path) -> Path:
    """Copy an Apache Kafka broker's jars (KAFKA_BROKER with its dependencies) into `<jars_dir>/kafka-broker`."""
    folder = Path(jars_dir) / KAFKA_BROKER_FOLDER
    if not (folder / f"{jar_name(KAFKA_BROKER)}").is_file():
        _maven_copy_with_dependencies(KAFKA_BROKER, folder, required=True)
    return folder


def session_jars(jars_dir: str | Path, s3a: bool, kafka: bool = False) -> list[Path] | None:
    """The jars a local session loads from `jars_dir`: Delta's, plus S3A's when `s3a` (the config names an
    s3a:// location) and Kafka's when `kafka` (stream.source is kafka), each when fetched; None without Delta's."""
    delta = delta_jars(jars_dir)
    if delta is None:
        return None
    return delta + (s3a_jars(jars_dir) if s3a else []) + (kafka_jars(jars_dir) if kafka else [])


def _maven_copy(coordinate: str, folder: Path, required: bool = True) -> bool:
    """`coordinate` alone into `folder`; False when Maven could not fetch it and not `required`."""
    folder.mkdir(parents=True, exist_ok=True)
    done = _mvn(coordinate, ["dependency:copy", f"-Dartifact={coordinate}", f"-DoutputDirectory={folder}"])
    if done.returncode != 0 and required:
        raise EnvironmentSetupError(
            f"Maven could not download {coordinate} from Maven Central; check the network or "
            "proxy settings in ~/.m2/settings.xml and rerun the set-up command."
        )
    return done.returncode == 0


def _maven_copy_with_dependencies(coordinate: str, folder: Path, required: bool) -> bool:
    """`coordinate` and its runtime dependencies into `folder` (a throwaway pom, Central only); False when
    Maven could not resolve them and not `required`."""
    group, artifact, version = coordinate.split(":")
    with tempfile.TemporaryDirectory() as scratch:
        pom, settings = Path(scratch) / "pom.xml", Path(scratch) / "settings.xml"
        pom.write_text(
            '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
            "<groupId>shelf</groupId><artifactId>fetch</artifactId><version>1</version><dependencies><dependency>"
            f"<groupId>{group}</groupId><artifactId>{artifact}</artifactId><version>{version}</version>"
            "</dependency></dependencies></project>"
        )
        settings.write_text(_CENTRAL_ONLY)
        # A user's own ~/.m2/settings.xml (a proxy, a company mirror) is kept; without one, Central only.
        own = (Path.home() / ".m2" / "settings.xml").is_file()
        goal = ["dependency:copy-dependencies", f"-DoutputDirectory={folder.resolve()}", "-DincludeScope=runtime"]
        done = _mvn(coordinate, [*([] if own else ["-s", str(settings)]), "-f", str(pom), *goal])
    if done.returncode != 0 and required:
        raise EnvironmentSetupError(
            f"Maven could not download {coordinate} and its dependencies from Maven Central; check the network "
            "or proxy settings in ~/.m2/settings.xml and rerun the set-up command."
        )
    return done.returncode == 0


def _mvn(coordinate: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise EnvironmentSetupError(
            f"Maven (mvn) is not installed, so {coordinate} cannot be fetched; install it (apt-get install maven) "
            "or put the jars in spark.jars_dir by hand."
        )
    return subprocess.run([mvn, "-q", "-B", *args], capture_output=True, text=True, check=False)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    flags = {"--s3a", "--kafka", "--kafka-broker"}
    folders = [a for a in args if a not in flags]
    folder = folders[0] if folders else ".jars"
    try:
        for path in fetch_delta_jars(folder):
            print(f"delta jar: {path}")
        for path in fetch_s3a_jars(folder) if "--s3a" in args else []:
            print(f"s3a jar: {path}")
        for path in fetch_kafka_jars(folder) if "--kafka" in args else []:
            print(f"kafka jar: {path}")
        if "--kafka-broker" in args:
            print(f"kafka broker: {fetch_kafka_broker(folder)}")
    except EnvironmentSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
