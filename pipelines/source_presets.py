"""How each source preset's files are read: the text layout (separator, header, field names), the mapping
of parsed lines onto the canonical string columns, and the item attributes the preset's own files carry.

`pipelines.ingest` reads a source's lines and runs them through these; `pipelines.core.events` types and
classifies the canonical rows (its reason codes are listed in `pipelines/ingest.py`'s docstring).

Presets:
- generic / synthetic: `source.columns` maps the canonical columns to the source's, `source.event_types`
  maps source values to view/add_to_cart/purchase/rating, `source.timestamp_format` is a Spark datetime
  pattern (None: ISO-8601) or `epoch_seconds`. synthetic is generic with the default mapping.
- movielens: u.data (tab, no header), ratings.dat (`::`, no header) or ratings.csv (header): rating
  events, value = rating, epoch-second timestamps. The file is chosen by its name.
- online_retail (UCI Online Retail as published): one purchase per invoice line, user = CustomerID,
  item = StockCode, value = Quantity, session = InvoiceNo. Choices:
  * rows without CustomerID -> null_user (nobody to recommend to);
  * stock codes that are not products (POST, DOT, M, C2, D, S, BANK CHARGES, AMAZONFEE, CRUK, PADS,
    B, DCGS..., gift_...) -> non_product: a product code is five digits plus optional letters;
  * invoices starting with C are cancellations -> cancelled (a return is not interest). Their quantity
    nets out the same customer's purchases of the same stock code, most recent purchase first:
    a purchase line cancelled completely -> netted_out, a partly cancelled one keeps the rest
    as its value. Cancellations without a matching purchase in the file net out nothing;
  * UnitPrice 0 -> zero_price (free samples and manual fixes), a negative price -> negative_value,
    Quantity <= 0 on a non-cancellation -> negative_value (stock adjustments).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.core import sources, uris
from pipelines.core.config import SourceConfig
from pipelines.core.errors import InputDataError
from pipelines.core.events import (
    _CANCEL_QTY,
    _CORRUPT,
    _EVENT_TS_RAW,
    _EVENT_TYPE_RAW,
    _PRESET_REASON,
    _PRICE_RAW,
    _TITLE_RAW,
    _VALUE_RAW,
    _blank_to_null,
)
from pipelines.core.schemas import (
    BAD_VALUE,
    CANCELLED,
    CATALOG_SCHEMA,
    CATEGORY,
    EVENT_TS,
    IN_STOCK,
    ITEM_ID,
    LAUNCHED_AT,
    NEGATIVE_VALUE,
    NON_PRODUCT,
    NULL_ITEM,
    NULL_USER,
    PRICE,
    PROMO,
    RAW,
    REASON,
    SESSION_ID,
    SOURCE_FILE,
    TITLE,
    UNPARSEABLE_ROW,
    USER_ID,
    ZERO_PRICE,
)

PATH_KEY = "source.path"

RETAIL_COLUMNS = (
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
)
RETAIL_PRODUCT_CODE = r"^[0-9]{5}[A-Za-z]*$"
MOVIELENS_COLUMNS = ("userId", "movieId", "rating", "timestamp")


@dataclass(frozen=True)
class TextLayout:
    """How to split a text source into fields: separator, whether files start with a header, field names."""

    sep: str
    header: bool
    columns: tuple[str, ...]


# ---------------------------------------------------------------- parsing: lines -> canonical strings


def with_csv_fields(lines: DataFrame, layout: TextLayout) -> DataFrame:
    """Parse each `raw` line into a `fields` struct of strings; wrong field counts set `_corrupt`."""
    schema = ", ".join(f"`{c}` string" for c in [*layout.columns, _CORRUPT])
    # escape '"': a quote inside a quoted field is doubled (RFC 4180: "a ""b"" c" is a "b" c), not backslashed
    options = {"sep": layout.sep, "escape": '"', "mode": "PERMISSIVE", "columnNameOfCorruptRecord": _CORRUPT}
    return lines.withColumn("fields", F.from_csv(F.col(RAW), schema, options))


def with_json_fields(lines: DataFrame, columns: tuple[str, ...]) -> DataFrame:
    schema = ", ".join(f"`{c}` string" for c in [*columns, _CORRUPT])
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": _CORRUPT}
    return lines.withColumn("fields", F.from_json(F.col(RAW), schema, options))


def filter_header_lines(parsed: DataFrame, layout: TextLayout) -> DataFrame:
    """Drop each file's header line: the line whose fields are exactly the column names."""
    if not layout.header:
        return parsed
    is_header = F.lit(True)
    for name in layout.columns:
        is_header = is_header & F.coalesce(F.col(f"fields.`{name}`") == F.lit(name), F.lit(False))
    return parsed.filter(~is_header)


def with_corrupt_flag(parsed: DataFrame) -> DataFrame:
    """Blank lines and lines the parser could not split into the schema's fields are unparseable."""
    corrupt = F.col(f"fields.{_CORRUPT}").isNotNull() | (F.trim(F.col(RAW)) == "") | F.col("fields").isNull()
    return parsed.withColumn(_CORRUPT, corrupt)


def to_movielens_canonical(parsed: DataFrame) -> DataFrame:
    user, item, rating, ts = (_blank_to_null(F.col(f"fields.`{c}`")) for c in MOVIELENS_COLUMNS)
    return parsed.select(
        RAW,
        SOURCE_FILE,
        _CORRUPT,
        user.alias(USER_ID),
        item.alias(ITEM_ID),
        F.lit("rating").alias(_EVENT_TYPE_RAW),
        ts.alias(_EVENT_TS_RAW),
        rating.alias(_VALUE_RAW),
        F.lit(None).cast("string").alias(SESSION_ID),
        F.lit(None).cast("string").alias(_PRESET_REASON),
        F.lit(None).cast("double").alias(_CANCEL_QTY),
        F.lit(None).cast("string").alias(_TITLE_RAW),
        F.lit(None).cast("string").alias(_PRICE_RAW),
    )


def to_retail_canonical(parsed: DataFrame) -> DataFrame:
    """Online Retail invoice lines -> canonical purchases plus the preset's own reason codes."""
    invoice, stock, description, quantity, date, price, customer, _ = (
        _blank_to_null(F.col(f"fields.`{c}`")) for c in RETAIL_COLUMNS
    )
    # CustomerID is published as "17850" (or "17850.0" in some exports): keep the integer text.
    user = F.regexp_replace(customer, r"\.0+$", "")
    price_value = price.try_cast("double")
    qty_value = quantity.try_cast("double")
    is_cancel = F.coalesce(invoice.startswith("C"), F.lit(False))
    reason = (
        F.when(user.isNull(), F.lit(NULL_USER))
        .when(stock.isNull(), F.lit(NULL_ITEM))
        .when(~stock.rlike(RETAIL_PRODUCT_CODE), F.lit(NON_PRODUCT))
        .when(is_cancel, F.lit(CANCELLED))
        .when(price.isNotNull() & price_value.isNull(), F.lit(BAD_VALUE))
        .when(price_value == 0, F.lit(ZERO_PRICE))
        .when(price_value < 0, F.lit(NEGATIVE_VALUE))
        .when(qty_value <= 0, F.lit(NEGATIVE_VALUE))
    )
    return parsed.select(
        RAW,
        SOURCE_FILE,
        _CORRUPT,
        user.alias(USER_ID),
        stock.alias(ITEM_ID),
        F.lit("purchase").alias(_EVENT_TYPE_RAW),
        date.alias(_EVENT_TS_RAW),
        quantity.alias(_VALUE_RAW),
        invoice.alias(SESSION_ID),
        reason.alias(_PRESET_REASON),
        F.when(is_cancel, -qty_value).alias(_CANCEL_QTY),
        F.trim(description).alias(_TITLE_RAW),
        price.alias(_PRICE_RAW),
    )


# ---------------------------------------------------------------- item attributes carried by the source

_COUNT = "_count"


def to_retail_items(classified: DataFrame) -> DataFrame:
    """Online Retail invoice lines -> one catalog row per product code (CATALOG_SCHEMA).

    title: the product's most frequent Description (ties: alphabetically first); price: the median
    UnitPrice over its lines with a positive price; launched_at: its first line in the file (the
    new-arrival rule reads it as "first sold"); category, in_stock and promo are not published and
    stay null. Lines without a customer still describe their product, so every line with a product
    code counts, whatever its reason code.
    """
    # By code, not by reason: a line without a customer is quarantined as null_user before its code is looked at.
    products = classified.filter(
        F.coalesce(F.col(REASON) != UNPARSEABLE_ROW, F.lit(True)) & F.col(ITEM_ID).rlike(RETAIL_PRODUCT_CODE)
    )
    by_frequency = Window.partitionBy(ITEM_ID).orderBy(F.col(_COUNT).desc(), F.col(TITLE).asc())
    titles = (
        products.filter(F.col(_TITLE_RAW).isNotNull() & (F.col(_TITLE_RAW) != ""))
        .groupBy(ITEM_ID, F.col(_TITLE_RAW).alias(TITLE))
        .agg(F.count(F.lit(1)).alias(_COUNT))
        .withColumn("_n", F.row_number().over(by_frequency))
        .filter(F.col("_n") == 1)
        .select(ITEM_ID, TITLE)
    )
    price = F.col(_PRICE_RAW).try_cast("double")
    attributes = products.groupBy(ITEM_ID).agg(
        F.median(F.when(price > 0, price)).alias(PRICE), F.min(EVENT_TS).alias(LAUNCHED_AT)
    )
    return (
        attributes.join(titles, on=ITEM_ID, how="left")
        .withColumn(CATEGORY, F.lit(None).cast("string"))
        .withColumn(IN_STOCK, F.lit(None).cast("boolean"))
        .withColumn(PROMO, F.lit(None).cast("boolean"))
        .select(*[F.col(f.name).cast(f.dataType) for f in CATALOG_SCHEMA.fields])
    )


# MovieLens 100k's u.item flags 19 genres in this order.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def movielens_items_path(spark: SparkSession, ratings_path: str) -> str | None:
    """The movies file beside a MovieLens ratings file (movies.csv, movies.dat or u.item), if present."""
    folder, _, name = ratings_path.rstrip("/").rpartition("/")
    sibling = {"ratings.csv": "movies.csv", "ratings.dat": "movies.dat", "u.data": "u.item"}.get(name)
    if sibling is None:
        return None
    path = uris.join(folder, sibling) if folder else sibling
    return path if sources.path_exists(spark, path) else None


def read_movielens_items(spark: SparkSession, path: str) -> DataFrame:
    """A MovieLens movies file -> one catalog row per movie: title, category = its first genre."""
    name = PurePath(path).name
    if name == "movies.csv":
        raw = sources.read_source(spark, path, "csv", PATH_KEY, options={"header": "true", "escape": '"'})
        item, title = F.col("movieId"), F.col("title")
        category = F.split(F.col("genres"), r"\|").getItem(0)
    elif name == "movies.dat":
        raw = sources.read_source(
            spark, path, "csv", PATH_KEY, options={"sep": "::", "encoding": "ISO-8859-1", "quote": ""}
        )
        item, title = F.col("_c0"), F.col("_c1")
        category = F.split(F.col("_c2"), r"\|").getItem(0)
    else:  # u.item: id|title|release|video release|url|19 genre flags
        raw = sources.read_source(
            spark, path, "csv", PATH_KEY, options={"sep": "|", "encoding": "ISO-8859-1", "quote": ""}
        )
        flags = [F.when(F.col(f"_c{5 + i}") == "1", F.lit(g)) for i, g in enumerate(ML100K_GENRES)]
        item, title, category = F.col("_c0"), F.col("_c1"), F.coalesce(*flags)
    no_genre = category.isin("(no genres listed)", "unknown")
    return raw.select(
        F.trim(item).alias(ITEM_ID),
        F.when(~no_genre, category).alias(CATEGORY),
        F.lit(None).cast("double").alias(PRICE),
        F.lit(None).cast("boolean").alias(IN_STOCK),
        F.lit(None).cast("boolean").alias(PROMO),
        F.lit(None).cast("timestamp").alias(LAUNCHED_AT),
        F.trim(title).alias(TITLE),
    ).filter(F.col(ITEM_ID).isNotNull())


def to_source_items(spark: SparkSession, source: SourceConfig, classified: DataFrame) -> DataFrame | None:
    """The item attributes the preset's own files carry (bronze.items), or None when it carries none."""
    if source.preset == "online_retail":
        return to_retail_items(classified)
    if source.preset == "movielens":
        path = movielens_items_path(spark, source.path)
        return read_movielens_items(spark, path) if path else None
    return None


# ---------------------------------------------------------------- text layouts


def text_layout(spark: SparkSession, source: SourceConfig) -> TextLayout:
    """Separator, header and field names of a text source; header names come from the file itself."""
    if source.preset == "movielens":
        name = PurePath(source.path).name
        if name.endswith(".dat"):
            return TextLayout("::", False, MOVIELENS_COLUMNS)
        if name.endswith(".data"):
            return TextLayout("\t", False, MOVIELENS_COLUMNS)
        header = _header_columns(spark, source.path, ",")
        require_columns(header, MOVIELENS_COLUMNS, source.path, PATH_KEY)
        return TextLayout(",", True, header)
    if source.preset == "online_retail":
        header = _header_columns(spark, source.path, ",")
        require_columns(header, RETAIL_COLUMNS, source.path, PATH_KEY)
        return TextLayout(",", True, header)
    sep = source.delimiter
    if source.header:
        columns = _header_columns(spark, source.path, sep)
    else:
        width = len(_header_columns(spark, source.path, sep, header=False))
        columns = tuple(f"_c{i}" for i in range(width))
    require_columns(columns, mapped_columns(source, optional=False), source.path, "source.columns")
    return TextLayout(sep, source.header, columns)


def _header_columns(spark: SparkSession, path: str, sep: str, header: bool = True) -> tuple[str, ...]:
    options = {"header": str(header).lower(), "sep": sep, "escape": '"', "inferSchema": "false"}
    df = sources.read_source(spark, path, "csv", PATH_KEY, options=options)
    return tuple(c for c in df.columns if c != "_source_file")


def mapped_columns(source: SourceConfig, optional: bool = True) -> tuple[str, ...]:
    """The source column names `source.columns` maps the canonical columns to (generic and synthetic presets);
    optional=False leaves out session_id, which a source may lack (its rows then have no session)."""
    mapping = source.columns
    names = (
        mapping.user_id,
        mapping.item_id,
        mapping.event_type,
        mapping.event_ts,
        mapping.value,
        mapping.session_id if optional else None,
    )
    return tuple(n for n in names if n is not None)


def require_columns(found: tuple[str, ...], wanted: tuple[str, ...], path: str, key: str) -> None:
    """Raise InputDataError naming `key` when a column of `wanted` is not in `found` (a source's columns)."""
    missing = [c for c in wanted if c not in found]
    glued = [d for d in (";", "\t", "|", ",") if len(found) == 1 and d in found[0]]
    if missing and glued:
        raise InputDataError(
            f"Source {path} has a single column '{found[0]}' that looks delimited by {glued[0]!r}; "
            f"set source.delimiter to {glued[0]!r}."
        )
    if missing:
        raise InputDataError(
            f"Source {path} has no column '{missing[0]}' (it has {', '.join(found) or 'none'}); "
            f"fix {key} or the source file."
        )
