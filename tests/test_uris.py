"""Locations under storage.root stay URIs: the bucket, authority and scheme survive every join."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.core import als, tables, uris
from pipelines.core.session import driver_folder
from tests.conftest import make_test_config


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("s3a://bucket/shelf", "s3a://bucket/shelf/gold/recommendations"),
        ("s3a://bucket/shelf/", "s3a://bucket/shelf/gold/recommendations"),
        ("s3a://bucket", "s3a://bucket/gold/recommendations"),
        ("hdfs:///data/shelf", "hdfs:///data/shelf/gold/recommendations"),
        ("hdfs://nn:8020/shelf", "hdfs://nn:8020/shelf/gold/recommendations"),
        ("abfss://c@acct.dfs.core.windows.net/shelf", "abfss://c@acct.dfs.core.windows.net/shelf/gold/recommendations"),
        ("dbfs:/shelf", "dbfs:/shelf/gold/recommendations"),
        ("file:/tmp/shelf", "file:/tmp/shelf/gold/recommendations"),
        ("/tmp/shelf", "/tmp/shelf/gold/recommendations"),
        ("relative/shelf", "relative/shelf/gold/recommendations"),
    ],
)
def test_table_locations_keep_the_scheme_and_bucket(root: str, expected: str) -> None:
    config = make_test_config(Path("/unused"), f"storage.root={root}")
    assert tables.location(config, "gold", "recommendations") == expected


def test_models_and_the_holdout_namespace_join_the_same_way() -> None:
    config = make_test_config(Path("/unused"), "storage.root=s3a://bucket/shelf", "storage.namespace=holdout_")
    assert als.model_path(config, "r1") == "s3a://bucket/shelf/holdout_models/r1/als"
    assert tables.location(config, "silver", "interactions") == "s3a://bucket/shelf/holdout_silver/interactions"


def test_qualify_keeps_uris_and_makes_bare_paths_absolute() -> None:
    assert uris.qualify("s3a://bucket/x") == "s3a://bucket/x"
    assert uris.qualify("file:/tmp/x") == "file:/tmp/x"
    assert uris.qualify("rel/x") == os.path.join(os.getcwd(), "rel", "x")
    assert uris.sql_path("s3a://bucket/t") == "delta.`s3a://bucket/t`"
    assert (uris.is_local("file:/x"), uris.is_local("/x"), uris.is_local("s3a://b/x")) == (True, True, False)
    assert (uris.local_path("file:/x/y"), uris.local_path("file:///x/y"), uris.local_path("x/y")) == ("/x/y",) * 2 + (
        "x/y",
    )
    assert uris.is_local("C:/shelf")  # a Windows drive letter is not a scheme
    with pytest.raises(ValueError, match="not on the driver's disk"):
        uris.local_path("s3a://bucket/x")


def test_the_session_keeps_its_own_files_local_for_a_remote_root(tmp_path: Path) -> None:
    assert driver_folder(make_test_config(tmp_path, f"storage.root=file:{tmp_path}")) == tmp_path.resolve()
    remote = driver_folder(make_test_config(tmp_path, "storage.root=s3a://bucket/shelf"))
    assert remote == Path(".shelf").resolve() and "s3a" not in str(remote)


def test_shelf_serve_opens_spark_s3a_locations_with_delta_rs_options() -> None:
    """`s3a://` is Hadoop's name: delta-rs opens `s3://` with the S3A settings translated; other URIs pass."""
    from pipelines.serve.storage import delta_rs_location

    s3a = {
        "spark.hadoop.fs.s3a.endpoint": "minio.local:9000",
        "spark.hadoop.fs.s3a.connection.ssl.enabled": "false",
        "spark.hadoop.fs.s3a.path.style.access": "true",
        "spark.hadoop.fs.s3a.endpoint.region": "eu-west-1",
        "spark.hadoop.fs.s3a.access.key": "AK",
        "spark.hadoop.fs.s3a.secret.key": "SK",
        "spark.sql.shuffle.partitions": "4",
    }
    assert delta_rs_location("s3a://bucket/shelf/gold/recommendations", s3a) == (
        "s3://bucket/shelf/gold/recommendations",
        {
            "AWS_ENDPOINT_URL": "http://minio.local:9000",
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": "eu-west-1",
            "AWS_ACCESS_KEY_ID": "AK",
            "AWS_SECRET_ACCESS_KEY": "SK",
        },
    )
    assert delta_rs_location("s3a://bucket/t", {}) == ("s3://bucket/t", {})  # credentials from the environment
    hosted = {"spark.hadoop.fs.s3a.endpoint": "https://s3.example.com"}
    assert delta_rs_location("s3a://b/t", hosted)[1] == {
        "AWS_ENDPOINT_URL": "https://s3.example.com",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "true",
    }
    for uri in ("/data/shelf/t", "abfss://c@a.dfs.core.windows.net/t", "gs://b/t"):
        assert delta_rs_location(uri, s3a) == (uri, {})
