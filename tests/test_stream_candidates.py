"""The stream's numpy paths against the batch step's Spark ones: the candidate union (udfs.candidates.merge_candidates
over pipelines.stream.to_candidate_lists) against group by user and item and reranking.to_capped_candidates, and
the kernel rows' ids (publishing.to_recommendations_pandas) against publishing.to_recommendations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.core import kernel_frames, publishing, reranking
from pipelines.core.schemas import (
    ALS_SCORE,
    FEATURES,
    ITEM_ID,
    ITEM_IDX,
    RANK,
    REASONS,
    SCORE,
    SOURCES,
    USER_ID,
    USER_IDX,
)
from pipelines.stream.users import to_candidate_lists
from udfs.candidates import NEIGHBOURS_BIT, POPULAR_BIT, merge_candidates
from udfs.rerank import ItemTable, RerankParams

KINDS = {"neighbours": NEIGHBOURS_BIT, "popular": POPULAR_BIT}


def segments(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(v) for v in lists], out=indptr[1:])
    return indptr, np.asarray([x for v in lists for x in v], dtype=np.int64)


def test_one_entry_per_item_keeps_the_score_and_counts_the_union_of_sources() -> None:
    # User 0: item 5 stored (ALS 0.9, sources als+cooc) and a neighbour; items 6, 7 only neighbours/popular.
    # User 1: nothing stored, item 3 both a neighbour and popular, item 2 only popular.
    stored_ptr, stored_items = segments([[5, 8], []])
    extra_ptr, extra_items = segments([[5, 6, 7, 6], [3, 2, 3]])
    extra_kinds = np.array(
        [NEIGHBOURS_BIT, NEIGHBOURS_BIT, POPULAR_BIT, POPULAR_BIT, NEIGHBOURS_BIT, POPULAR_BIT, POPULAR_BIT]
    )
    got = merge_candidates(
        stored_ptr,
        stored_items,
        np.array([0.9, np.nan]),
        np.array([2, 1]),
        np.array([0, 0]),
        extra_ptr,
        extra_items,
        extra_kinds,
        max_candidates=2,
    )
    # User 0: with a score only item 5; without: 6 (neighbours + popular: 2 sources), then 7 and 8 tie at one
    # source and the cap of 2 keeps the smaller id, 7. User 1: 3 (2 sources) and 2.
    assert got.indptr.tolist() == [0, 3, 5]
    assert got.items.tolist() == [5, 6, 7, 2, 3]
    assert got.als.tolist() == [True, False, False, False, False]


def test_mismatched_segments_are_refused() -> None:
    ptr, items = segments([[1]])
    two_users, _ = segments([[], []])
    with pytest.raises(ValueError, match="stored segments have 1 users, extra segments 2"):
        merge_candidates(ptr, items, np.array([1.0]), np.array([1]), np.array([0]), two_users, items[:0], items[:0], 5)


def test_the_union_and_cap_equal_the_batch_steps_spark_path(spark: SparkSession) -> None:
    rng = np.random.default_rng(7)
    names = ["als", "cooc", "neighbours", "popular"]
    stored_rows, extra_rows = [], []
    for user in range(40):
        for item in rng.choice(60, size=int(rng.integers(0, 25)), replace=False):
            # Scores on a coarse grid (ties), a quarter without one; 1-3 distinct sources.
            score = None if rng.random() < 0.25 else float(rng.integers(0, 5)) / 4
            sources = sorted(rng.choice(names, size=int(rng.integers(1, 4)), replace=False).tolist())
            stored_rows.append((user, int(item), score, sources))
        for item in rng.integers(0, 60, size=int(rng.integers(0, 12))):
            extra_rows.append((user, int(item), str(rng.choice(["neighbours", "popular"]))))
    stored = spark.createDataFrame(stored_rows, "user_idx int, item_idx int, als_score double, sources array<string>")
    extras = spark.createDataFrame(extra_rows, "user_idx int, item_idx int, kind string")
    cap = 6

    # The batch step: one row per (user, item) over the union, then to_capped_candidates.
    union = stored.unionByName(
        extras.select(USER_IDX, ITEM_IDX, F.lit(None).cast("double").alias(ALS_SCORE), F.array("kind").alias(SOURCES))
    )
    grouped = union.groupBy(USER_IDX, ITEM_IDX).agg(
        F.max(ALS_SCORE).alias(ALS_SCORE),
        F.array_sort(F.array_distinct(F.flatten(F.collect_list(SOURCES)))).alias(SOURCES),
    )
    want: dict[int, list[tuple[int, bool]]] = {}
    for r in reranking.to_capped_candidates(grouped, cap).collect():
        want.setdefault(r[USER_IDX], []).append((r[ITEM_IDX], r[ALS_SCORE] is not None))

    # The stream: stored lists grouped once (to_candidate_lists), extras per user, merged in numpy.
    lists = to_candidate_lists(stored).toPandas().set_index(USER_IDX)
    users = sorted(set(lists.index) | {u for u, _, _ in extra_rows})
    frame = lists.reindex(users)

    def column(name: str, dtype: type) -> tuple[np.ndarray, np.ndarray]:
        return kernel_frames.segments(
            pd.Series([v if isinstance(v, np.ndarray | list) else None for v in frame[name]]), dtype
        )

    stored_ptr, stored_items = column("_s_items", np.int64)
    _, stored_als = column("_s_als", np.float64)
    _, stored_others = column("_s_others", np.int64)
    _, stored_kinds = column("_s_kinds", np.int64)
    by_user: dict[int, list[tuple[int, str]]] = {u: [] for u in users}
    for u, i, kind in extra_rows:
        by_user[u].append((i, kind))
    extra_ptr, extra_items = segments([[i for i, _ in by_user[u]] for u in users])
    extra_kinds = np.asarray([KINDS[k] for u in users for _, k in by_user[u]], dtype=np.int64)
    merged = merge_candidates(
        stored_ptr, stored_items, stored_als, stored_others, stored_kinds, extra_ptr, extra_items, extra_kinds, cap
    )
    got = {
        u: list(
            zip(
                merged.items[merged.indptr[n] : merged.indptr[n + 1]].tolist(),
                merged.als[merged.indptr[n] : merged.indptr[n + 1]].tolist(),
                strict=True,
            )
        )
        for n, u in enumerate(users)
    }
    assert {u: sorted(v) for u, v in want.items()} == {u: v for u, v in got.items() if v}
    # The case is not trivial: the cap cut both kinds of candidates, and extras met stored items.
    counts = grouped.groupBy(USER_IDX).agg(
        F.sum(F.col(ALS_SCORE).isNotNull().cast("int")).alias("scored"),
        F.sum(F.col(ALS_SCORE).isNull().cast("int")).alias("unscored"),
    )
    assert counts.filter(F.col("scored") > cap).count() > 0 and counts.filter(F.col("unscored") > cap).count() > 0
    assert {(u, i) for u, i, _, _ in stored_rows} & {(u, i) for u, i, _ in extra_rows}


def test_kernel_rows_get_the_same_ids_and_reasons_in_pandas_as_in_spark(spark: SparkSession) -> None:
    """The stream's path (rerank_frame naming similar_to items by item_id, then to_recommendations_pandas in the
    Python workers) against the batch step's (rerank_frame with dense ids, then to_recommendations' joins) on the
    same kernel rows: a user with factors and a cold one (negative idx), both of whom viewed item 10."""
    table = ItemTable.plain(
        [10, 11, 12], [[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]], promo=[False, False, True], popularity=[0.1, 0.2, 0.9]
    )
    user_rows = pd.DataFrame(
        {
            USER_IDX: [3, -1],
            FEATURES: [[0.5, 0.5], None],
            kernel_frames.CAND_ITEMS: [[11, 12], [11, 12]],
            kernel_frames.CAND_ALS: [[True, True], [False, False]],
            kernel_frames.EV_ITEMS: [[10], [10]],
            kernel_frames.EV_WEIGHTS: [[1.0], [1.0]],
            kernel_frames.EV_AGES: [[0.0], [0.0]],
            kernel_frames.EV_BOUGHT: [[False], [False]],
        }
    )
    params = RerankParams(top_k=2, mmr_lambda=1.0, alpha=1.0, weights={"session": 1.0})
    users = spark.createDataFrame([(3, "u-three"), (-1, "new-one")], "user_idx int, user_id string")
    items = spark.createDataFrame([(i, f"item-{i}") for i in (10, 11, 12, 13)], "item_idx int, item_id string")
    ids = kernel_frames.ItemIds.collect(items)

    dense = kernel_frames.rerank_frame(user_rows, table, params)
    frame = spark.createDataFrame(dense, schema=reranking.KERNEL_SCHEMA)
    want = publishing.to_recommendations(frame, users, items, "r1", pd.Timestamp("2026-11-01").to_pydatetime())
    columns = [USER_ID, ITEM_ID, RANK, SCORE, REASONS]
    expected = sorted((r[0], r[1], r[2], r[3], list(r[4])) for r in want.select(*columns).collect())
    named = kernel_frames.rerank_frame(user_rows, table, params, name_items=ids.of)
    got = publishing.to_recommendations_pandas(named, pd.Series(["u-three", "new-one"], index=[3, -1]), ids)
    actual = sorted((u, i, int(k), float(s), list(r)) for u, i, k, s, r in got[columns].itertuples(index=False))
    assert actual == expected
    assert [r for r in actual if r[0] == "new-one"] == [
        ("new-one", "item-11", 1, 2.0, ["similar_to:item-10"]),  # as test_session_vector_reasons_and_cold_user_fold_in
        ("new-one", "item-12", 2, 0.0, ["promo", "trending"]),
    ]
    with pytest.raises(ValueError, match="missing from silver.item_index"):
        kernel_frames.ItemIds.collect(items).of(np.array([5]))
