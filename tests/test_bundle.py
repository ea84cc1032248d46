"""databricks.yml: valid against the Databricks bundle JSON schema, and every reference resolves in this repo
(entry points, package name, conf files, catalog).

The Databricks CLI is a Go program with no package on PyPI, so `databricks bundle validate` cannot run
here. Its JSON schema (`bundle/schema/jsonschema.json`, what `databricks bundle schema` prints) ships in
the CLI's Go module, which the Go module proxy serves: the test fetches that one file once into .cache/.
"""

from __future__ import annotations

import io
import json
import os
import re
import tomllib
import urllib.request
import zipfile
from typing import Any

import jsonschema
import pytest
import yaml

from pipelines.core.config_loading import load_config
from pipelines.steps import GATE, ORCHESTRATED
from tests.conftest import REPO

WORKSPACE_CONF = re.compile(r"/Workspace\$\{workspace\.file_path\}/(conf/[\w.-]+\.ya?ml)")
CLI_VERSION = "v0.298.0"  # databricks/cli release of 2026-04-22
SCHEMA_URL = f"https://proxy.golang.org/github.com/databricks/cli/@v/{CLI_VERSION}.zip"
SCHEMA_MEMBER = f"github.com/databricks/cli@{CLI_VERSION}/bundle/schema/jsonschema.json"
SCHEMA_CACHE = REPO / ".cache" / f"databricks-bundle-schema-{CLI_VERSION}.json"


def bundle_schema() -> dict[str, Any]:
    """The bundle JSON schema of Databricks CLI CLI_VERSION (cached); in CI a failed download fails the test."""
    if not SCHEMA_CACHE.exists():
        try:
            with urllib.request.urlopen(SCHEMA_URL, timeout=120) as response:
                module = zipfile.ZipFile(io.BytesIO(response.read()))
        except OSError as exc:
            reason = f"could not fetch the bundle schema from {SCHEMA_URL} ({exc})"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
        SCHEMA_CACHE.parent.mkdir(exist_ok=True)
        SCHEMA_CACHE.write_bytes(module.read(SCHEMA_MEMBER))
    return json.loads(SCHEMA_CACHE.read_text())


@pytest.fixture(scope="module")
def bundle() -> dict[str, Any]:
    return yaml.safe_load((REPO / "databricks.yml").read_text())


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def job_tasks(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The tasks of every job (the job-cluster one and the serverless one)."""
    return [task for job in bundle["resources"]["jobs"].values() for task in job["tasks"]]


def test_the_bundle_is_valid_against_the_databricks_bundle_schema(bundle: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(bundle_schema())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(bundle)]
    assert errors == []
    # The schema is strict enough to catch a misspelt field: the check above can fail.
    broken = json.loads(json.dumps(bundle))
    broken["resources"]["jobs"]["shelf_daily"]["tasks"][0]["max_retry"] = 2
    assert any("max_retry" in e.message for e in validator.iter_errors(broken))


def test_two_jobs_one_wheel_task_per_command_in_shelf_runs_order(bundle: dict[str, Any]) -> None:
    jobs = bundle["resources"]["jobs"]
    assert set(jobs) == {"shelf_daily", "shelf_daily_serverless"}
    for name, job in jobs.items():
        tasks = job["tasks"]
        assert [t["task_key"] for t in tasks] == list(ORCHESTRATED), name  # evaluated, gated, then published
        previous = None
        for task in tasks:
            depends = [d["task_key"] for d in task.get("depends_on", [])]
            assert depends == ([previous] if previous else []), f"{name}.{task['task_key']}"
            previous = task["task_key"]
        # Retries, time limits and a failure mail on every job and task.
        assert job["timeout_seconds"] > 0 and job["email_notifications"]["on_failure"]
        assert all(0 < t["timeout_seconds"] <= job["timeout_seconds"] for t in tasks)
        assert all(t["max_retries"] == 0 if t["task_key"] == GATE else t["max_retries"] >= 1 for t in tasks)
        assert job["max_concurrent_runs"] == 1


def test_compute_job_cluster_on_a_current_runtime_and_serverless_with_the_wheel(bundle: dict[str, Any]) -> None:
    jobs = bundle["resources"]["jobs"]
    cluster_job, serverless_job = jobs["shelf_daily"], jobs["shelf_daily_serverless"]
    (cluster,) = cluster_job["job_clusters"]
    runtime = bundle["variables"]["spark_version"]["default"]
    assert cluster["new_cluster"]["spark_version"] == "${var.spark_version}"
    assert re.fullmatch(r"(\d+)\.\d+\.x-scala2\.13", runtime) and int(runtime.split(".")[0]) >= 18  # Spark 4.1
    assert all(t["job_cluster_key"] == cluster["job_cluster_key"] for t in cluster_job["tasks"])
    (environment,) = serverless_job["environments"]
    assert int(environment["spec"]["environment_version"]) >= 5  # Databricks Connect 18: Spark 4.1
    assert environment["spec"]["dependencies"] == ["./dist/*.whl"]
    for task in serverless_job["tasks"]:
        assert task["environment_key"] == environment["environment_key"]
        assert not {"job_cluster_key", "new_cluster", "existing_cluster_id", "libraries"} & set(task)
    assert serverless_job["tasks"][0]["python_wheel_task"] == cluster_job["tasks"][0]["python_wheel_task"]


def test_entry_points_and_package_name_exist_in_pyproject(bundle: dict[str, Any], project: dict[str, Any]) -> None:
    scripts = project["scripts"]
    for task in job_tasks(bundle):
        wheel_task = task["python_wheel_task"]
        assert wheel_task["package_name"] == project["name"]
        assert wheel_task["entry_point"] in scripts, f"{wheel_task['entry_point']} is not in [project.scripts]"
        module = scripts[wheel_task["entry_point"]].split(":")[0]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file()
        assert task.get("libraries", [{"whl": "./dist/*.whl"}]) == [{"whl": "./dist/*.whl"}]  # serverless: none


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
    assert "workspace" not in targets["dev"]  # development mode needs a path under the user's home
    prod = targets["prod"]
    assert prod["mode"] == "production"
    assert prod["variables"]["schema"] == bundle["variables"]["schema"]["default"]
    assert targets["dev"]["variables"]["schema"] != prod["variables"]["schema"]
    # What `mode: production` requires, deployable by a user who is not an admin: an explicit root_path
    # (one copy), run_as for every job (a user may only name themself), and who may manage and view.
    user = "${workspace.current_user.userName}"
    assert prod["workspace"]["root_path"].startswith(f"/Workspace/Users/{user}/")
    assert prod["run_as"] == {"user_name": user}
    levels = {p["level"] for p in prod["permissions"]}
    assert {"CAN_MANAGE", "CAN_VIEW"} <= levels
    assert {"level": "CAN_MANAGE", "user_name": user} in prod["permissions"]


def test_storage_root_is_the_bundles_unity_catalog_volume(bundle: dict[str, Any]) -> None:
    (volume,) = bundle["resources"]["volumes"].values()
    assert (volume["catalog_name"], volume["schema_name"]) == ("${var.catalog}", "${var.schema}")
    params = job_tasks(bundle)[0]["python_wheel_task"]["parameters"]
    (root,) = [p.split("=", 1)[1] for p in params if p.startswith("storage.root=")]
    assert root.startswith(f"/Volumes/${{var.catalog}}/${{var.schema}}/{volume['name']}/")


def test_the_wheel_leaves_spark_to_the_runtime(project: dict[str, Any]) -> None:
    """A runtime's own pyspark/Delta must not be shadowed by PyPI copies the wheel pulls in."""

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements}

    assert not {"pyspark", "delta-spark"} & names(project["dependencies"])
    assert not any("[spark]" in r for r in project["dependencies"])
    assert {"pyspark", "delta-spark"} <= names(project["optional-dependencies"]["spark"])
    assert '".[spark,dev]"' in (REPO / "Makefile").read_text()  # the local set-up still installs them
