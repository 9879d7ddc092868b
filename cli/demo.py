"""``tuneq demo``: the classic recipe, one command: fine-tune on IMDB, register, label reviews."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

import click

from tuneq.cli.context import engine, settings
from tuneq.cli.follow import follow_job
from tuneq.cli.render import describe_metrics, table
from tuneq.schemas.errors import DataUnavailable
from tuneq.schemas.specs import FinetuneSpec

HUB_HOST = "huggingface.co"
DEMO_QUEUE = "demo"

NEW_REVIEWS = [
    "One of the best films I have seen in years: moving, funny and beautifully acted.",
    "A dull, lifeless plot and wooden acting. I walked out after an hour.",
    "I expected little, but the story grabbed me and the ending was perfect.",
    "The worst sequel ever made; even the special effects look cheap.",
    "这部电影太精彩了，演员的表演非常出色，强烈推荐！",
    "剧情拖沓，浪费了两个小时，非常失望。",
]


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a connection to the Hugging Face Hub opens (offline machines fail fast)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


@click.command()
@click.option(
    "--data",
    default=None,
    help="Local IMDB-style data (file or folder with train.* and test.*); default: the Hub's imdb.",
)
@click.option(
    "--model",
    default="minilm",
    show_default=True,
    help="Base model: minilm (offline), bert-base-uncased, or a folder.",
)
@click.option("--train-size", default=1000, show_default=True, help="Training reviews.")
@click.option("--eval-size", default=400, show_default=True, help="Evaluation reviews.")
@click.option(
    "--epochs", type=float, default=None, help="Training epochs; default: a fine-tune's (3)."
)
@click.option(
    "--max-length",
    type=int,
    default=None,
    help="Tokens kept per review; default: a fine-tune's (fitted to the data, at most 256).",
)
@click.option(
    "--attention-dropout",
    type=float,
    default=None,
    help="Dropout on attention weights; default: a fine-tune's (0).",
)
@click.option(
    "--name", default="imdb-sentiment", show_default=True, help="Name to register the model under."
)
def demo(
    data: str | None,
    model: str,
    train_size: int,
    eval_size: int,
    epochs: float | None,
    max_length: int | None,
    attention_dropout: float | None,
    name: str,
) -> None:
    """Fine-tune a sentiment classifier on IMDB reviews through a queue and a worker that the
    demo starts itself, register it, and label a few new reviews (English and Chinese).

    With MiniLM on a 2-core CPU this takes a few minutes; nothing needs a server.

    \b
    Examples:
      tuneq demo                                  # downloads IMDB from the Hub
      tuneq demo --data ../shared/data/imdb       # offline: a local copy
      tuneq demo --model bert-base-uncased --epochs 2
    """
    if data is None and not hub_reachable():
        raise DataUnavailable(
            "the Hugging Face Hub cannot be reached from this machine, so the demo cannot "
            "download IMDB. Pass a local copy with --data PATH: a CSV, TSV, JSON lines or "
            "Parquet file, or a folder with train.* and test.* files, with columns text and "
            "label (0 = negative, 1 = positive); e.g. tuneq demo --data ../shared/data/imdb"
        )
    if data is not None:
        data = os.path.abspath(os.path.expanduser(data))
    spec = FinetuneSpec(
        data=data or "imdb",
        model=model,
        name=name,
        train_size=train_size,
        eval_size=eval_size,
        label_names=["negative", "positive"],
        queue=DEMO_QUEUE,
        attention_dropout=attention_dropout,
        **{k: v for k, v in (("epochs", epochs), ("max_length", max_length)) if v is not None},
    )
    from tuneq.worker.io.artifacts import cache_folder
    from tuneq.worker.jobs.submit import submit_job
    from tuneq.worker.ml.predict import predict_texts
    from tuneq.worker.store import model_folder

    db = engine()
    click.echo(f"Starting a worker (queue {DEMO_QUEUE}); state lives in {settings().data_dir}")
    worker = start_worker(extra_roots=[data] if data else [])
    try:
        job = submit_job(settings(), spec)
        click.echo(
            f"Queued fine-tune job {job.id}: {model} on {spec.data}, "
            f"{train_size} train / {eval_size} eval reviews"
        )
        finished = follow_job(db, job.id, watch=lambda: worker_gone(worker))
    finally:
        stop_worker(worker)
    from tuneq.worker.store import job_model

    registered = job_model(db, finished)
    assert registered is not None
    click.echo("\n".join(describe_metrics(finished.metrics or {})))
    click.echo(f"\nModel {registered.name}:{registered.version} is at {registered.path}\n")
    folder = model_folder(db, registered.path, cache=cache_folder(settings()))
    predictions = predict_texts(folder, NEW_REVIEWS)
    rows = [
        [p.label, f"{p.score:.3f}", text] for text, p in zip(NEW_REVIEWS, predictions, strict=True)
    ]
    click.echo(table(["label", "score", "review"], rows))
    click.echo(
        f'\nLabel your own: tuneq predict {registered.name} "Your review here"\n'
        "(An English uncased model sees most Chinese characters as [UNK]: its Chinese labels "
        "are guesses.)"
    )


def start_worker(extra_roots: list[str]) -> subprocess.Popen[bytes]:
    """A worker process for the demo's queue, with this process's settings; it may also read
    ``extra_roots`` (the data named on the demo's command line)."""
    log = worker_log()
    settings().data_dir.mkdir(parents=True, exist_ok=True)
    from tuneq.worker.ml.device import nvidia_gpus

    command = [
        sys.executable,
        "-m",
        "tuneq.cli",
        "worker",
        "--queues",
        DEMO_QUEUE,
        "--loglevel",
        "WARNING",
        *gpu_option(os.environ, nvidia_gpus()),
    ]
    roots = [*map(str, settings().allowed_roots), *extra_roots]
    env = {**os.environ, "TUNEQ_ALLOWED_ROOTS": os.pathsep.join(roots)}
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def gpu_option(environ: Mapping[str, str], gpus: int) -> list[str]:
    """``--gpu 0`` where the machine has an NVIDIA GPU that CUDA_VISIBLE_DEVICES does not hide
    (a worker without --gpu runs on the CPU)."""
    hidden = "CUDA_VISIBLE_DEVICES" in environ and not environ["CUDA_VISIBLE_DEVICES"].strip()
    return ["--gpu", "0"] if gpus and not hidden else []


def worker_log() -> str:
    return str(settings().data_dir / "demo-worker.log")


def worker_gone(process: subprocess.Popen[bytes]) -> str | None:
    if process.poll() is None:
        return None
    return f"the demo's worker stopped (exit code {process.returncode}); see {worker_log()}"


def stop_worker(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """Stop the demo's worker: a warm shutdown first, then a kill."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if process.poll() is None:
        process.kill()
        process.wait()
