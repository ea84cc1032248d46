"""The bad-input corpus: every kind of malformed feed, each row quarantined with its reason or the file
stopped with one sentence, and the counts reconciling every time (issue: reliability, fault 1)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines import clean, cli, ingest
from pipelines.core import tables
from pipelines.core.errors import InputDataError
from pipelines.core.runs import RunContext
from tests.conftest import REPO, make_test_config

AS_OF = datetime(2026, 11, 1)
HEADER = "user_id,item_id,event_type,event_ts,value,session_id"
OK = "2026-10-01T12:00:00"

# (line, expected reason or None for accepted); the header comes first in the file.
ROWS: list[tuple[str, str | None]] = [
    (f"u1,i1,view,{OK},,s1", None),
    (f"u1,i2,purchase,{OK},2,s1", None),
    (f"  u2  , i1 ,view,{OK},,s2", None),  # whitespace around ids is trimmed
    (f"ü-ser:7/#,i1,view,{OK},,s2", None),  # odd but printable characters are a valid id
    (f"u1,i1,view,{OK},,s1", None),  # exact duplicate: accepted here, removed by clean
    (f"u1,i2,purchase,{OK},5,s1", None),  # near duplicate (same key, other value): clean keeps one
    (f"u1,i1,view,{OK},1,s1,extra", "unparseable_row"),  # wrong column count (too many)
    ("u1;i1;view;2026-10-01T12:00:00;;s1", "unparseable_row"),  # a line with the wrong delimiter
    ("", "unparseable_row"),  # a blank line in the middle of the file
    (f",i1,view,{OK},,s3", "null_user"),
    (f"   ,i1,view,{OK},,s3", "null_user"),  # an id of blanks is no id
    (f"u3,,view,{OK},,s3", "null_item"),
    (f"u3\x01,i1,view,{OK},,s3", "bad_id"),  # control character in an id
    (f"u3,i1,wishlist,{OK},,s3", "unknown_event_type"),
    ("u3,i1,view,01/10/2026 12:00,,s3", "bad_timestamp"),  # a timestamp in another format
    ("u3,i1,view,1790000000,,s3", "bad_timestamp"),  # epoch seconds where ISO-8601 is configured
    ("u3,i1,view,2031-01-01T00:00:00,,s3", "future_timestamp"),
    ("u3,i1,view,1970-01-01T00:00:00,,s3", "stale_timestamp"),  # far past
    (f"u3,i1,purchase,{OK},-2,s3", "negative_value"),
    (f"u3,i1,purchase,{OK},1e15,s3", "bad_value"),  # huge quantity
    (f"u3,i1,purchase,{OK},NaN,s3", "bad_value"),
    (f"u3,i1,purchase,{OK},Infinity,s3", "bad_value"),
    (f"u3,i1,purchase,{OK},three,s3", "bad_value"),  # a value column of the wrong type
]
INVALID_UTF8 = b"u4\xff\xfe,i1,view,2026-10-01T12:00:00,,s4"  # not UTF-8


def write_source(folder: Path, lines: list[bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "part-0.csv").write_bytes(b"\n".join(lines) + b"\n")
    return folder


@pytest.mark.steps
def test_every_malformed_row_is_quarantined_with_its_reason_and_counts_reconcile(
    spark: SparkSession, tmp_path: Path
) -> None:
    lines = [b"\xef\xbb\xbf" + HEADER.encode()]  # a UTF-8 byte-order mark before the header
    lines += [line.encode("utf-8") for line, _ in ROWS] + [INVALID_UTF8]
    source = write_source(tmp_path / "feed", lines)
    config = make_test_config(
        tmp_path, f"source.path={source}", "clean.max_quarantine_rate=1.0", "clean.max_user_share=1.0",
        "clean.min_user_events=1", "clean.min_item_events=1",
    )  # fmt: skip
    ctx = RunContext("bad", AS_OF)
    ingest.run(spark, config, ctx)

    quarantined = tables.read(spark, config, "quarantine", "events").filter(F.col("run_id") == "bad")
    expected = Counter(reason for _, reason in ROWS if reason) + Counter({"bad_encoding": 1})
    assert Counter(r.reason for r in quarantined.collect()) == expected
    # The raw text of a rejected line is kept as it was read.
    raws = {r.raw for r in quarantined.collect()}
    assert "u1;i1;view;2026-10-01T12:00:00;;s1" in raws and "u3,i1,view,1970-01-01T00:00:00,,s3" in raws

    bronze = tables.read(spark, config, "bronze", "events")
    assert sorted({r.user_id for r in bronze.collect()}) == ["u1", "u2", "ü-ser:7/#"]
    assert {r.item_id for r in bronze.collect()} == {"i1", "i2"}

    clean.run(spark, config, ctx)
    m = {(r.step, r.metric): r.value for r in tables.read(spark, config, "ops", "run_metrics").collect()}
    accepted_lines = sum(1 for _, reason in ROWS if reason is None)
    assert m[("ingest", "input_rows")] == len(ROWS) + 1 == m[("ingest", "accepted")] + m[("ingest", "quarantined")]
    assert m[("ingest", "accepted")] == accepted_lines
    assert m[("clean", "duplicates_removed")] == 2  # the exact and the near duplicate
    assert m[("clean", "input_rows")] == m[("clean", "accepted")] + m[("clean", "duplicates_removed")]
    purchase = tables.read(spark, config, "silver", "interactions").filter(F.col("event_type") == "purchase")
    assert [r.value for r in purchase.collect()] == [5.0]  # the near duplicate with the larger value won


FILE_PROBLEMS = [
    ("empty file", [], "no column 'user_id'"),
    ("header only", [HEADER.encode()], "has no data rows"),
    ("wrong delimiter", [HEADER.replace(",", ";").encode(), b"u1;i1;view;2026-10-01T12:00:00;;s1"], "set source.delimiter to ';'"),
    ("missing column", [b"user_id,item_id,event_ts", b"u1,i1,2026-10-01T12:00:00"], "no column 'event_type'"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "lines", "message"), FILE_PROBLEMS, ids=[c[0] for c in FILE_PROBLEMS])
def test_file_level_problems_stop_ingest_with_one_sentence_and_write_nothing(
    spark: SparkSession, tmp_path: Path, case: str, lines: list[bytes], message: str
) -> None:
    source = write_source(tmp_path / "feed", lines) if lines else tmp_path / "feed"
    if not lines:
        source.mkdir()
        (source / "part-0.csv").write_bytes(b"")
    config = make_test_config(tmp_path, f"source.path={source}")
    with pytest.raises(InputDataError, match=message) as caught:
        ingest.run(spark, config, RunContext("bad", AS_OF))
    assert str(caught.value).count(". ") == 0 and str(caught.value).endswith(".")  # one sentence
    assert not tables.exists(spark, config, "bronze", "events")
    assert not tables.exists(spark, config, "quarantine", "events")


def test_missing_source_path_exits_7_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main([
        "ingest", "--conf", str(REPO / "conf/test.yaml"), "--set", f"storage.root={tmp_path}",
        "--set", f"source.path={tmp_path / 'nowhere'}",
    ])  # fmt: skip
    assert code == 7
    err = capsys.readouterr().err
    assert "nowhere does not exist" in err and "source.path" in err and "Traceback" not in err
