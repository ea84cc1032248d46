"""Checks on a storage root in an S3 bucket, read back with delta-rs and pyarrow (clients other than Spark):
tests/test_end_to_end.py's run on `s3a://` uses them."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.core.schemas import RAW, USER_ID, USER_IDX
from tests.servers import S3, S3_KEY, S3_REGION
from tests.submitting import write_run_config


def write_remote_config(folder: Path, s3: S3, bucket: str) -> Path:
    """conf/test.yaml (local[2]) with the source and storage root in `bucket` and S3A's settings in spark.extra.

    evaluate scores ALS and popularity without the holdout rehearsal of the publishing steps: the rehearsal is the
    same steps under the `holdout_` namespace (the same URI joins), covered on a local root by test_end_to_end and
    on a remote engine by test_clusters' Connect run; on moto it was about 40% of this test's run."""
    return write_run_config(
        folder,
        spark={"master": "local[2]", "extra": s3.spark_settings()},
        storage={"root": f"s3a://{bucket}/shelf"},
        source={"path": f"s3a://{bucket}/demo/events", "catalog_path": f"s3a://{bucket}/demo/catalog"},
        evaluate={"models": ["popularity", "als"]},
    )


def delta_tables(s3: S3, bucket: str) -> list[str]:
    """Every Delta table in `bucket`, as `<prefix>` paths relative to the bucket (those holding a _delta_log)."""
    return sorted({key.split("/_delta_log/")[0] for key in s3.keys(bucket) if "/_delta_log/" in key})


def read_delta(spark: SparkSession, s3: S3, bucket: str, prefix: str) -> DataFrame:
    """A Delta table in the bucket as delta-rs reads it, handed to this session as Arrow."""
    from deltalake import DeltaTable

    table = DeltaTable(f"s3://{bucket}/{prefix}", storage_options=s3.delta_rs_options())
    return spark.createDataFrame(table.to_pyarrow_table())


def operations(s3: S3, bucket: str, prefix: str) -> list[str]:
    from deltalake import DeltaTable

    return [
        h["operation"] for h in DeltaTable(f"s3://{bucket}/{prefix}", storage_options=s3.delta_rs_options()).history()
    ]


def user_factor_ids(s3: S3, bucket: str) -> dict[str, set[int]]:
    """The ids in every saved model's userFactors (parquet, read by pyarrow's own S3 client)."""
    host = s3.endpoint.removeprefix("http://")
    s3fs = fs.S3FileSystem(
        access_key=S3_KEY, secret_key=S3_KEY, region=S3_REGION, endpoint_override=host, scheme="http"
    )
    folders = {key.split("/userFactors/")[0] for key in s3.keys(bucket) if "/userFactors/" in key}
    ids: dict[str, set[int]] = {}
    for folder in sorted(folders):
        table: pa.Table = pq.read_table(f"{bucket}/{folder}/userFactors", filesystem=s3fs)
        ids[folder] = set(table.column("id").to_pylist())
    return ids


def holds_user(df: DataFrame, user_id: str, index: int) -> int:
    """Rows of `df` that name the user: by id, by index or in the raw source text."""
    terms = []
    if USER_ID in df.columns:
        terms.append(F.col(USER_ID) == user_id)
    if USER_IDX in df.columns:
        terms.append(F.col(USER_IDX) == index)
    if RAW in df.columns:
        terms.append(F.col(RAW).contains(user_id))
    if not terms:
        return 0
    condition = terms[0]
    for term in terms[1:]:
        condition = condition | term
    return df.filter(condition).count()
