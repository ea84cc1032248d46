"""The step sections of the configuration (generate, clean, train, evaluate, similarities, recommend, rerank,
stream, privacy) and Section, the base of every section model.

Each field's description is the comment on its line, or the comment lines directly above it;
pipelines/core/config_reference.py turns them into docs/CONFIG_REFERENCE.md. ShelfConfig, the data-side
sections (spark, storage, source) and the source presets' defaults are pipelines/core/config.py.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.core.errors import EnvironmentSetupError


class Section(BaseModel):
    """A frozen section that rejects unknown keys, so a typo fails at start-up with the key's full path."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DirtyRates(Section):
    """Shares of the generated events damaged on purpose, one defect per row, so that ingest's quarantine counts
    per reason code can be checked against them."""

    null_user: float = 0.004  # rows whose user_id is null or empty (reason null_user)
    bad_timestamp: float = 0.003  # rows with an unparseable timestamp (bad_timestamp)
    future_timestamp: float = 0.002  # rows dated 2 to 400 days after generate.end (future_timestamp)
    unknown_event_type: float = 0.003  # rows whose event type is none of the known ones (unknown_event_type)
    negative_value: float = 0.002  # rows with a negative value (negative_value)
    duplicate: float = 0.01  # exact copies of clean rows appended, as a share of the events


class GenerateConfig(Section):
    """`shelf generate`: the demo shop (pipelines/generate.py), written to source.path and source.catalog_path."""

    seed: int = 42  # the generator's random seed: the same seed gives identical files
    users: int = 2000  # users (shoppers) generated, bots not included
    items: int = 800  # items in the catalogue
    categories: int = 12  # item categories
    sessions_per_user: float = 6.0  # mean sessions per user (heavy-tailed: active users have many more)
    days: int = 60  # days of history before generate.end that the sessions spread over
    end: str = "2026-11-01T00:00:00"  # last generated instant; as_of is usually this
    new_item_share: float = 0.1  # share of items launched in the last 7 days before end (the new arrivals)
    promo_share: float = 0.08  # share of items on promotion
    out_of_stock_share: float = 0.05  # share of items out of stock
    popularity_exponent: float = 1.1  # item popularity falls as 1 / rank^popularity_exponent (a power law)
    # logit added to a user's favourite category (a second favourite, for half the users, gets 0.7 x it): how much
    # taste, rather than popularity, decides what a user looks at
    taste_strength: float = 4.0
    bots: int = 3  # bot users added, each with bot_events events on one day (clean's bot filter finds them)
    bot_events: int = 3000  # events per bot user
    format: Literal["csv", "parquet"] = "csv"  # the events file's format (csv with a header); the catalogue is csv
    dirty: DirtyRates = DirtyRates()  # shares of deliberately broken rows (generate.dirty)


class CleanConfig(Section):
    """`shelf clean`: deduplication, the bot and minimum-support filters, weights and decay (pipelines/clean.py)."""

    # interaction weight per event type in silver.interactions (a rating weighs its own value)
    weights: dict[str, float] = Field(
        default_factory=lambda: {"view": 1.0, "add_to_cart": 3.0, "purchase": 5.0, "rating": 1.0}
    )
    # days: an event's weight is multiplied by 2^(-age_days / half_life_days) relative to as_of; None: no time decay
    # (every event weighs the same whatever its age)
    half_life_days: float | None = 30.0
    window_days: int = 3650  # events before as_of - window_days are quarantined (stale_timestamp)
    future_tolerance_hours: float = 1.0  # events after as_of + this are quarantined (future_timestamp)
    min_user_events: int = 2  # users with fewer events (after the bot filter) are filtered out by minimum support
    min_item_events: int = 2  # items with fewer events (after the bot filter) are filtered out by minimum support
    # users with more events than this on an active day are bots: their rows are quarantined (bot_user); None: no
    # bot filter
    bot_max_events_per_day: float | None = 500.0
    max_value: float = 1.0e6  # values above it (or not a number) are quarantined as bad_value
    # clean's quality gate fails when the share of ingested rows quarantined (bots included) is above it
    max_quarantine_rate: float = 0.2
    max_user_share: float = 0.2  # clean's quality gate fails when one user has more than this share of accepted rows


class TuneGrid(Section):
    """The values train's tuning tries (train.grid), in order: the first point is each list's first value (not
    train.rank / reg_param / alpha, which are fitted when train.tune is off)."""

    rank: list[int] = Field(default_factory=lambda: [32, 16])  # ALS ranks tried
    reg_param: list[float] = Field(default_factory=lambda: [0.1, 0.01])  # ALS regularisations tried
    alpha: list[float] = Field(default_factory=lambda: [10.0, 1.0])  # ALS confidence scales tried
    confidence: list[Literal["raw", "log1p"]] = ["log1p"]  # confidences tried (train.confidence)
    # Half-lives (days; null: no decay) of the time decay in ALS's confidences. clean.half_life_days is always tried
    # first; this dimension varies fastest, so the second grid point is the first one with the other decay.
    half_life_days: list[float | None] = Field(default_factory=lambda: [None, 30.0])


EaseValues = Literal["binary", "log_count"]


class EaseConfig(Section):
    """EASE (Steck 2019), the closed-form item-item model beside ALS (pipelines/core/ease.py)."""

    enabled: bool = True  # fit EASE when the catalogue has at most max_items items (ALS is always fitted)
    max_items: int = Field(20000, ge=1)  # above it the train step logs that it skips EASE: B is items x items
    l2: float = Field(500.0, gt=0)  # lambda in P = (X^T X + lambda I)^-1
    top_n: int = Field(200, ge=1)  # B's largest positive weights kept per item (gold.ease_neighbours)
    values: EaseValues = "binary"  # X: binary (touched or not) or log_count (log1p of the user's events on the item)
    precision: Literal["float32", "float64"] = (
        "float32"  # the driver's inverse: float32 halves float64's time and memory
    )


class TrainConfig(Section):
    """`shelf train`: implicit-feedback ALS (Spark MLlib), its tuning, and EASE."""

    rank: int = 32  # latent factors per user and item
    reg_param: float = 0.05  # ALS's L2 regularisation (regParam)
    alpha: float = 10.0  # ALS's implicit-feedback confidence scale: confidence = 1 + alpha x rating
    max_iter: int = 10  # ALS iterations
    nonnegative: bool = False  # constrain the factors to be non-negative
    seed: int = 42  # ALS's random seed (initial factors)
    checkpoint_interval: int = 5  # ALS checkpoints every this many iterations (spark.checkpoint_dir), cutting lineage
    num_blocks: int | None = None  # None: the session's default parallelism, capped at 4
    confidence: Literal["raw", "log1p"] = "log1p"  # ALS's rating: a pair's strength (raw) or log1p of it
    # Tune ALS on a per-user leave-last-N validation split of the training data only, trying the first tune_points
    # points of the grid in order. In `shelf run` (and after `shelf evaluate` for the run id) the holdout
    # rehearsal tunes and the publishing train fits with the parameters it chose: what the evaluation measured.
    tune: bool = True
    tune_points: int = Field(2, ge=1)  # grid points tried, in grid order: a count, so the choice is machine-independent
    grid: TuneGrid = TuneGrid()  # the values tuning tries (train.grid)
    ease: EaseConfig = EaseConfig()  # EASE, fitted beside ALS (train.ease)
    tune_k: int = 10  # tuning scores NDCG@tune_k on a per-user leave-last-N validation split
    validation_last_n: int = 1  # tuning's validation split: each user's last N interactions


class EvaluateConfig(Section):
    """`shelf evaluate`: the offline protocol, the baselines and the gate before publishing."""

    # None: the preset's (movielens: random_item, the public MovieLens protocol; the others: temporal)
    protocol: Literal["temporal", "random_user", "random_item", "leave_last", "replay"] | None = None
    k: int = 10  # the cutoff of the reported metrics (NDCG@k, precision@k...) and of the gate
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])  # the cutoffs of the metric-vs-k plot (k added)
    holdout_days: float = 7.0  # temporal: test = events in [as_of - holdout_days, as_of)
    # replay: ALS trains before T = as_of - replay_horizon_days - replay_fresh_days, [T, T + d) is the
    # fresh behaviour the re-rank sees, test = [T + d, as_of); items seen before T + d are not relevant.
    replay_fresh_days: float = Field(7.0, gt=0)
    replay_horizon_days: float = Field(7.0, gt=0)  # replay: days of the test window [T + d, as_of)
    test_ratio: float = 0.25  # random_user / random_item: the MovieLens 75/25 protocol
    leave_last_n: int = 1  # leave_last: each user's last N interactions are the test
    seed: int = 42  # the random splits' seed (random_user, random_item)
    recent_days: float = 7.0  # recent popularity counts the last days of the training data
    knn_recent_items: int = 20  # item-kNN: each user's most recent items, bounds the self-join
    knn_neighbours: int = 50  # item-kNN: co-occurrence neighbours kept per item
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
    ]
    # unseen: a test item counts only if the user had not owned it in training (consumed: recommend.consumed_event_types,
    # the publish path's rule; a viewed item bought later counts) and the baselines skip owned items; any: every test item
    # counts, repeats included, and the baselines may recommend them too. None: any when recommend.repeat_purchase
    # is on (a buy-again list is scored on what the user buys, again or not), else unseen.
    relevant: Literal["unseen", "any"] | None = None
    # `shelf run` evaluates before it publishes: fail refuses to publish (exit 6) when published NDCG@k is below
    # popularity's x (1 + gate_margin), warn logs it and publishes, off skips the check.
    gate: Literal["fail", "warn", "off"] = "fail"
    gate_margin: float = Field(0.0, ge=-1)  # the gate's margin over popularity's NDCG@k (0.1: 10% better)


class SimilarityConfig(Section):
    """`shelf similarities`: item neighbour lists from ALS factors and from co-occurrence."""

    top_n: int = 50  # neighbours kept per item and source
    # als: cosine of item factors; cooccurrence: users in common; both: rows of each source; blend: one mix
    method: Literal["als", "cooccurrence", "both", "blend"] = "both"
    # co-occurrence score of a pair: cosine (shared users / sqrt(users_i x users_j)) or jaccard (shared / union)
    cooccurrence_measure: Literal["cosine", "jaccard"] = "cosine"
    min_support: int = 2  # users an item pair must share to get a co-occurrence score
    max_items_per_user: int = 50  # bounds the self-join on user: each user's most recent/heaviest items
    blend_als_weight: float = 0.5  # blend score = w * als + (1 - w) * cooccurrence
    block_rows: int = 256  # query rows per GEMM block
    block_items: int = 2048  # catalogue columns per GEMM block (block_rows x block_items floats stay in cache)


class RecommendConfig(Section):
    """`shelf candidates`: each user's candidate items before the re-rank."""

    candidates_k: int = 200  # ALS (and EASE) candidates per user: the best-scored items the user does not own
    # Event types that consume an item: it is never recommended to that user again (candidates, re-rank and
    # evaluation alike). None: the preset's (movielens: rating; synthetic, online_retail, generic: purchase).
    consumed_event_types: list[str] | None = None
    # Buy again: items the user consumed come back as candidates (source buy_again, reason buy_again), scored by
    # how often and how lately the user bought them (rerank.weights.buy_again); false: a consumed item is never
    # recommended again.
    repeat_purchase: bool = False
    buy_again_k: int = Field(20, ge=1)  # consumed items per user offered again, best rebuy_score first
    # rebuy_score = log1p(days the user bought the item) * 2^(-days since the last time / this); 90: best of 30, 90,
    # 180, 365 on an Online Retail validation week (docs/EVALUATION.md "Buy again")
    buy_again_half_life_days: float = Field(90.0, gt=0)
    recent_items: int = 5  # a user's most recently touched items whose neighbours become candidates
    neighbours_per_item: int = 10  # the best neighbours taken from each of those items' lists
    popular_k: int = 100  # popularity fallback for users without ALS factors
    new_arrivals_k: int = Field(20, ge=0)  # newest items (rerank.new_arrival_days) also offered to them; 0: none
    max_candidates: int = 300  # cap per user after the union


class RerankWeights(Section):
    """Weights of the re-ranking features in the relevance score (udfs/rerank.py). The defaults of the
    session, cosine, popularity and co-occurrence weights were tuned on validation replay windows before the
    test windows (benchmarks/replay.py --tune; docs/EVALUATION.md "Does re-ranking help?")."""

    als: float = 1.0  # p_u . q_c
    session: float = 0.5  # s_u . q_c (with alpha 0: s_u = p_u, so this adds to the ALS weight)
    max_cosine: float = 0.0  # max cosine of q_c to the user's fresh items
    mean_cosine: float = 0.0  # mean cosine of q_c to the user's fresh items
    popularity: float = 0.5  # distinct users in the fresh window / the most popular item's
    promo: float = 0.1  # the promotion boost
    new_arrival: float = 0.1  # the new-arrival boost
    price_fit: float = 0.1  # exp(-|log price - the user's fresh weighted mean log price|), 0 without prices
    cooc_sum: float = 0.5  # sum over fresh items j of pull_j * co-occurrence sim(j, c) (j's top-N neighbour list)
    cooc_max: float = 2.0  # max over fresh items j of co-occurrence sim(j, c)
    # the candidate's EASE score (x_u B)_c; 4: best of 1, 2, 4, 8 on a MovieLens validation split (shelf tune tries 0-16
    # on your data; 0 on Online Retail: conf/online_retail.yaml)
    ease: float = 4.0
    # the buy-again score of a consumed item (recommend.repeat_purchase), 0 otherwise; 8: best of 1, 4, 8 on an Online
    # Retail validation week (docs/EVALUATION.md "Buy again")
    buy_again: float = 8.0


class RerankConfig(Section):
    """`shelf rerank`: the session-aware re-rank and business rules. fresh_days, half_life_days, alpha,
    category_cap, mmr_lambda and the weights were tuned on validation replay windows that end before the first
    test day (benchmarks/replay.py --tune --test-windows, docs/EVALUATION.md "Does re-ranking help?"); the other
    values are business choices."""

    top_k: int = Field(10, ge=1)  # items per user in the published lists (gold.recommendations)
    max_candidates: int = Field(300, ge=1)  # ALS-proposed per user before the kernel (best first); others too
    # per user before the kernel, most recent first (older ones are dropped)
    max_fresh_events: int = Field(1000, ge=1)
    fresh_days: float = Field(28.0, gt=0)  # events in [as_of - fresh_days, as_of) form the session
    half_life_days: float = Field(8.0, gt=0)  # decay of a fresh event's pull on the session vector
    # s_u = p_u + alpha * sum_j w(type_j) * 2^(-age_j / half_life) * q_j; 0: the fresh events' pull on the session
    # vector lowered validation NDCG
    alpha: float = Field(0.0, ge=0)
    # w(type): a fresh event's pull on the session vector by event type
    event_weights: dict[str, float] = Field(
        default_factory=lambda: {"view": 1.0, "add_to_cart": 3.0, "purchase": 5.0, "rating": 1.0}
    )
    # days: fresh consumed items (recommend.consumed_event_types) in it: dropped
    bought_window_days: float = Field(30.0, ge=0)
    blocked_categories: list[str] = Field(default_factory=list)  # items in these categories are never recommended
    # None: no cap (a shop that wants one sets it); e.g. 3: at most 3 items per category (cost NDCG@10 on both
    # replay datasets)
    category_cap: int | None = Field(None, ge=1)
    new_arrival_days: float = Field(30.0, ge=0)  # launched within this many days before as_of
    trending_threshold: float = Field(0.5, ge=0, le=1)  # popularity at or above it earns reason "trending"
    # factor cosine to a fresh item at or above it earns "similar_to:<item>"
    similar_threshold: float = Field(0.5, ge=-1, le=1)
    # co-occurrence similarity at or above it earns similar_to:<item> first
    cooc_threshold: float = Field(0.1, ge=0, le=1)
    # MMR's relevance-diversity trade-off; 1.0 = pure relevance order (every MMR lambda < 1 lowered validation NDCG)
    mmr_lambda: float = Field(1.0, ge=0, le=1)
    mmr_pool: int = Field(50, ge=1)  # most relevant candidates per user that MMR chooses from
    buckets: int | None = Field(None, ge=1)  # user hash partitions; None: spark.sql.shuffle.partitions
    weights: RerankWeights = RerankWeights()  # the re-ranking features' weights in the relevance score
    tune_windows: int = Field(1, ge=1)  # shelf tune: replay validation windows ending at as_of, one horizon apart
    tune_rounds: int = Field(3, ge=1)  # shelf tune: rounds of the greedy coordinate search over its grid


class KafkaConfig(Section):
    """`stream.source: kafka`: the topic a tracker publishes events to, read with Spark's Kafka source
    (pipelines/stream/kafka.py; jars: `python -m pipelines.core.jars .jars --kafka`)."""

    bootstrap_servers: str = "127.0.0.1:9092"  # host:port[,host:port...] of the brokers (kafka.bootstrap.servers)
    topic: str = "shelf-events"  # the topic the stream subscribes to
    # json: each message value is one JSON object whose keys are source.columns' names; csv: one delimited line
    # (source.delimiter) whose fields are csv_columns, in order
    format: Literal["json", "csv"] = "json"
    csv_columns: list[str] | None = None  # csv: the field names of a value, in order (then mapped by source.columns)
    # where a new query starts (one with no checkpoint yet): earliest (the topic's retained events) or latest
    starting_offsets: Literal["earliest", "latest"] = "earliest"
    max_offsets_per_trigger: int | None = Field(None, ge=1)  # at most this many messages per micro-batch; None: all
    # true: the query stops when offsets it has not read are gone (retention deleted them): nothing is lost silently
    fail_on_data_loss: bool = True
    # further consumer settings without secrets (security.protocol, sasl.mechanism, ssl.truststore.location, ...);
    # each is passed as kafka.<name>
    options: dict[str, str] = {}
    # consumer settings read from environment variables, for secrets: {sasl.jaas.config: SHELF_KAFKA_JAAS} sets
    # kafka.sasl.jaas.config to $SHELF_KAFKA_JAAS at start (never written to config files or logs)
    secret_options_env: dict[str, str] = {}

    def secret_options(self) -> dict[str, str]:
        """The consumer settings named in secret_options_env, with their values from the environment (read when a
        consumer starts: the stream's Kafka source and shelf serve's consumer).

        Raises:
            EnvironmentSetupError: a named variable is not set.
        """
        for name, variable in self.secret_options_env.items():
            if not os.environ.get(variable):
                raise EnvironmentSetupError(
                    f"stream.kafka.secret_options_env names {variable} for {name}, but it is not set; export it in "
                    "the consumer's environment (a secret scope or vault on a cluster)."
                )
        return {name: os.environ[variable] for name, variable in self.secret_options_env.items()}

    @model_validator(mode="after")
    def _csv_needs_columns(self) -> KafkaConfig:
        if self.format == "csv" and not self.csv_columns:
            raise ValueError(
                "stream.kafka.format is csv but stream.kafka.csv_columns is empty; list the field names of a "
                "message value in order (e.g. [user_id, item_id, event_type, event_ts, value, session_id])."
            )
        return self


class StreamConfig(Section):
    """`shelf stream`: near-real-time re-ranking of the users with new events (pipelines/stream)."""

    # where events come from: delta (the landing table at source_path) or kafka (the topic in stream.kafka)
    source: Literal["delta", "kafka"] = "delta"
    kafka: KafkaConfig = KafkaConfig()  # the topic, when source is kafka
    # Delta table the tracker appends raw events to; None: <storage.root>/landing/events
    source_path: str | None = None
    checkpoint: str | None = None  # None: <storage.root>/_checkpoints/stream
    # processing_time (a micro-batch every interval_seconds) | available_now (what is there, then stop)
    trigger: Literal["processing_time", "available_now"] = "processing_time"
    interval_seconds: float = Field(2.0, gt=0)  # processing_time: a micro-batch at most this often
    max_files_per_trigger: int | None = Field(None, ge=1)  # None: Delta's default (1000 files)
    name: str = "stream"  # quarantine / run-metrics rows of batch N get run_id <name>-<N>
    # events later than the serving run's as_of + this are quarantined as future_timestamp
    max_hours_ahead: float = Field(48.0, gt=0)
    popular_k: int = Field(50, ge=0)  # popular items offered to users without ALS factors (first seen today)
    kernel_buckets: int | None = Field(None, ge=1)  # partitions of a batch's users for the kernel; None: the cores
    # spark.sql.shuffle.partitions while a micro-batch re-ranks and MERGEs (tiny batches: few)
    shuffle_partitions: int = Field(2, ge=1)
    adaptive: bool = False  # spark.sql.adaptive.enabled while a micro-batch runs (each adaptive stage is a job)
    broadcast_joins: bool = False  # broadcast joins while a micro-batch runs (each broadcast is a job)
    # broadcast threshold (MB) in Delta's MERGE: its source, a micro-batch's lists, is broadcast when under it; 0: off
    merge_broadcast_mb: float = Field(10.0, ge=0)


class ServeConfig(Section):
    """`shelf serve`: the HTTP service that re-ranks the published lists at request time (pipelines/serve)."""

    host: str = "127.0.0.1"  # the address uvicorn binds (0.0.0.0: every interface, behind a load balancer)
    port: int = Field(8000, ge=1, le=65535)  # the port it listens on
    max_body_bytes: int = Field(1_000_000, ge=1024)  # larger request bodies are refused with 413
    flush_every_seconds: float = Field(5.0, gt=0)  # accepted events are appended to the landing table this often
    flush_max_events: int = Field(1000, ge=1)  # ... or as soon as this many wait, whichever comes first
    reload_every_seconds: float = Field(60.0, gt=0)  # how often it checks for a newly published run to swap to
    # worker processes on the port, each with its own copy of the serving run (memory x workers); they share the
    # events posted to any of them and their metrics through SQLite in a temporary folder (docs/SERVING.md)
    workers: int = Field(1, ge=1, le=64)
    access_log: bool = True  # uvicorn's line per request (false: none, e.g. when the load balancer logs them)
    max_batch: int = Field(64, ge=1, le=4096)  # at most this many re-ranked requests share one kernel call
    batch_wait_ms: float = Field(0.0, ge=0, le=100)  # hold a batch open this long to gather more (0: run at once)
    # true: also consume stream.kafka.topic (JSON values) in consumer group kafka_group, so the lists reflect events
    # the service was not sent; those events are not appended to the landing table (shelf stream reads the topic)
    kafka_consume: bool = False
    kafka_group: str = "shelf-serve"  # the service's own consumer group (each replica of the service: its own)
    # where a new consumer group starts: latest (what happens from now on) or earliest (what the topic retains)
    kafka_offset_reset: Literal["latest", "earliest"] = "latest"


class PrivacyConfig(Section):
    """Pseudonymisation of user ids (pipelines/core/privacy.py)."""

    pseudonymize_users: bool = False  # true: user ids become HMAC-SHA256(key, id) before anything is written
    key_env: str = "SHELF_PSEUDONYM_KEY"  # the environment variable holding the key (never a file, never logged)
