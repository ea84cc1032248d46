"""Exceptions for mistakes a user can fix. Their message is one sentence: what is wrong and how to fix it."""

from __future__ import annotations


class ShelfError(Exception):
    """Base class: the CLI prints the message (no stack trace) and exits non-zero (7; argparse's usage errors are 2,
    the full table is `shelf --help`'s epilog, pipelines/cli.py EXIT_CODES)."""

    exit_code = 7


class ConfigError(ShelfError):
    """A config file, key or value is wrong."""


class EnvironmentSetupError(ShelfError):
    """Java, Delta jars or another prerequisite is missing."""


class InputDataError(ShelfError):
    """A source file is missing, unreadable or lacks a mapped column."""


class QualityGateError(ShelfError):
    """The data-quality gate failed: nothing downstream is written."""

    exit_code = 3


class ReconciliationError(ShelfError):
    """Row counts do not reconcile: input != accepted + quarantined + duplicates removed."""

    exit_code = 4


class PublishRefusedError(ShelfError):
    """`shelf run`'s publish gate: the published lists scored below popularity on the holdout, nothing was published."""

    exit_code = 6
