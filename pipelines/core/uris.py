"""Locations under storage.root are URI strings, joined by `join` and never by pathlib.

`pathlib` collapses the double slash of a URI (`s3a://bucket/shelf` becomes `s3a:/bucket/shelf`, the
bucket is lost; `hdfs:///x` becomes `hdfs:/x`) and `Path.resolve()` prefixes the driver's working
directory. Here a location with a scheme (`s3a://`, `abfss://`, `gs://`, `hdfs://`, `dbfs:/`, `file:`)
is kept as written; a bare local path keeps working and is made absolute only where the JVM or SQL
needs it (`qualify`), so a relative `storage.root` means the same folder to Spark and to Python.
"""

from __future__ import annotations

import os
import re

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")  # two letters at least: `C:` is a Windows drive


def has_scheme(location: str) -> bool:
    """Whether `location` names its filesystem (`s3a://b/x`, `file:/x`, `dbfs:/x`), not a bare local path."""
    return bool(_SCHEME.match(location))


def is_local(location: str) -> bool:
    """A bare path or a `file:` URI: the driver's own disk (what Python's file IO may touch)."""
    return not has_scheme(location) or location.lower().startswith("file:")


def local_path(location: str) -> str:
    """A local location as a plain path for Python's file IO: `file:/x` and `file:///x` become `/x`.

    Raises:
        ValueError: `location` is on a remote filesystem (check `is_local` first).
    """
    if not is_local(location):
        raise ValueError(f"{location} is not on the driver's disk")
    return re.sub(r"^file:(//)?", "", location, flags=re.IGNORECASE)


def join(root: str, *parts: str) -> str:
    """`root` and `parts` joined by single slashes; the root's scheme and authority are kept as written.

    >>> join("s3a://bucket/shelf", "gold", "recommendations")
    's3a://bucket/shelf/gold/recommendations'
    >>> join("hdfs:///data/", "/silver")
    'hdfs:///data/silver'
    """
    base = root if root.endswith("://") else root.rstrip("/") or "/"
    tail = [p.strip("/") for p in parts if p and p.strip("/")]
    if not tail:
        return base
    return base + ("" if base.endswith("/") else "/") + "/".join(tail)


def qualify(location: str) -> str:
    """The absolute form the JVM and SQL (`delta.`...``) need: URIs unchanged, a bare local path made absolute
    against the working directory (normalised, symlinks kept)."""
    return location if has_scheme(location) else os.path.abspath(location)


def sql_path(location: str) -> str:
    """A Delta table path as a SQL identifier: delta.`<qualified location>`."""
    return f"delta.`{qualify(location)}`"


def local_missing(location: str) -> bool:
    """Whether `location` is on the driver's disk and nothing is there (a remote location is never "missing"
    here: Spark finds out, and says so, when it reads it)."""
    return is_local(location) and not os.path.exists(local_path(location))
