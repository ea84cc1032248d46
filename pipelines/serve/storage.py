"""Where delta-rs finds a table that Spark names: `s3a://` (Hadoop's scheme) becomes `s3://`, and the S3A
settings in `spark.extra` (`spark.hadoop.fs.s3a.*`: endpoint, region, keys, path style, plain HTTP) become
delta-rs storage options. Without them delta-rs takes credentials from the environment (AWS_*), as Spark's
default provider chain does. `abfss://`, `gs://` and local paths pass through unchanged.
"""

from __future__ import annotations

S3A = "spark.hadoop.fs.s3a."
# S3A setting -> delta-rs (object_store) option
OPTIONS = {
    "endpoint.region": "AWS_REGION",
    "access.key": "AWS_ACCESS_KEY_ID",
    "secret.key": "AWS_SECRET_ACCESS_KEY",
    "session.token": "AWS_SESSION_TOKEN",
}


def delta_rs_location(uri: str, spark_extra: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(the URI delta-rs opens, its storage options) for a table Spark knows as `uri`."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() not in ("s3a", "s3n", "s3"):
        return uri, {}
    s3a = {key[len(S3A) :]: value for key, value in spark_extra.items() if key.startswith(S3A)}
    options = {OPTIONS[key]: value for key, value in s3a.items() if key in OPTIONS}
    plain = s3a.get("connection.ssl.enabled", "true").lower() == "false"
    endpoint = s3a.get("endpoint")
    if endpoint:
        has_scheme = "://" in endpoint
        options["AWS_ENDPOINT_URL"] = endpoint if has_scheme else f"{'http' if plain else 'https'}://{endpoint}"
        plain = plain or endpoint.startswith("http://")
    if plain:
        options["AWS_ALLOW_HTTP"] = "true"
    if s3a.get("path.style.access", "false").lower() != "true" and endpoint:
        options["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "true"
    return f"s3://{rest}", options
