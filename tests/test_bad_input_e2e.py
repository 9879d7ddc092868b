"""A corpus of bad scoring inputs through one real worker: each job fails with a message that
names the problem, writes nothing, and the worker goes on to score the next file."""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import invoke_cli, queue_name, score_args, scoring_input
from tuneq.worker.io.files import MAX_FIELD_BYTES

ENCODING_HINT = (
    "bytes that are not valid utf-8; pass the file's encoding with --encoding "
    "(for example --encoding latin-1 or --encoding gb18030)"
)
TOO_LONG = f"a field longer than {MAX_FIELD_BYTES:,} bytes, the most tuneq reads"


@pytest.fixture
def outside() -> Iterator[Path]:
    """A folder outside every allowed root (not under pytest's temporary folder)."""
    folder = Path(tempfile.mkdtemp(prefix="tuneq-outside-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def corpus(folder: Path, outside: Path) -> list[tuple[str, Path, Path, str]]:
    """(case, input, output, the message after "failed: ") for each bad input."""
    folder.mkdir()

    def write(name: str, content: bytes) -> Path:
        (folder / name).write_bytes(content)
        return folder / name

    huge = "word " * (10 * 2**20 // 5)  # 10 MB
    secret = outside / "private.csv"
    secret.write_text("id,text\n1,not for tuneq\n")
    link = folder / "link.csv"
    link.symlink_to(secret)
    (folder / "a-folder.csv").mkdir()
    cases = [
        ("empty file", write("empty.csv", b""), "{input} is empty"),
        ("header only", write("header.csv", b"id,text\n"), "{input} has no rows"),
        (
            "malformed CSV row",
            write("malformed.csv", b"id,text\n1,fine\n2,broken,row\n"),
            "{input}, line 3: expected 2 fields, found 3",
        ),
        (
            "malformed JSON line",
            write("malformed.jsonl", b'{"id": 1, "text": "fine"}\n{"id": 2, "text": "cut\n'),
            "{input}, line 2: not valid JSON",
        ),
        (
            "missing column",
            write("no-text.csv", b"id,review\n1,great\n"),
            "{input} has no column 'text'",
        ),
        (
            "bytes that are not UTF-8",
            write("latin.csv", "id,text\n1,très bien\n".encode("latin-1")),
            "{input}: " + ENCODING_HINT,
        ),
        (
            "a 10 MB field",
            write("huge.csv", f"id,text\n1,fine\n2,{huge}\n".encode()),
            "{input}, line 3: " + TOO_LONG,
        ),
        (
            "a 10 MB field in gzipped JSON lines",
            write(
                "huge.jsonl.gz",
                gzip.compress(json.dumps({"id": 1, "text": huge}).encode() + b"\n"),
            ),
            "{input}, line 1: " + TOO_LONG,
        ),
        ("a folder where a file belongs", folder / "a-folder.csv", "{input} is a folder"),
        (
            "a path outside the allowed roots",
            secret,
            "input {input} is outside the folders this worker may use",
        ),
        (
            "a link that leads outside",
            link,
            f"input {{input}} (a link to {secret.resolve()}) is outside the folders this "
            "worker may use",
        ),
    ]
    rows = [
        (name, source, folder / f"{source.name}.out.csv", message)
        for name, source, message in cases
    ]
    good = scoring_input(folder / "good.csv", 40)
    rows.append(
        (
            "an output outside the allowed roots",
            good,
            outside / "scored.csv",
            f"output {outside / 'scored.csv'} is outside the folders this worker may use",
        )
    )
    return rows


def test_each_bad_input_fails_its_job_and_the_worker_scores_the_next(
    env, start_worker, trained_tiny_model: Path, tmp_path: Path, outside: Path
) -> None:
    queue = queue_name()
    worker = start_worker(env, queue)
    for case, source, output, message in corpus(tmp_path / "corpus", outside):
        result = invoke_cli(env, *score_args(trained_tiny_model, source, output, queue, "--wait"))
        job_id = result.stdout.strip()
        error = result.stderr.splitlines()[-1]
        expected = f"Error: job {job_id} failed: " + message.format(input=source)
        assert result.exit_code == 1, (case, result.output)
        assert error.startswith(expected), (case, error)
        assert not output.exists(), case
        assert worker.alive, case
    assert not list(outside.glob("scored*")), "nothing written outside the allowed roots"
    good = scoring_input(tmp_path / "next.csv", 40)
    output = tmp_path / "next.scored.jsonl"
    result = invoke_cli(env, *score_args(trained_tiny_model, good, output, queue, "--wait"))
    assert result.exit_code == 0, result.output
    assert len(output.read_text().splitlines()) == 40
    jobs = json.loads(invoke_cli(env, "jobs", "--json").stdout)
    assert [job["status"] for job in jobs] == ["succeeded"] + ["failed"] * 12
    assert (Path(env["TUNEQ_DATA_DIR"]) / "artifacts" / "scoring").exists()
    assert not list((Path(env["TUNEQ_DATA_DIR"]) / "artifacts" / "scoring").iterdir())


def test_bytes_in_another_encoding_score_with_encoding(
    env, start_worker, trained_tiny_model: Path, tmp_path: Path
) -> None:
    queue = queue_name()
    start_worker(env, queue)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,text\n1,très bien\n".encode("latin-1"))
    output = tmp_path / "latin.out.jsonl"
    args = score_args(trained_tiny_model, latin, output, queue, "--encoding", "latin-1", "--wait")
    result = invoke_cli(env, *args)
    assert result.exit_code == 0, result.output
    assert json.loads(output.read_text())["text"] == "très bien"
