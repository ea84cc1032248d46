"""Column names, reason codes and model names: the contract between steps, as plain strings (no Spark import, so
the Spark-free parts, such as `shelf serve`, share them). pipelines/core/schemas.py re-exports them with the
tables' Spark schemas."""

from __future__ import annotations

USER_ID = "user_id"
ITEM_ID = "item_id"
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
EVENT_TYPE = "event_type"
EVENT_TS = "event_ts"
VALUE = "value"
SESSION_ID = "session_id"
WEIGHT = "weight"
DECAY = "decay"
RUN_ID = "run_id"
AS_OF = "as_of"
SOURCE_FILE = "source_file"
RAW = "raw"
REASON = "reason"
STEP = "step"
CATEGORY = "category"
PRICE = "price"
IN_STOCK = "in_stock"
PROMO = "promo"
LAUNCHED_AT = "launched_at"
TITLE = "title"

EVENT_TYPES = ("view", "add_to_cart", "purchase", "rating")

# Reason codes of quarantine.events.
NULL_USER = "null_user"
NULL_ITEM = "null_item"
BAD_TIMESTAMP = "bad_timestamp"
FUTURE_TIMESTAMP = "future_timestamp"
STALE_TIMESTAMP = "stale_timestamp"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
NEGATIVE_VALUE = "negative_value"
BAD_VALUE = "bad_value"
BOT_USER = "bot_user"
UNPARSEABLE_ROW = "unparseable_row"
NON_PRODUCT = "non_product"
CANCELLED = "cancelled"
NETTED_OUT = "netted_out"  # a purchase fully cancelled by a later cancellation invoice
ZERO_PRICE = "zero_price"
BAD_ENCODING = "bad_encoding"  # bytes that are not UTF-8 (decoded as U+FFFD): the ids cannot be trusted
BAD_ID = "bad_id"  # a user or item id with control characters

# Columns of the model and list tables (gold.*_factors, gold.item_similarities, gold.candidates, gold.recommendations).
FEATURES = "features"  # a factor vector
NEIGHBOUR_IDX = "neighbour_idx"
RANK = "rank"
SCORE = "score"
REASONS = "reasons"
ALS_SCORE = "als_score"
EASE_SCORE = "ease_score"
REBUY_SCORE = "rebuy_score"
SOURCES = "sources"  # gold.candidates: the sources that proposed the item (CANDIDATE_SOURCES)
# gold.candidates' source tags (pipelines/candidates.py)
ALS_SOURCE, EASE_SOURCE, BUY_AGAIN_SOURCE = "als", "ease", "buy_again"
NEIGHBOURS_SOURCE, POPULAR_SOURCE, NEW_ARRIVAL_SOURCE = "neighbours", "popular", "new_arrival"

# gold.metrics: its model column and the names of the compared models (pipelines/baselines.py ranks them).
MODEL = "model"
PUBLISHED = "published"  # the lists the publish path wrote, as written
POPULARITY = "popularity"
RECENT_POPULARITY = "recent_popularity"
ITEM_KNN = "item_knn"
ALS_MODEL = "als"
EASE = "ease"
ALS_RERANK = "als_rerank"  # replay protocol: ALS + the re-rank
ITEM_KNN_FRESH = "item_knn_fresh"  # replay protocol: item-kNN that also sees the fresh window
REASON_CODES = (
    NULL_USER,
    NULL_ITEM,
    BAD_TIMESTAMP,
    FUTURE_TIMESTAMP,
    STALE_TIMESTAMP,
    UNKNOWN_EVENT_TYPE,
    NEGATIVE_VALUE,
    BAD_VALUE,
    BOT_USER,
    UNPARSEABLE_ROW,
    NON_PRODUCT,
    CANCELLED,
    NETTED_OUT,
    ZERO_PRICE,
    BAD_ENCODING,
    BAD_ID,
)

SIM_SOURCE = "source"  # gold.item_similarities: which method made the row
COOCCURRENCE = "cooccurrence"  # ... the co-occurrence neighbour lists (the re-rank's co-occurrence features)
