"""Loading the configuration: the defaults of the config models (packaged with shelf, so a run needs no file),
`conf/base.yaml` and an overlay deep-merged over them, and `--set key.path=value` overrides, validated into a
ShelfConfig (pipelines/core/config.py holds the section models).

A typo or a wrong type fails at start-up with the key's full path and the file (or flag) it came from.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.core.config import ShelfConfig
from pipelines.core.errors import ConfigError

BASE_FILE = "base.yaml"

log = logging.getLogger("shelf.config")


def config_warnings(config: ShelfConfig) -> list[str]:
    """Settings that are valid each on their own but defeat each other; load_config logs each as a warning."""
    found = []
    weights = config.rerank.weights
    if config.similarities.method in ("als", "blend") and (weights.cooc_sum or weights.cooc_max):
        found.append(
            f"similarities.method={config.similarities.method} writes no co-occurrence neighbour lists, so the "
            f"re-rank's co-occurrence features (rerank.weights.cooc_sum={weights.cooc_sum}, "
            f"cooc_max={weights.cooc_max}) are always 0; use method both or cooccurrence, or set those weights to 0."
        )
    return found


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `overlay` merged in: nested dicts merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _origins(tree: dict[str, Any], origin: str, prefix: str = "") -> dict[str, str]:
    """Map every key path in `tree` to the file (or flag) it came from."""
    found: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        found[path] = origin
        if isinstance(value, dict):
            found.update(_origins(value, origin, f"{path}."))
    return found


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; pass an existing file with --conf.")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML ({exc.__class__.__name__}); fix its syntax.") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections at the top level.")
    return loaded


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value` into (["a", "b", "c"], value), the value read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' is not KEY=VALUE; write it like --set rerank.top_k=20.")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"Override '{text}' has an empty key; write it like --set rerank.top_k=20.")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads some one-character delimiters ('|', '>') as syntax: keep such values as written.
    if value in ("", None) and raw.strip() not in ("", "null", "~", "''", '""'):
        value = raw
    return parts, value


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        tree = {part: tree}
    return tree


def _file_layers(overlay_path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(origin, tree) of base.yaml beside the overlay (when present) and of the overlay itself."""
    base_path = overlay_path.parent / BASE_FILE
    layers: list[tuple[str, dict[str, Any]]] = []
    if base_path.is_file():
        layers.append((str(base_path), _read_yaml(base_path)))
    if not base_path.is_file() or overlay_path.resolve() != base_path.resolve():
        layers.append((str(overlay_path), _read_yaml(overlay_path)))
    return layers


def load_config(
    conf: str | Path | None = None, overrides: list[str] | None = None, flags: dict[str, str] | None = None
) -> ShelfConfig:
    """The packaged defaults (the config models), `conf/base.yaml` and the overlay `conf`, then `--set` overrides,
    validated into a ShelfConfig.

    Args:
        conf: the overlay file (e.g. conf/local.yaml); a base.yaml in the same folder is read first. None: no
            file at all, the defaults alone (what a wheel installed outside a checkout runs with).
        overrides: `key.path=value` strings, applied last.
        flags: override -> the command-line flag it came from (e.g. "--workers 0"), named in errors instead of --set.

    Raises:
        ConfigError: a file is missing or invalid, or a key is unknown or has the wrong type.
    """
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    layers = _file_layers(Path(conf)) if conf is not None else []
    for text in overrides or []:
        parts, value = parse_override(text)
        layers.append(((flags or {}).get(text, f"--set {text}"), _nest(parts, value)))
    for origin, tree in layers:
        merged = deep_merge(merged, tree)
        origins.update(_origins(tree, origin))
    try:
        config = ShelfConfig.model_validate(merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        path = ".".join(str(p) for p in error["loc"])
        origin = origins.get(path, origins.get(path.rsplit(".", 1)[0], str(conf or "the defaults")))
        if error["type"] == "extra_forbidden":
            raise ConfigError(f"Unknown config key '{path}' in {origin}; remove it or correct its spelling.") from exc
        raise ConfigError(
            f"Config key '{path}' in {origin} is invalid ({error['msg']}, got {error.get('input')!r}); fix its value."
        ) from exc
    for warning in config_warnings(config):
        log.warning(warning)
    return config
