"""databricks.yml: every reference resolves in this repo (entry points, package name, conf files, catalog).

The Databricks CLI is not installable from a package registry, so `databricks bundle validate` cannot
run here; these checks cover what it would resolve against the repo.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest
import yaml

from pipelines.core.cli import STEPS
from pipelines.core.config import load_config
from tests.conftest import REPO

WORKSPACE_CONF = re.compile(r"/Workspace\$\{workspace\.file_path\}/(conf/[\w.-]+\.ya?ml)")


@pytest.fixture(scope="module")
def bundle() -> dict[str, Any]:
    return yaml.safe_load((REPO / "databricks.yml").read_text())


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def job_tasks(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    (job,) = bundle["resources"]["jobs"].values()
    return list(job["tasks"])


def test_one_wheel_task_per_step_in_pipeline_order(bundle: dict[str, Any]) -> None:
    tasks = job_tasks(bundle)
    assert [t["task_key"] for t in tasks] == list(STEPS)
    previous = None
    for task in tasks:
        depends = [d["task_key"] for d in task.get("depends_on", [])]
        assert depends == ([previous] if previous else []), task["task_key"]
        previous = task["task_key"]


def test_entry_points_and_package_name_exist_in_pyproject(bundle: dict[str, Any], project: dict[str, Any]) -> None:
    scripts = project["scripts"]
    for task in job_tasks(bundle):
        wheel_task = task["python_wheel_task"]
        assert wheel_task["package_name"] == project["name"]
        assert wheel_task["entry_point"] in scripts, f"{wheel_task['entry_point']} is not in [project.scripts]"
        module = scripts[wheel_task["entry_point"]].split(":")[0]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file()
        assert task["libraries"] == [{"whl": "./dist/*.whl"}]


def test_the_wheel_artifact_is_built_from_this_repo_into_dist(bundle: dict[str, Any]) -> None:
    (artifact,) = bundle["artifacts"].values()
    assert artifact["type"] == "whl" and artifact["path"] == "."
    assert "wheel" in artifact["build"] and "-w dist" in artifact["build"]


def test_conf_files_exist_and_tables_go_to_cluster_yaml_catalog(bundle: dict[str, Any]) -> None:
    params = [p for t in job_tasks(bundle) for p in t["python_wheel_task"]["parameters"]]
    conf_files = {m.group(1) for p in params if (m := WORKSPACE_CONF.fullmatch(p))}
    assert conf_files == {"conf/cluster.yaml"}
    for conf in conf_files:
        assert (REPO / conf).is_file() and (REPO / conf).with_name("base.yaml").is_file()
    assert "conf/*.yaml" in bundle["sync"]["include"]
    cluster = load_config(REPO / "conf" / "cluster.yaml")
    assert cluster.spark.master is None  # the job cluster's session is reused
    variables = bundle["variables"]
    assert f"{variables['catalog']['default']}.{variables['schema']['default']}" == cluster.storage.catalog
    assert "storage.catalog=${var.catalog}.${var.schema}" in params
    # Every --set names a real config key: the same validation the job would run at start-up.
    sets = [params[i + 1] for i, p in enumerate(params) if p == "--set"]
    load_config(
        REPO / "conf" / "cluster.yaml", [s.replace("${var.catalog}", "c").replace("${var.schema}", "s") for s in sets]
    )


def test_dev_and_prod_targets(bundle: dict[str, Any]) -> None:
    targets = bundle["targets"]
    assert targets["dev"]["mode"] == "development" and targets["dev"].get("default") is True
    assert targets["prod"]["mode"] == "production"
    assert targets["prod"]["variables"]["schema"] == bundle["variables"]["schema"]["default"]
    assert targets["dev"]["variables"]["schema"] != targets["prod"]["variables"]["schema"]


def test_the_wheel_leaves_spark_to_the_runtime(project: dict[str, Any]) -> None:
    """A runtime's own pyspark/Delta must not be shadowed by PyPI copies the wheel pulls in."""

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements}

    assert not {"pyspark", "delta-spark"} & names(project["dependencies"])
    assert not any("[spark]" in r for r in project["dependencies"])
    assert {"pyspark", "delta-spark"} <= names(project["optional-dependencies"]["spark"])
    assert '".[spark,dev]"' in (REPO / "Makefile").read_text()  # the local set-up still installs them
