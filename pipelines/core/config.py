"""Typed configuration: the section models and ShelfConfig, with each source preset's defaults.

Every section is a frozen pydantic model that rejects unknown keys, so a typo fails at start-up
with the key's full path and the file it came from instead of being silently ignored. Reading
`conf/base.yaml`, an overlay and `--set key.path=value` overrides into a ShelfConfig is
pipelines/core/config_loading.py (`load_config`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.core import uris


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparkConfig(_Section):
    master: str | None = "local[*]"
    remote: str | None = None  # a Spark Connect server, e.g. sc://host:15002; set, master is not used
    app_name: str = "shelf"
    shuffle_partitions: int | None = None  # None: 2 x the cores Spark sees
    driver_memory: str = "4g"
    jars_dir: str = ".jars"
    checkpoint_dir: str | None = None  # None: <storage.root>/_checkpoints
    log_level: str = "ERROR"
    extra: dict[str, str] = Field(default_factory=dict)


class StorageConfig(_Section):
    root: str = ".data/tables"
    catalog: str | None = None  # e.g. "main.shelf": tables by name <catalog>.<layer>_<table>
    report_dir: str | None = None  # the report is in ops.reports; set this to also get its files in <dir>/<run_id>/
    # Prefix of every table's layer and of the models folder. The evaluation's holdout rehearsal runs the
    # publishing steps with "holdout_" (tables at <root>/holdout_gold/..., or <catalog>.holdout_gold_...).
    namespace: str = ""


class ColumnMapping(_Section):
    user_id: str = "user_id"
    item_id: str = "item_id"
    event_type: str = "event_type"
    event_ts: str = "event_ts"
    value: str | None = "value"
    session_id: str | None = "session_id"


class CatalogMapping(_Section):
    item_id: str = "item_id"
    category: str | None = "category"
    price: str | None = "price"
    in_stock: str | None = "in_stock"
    promo: str | None = "promo"
    launched_at: str | None = "launched_at"
    title: str | None = "title"


class SourceConfig(_Section):
    preset: Literal["synthetic", "online_retail", "movielens", "generic"] = "synthetic"
    path: str = ".data/demo/events"
    table: str | None = None  # a catalog table (cat.schema.events) read instead of path; generic preset only
    format: Literal["csv", "json", "parquet", "delta"] = "csv"
    header: bool = True
    delimiter: str = ","
    timestamp_format: str | None = None  # None: ISO-8601 / Spark's default parser
    columns: ColumnMapping = ColumnMapping()
    event_types: dict[str, str] = Field(
        default_factory=lambda: {
            "view": "view",
            "add_to_cart": "add_to_cart",
            "purchase": "purchase",
            "rating": "rating",
        }
    )
    catalog_path: str | None = None  # None: no catalogue file (the synthetic preset: the demo's, .data/demo/catalog)
    catalog_format: Literal["csv", "json", "parquet", "delta"] = "csv"
    catalog_columns: CatalogMapping = CatalogMapping()


class DirtyRates(_Section):
    null_user: float = 0.004
    bad_timestamp: float = 0.003
    future_timestamp: float = 0.002
    unknown_event_type: float = 0.003
    negative_value: float = 0.002
    duplicate: float = 0.01


class GenerateConfig(_Section):
    seed: int = 42
    users: int = 2000
    items: int = 800
    categories: int = 12
    sessions_per_user: float = 6.0
    days: int = 60
    end: str = "2026-11-01T00:00:00"  # last generated instant; as_of is usually this
    new_item_share: float = 0.1
    promo_share: float = 0.08
    out_of_stock_share: float = 0.05
    popularity_exponent: float = 1.1
    taste_strength: float = 4.0
    bots: int = 3
    bot_events: int = 3000
    format: Literal["csv", "parquet"] = "csv"
    dirty: DirtyRates = DirtyRates()


class CleanConfig(_Section):
    weights: dict[str, float] = Field(
        default_factory=lambda: {"view": 1.0, "add_to_cart": 3.0, "purchase": 5.0, "rating": 1.0}
    )
    half_life_days: float | None = 30.0  # None: no time decay (every event weighs the same whatever its age)
    window_days: int = 3650
    future_tolerance_hours: float = 1.0
    min_user_events: int = 2
    min_item_events: int = 2
    bot_max_events_per_day: float | None = 500.0  # None: no bot filter
    max_value: float = 1.0e6
    max_quarantine_rate: float = 0.2
    max_user_share: float = 0.2


class TuneGrid(_Section):
    rank: list[int] = Field(default_factory=lambda: [32, 16])
    reg_param: list[float] = Field(default_factory=lambda: [0.1, 0.01])
    alpha: list[float] = Field(default_factory=lambda: [10.0, 1.0])
    confidence: list[Literal["raw", "log1p"]] = ["log1p"]  # pydantic copies list defaults per instance
    # Half-lives (days; null: no decay) of the time decay in ALS's confidences. clean.half_life_days is always tried
    # first; this dimension varies fastest, so the second grid point is the first one with the other decay.
    half_life_days: list[float | None] = Field(default_factory=lambda: [None, 30.0])


EaseValues = Literal["binary", "log_count"]


class EaseConfig(_Section):
    """EASE (Steck 2019), the closed-form item-item model beside ALS (pipelines/core/ease.py)."""

    enabled: bool = True  # fit EASE when the catalogue has at most max_items items (ALS is always fitted)
    max_items: int = Field(20000, ge=1)  # above it the train step logs that it skips EASE: B is items x items
    l2: float = Field(500.0, gt=0)  # lambda in P = (X^T X + lambda I)^-1
    top_n: int = Field(200, ge=1)  # B's largest positive weights kept per item (gold.ease_neighbours)
    values: EaseValues = "binary"  # X: binary (touched or not) or log_count (log1p of the user's events on the item)


class TrainConfig(_Section):
    rank: int = 32
    reg_param: float = 0.05
    alpha: float = 10.0
    max_iter: int = 10
    nonnegative: bool = False
    seed: int = 42
    checkpoint_interval: int = 5
    num_blocks: int | None = None  # None: the session's default parallelism, capped at 4
    confidence: Literal["raw", "log1p"] = "log1p"
    # Tune ALS on a per-user leave-last-N validation split of the training data only, trying the grid in order
    # (the first point: the configured parameters) until the budget would be passed.
    tune: bool = True
    tune_budget_seconds: float | None = None  # None: 4 x the first grid point's ALS fit: tuning costs about 4 fits
    grid: TuneGrid = TuneGrid()
    ease: EaseConfig = EaseConfig()
    tune_k: int = 10  # tuning scores NDCG@tune_k on a per-user leave-last-N validation split
    validation_last_n: int = 1


class EvaluateConfig(_Section):
    # None: the preset's (movielens: random_item, the public MovieLens protocol; the others: temporal)
    protocol: Literal["temporal", "random_user", "random_item", "leave_last", "replay"] | None = None
    k: int = 10
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])  # metric-vs-k plot
    holdout_days: float = 7.0  # temporal: test = events in [as_of - holdout_days, as_of)
    # replay: ALS trains before T = as_of - replay_horizon_days - replay_fresh_days, [T, T + d) is the
    # fresh behaviour the re-rank sees, test = [T + d, as_of); items seen before T + d are not relevant.
    replay_fresh_days: float = Field(7.0, gt=0)
    replay_horizon_days: float = Field(7.0, gt=0)
    test_ratio: float = 0.25  # random_user / random_item: the MovieLens 75/25 protocol
    leave_last_n: int = 1
    seed: int = 42
    recent_days: float = 7.0  # recent popularity counts the last days of the training data
    knn_recent_items: int = 20  # item-kNN: each user's most recent items, bounds the self-join
    knn_neighbours: int = 50
    # "published" is the lists the publish path writes (train -> similarities -> candidates -> rerank run on the
    # training part, read back from the holdout's gold.recommendations): the product's quality. The others are
    # baselines scored on the same split.
    models: list[Literal["published", "popularity", "recent_popularity", "item_knn", "als", "ease"]] = [
        "published",
        "popularity",
        "recent_popularity",
        "item_knn",
        "als",
        "ease",
    ]  # pydantic copies list defaults per instance
    # unseen: a test item counts only if the user had not touched it in training (new items); any: every test item
    # counts, repeats included (buy-again: recommend.repeat_purchase), and the baselines may recommend them too.
    relevant: Literal["unseen", "any"] = "unseen"
    # `shelf run` evaluates before it publishes: fail refuses to publish (exit 6) when published NDCG@k is below
    # popularity's x (1 + gate_margin), warn logs it and publishes, off skips the check.
    gate: Literal["fail", "warn", "off"] = "fail"
    gate_margin: float = Field(0.0, ge=-1)


class SimilarityConfig(_Section):
    top_n: int = 50  # neighbours kept per item and source
    # als: cosine of item factors; cooccurrence: users in common; both: rows of each source; blend: one mix
    method: Literal["als", "cooccurrence", "both", "blend"] = "both"
    cooccurrence_measure: Literal["cosine", "jaccard"] = "cosine"
    min_support: int = 2  # users an item pair must share to get a co-occurrence score
    max_items_per_user: int = 50  # bounds the self-join on user: each user's most recent/heaviest items
    blend_als_weight: float = 0.5  # blend score = w * als + (1 - w) * cooccurrence
    block_rows: int = 256  # query rows per GEMM block
    block_items: int = 2048  # catalogue columns per GEMM block (block_rows x block_items floats stay in cache)


class RecommendConfig(_Section):
    candidates_k: int = 200
    # Event types that consume an item: it is never recommended to that user again (candidates, re-rank and
    # evaluation alike). None: the preset's (movielens: rating; synthetic, online_retail, generic: purchase).
    consumed_event_types: list[str] | None = None
    # Buy again: items the user consumed come back as candidates (source buy_again, reason buy_again), scored by
    # their repurchase cycle (rerank.weights.buy_again); false: a consumed item is never recommended again.
    repeat_purchase: bool = False
    buy_again_k: int = Field(20, ge=1)  # consumed items per user offered again, best repurchase score first
    recent_items: int = 5  # a user's most recently touched items whose neighbours become candidates
    neighbours_per_item: int = 10
    popular_k: int = 100  # popularity fallback for users without ALS factors
    new_arrivals_k: int = Field(20, ge=0)  # newest items (rerank.new_arrival_days) also offered to them; 0: none
    max_candidates: int = 300  # cap per user after the union


class RerankWeights(_Section):
    """Weights of the re-ranking features in the relevance score (udfs/rerank.py). The defaults of the
    session, cosine, popularity and co-occurrence weights were tuned on validation replay windows before the
    test windows (benchmarks/replay.py --tune; docs/EVALUATION.md "Does re-ranking help?")."""

    als: float = 1.0  # p_u . q_c
    session: float = 0.5  # s_u . q_c (with alpha 0: s_u = p_u, so this adds to the ALS weight)
    max_cosine: float = 0.0  # max cosine of q_c to the user's fresh items
    mean_cosine: float = 0.0
    popularity: float = 0.5  # distinct users in the fresh window / the most popular item's
    promo: float = 0.1  # the promotion boost
    new_arrival: float = 0.1  # the new-arrival boost
    price_fit: float = 0.1  # exp(-|log price - the user's fresh weighted mean log price|), 0 without prices
    cooc_sum: float = 0.5  # sum over fresh items j of pull_j * co-occurrence sim(j, c) (j's top-N neighbour list)
    cooc_max: float = 2.0  # max over fresh items j of co-occurrence sim(j, c)
    ease: float = 4.0  # the candidate's EASE score (x_u B)_c; 4: best of 1, 2, 4, 8 on a MovieLens validation split
    buy_again: float = 1.0  # the buy-again score of a consumed item (recommend.repeat_purchase); 0 otherwise


class RerankConfig(_Section):
    top_k: int = Field(10, ge=1)
    max_candidates: int = Field(300, ge=1)  # ALS-proposed per user before the kernel (best first); others too
    max_fresh_events: int = Field(1000, ge=1)  # per user, before the kernel (most recent first)
    fresh_days: float = Field(28.0, gt=0)  # events in [as_of - fresh_days, as_of) are the session
    half_life_days: float = Field(8.0, gt=0)  # decay of a fresh event's pull on the session vector
    alpha: float = Field(0.0, ge=0)  # s_u = p_u + alpha * sum_j w(type_j) * 2^(-age_j / half_life) * q_j
    event_weights: dict[str, float] = Field(
        default_factory=lambda: {"view": 1.0, "add_to_cart": 3.0, "purchase": 5.0, "rating": 1.0}
    )
    bought_window_days: float = Field(
        30.0, ge=0
    )  # fresh consumed items (recommend.consumed_event_types) in it: dropped
    blocked_categories: list[str] = Field(default_factory=list)
    category_cap: int | None = Field(None, ge=1)  # None: no cap (a shop that wants one sets it)
    new_arrival_days: float = Field(30.0, ge=0)  # launched within this many days before as_of
    trending_threshold: float = Field(0.5, ge=0, le=1)  # popularity at or above it earns reason "trending"
    similar_threshold: float = Field(0.5, ge=-1, le=1)  # max cosine at or above it earns "similar_to:<item>"
    cooc_threshold: float = Field(0.1, ge=0, le=1)  # co-occurrence sim at or above it earns it first
    mmr_lambda: float = Field(1.0, ge=0, le=1)  # 1: pure relevance order
    mmr_pool: int = Field(50, ge=1)  # most relevant candidates per user that MMR chooses from
    buckets: int | None = Field(None, ge=1)  # user hash partitions; None: spark.sql.shuffle.partitions
    weights: RerankWeights = RerankWeights()


class StreamConfig(_Section):
    """`shelf stream`: near-real-time re-ranking of the users with new events (pipelines/stream.py)."""

    source_path: str | None = None  # Delta table the tracker appends to; None: <storage.root>/landing/events
    checkpoint: str | None = None  # None: <storage.root>/_checkpoints/stream
    trigger: Literal["processing_time", "available_now"] = "processing_time"
    interval_seconds: float = Field(2.0, gt=0)  # processing_time: a micro-batch at most this often
    max_files_per_trigger: int | None = Field(None, ge=1)  # None: Delta's default (1000 files)
    name: str = "stream"  # tags quarantine and run-metrics rows: run_id = <name>-<batch id>
    max_hours_ahead: float = Field(48.0, gt=0)  # events later than the serving run's as_of + this are future
    popular_k: int = Field(50, ge=0)  # popular items offered to users without ALS factors
    kernel_buckets: int | None = Field(None, ge=1)  # partitions of a batch's users for the kernel; None: the cores
    shuffle_partitions: int = Field(2, ge=1)  # spark.sql.shuffle.partitions while a micro-batch re-ranks and MERGEs
    adaptive: bool = False  # spark.sql.adaptive.enabled while a micro-batch runs (each adaptive stage is a job)
    broadcast_joins: bool = False  # broadcast joins while a micro-batch runs (each broadcast is a job)
    merge_broadcast_mb: float = Field(10.0, ge=0)  # broadcast threshold in Delta's MERGE (its source is small); 0: off


class PrivacyConfig(_Section):
    pseudonymize_users: bool = False  # replace user ids by HMAC-SHA256(key, id) before anything is written
    key_env: str = "SHELF_PSEUDONYM_KEY"  # the environment variable holding the key (never a file, never logged)


# What each source preset changes when the config leaves the key out (docs/CONFIGURATION.md, "Presets").
# movielens: a rating is consumption (a film rated is never recommended again); ratings span decades and a
# random split has no "recent", so no time decay (0.157 -> 0.188 NDCG@10 measured) and no 10-year window (the
# public files start in 1995); people rate many films in a
# day, so no bot filter (it quarantined 4% of a MovieLens-1M sample); the public random 75/25 protocol.
# Shops (synthetic, online_retail) and generic: a purchase is consumption; the temporal protocol.
PRESET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "movielens": {
        "recommend": {"consumed_event_types": ["rating"]},
        "evaluate": {"protocol": "random_item"},
        "clean": {"half_life_days": None, "bot_max_events_per_day": None, "window_days": 36500},
    },
    "shop": {
        "recommend": {"consumed_event_types": ["purchase"]},
        "evaluate": {"protocol": "temporal"},
    },
    # the demo generator writes its catalogue here; the other presets have none unless source.catalog_path is set
    "synthetic": {"source": {"catalog_path": ".data/demo/catalog"}},
}


def with_preset_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a ShelfConfig's raw sections) with the preset's defaults filled in where a key is absent."""
    merged = dict(data)
    source = merged.get("source") or {}
    preset = source.preset if isinstance(source, SourceConfig) else source.get("preset", "synthetic")
    chosen = ["movielens"] if preset == "movielens" else ["shop", "synthetic"] if preset == "synthetic" else ["shop"]
    for section, values in (item for name in chosen for item in PRESET_DEFAULTS[name].items()):
        given = merged.get(section) or {}
        if isinstance(given, BaseModel):
            given = given.model_dump(exclude_unset=True)
        merged[section] = {**values, **given}
    return merged


class ShelfConfig(_Section):
    env: str = "local"
    spark: SparkConfig = SparkConfig()
    storage: StorageConfig = StorageConfig()
    source: SourceConfig = SourceConfig()
    generate: GenerateConfig = GenerateConfig()
    clean: CleanConfig = CleanConfig()
    train: TrainConfig = TrainConfig()
    similarities: SimilarityConfig = SimilarityConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    recommend: RecommendConfig = RecommendConfig()
    rerank: RerankConfig = RerankConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    stream: StreamConfig = StreamConfig()

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        return with_preset_defaults(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _table_source(self) -> ShelfConfig:
        if self.source.table and self.source.preset != "generic":
            raise ValueError(
                f"source.table reads columns named by source.columns, which the {self.source.preset} preset does "
                "not use; set source.preset to generic"
            )
        return self

    @model_validator(mode="after")
    def _client_paths(self) -> ShelfConfig:
        """With spark.remote the server resolves relative paths against its own working directory: bare relative
        local paths are made absolute here, on the client, so they name the folder the user meant."""
        if not self.spark.remote:
            return self
        storage = {k: _absolute(getattr(self.storage, k)) for k in ("root", "report_dir")}
        source = {k: _absolute(getattr(self.source, k)) for k in ("path", "catalog_path")}
        spark = {"checkpoint_dir": _absolute(self.spark.checkpoint_dir)}
        object.__setattr__(self, "storage", self.storage.model_copy(update=storage))
        object.__setattr__(self, "source", self.source.model_copy(update=source))
        object.__setattr__(self, "spark", self.spark.model_copy(update=spark))
        return self

    @property
    def consumed_event_types(self) -> list[str]:
        """The event types that consume an item (recommend.consumed_event_types, resolved from the preset)."""
        return list(self.recommend.consumed_event_types or ["purchase"])


def _absolute(location: str | None) -> str | None:
    """A bare relative local path made absolute against the client's working directory; URIs unchanged."""
    return None if location is None else uris.qualify(location)
