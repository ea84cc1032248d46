"""Fetch the Delta Lake jars with Maven into a local folder, for machines where Ivy cannot resolve them.

`spark.jars.packages` resolves through Ivy, which on some networks cannot download Spark's own
transitive artifacts; Maven can. The set-up command runs `python -m pipelines.core.jars` once and
the session builder then points `spark.jars` at the folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
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
    folder = Path(jars_dir)
    found = delta_jars(folder)
    if found:
        return found
    mvn = shutil.which("mvn")
    if mvn is None:
        raise EnvironmentSetupError(
            "Maven (mvn) is not installed, so the Delta jars cannot be fetched; install it "
            "(apt-get install maven) or set spark.jars_dir to a folder holding "
            + ", ".join(jar_name(c) for c in delta_artifacts())
            + "."
        )
    folder.mkdir(parents=True, exist_ok=True)
    for coordinate in delta_artifacts():
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
    result = delta_jars(folder)
    assert result is not None
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = args[0] if args else ".jars"
    try:
        for path in fetch_delta_jars(folder):
            print(f"delta jar: {path}")
    except EnvironmentSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
