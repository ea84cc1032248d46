"""User-id pseudonymisation: a keyed hash (HMAC-SHA256) computed inside Spark, and the key's source.

With `privacy.pseudonymize_users: true`, ingest replaces every user id with
`hex(HMAC-SHA256(key, user_id))` before anything is written, so tables, logs and published
recommendations hold only pseudonyms. The key is read from the environment variable named by
`privacy.key_env` (never from a file in the repository, never logged); without the key nobody can map
a pseudonym back or compute a given user's pseudonym. Serving systems that hold the key compute the
same hash to look a user up.

HMAC runs on the executors in a vectorised pandas UDF (Arrow batches, Python's `hmac`) with the key in the
function's closure: the plan names only the UDF, so the key appears in no EXPLAIN output, Spark UI page or
event log. (An earlier version built HMAC from SQL `sha2` with key-derived pads as binary literals, which
Spark prints in every plan: anyone with the UI or an event log could recover the key.)
"""

from __future__ import annotations

import hashlib
import hmac
import os

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.functions import pandas_udf

from pipelines.core.config_sections import PrivacyConfig
from pipelines.core.errors import ConfigError


def key_from_env(privacy: PrivacyConfig) -> bytes:
    """The pseudonymisation key from the environment variable `privacy.key_env`.

    Raises:
        ConfigError: the variable is unset or empty.
    """
    value = os.environ.get(privacy.key_env, "")
    if not value:
        raise ConfigError(
            f"privacy.pseudonymize_users is on but the environment variable {privacy.key_env} is empty; "
            "export the secret key there (or set privacy.key_env to the variable that holds it)."
        )
    return value.encode("utf-8")


def hmac_sha256_hex(column: Column, key: bytes) -> Column:
    """hex(HMAC-SHA256(key, utf8(column))), computed per Arrow batch on the executors; null stays null.

    The key travels only inside the pickled function (never as a literal of the plan)."""

    def pseudonymise(values: pd.Series) -> pd.Series:
        digest = hashlib.sha256
        return pd.Series(
            # a null arrives as None, or as NaN when Arrow hands over a batch of nulls only
            [hmac.new(key, v.encode("utf-8"), digest).hexdigest() if isinstance(v, str) else None for v in values],
            dtype=object,
        )

    hashed: Column = pandas_udf(pseudonymise, "string")(column.cast("string"))  # type: ignore[call-overload]
    return hashed


def pseudonym(user_id: str, key: bytes) -> str:
    """The same pseudonym computed in Python (for `shelf forget` and for serving-side lookups)."""
    return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()


_PSEUDONYM = "_pseudonym"


def _as_whole_field(user: Column) -> Column:
    r"""A Java regex matching `user` as a whole field of a raw line: `\Q...\E` between non-id characters."""
    quoted = F.concat(F.lit("\\Q"), F.replace(user, F.lit("\\E"), F.lit("\\E\\\\E\\Q")), F.lit("\\E"))
    return F.concat(F.lit("(^|[^A-Za-z0-9_.-])"), quoted, F.lit("(?=$|[^A-Za-z0-9_.-])"))


def with_pseudonymous_users(rows: DataFrame, key: bytes, user_col: str, raw_col: str, unparseable: Column) -> DataFrame:
    """Replace user ids by their pseudonym, in the id column and inside the raw text kept for quarantine.

    In the raw text every whole-field occurrence of the user's id is replaced (an item or session with
    the very same text is replaced too: the safe side). A row that could not be parsed has no known user
    field, so its raw text is redacted to its own HMAC (still matchable by someone holding the key and
    the original line).
    """
    user, raw, hashed = F.col(user_col), F.col(raw_col), F.col(_PSEUDONYM)
    replaced = F.regexp_replace(raw, _as_whole_field(user), F.concat(F.lit("$1"), hashed))
    # A Python UDF runs on every row whatever CASE WHEN says, so the raw text is hashed only where it is needed
    # (the UDF skips nulls) and the user's pseudonym once per row, in a column of its own.
    redacted = F.concat(F.lit("redacted:hmac-sha256:"), hmac_sha256_hex(F.when(unparseable, raw), key))
    return (
        rows.withColumn(_PSEUDONYM, hmac_sha256_hex(user, key))
        .withColumn(raw_col, F.when(unparseable, redacted).when(user.isNotNull(), replaced).otherwise(raw))
        .withColumn(user_col, hashed)
        .drop(_PSEUDONYM)
    )
