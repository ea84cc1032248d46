"""Fetch the Delta Lake jars (and, on request, the S3A connector) with Maven into a local folder.

`spark.jars.packages` resolves through Ivy, which on some networks cannot download Spark's own
transitive artifacts; Maven can. The set-up command runs `python -m pipelines.core.jars` once and
the session builder then points `spark.jars` at the folder.

`python -m pipelines.core.jars .jars --s3a` also fetches hadoop-aws at pyspark's own Hadoop version and
the AWS SDK bundle that Hadoop release was built against (read from its `hadoop-project` pom), so a local
session can read and write `s3a://` roots; the S3A settings (endpoint, credentials provider, path-style
access) go in `spark.extra` (see docs/DEPLOYMENT.md, "Remote storage from a local session").
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


def session_jars(jars_dir: str | Path, s3a: bool) -> list[Path] | None:
    """The jars a local session loads from `jars_dir`: Delta's, plus S3A's when `s3a` (the config names an
    s3a:// location) and they were fetched; None without Delta's."""
    delta = delta_jars(jars_dir)
    return None if delta is None else delta + (s3a_jars(jars_dir) if s3a else [])


def _maven_copy(coordinate: str, folder: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise EnvironmentSetupError(
            f"Maven (mvn) is not installed, so {coordinate} cannot be fetched; install it "
            "(apt-get install maven) or set spark.jars_dir to a folder holding "
            + ", ".join(jar_name(c) for c in delta_artifacts())
            + "."
        )
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [mvn, "-q", "-B", "dependency:copy", f"-Dartifact={coordinate}", f"-DoutputDirectory={folder}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise EnvironmentSetupError(
            f"Maven could not download {coordinate} from Maven Central; check the network or "
            "proxy settings in ~/.m2/settings.xml and rerun the set-up command."
        )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    s3a = "--s3a" in args
    folders = [a for a in args if a != "--s3a"]
    folder = folders[0] if folders else ".jars"
    try:
        for path in fetch_delta_jars(folder):
            print(f"delta jar: {path}")
        for path in fetch_s3a_jars(folder) if s3a else []:
            print(f"s3a jar: {path}")
    except EnvironmentSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
