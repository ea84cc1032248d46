"""Every conf file loads; typos and wrong types fail with the key's path and its file; --set wins."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from pipelines.core.config import RerankConfig, ShelfConfig
from pipelines.core.config_loading import config_warnings, load_config
from pipelines.core.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
NO_COOC = ["rerank.weights.cooc_sum=0", "rerank.weights.cooc_max=0"]


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.name)
def test_every_conf_file_loads(path: Path) -> None:
    config = load_config(path)
    assert config.env == path.stem


def test_required_keys_exist_with_their_names() -> None:
    config = load_config(CONF / "local.yaml")
    assert config.source.preset == "synthetic"
    assert config.source.path and config.storage.root and config.rerank.top_k == 10


def test_tuned_rerank_defaults_in_base_yaml_agree_with_the_model_defaults() -> None:
    # The re-rank's weights were tuned on validation windows (docs/EVALUATION.md "Does re-ranking help?"); code that
    # builds RerankConfig() without a file must get the same values as conf/base.yaml.
    section = yaml.safe_load((CONF / "base.yaml").read_text())["rerank"]
    assert RerankConfig.model_validate(section) == RerankConfig()


def test_overlay_deep_merges_over_base() -> None:
    config = load_config(CONF / "test.yaml")
    assert config.train.rank == 8  # from test.yaml
    assert config.train.reg_param == 0.05  # from base.yaml, untouched by the overlay
    assert config.spark.master == "local[2]"
    assert load_config(CONF / "cluster.yaml").spark.master is None


def test_set_overrides_win() -> None:
    config = load_config(CONF / "test.yaml", ["rerank.top_k=25", "source.preset=movielens", "train.tune=true"])
    assert (config.rerank.top_k, config.source.preset, config.train.tune) == (25, "movielens", True)
    for delimiter in ["|", ";", "\t", ">"]:
        assert load_config(CONF / "test.yaml", [f"source.delimiter={delimiter}"]).source.delimiter == delimiter


def test_misspelled_key_names_full_path_and_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text((CONF / "base.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text("recommend:\n  topk: 5\n")
    with pytest.raises(ConfigError, match=r"Unknown config key 'recommend\.topk' in .*bad\.yaml"):
        load_config(bad)


def test_wrong_type_names_path_and_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text((CONF / "base.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  rank: lots\n")
    with pytest.raises(ConfigError, match=r"'train\.rank' in .*bad\.yaml is invalid"):
        load_config(bad)


def test_bad_override_and_missing_file_are_one_sentence() -> None:
    with pytest.raises(ConfigError, match=r"Unknown config key 'source\.nope' in --set source\.nope=1"):
        load_config(CONF / "test.yaml", ["source.nope=1"])
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_config(CONF / "test.yaml", ["recommend.top_k"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(CONF / "missing.yaml")
    with pytest.raises(ConfigError, match="source.preset"):
        load_config(CONF / "test.yaml", ["source.preset=shopify"])


def test_similarity_method_without_cooccurrence_lists_warns_that_cooc_weights_are_dead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="shelf.config"):
        load_config(CONF / "test.yaml", ["similarities.method=both"])
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="shelf.config"):
        config = load_config(CONF / "test.yaml", ["similarities.method=als", "rerank.weights.cooc_sum=8"])
    assert config_warnings(config) == [caplog.records[0].getMessage()]
    assert "similarities.method=als" in caplog.text and "cooc_sum=8.0" in caplog.text
    quiet = load_config(CONF / "test.yaml", ["similarities.method=blend"] + NO_COOC)
    assert config_warnings(quiet) == []


def test_presets_fill_what_the_config_leaves_out_and_explicit_keys_win() -> None:
    movielens = load_config(CONF / "test.yaml", ["source.preset=movielens"])
    assert movielens.consumed_event_types == ["rating"]
    assert movielens.evaluate.protocol == "random_item"
    assert (movielens.clean.half_life_days, movielens.clean.bot_max_events_per_day) == (None, None)
    for preset in ("synthetic", "online_retail", "generic"):
        shop = load_config(CONF / "test.yaml", [f"source.preset={preset}"])
        assert shop.consumed_event_types == ["purchase"]
        assert shop.evaluate.protocol == "temporal"
        assert (shop.clean.half_life_days, shop.clean.bot_max_events_per_day) == (30.0, 500.0)
    chosen = load_config(
        CONF / "test.yaml",
        ["source.preset=movielens", "recommend.consumed_event_types=[rating, purchase]", "clean.half_life_days=7"],
    )
    assert chosen.consumed_event_types == ["rating", "purchase"] and chosen.clean.half_life_days == 7.0
    assert ShelfConfig(source={"preset": "movielens"}).consumed_event_types == ["rating"]


def test_the_list_length_has_one_key() -> None:
    with pytest.raises(ConfigError, match="recommend.top_k"):
        load_config(CONF / "test.yaml", ["recommend.top_k=5"])
