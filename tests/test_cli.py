"""The command line without a worker: help, start-up cost, usage errors and their exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tuneq.cli.main import cli
from tuneq.worker.store.db import head_revision


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += all_commands(command, (*prefix, name))
    return found


@pytest.mark.parametrize("path", all_commands(cli), ids=" ".join)
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0
    command = cli
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    if isinstance(command, click.Group):
        assert command.help
    else:
        assert "Example" in result.output, result.output


def test_help_imports_no_heavy_library() -> None:
    """``tuneq --help`` loads no ML, queue or database library: those imports are what made
    help slow (SQLAlchemy and the tables alone took 0.5 s of 1.0). What help costs in wall time
    depends on the machine, so it is not timed here."""
    probe = (
        "import sys; from tuneq.cli.main import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))"
    )
    heavy = ["celery", "datasets", "sqlalchemy", "torch", "transformers"]
    result = subprocess.run([sys.executable, "-c", probe, *heavy], capture_output=True, text=True)
    assert result.stdout.splitlines()[-1] == "[]", result.stdout
    subprocess.run([sys.executable, "-m", "tuneq.cli", "--help"], check=True, capture_output=True)


def test_finetune_options_come_from_the_spec() -> None:
    result = CliRunner().invoke(cli, ["finetune", "--help"])
    assert "--learning-rate FLOAT" in result.output
    assert (
        "Peak learning rate; default: 1e-4 below 3,000 training rows, 5e-5 from 3,000 on "
        "(chosen from bench/quality.py)."
    ) in " ".join(result.output.split()), "the default depends on the data: no [default: ...]"


def test_bad_option_values_are_usage_errors(env: dict[str, str]) -> None:
    result = CliRunner().invoke(
        cli, ["finetune", "--data", "x.csv", "--learning-rate", "2", "--name", "Bad Name"], env=env
    )
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: --name must be lower-case letters, digits, '.', '_' or '-' (at most 64), like "
        "imdb-sentiment; --learning-rate Input should be less than 1"
    )


def test_data_is_required(env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["finetune"], env=env)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == "Error: --data is required"


def test_job_file_with_overrides(env: dict[str, str], tmp_path: Path) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text("data: reviews.csv\nepochs: 3\nlabel_names: [neg, pos]\n")
    result = CliRunner().invoke(cli, ["finetune", str(job_file), "--epochs", "2"], env=env)
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(cli, ["show", result.stdout.strip()], env=env)
    assert "  epochs: 2.0" in shown.stdout
    assert "  label_names: ['neg', 'pos']" in shown.stdout


def test_unknown_job_and_model(env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["show", "abcdef"], env=env)
    assert (result.exit_code, result.stderr) == (
        1,
        "Error: no job 'abcdef'; `tuneq jobs` lists them\n",
    )
    result = CliRunner().invoke(cli, ["predict", "nothing-here", "text"], env=env)
    assert (result.exit_code, result.stderr) == (
        1,
        "Error: no registered model 'nothing-here'; `tuneq models` lists them, "
        "or pass a model folder\n",
    )


def test_empty_listings_say_what_to_do(env: dict[str, str]) -> None:
    jobs = CliRunner().invoke(cli, ["jobs"], env=env)
    models = CliRunner().invoke(cli, ["models"], env=env)
    assert jobs.stdout == "no jobs yet; submit one with `tuneq finetune --data FILE`\n"
    assert models.stdout == "no models yet; a successful `tuneq finetune` registers one\n"


def test_demo_offline_without_data_says_how_to_pass_a_file(env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["demo"], env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: the Hugging Face Hub cannot be reached from this machine, so the demo cannot "
        "download IMDB. Pass a local copy with --data PATH: a CSV, TSV, JSON lines or Parquet "
        "file, or a folder with train.* and test.* files, with columns text and label "
        "(0 = negative, 1 = positive); e.g. tuneq demo --data ../shared/data/imdb\n"
    )


def test_db_upgrade(env: dict[str, str]) -> None:
    first = CliRunner().invoke(cli, ["db", "upgrade"], env=env)
    second = CliRunner().invoke(cli, ["db", "upgrade"], env=env)
    head = head_revision()
    assert first.exit_code == 0 and f"upgraded from empty to revision {head}" in first.stdout
    assert f"already at revision {head}" in second.stdout


def test_the_demo_worker_takes_a_gpu_where_there_is_one() -> None:
    from tuneq.cli.demo import gpu_option

    assert gpu_option({}, gpus=0) == []
    assert gpu_option({}, gpus=2) == ["--gpu", "0"]
    assert gpu_option({"CUDA_VISIBLE_DEVICES": "3"}, gpus=2) == ["--gpu", "0"]  # GPU 3, then
    assert gpu_option({"CUDA_VISIBLE_DEVICES": ""}, gpus=2) == []  # hidden on purpose
