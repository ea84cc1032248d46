"""Every conf file loads; typos and wrong types fail with the key's path and its file; --set wins."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter

from pipelines.core import config_reference
from pipelines.core.config import ShelfConfig
from pipelines.core.config_loading import config_warnings, load_config
from pipelines.core.config_sections import Section
from pipelines.core.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
DOCS = CONF.parent / "docs"
NO_COOC = ["rerank.weights.cooc_sum=0", "rerank.weights.cooc_max=0"]


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.name)
def test_every_conf_file_loads(path: Path) -> None:
    config = load_config(path)
    assert config.env == path.stem


def test_required_keys_exist_with_their_names() -> None:
    config = load_config(CONF / "local.yaml")
    assert config.source.preset == "synthetic"
    assert config.source.path and config.storage.root and config.rerank.top_k == 10


def test_no_conf_file_means_the_packaged_defaults_which_are_the_laptop_overlay() -> None:
    """A wheel installed outside a checkout needs no conf file: `shelf run` with no --conf loads the models'
    defaults, which conf/local.yaml merely restates."""
    assert load_config(None).model_dump() == load_config(CONF / "local.yaml").model_dump()
    assert load_config(None, ["rerank.top_k=5"]).rerank.top_k == 5


def test_every_field_of_every_section_has_a_description() -> None:
    assert config_reference.missing_descriptions() == []


def test_the_description_check_finds_a_field_without_one() -> None:
    source = (
        "class Probe(Section):\n"
        "    # described above\n"
        "    above: int = 1\n"
        "    beside: int = 2  # described beside\n"
        "    bare: int = 3\n"
    )
    assert config_reference.field_comments(source, "Probe") == {
        "above": "described above",
        "beside": "described beside",
        "bare": "",
    }
    assert config_reference.missing_descriptions(_Undescribed) == ["bare", "nested.bare"]


def test_config_reference_is_generated_from_the_models() -> None:
    # Stale? Run: python -m pipelines.core.config_reference
    assert (DOCS / "CONFIG_REFERENCE.md").read_text() == config_reference.reference()
    assert config_reference.main(["--check"]) == 0


def test_base_yaml_holds_overrides_only() -> None:
    # The defaults live in the models (docs/CONFIG_REFERENCE.md); a key in base.yaml equal to its default is a
    # second copy that drifts.
    def same_as_default(tree: dict[str, Any], model: type[BaseModel], prefix: str = "") -> list[str]:
        found = []
        for key, value in tree.items():
            field = model.model_fields[key]
            nested = field.annotation if isinstance(value, dict) and isinstance(field.annotation, type) else None
            if nested is not None and issubclass(nested, BaseModel):
                found += same_as_default(value, nested, f"{prefix}{key}.")
            elif TypeAdapter(field.annotation).validate_python(value) == field.get_default(call_default_factory=True):
                found.append(f"{prefix}{key}")
        return found

    base = yaml.safe_load((CONF / "base.yaml").read_text())
    assert same_as_default(base, ShelfConfig) == []
    assert same_as_default({"env": "local", "rerank": {"top_k": 10, "weights": {"ease": 4}}}, ShelfConfig) == [
        "env",
        "rerank.top_k",
        "rerank.weights.ease",
    ]
    assert load_config(CONF / "base.yaml").model_dump() == ShelfConfig(env="base").model_dump()


def test_overlay_deep_merges_over_base() -> None:
    config = load_config(CONF / "test.yaml")
    assert config.train.rank == 8  # from test.yaml
    assert config.train.reg_param == 0.05  # the model's default, untouched by the overlay
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


class _UndescribedPart(Section):
    bare: int = 0


class _Undescribed(Section):
    described: int = 0  # a field with a description
    bare: int = 0
    nested: _UndescribedPart = _UndescribedPart()  # a nested section: its own fields are checked too
