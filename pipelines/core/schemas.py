"""Column names and table schemas: the contract between steps. Ids are dense ints inside the
pipeline (`user_idx`, `item_idx`) and the source's strings at the edges (`user_id`, `item_id`)."""

from __future__ import annotations

from pyspark.sql.types import (
    BooleanType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

# The names are re-exported: the steps import them from here, with the Spark schemas below.
from pipelines.core.columns import (
    ALS_MODEL as ALS_MODEL,
)
from pipelines.core.columns import (
    ALS_RERANK as ALS_RERANK,
)
from pipelines.core.columns import (
    ALS_SCORE as ALS_SCORE,
)
from pipelines.core.columns import (
    ALS_SOURCE as ALS_SOURCE,
)
from pipelines.core.columns import (
    AS_OF as AS_OF,
)
from pipelines.core.columns import (
    BAD_ENCODING as BAD_ENCODING,
)
from pipelines.core.columns import (
    BAD_ID as BAD_ID,
)
from pipelines.core.columns import (
    BAD_TIMESTAMP as BAD_TIMESTAMP,
)
from pipelines.core.columns import (
    BAD_VALUE as BAD_VALUE,
)
from pipelines.core.columns import (
    BOT_USER as BOT_USER,
)
from pipelines.core.columns import (
    BUY_AGAIN_SOURCE as BUY_AGAIN_SOURCE,
)
from pipelines.core.columns import (
    CANCELLED as CANCELLED,
)
from pipelines.core.columns import (
    CATEGORY as CATEGORY,
)
from pipelines.core.columns import (
    DECAY as DECAY,
)
from pipelines.core.columns import (
    EASE as EASE,
)
from pipelines.core.columns import (
    EASE_SCORE as EASE_SCORE,
)
from pipelines.core.columns import (
    EASE_SOURCE as EASE_SOURCE,
)
from pipelines.core.columns import (
    EVENT_TS as EVENT_TS,
)
from pipelines.core.columns import (
    EVENT_TYPE as EVENT_TYPE,
)
from pipelines.core.columns import (
    EVENT_TYPES as EVENT_TYPES,
)
from pipelines.core.columns import (
    FEATURES as FEATURES,
)
from pipelines.core.columns import (
    FUTURE_TIMESTAMP as FUTURE_TIMESTAMP,
)
from pipelines.core.columns import (
    IN_STOCK as IN_STOCK,
)
from pipelines.core.columns import (
    ITEM_ID as ITEM_ID,
)
from pipelines.core.columns import (
    ITEM_IDX as ITEM_IDX,
)
from pipelines.core.columns import (
    ITEM_KNN as ITEM_KNN,
)
from pipelines.core.columns import (
    ITEM_KNN_FRESH as ITEM_KNN_FRESH,
)
from pipelines.core.columns import (
    LAUNCHED_AT as LAUNCHED_AT,
)
from pipelines.core.columns import (
    MODEL as MODEL,
)
from pipelines.core.columns import (
    NEGATIVE_VALUE as NEGATIVE_VALUE,
)
from pipelines.core.columns import (
    NEIGHBOUR_IDX as NEIGHBOUR_IDX,
)
from pipelines.core.columns import (
    NEIGHBOURS_SOURCE as NEIGHBOURS_SOURCE,
)
from pipelines.core.columns import (
    NETTED_OUT as NETTED_OUT,
)
from pipelines.core.columns import (
    NEW_ARRIVAL_SOURCE as NEW_ARRIVAL_SOURCE,
)
from pipelines.core.columns import (
    NON_PRODUCT as NON_PRODUCT,
)
from pipelines.core.columns import (
    NULL_ITEM as NULL_ITEM,
)
from pipelines.core.columns import (
    NULL_USER as NULL_USER,
)
from pipelines.core.columns import (
    POPULAR_SOURCE as POPULAR_SOURCE,
)
from pipelines.core.columns import (
    POPULARITY as POPULARITY,
)
from pipelines.core.columns import (
    PRICE as PRICE,
)
from pipelines.core.columns import (
    PROMO as PROMO,
)
from pipelines.core.columns import (
    PUBLISHED as PUBLISHED,
)
from pipelines.core.columns import (
    RANK as RANK,
)
from pipelines.core.columns import (
    RAW as RAW,
)
from pipelines.core.columns import (
    REASON as REASON,
)
from pipelines.core.columns import (
    REASON_CODES as REASON_CODES,
)
from pipelines.core.columns import (
    REASONS as REASONS,
)
from pipelines.core.columns import (
    REBUY_SCORE as REBUY_SCORE,
)
from pipelines.core.columns import (
    RECENT_POPULARITY as RECENT_POPULARITY,
)
from pipelines.core.columns import (
    RUN_ID as RUN_ID,
)
from pipelines.core.columns import (
    SCORE as SCORE,
)
from pipelines.core.columns import (
    SESSION_ID as SESSION_ID,
)
from pipelines.core.columns import (
    SOURCE_FILE as SOURCE_FILE,
)
from pipelines.core.columns import (
    SOURCES as SOURCES,
)
from pipelines.core.columns import (
    STALE_TIMESTAMP as STALE_TIMESTAMP,
)
from pipelines.core.columns import (
    STEP as STEP,
)
from pipelines.core.columns import (
    TITLE as TITLE,
)
from pipelines.core.columns import (
    UNKNOWN_EVENT_TYPE as UNKNOWN_EVENT_TYPE,
)
from pipelines.core.columns import (
    UNPARSEABLE_ROW as UNPARSEABLE_ROW,
)
from pipelines.core.columns import (
    USER_ID as USER_ID,
)
from pipelines.core.columns import (
    USER_IDX as USER_IDX,
)
from pipelines.core.columns import (
    VALUE as VALUE,
)
from pipelines.core.columns import (
    WEIGHT as WEIGHT,
)
from pipelines.core.columns import (
    ZERO_PRICE as ZERO_PRICE,
)

RAW_EVENT_SCHEMA = StructType(
    [StructField(c, StringType(), True) for c in (USER_ID, ITEM_ID, EVENT_TYPE, EVENT_TS, VALUE, SESSION_ID)]
)

BRONZE_EVENTS_SCHEMA = StructType(
    [
        StructField(USER_ID, StringType(), False),
        StructField(ITEM_ID, StringType(), False),
        StructField(EVENT_TYPE, StringType(), False),
        StructField(EVENT_TS, TimestampType(), False),
        StructField(VALUE, DoubleType(), True),
        StructField(SESSION_ID, StringType(), True),
        StructField(SOURCE_FILE, StringType(), True),
        StructField(RUN_ID, StringType(), False),
        StructField(AS_OF, TimestampType(), False),
    ]
)

QUARANTINE_SCHEMA = StructType(
    [
        StructField(RAW, StringType(), True),
        StructField(SOURCE_FILE, StringType(), True),
        StructField(STEP, StringType(), False),
        StructField(REASON, StringType(), False),
        StructField(RUN_ID, StringType(), False),
        StructField(AS_OF, TimestampType(), False),
    ]
)

INTERACTIONS_SCHEMA = StructType(
    [
        StructField(USER_IDX, IntegerType(), False),
        StructField(ITEM_IDX, IntegerType(), False),
        StructField(EVENT_TYPE, StringType(), False),
        StructField(EVENT_TS, TimestampType(), False),
        StructField(VALUE, DoubleType(), True),
        StructField(WEIGHT, DoubleType(), False),
        StructField(DECAY, DoubleType(), False),
        StructField(RUN_ID, StringType(), False),
        StructField(AS_OF, TimestampType(), False),
    ]
)

CATALOG_SCHEMA = StructType(
    [
        StructField(ITEM_ID, StringType(), False),
        StructField(CATEGORY, StringType(), True),
        StructField(PRICE, DoubleType(), True),
        StructField(IN_STOCK, BooleanType(), True),
        StructField(PROMO, BooleanType(), True),
        StructField(LAUNCHED_AT, TimestampType(), True),
        StructField(TITLE, StringType(), True),
    ]
)

INDEX_SCHEMA_USER = StructType([StructField(USER_ID, StringType(), False), StructField(USER_IDX, IntegerType(), False)])
INDEX_SCHEMA_ITEM = StructType([StructField(ITEM_ID, StringType(), False), StructField(ITEM_IDX, IntegerType(), False)])

RUN_METRICS_SCHEMA = StructType(
    [
        StructField(RUN_ID, StringType(), False),
        StructField(STEP, StringType(), False),
        StructField("metric", StringType(), False),
        StructField("value", DoubleType(), False),
    ]
)

__all__ = ["LongType"]
