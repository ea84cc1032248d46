"""The CLI: one-sentence errors with a non-zero exit, and the generate subcommand end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import cli
from pipelines.core.errors import PublishRefusedError, QualityGateError, ShelfError
from pipelines.core.runs import make_context

REPO = Path(__file__).resolve().parents[1]


def test_every_step_of_the_design_has_a_subcommand() -> None:
    parser = cli.build_parser()
    for name in ["generate", "ingest", "clean", "train", "similarities", "candidates", "rerank", "evaluate", "run"]:
        assert parser.parse_args([name]).command == name


def test_bad_config_key_exits_non_zero_with_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["generate", "--conf", str(REPO / "conf/test.yaml"), "--set", "generate.userz=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 7  # a mistake the user can fix (argparse's usage errors are 2)
    assert err[-1] == (
        "shelf generate: error: Unknown config key 'generate.userz' in --set generate.userz=3; "
        "remove it or correct its spelling."
    )


def test_bad_as_of_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["generate", "--conf", str(REPO / "conf/test.yaml"), "--as-of", "tomorrow"])
    assert code == 7 and "--as-of 'tomorrow' is not an ISO date" in capsys.readouterr().err


def test_serve_port_and_workers_flags_are_the_config_keys_and_win_over_set(capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.core.config_loading import load_config

    args = cli.build_parser().parse_args(["serve", "--port", "8123", "--workers", "2", "--set", "serve.port=9000"])
    config = load_config(None, [*args.overrides, *cli.serve_overrides(args)])
    assert (config.serve.port, config.serve.workers) == (8123, 2)
    assert cli.serve_overrides(cli.build_parser().parse_args(["serve"])) == {}
    assert cli.main(["serve", "--workers", "0"]) == 7
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Config key 'serve.workers' in --workers 0 is invalid" in error and "--set" not in error


def test_run_id_defaults_from_as_of_so_reruns_are_idempotent() -> None:
    assert make_context(None, "2026-11-01", "2026-01-01").run_id == "run-20261101T000000"
    assert make_context("nightly-7", None, "2026-01-01T06:00:00+02:00").as_of.hour == 4


def test_generate_writes_events_and_catalog(tmp_path: Path) -> None:
    code = cli.main(
        [
            "generate",
            "--conf",
            str(REPO / "conf/test.yaml"),
            "--set",
            f"source.path={tmp_path / 'ev'}",
            "--set",
            f"source.catalog_path={tmp_path / 'cat'}",
            "--set",
            "generate.users=50",
            "--set",
            "generate.items=30",
        ]
    )
    assert code == 0
    header = (tmp_path / "ev" / "part-00000.csv").read_text().splitlines()[0]
    assert header == "user_id,item_id,event_type,event_ts,value,session_id"
    assert len((tmp_path / "cat" / "part-00000.csv").read_text().splitlines()) == 31


def test_generate_into_a_remote_uri_says_it_writes_locally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["generate", "--conf", str(REPO / "conf/test.yaml"), "--set", "source.path=s3a://shop/events"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 7 and err == (
        "shelf generate: error: shelf generate writes the demo shop to the driver's disk, not to "
        "s3a://shop/events; generate it into a local folder and copy it there, or set source.path to data "
        "that already exists."
    )
    assert not Path("s3a:").exists() and not (REPO / "s3a:").exists()


def test_version_and_the_exit_code_table(capsys: pytest.CaptureFixture[str]) -> None:
    """`shelf --version` names the installed version; a usage error (2) is not a user's fixable mistake (7)."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as shown:
        cli.main(["--version"])
    assert shown.value.code == 0 and capsys.readouterr().out.strip() == f"shelf {version(cli.DISTRIBUTION)}"
    with pytest.raises(SystemExit) as usage:
        cli.main(["no-such-step"])
    assert usage.value.code == 2
    codes = {int(line.split()[0]) for line in cli.EXIT_CODES.splitlines()[1:]}
    assert codes == set(range(8))
    assert ShelfError.exit_code == 7 and {QualityGateError.exit_code, PublishRefusedError.exit_code} == {3, 6}


def test_generate_runs_without_a_conf_file_where_pyspark_cannot_be_imported(tmp_path: Path) -> None:
    """Outside a checkout (no conf/ folder) with no --conf, `shelf generate` runs on the packaged defaults and
    writes the demo shop with pandas only: in a process where importing pyspark fails, it works."""
    import subprocess
    import sys

    code = "import sys; sys.modules['pyspark'] = None; from pipelines import cli; sys.exit(cli.main(['generate']))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / ".data" / "demo" / "events" / "part-00000.csv").exists()
    assert (tmp_path / ".data" / "demo" / "catalog").is_dir()


def test_shelf_serve_imports_no_pyspark() -> None:
    """`.[serve]` installs no Spark: the service's modules import where importing pyspark fails."""
    import subprocess
    import sys

    code = "import sys; sys.modules['pyspark'] = None; import pipelines.serve.main, pipelines.serve.app"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
