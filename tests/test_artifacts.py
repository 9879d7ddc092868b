"""Artifacts in a store named by an fsspec URI: the verbs against ``memory://`` and ``file://``,
scoring through a store in-process, then fine-tune and scoring through real worker processes
that share nothing but the store, Redis and the database."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import (
    REDIS_URL,
    invoke_cli,
    queue_name,
    redis_available,
    scoring_input,
    unavailable,
)
from tuneq.schemas.errors import ModelError, PathRefused
from tuneq.schemas.settings import load_settings
from tuneq.schemas.specs import FinetuneSpec, ScoreSpec
from tuneq.worker.io import artifacts
from tuneq.worker.io.files import iter_batches
from tuneq.worker.jobs import lifecycle, runner
from tuneq.worker.jobs.paths import confine_spec
from tuneq.worker.ml.predict import predict_texts
from tuneq.worker.ml.score import assemble_output, choose_precision, score_shard, stage_input
from tuneq.worker.store import create_job, get_job
from tuneq.worker.store.db import get_engine


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store: a ``memory://`` one of this test's own, or a ``file://`` folder."""
    if request.param == "file":
        yield f"file://{tmp_path / 'store'}"
        return
    uri = f"memory://tuneq-test-{uuid.uuid4().hex[:8]}"
    yield uri
    artifacts.remove_path(uri)


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def a_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "bert"}')
    (path / "sub" / "plot.png").write_bytes(b"\x89PNG" + bytes(range(256)))
    return path


def test_locations_are_paths_without_a_store_and_uris_with_one(tmp_path: Path) -> None:
    local = load_settings({"TUNEQ_DATA_DIR": str(tmp_path)})
    assert artifacts.store_location(local, "scoring", "j1") == str(
        tmp_path / "artifacts" / "scoring" / "j1"
    )
    stored = load_settings(
        {"TUNEQ_DATA_DIR": str(tmp_path), "TUNEQ_ARTIFACT_STORE": "memory://bucket/tuneq/"}
    )
    assert artifacts.store_location(stored, "models", "m", "j1-1") == (
        "memory://bucket/tuneq/models/m/j1-1"
    )
    assert artifacts.cache_folder(stored) == tmp_path / "artifacts" / "cache"
    assert artifacts.is_uri("s3://b/k") and artifacts.is_uri("file:///srv/x")
    assert not artifacts.is_uri("/srv/x") and not artifacts.is_uri("./s3:/x")


def test_a_folder_goes_up_whole_and_comes_back_once(store: str, tmp_path: Path) -> None:
    local = a_folder(tmp_path / "model")
    location = artifacts.join(store, "models", "m", "j1-1")
    artifacts.put_folder(local, location)
    assert artifacts.exists(artifacts.join(location, "sub", "plot.png"))

    cache = tmp_path / "cache"
    fetched = artifacts.fetch_folder(location, cache)
    assert files_under(fetched) == ["config.json", "sub/plot.png"]
    assert (fetched / "sub" / "plot.png").read_bytes() == (local / "sub" / "plot.png").read_bytes()
    assert [p.name for p in cache.iterdir()] == [fetched.name], "no temporary folder left"

    artifacts.remove_path(location)
    assert not artifacts.exists(location)
    assert artifacts.fetch_folder(location, cache) == fetched, "fetched once, then cached"
    with pytest.raises(FileNotFoundError):
        artifacts.fetch_folder(artifacts.join(store, "models", "m", "gone"), cache)
    assert [p.name for p in cache.iterdir()] == [fetched.name]


def test_put_folder_replaces_what_a_failed_attempt_left(store: str, tmp_path: Path) -> None:
    location = artifacts.join(store, "models", "m", "j1-1")
    with artifacts.open_artifact(artifacts.join(location, "stale.bin"), "wb") as f:
        f.write(b"half an upload")
    artifacts.put_folder(a_folder(tmp_path / "model"), location)
    fetched = artifacts.fetch_folder(location, tmp_path / "cache")
    assert files_under(fetched) == ["config.json", "sub/plot.png"]


def test_a_written_file_appears_whole_or_not_at_all(store: str) -> None:
    target = artifacts.join(store, "out", "scored.parquet")
    with pytest.raises(RuntimeError), artifacts.writing(target) as sink:
        sink.write(b"half")
        raise RuntimeError("stopped mid-write")
    fs, folder = artifacts.filesystem(artifacts.join(store, "out"))
    assert not fs.exists(folder) or fs.ls(folder) == [], "no output, no partial file"

    with artifacts.writing(target) as sink:
        sink.write(b"whole")
    with artifacts.open_artifact(target) as f:
        assert f.read() == b"whole"
    assert [posix.rsplit("/", 1)[-1] for posix in fs.ls(folder, detail=False)] == ["scored.parquet"]


def test_a_local_location_is_left_where_it_is(tmp_path: Path) -> None:
    folder = a_folder(tmp_path / "model")
    assert artifacts.fetch_folder(str(folder), tmp_path / "cache") == folder
    assert not (tmp_path / "cache").exists()


def test_a_model_in_the_store_is_loaded_from_the_cache(store: str, tmp_path: Path) -> None:
    settings = load_settings({"TUNEQ_DATA_DIR": str(tmp_path), "TUNEQ_ARTIFACT_STORE": store})
    location = artifacts.store_location(settings, "models", "m", "j1-1")
    artifacts.put_folder(a_folder(tmp_path / "model"), location)
    spec = ScoreSpec(model="m", model_path=location, input="/in.csv", output="/out.csv")
    local = artifacts.local_model(settings, spec).model_path
    assert local is not None and Path(local).parent == artifacts.cache_folder(settings)
    finetune = artifacts.local_model(settings, FinetuneSpec(data="imdb", model=location))
    assert finetune.model == local
    with pytest.raises(ModelError, match="is not in the artifact store"):
        artifacts.local_model(settings, spec.model_copy(update={"model_path": location + "x"}))


def test_uris_are_confined_to_the_artifact_store(tmp_path: Path) -> None:
    roots = {"TUNEQ_DATA_DIR": str(tmp_path), "TUNEQ_ALLOWED_ROOTS": str(tmp_path)}
    settings = load_settings({**roots, "TUNEQ_ARTIFACT_STORE": "memory://bucket/tuneq"})
    spec = ScoreSpec(
        model="m",
        model_path="memory://bucket/tuneq/models/m/j1-1",
        input=str(tmp_path / "in.csv"),
        output="memory://bucket/tuneq/out/scored.csv",
    )
    assert confine_spec(settings, spec) == spec
    elsewhere = "memory://bucket/other/scored.csv"
    with pytest.raises(PathRefused) as caught:
        confine_spec(settings, spec.model_copy(update={"output": elsewhere}))
    assert str(caught.value) == (
        f"output {elsewhere} is outside the artifact store this worker uses "
        "(memory://bucket/tuneq); a job may name URIs only inside TUNEQ_ARTIFACT_STORE, "
        "which every worker and client should set alike"
    )
    sneaky = "memory://bucket/tuneq/../other/m"
    with pytest.raises(PathRefused, match=r"^model memory://bucket/tuneq/\.\./other/m contains"):
        confine_spec(settings, FinetuneSpec(data="imdb", model=sneaky))
    with pytest.raises(PathRefused, match="is outside any artifact store"):
        confine_spec(load_settings(roots), spec)


def test_scoring_work_and_output_live_in_the_store(
    store: str, trained_tiny_model: Path, tmp_path: Path
) -> None:
    """Stage, score and assemble with the work folder and the output in the store: the same
    rows and labels as scoring alone, and nothing written locally but the scratch copy."""
    source = scoring_input(tmp_path / "in.csv", 120)
    output = artifacts.join(store, "out", "scored.csv.gz")
    spec = ScoreSpec(
        model="t", model_path=str(trained_tiny_model), input=str(source), output=output
    )
    spec = spec.model_copy(update={"shard_rows": 50})
    folder = artifacts.join(store, "scoring", "j1")
    staged = stage_input(spec, folder)
    assert staged.shard_sizes == [50, 50, 20]
    with artifacts.open_artifact(staged.path) as f:
        assert pq.ParquetFile(f).metadata.num_row_groups == 3
    choose_precision(spec, folder)
    for index in range(3):
        score_shard(spec, folder, index)
    scratch = tmp_path / "scratch"
    assemble_output(folder, 3, output, scratch / "scored.csv.gz")
    assert files_under(scratch) == [], "the local copy is gone once uploaded"

    with artifacts.open_artifact(output) as f:
        local = tmp_path / "scored.csv.gz"
        local.write_bytes(f.read())
    scored = pa.Table.from_batches(list(iter_batches(local))).to_pylist()
    original = pa.Table.from_batches(list(iter_batches(source))).to_pylist()
    assert [r["id"] for r in scored] == [r["id"] for r in original]
    texts = [r["text"] for r in original if r["text"]]
    alone = [p.label for p in predict_texts(trained_tiny_model, texts)]
    assert [r["label"] for r in scored if r["text"]] == alone


def test_a_cancelled_or_failed_scoring_job_leaves_nothing_in_the_store(
    trained_tiny_model: Path, tmp_path: Path, database_url: str
) -> None:
    bucket = f"file://{tmp_path / 'bucket'}"
    settings = load_settings(
        {
            "TUNEQ_DATA_DIR": str(tmp_path / "data"),
            "TUNEQ_DATABASE_URL": database_url,
            "TUNEQ_ALLOWED_ROOTS": str(tmp_path),
            "TUNEQ_ARTIFACT_STORE": bucket,
        }
    )
    model = artifacts.store_location(settings, "models", "t", "j0-1")
    artifacts.put_folder(trained_tiny_model, model)
    engine = get_engine(settings.database_url)
    source = scoring_input(tmp_path / "in.csv", 30)
    published: list[tuple[object, ...]] = []

    def start(**fields: str) -> str:
        spec = ScoreSpec(
            model="t",
            model_path=model,
            input=str(source),
            output=f"{bucket}/out/scored.csv",
            queue="q",
            shard_rows=10,
            **fields,  # type: ignore[arg-type]
        )
        job_id = create_job(engine, spec=spec).id
        runner.run_job(
            settings,
            job_id,
            worker="w",
            publish_shard=lambda *a: published.append(a),
            publish_job=lambda *_: None,
        )
        return job_id

    running = start()
    assert len(published) == 3
    assert artifacts.exists(f"{lifecycle.scoring_folder(settings, running, 1)}/input.parquet")
    lifecycle.cancel(engine, running)
    # No worker holds a shard of it, so none sees the cancel: the janitor clears the store.
    assert lifecycle.sweep_leftovers(settings, engine) == [
        lifecycle.scoring_folder(settings, running)
    ]
    assert not artifacts.exists(lifecycle.scoring_folder(settings, running))

    failed = start(text_column="review")
    assert get_job(engine, failed).status == "failed"
    assert not artifacts.exists(lifecycle.scoring_folder(settings, failed))


# End to end -----------------------------------------------------------------------------------


def files_outside_cache(artifact_dir: Path) -> list[str]:
    return [name for name in files_under(artifact_dir) if not name.startswith("cache/")]


def test_workers_that_share_only_a_store_fine_tune_and_score(
    env, start_worker, tiny_model: Path, reviews_csv: Path, tmp_path: Path
) -> None:
    """Two workers with artifact dirs of their own (as on two machines) and one ``file://``
    store: a fine-tune registers its model in the store, then both score a file with it into
    the store; their artifact dirs hold only their model caches."""
    if not redis_available(REDIS_URL):
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    store = f"file://{tmp_path / 'bucket' / 'tuneq'}"
    shared = {**env, "TUNEQ_BROKER_URL": REDIS_URL, "TUNEQ_ARTIFACT_STORE": store}
    hosts = [
        {**shared, "TUNEQ_ARTIFACT_DIR": str(tmp_path / name / "artifacts")}
        for name in ("a", "b", "client")
    ]
    queue = queue_name()
    for host in hosts[:2]:
        start_worker(host, queue, "--concurrency", "1")
    client = hosts[2]

    finetune = invoke_cli(
        client,
        *("finetune", "--data", str(reviews_csv), "--model", str(tiny_model), "--queue", queue),
        *("--epochs", "8", "--learning-rate", "0.002", "--batch-size", "16"),
        *("--name", "tiny-sentiment", "--wait"),
    )
    assert finetune.exit_code == 0, finetune.output
    job_id = finetune.stdout.strip()
    model = json.loads(invoke_cli(client, "show", job_id, "--json").stdout)["model"]
    assert model["path"] == f"{store}/models/tiny-sentiment/{job_id}-1"
    assert artifacts.exists(f"{model['path']}/model.safetensors")

    source = scoring_input(tmp_path / "reviews.csv", 400)
    output = f"{store}/outputs/scored.parquet"
    scored = invoke_cli(
        client,
        *("score", "tiny-sentiment", str(source), "--output", output, "--queue", queue),
        *("--shard-rows", "40", "--wait"),
    )
    assert scored.exit_code == 0, scored.output
    job = json.loads(invoke_cli(client, "show", scored.stdout.strip(), "--json").stdout)
    assert job["status"] == "succeeded" and job["output_path"] == output
    assert job["metrics"]["rows"] == 400 and job["metrics"]["workers"] == 2

    fs, path = fsspec.core.url_to_fs(output)
    with fs.open(path, "rb") as f:
        rows = pq.read_table(f).to_pylist()
    original = [row for batch in iter_batches(source) for row in batch.to_pylist()]
    assert [r["id"] for r in rows] == [r["id"] for r in original]
    texts = [r["text"] for r in original if r["text"]]
    cached = artifacts.fetch_folder(model["path"], tmp_path / "check-cache")
    assert [r["label"] for r in rows if r["text"]] == [
        p.label for p in predict_texts(cached, texts)
    ]

    assert not artifacts.exists(f"{store}/scoring/{job['id']}"), "work folder removed"
    for host in hosts[:2]:
        artifact_dir = Path(host["TUNEQ_ARTIFACT_DIR"])
        assert files_outside_cache(artifact_dir) == [], f"{artifact_dir} holds only its cache"
        assert any((artifact_dir / "cache").glob("*/model.safetensors"))
    assert not Path(client["TUNEQ_ARTIFACT_DIR"]).exists(), "the client fetched nothing"

    predicted = invoke_cli(client, "predict", "tiny-sentiment", "superb loved it", "--json")
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)["label"] == "positive"
    assert any((Path(client["TUNEQ_ARTIFACT_DIR"]) / "cache").glob("*/model.safetensors"))
