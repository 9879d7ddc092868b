"""Shared by the benchmarks: real IMDB reviews, the matmul ceiling, and result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"


def imdb_reviews(split: str, rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """``rows`` reviews drawn by a seeded shuffle from ``../shared/data/imdb/<split>.csv.gz``."""
    import numpy as np
    from pyarrow import csv

    table = csv.read_csv(SHARED_DATA / "imdb" / f"{split}.csv.gz")
    order = np.random.default_rng(seed).permutation(table.num_rows)[:rows]
    return table.take(order).select(["id", "text", "label"]).to_pylist()


def matmul_flops_per_second(
    dtype_name: str, size: int = 2048, repeats: int = 10, device: str = "cpu"
) -> float:
    """FLOP/s of a large square ``torch.matmul`` in ``dtype_name`` on ``device``, now: the
    best of three timings, the ceiling the model's own FLOP/s are compared with."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.matmul(a, b)  # warm up
    synchronize(device)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device`` (a GPU runs it asynchronously)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tutorial_predict(folder: str, texts: list[str], device: str = "cpu") -> tuple[list[int], float]:
    """The tutorial's predict(): pad every review to 512 tokens, fixed batches of 8, fp32, on
    ``device``; returns the label ids and the seconds taken (after one warm-up batch)."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval().to(device)

    def run(batch_texts: list[str]) -> list[int]:
        labels: list[int] = []
        for start in range(0, len(batch_texts), 8):
            batch = tokenizer(
                batch_texts[start : start + 8],
                padding="max_length",
                truncation=True,
                max_length=512,
                return_tensors="pt",
            ).to(device)
            with torch.no_grad():
                labels += model(**batch).logits.argmax(-1).tolist()
        return labels

    run(texts[:8])  # warm up
    synchronize(device)
    started = time.perf_counter()
    labels = run(texts)
    synchronize(device)
    return labels, time.perf_counter() - started


def onednn_linear_flops_per_second(
    dtype_name: str, rows: int = 2048, features: tuple[int, int] = (384, 1536), repeats: int = 20
) -> float:
    """FLOP/s of tuneq's oneDNN linear layer (``PackedLinear``) on a ``rows`` × ``features``
    product in ``dtype_name``, now: MiniLM's widest dense layer at a token budget of 2,048, the
    best this machine does on the model's own shapes (on AMD CPUs well above ``torch.matmul``,
    which takes MKL's AVX2 path there)."""
    import torch

    from tuneq.worker.ml.onednn import PackedLinear

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    layer = PackedLinear(torch.nn.Linear(*features), dtype)
    x = torch.randn(rows, features[0], dtype=dtype)
    with torch.inference_mode():
        layer(x)  # warm up
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(repeats):
                layer(x)
            best = min(best, time.perf_counter() - started)
    return 2 * rows * features[0] * features[1] * repeats / best


def encoder_flops(model: Any, lengths: list[int], first_token_only: bool = False) -> float:
    """Forward FLOPs of a BERT-style encoder on texts of ``lengths`` tokens, padding excluded:
    2 per weight per token for the dense layers, plus the attention score and mix products.
    ``first_token_only``: what tuneq computes where the last layer runs for the first token
    alone (``tuneq.worker.ml.first_token``): that layer's keys and values for every token, the
    rest of it, attention included, for one."""
    config = model.config
    dense = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() == 2 and "embeddings" not in name
    )
    tokens = sum(lengths)
    attention = 4 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in lengths)
    flops = 2 * dense * tokens + attention
    if first_token_only:
        last = model.base_model.encoder.layer[-1]
        skipped = sum(
            p.numel()
            for name, p in last.named_parameters()
            if p.dim() == 2 and not name.startswith(("attention.self.key", "attention.self.value"))
        )
        flops -= 2 * skipped * (tokens - len(lengths))
        flops -= 4 * config.hidden_size * sum(n * n - n for n in lengths)
    return flops


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_flags": [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()],
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "python": platform.python_version(),
    }


def timed_dtypes() -> tuple[str, ...]:
    """The dtypes worth timing here: bf16 only where the CPU computes it natively (emulated, a
    2048² bf16 matmul takes minutes and says nothing about tuneq)."""
    from tuneq.worker.ml.device import native_bf16

    return ("fp32", "bf16") if native_bf16() else ("fp32",)


def cpu_info(key: str) -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")


def cpu_model() -> str:
    return cpu_info("model name") or platform.processor() or platform.machine()


MATRIX_ISAS = (  # /proc/cpuinfo flag and name, best first
    ("amx_bf16", "AMX"),
    ("avx512_bf16", "AVX512-BF16"),
    ("avx512f", "AVX-512"),
    ("avx2", "AVX2"),
)


def cpu_name() -> str:
    """The processor's model and its best matrix instructions (AMX, AVX512-BF16, AVX-512,
    AVX2): the model string alone does not tell one machine from another ("AMD EPYC" has been
    both AVX2-only and AVX512-BF16 here), and they set a run's speed and training precision."""
    flags = set(cpu_flags())
    isa = next((name for flag, name in MATRIX_ISAS if flag in flags), None)
    return f"{cpu_model()} ({isa})" if isa else cpu_model()


def cpu_flags() -> list[str]:
    return cpu_info("flags").split()


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/NAME.json`` with the commit the run ended at, so that a figure can
    be traced to its code."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**result, "commit": commit()}, indent=2) + "\n")
    return path


def commit() -> str:
    """This checkout's commit, with "+changes" where the package's files differ from it."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True)
    package = ["worker", "schemas", "cli", "ui", "pyproject.toml"]
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *package], cwd=root)
    return out.stdout.decode().strip() + ("+changes" if dirty.returncode else "")


class PeakSampler(threading.Thread):
    """Peak RSS of a process and of its whole tree (a worker and its pool processes), sampled
    twice a second."""

    def __init__(self, pid: int) -> None:
        import psutil

        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak_process = self.peak_tree = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
                sizes = [p.memory_info().rss for p in processes]
            except psutil.Error:
                continue
            self.peak_process = max(self.peak_process, *sizes)
            self.peak_tree = max(self.peak_tree, sum(sizes))
            time.sleep(0.5)

    def result(self) -> dict[str, float]:
        return {
            "peak_rss_largest_process_mb": round(self.peak_process / 2**20, 1),
            "peak_rss_worker_tree_mb": round(self.peak_tree / 2**20, 1),
        }


@contextmanager
def tuneq_worker(work: Path, allowed: list[str], queue: str = "bench") -> Iterator[Any]:
    """A real ``tuneq worker`` process on its own data dir (embedded broker, SQLite) that may
    read ``work`` and ``allowed``; yields ``(settings, sampler)`` once its pool process is
    ready, as a worker that has been running a while is."""
    with tuneq_workers(work, allowed, queue, [([], {})]) as (settings, samplers):
        yield settings, samplers[0]


@contextmanager
def tuneq_workers(
    work: Path, allowed: list[str], queue: str, workers: list[tuple[list[str], dict[str, str]]]
) -> Iterator[Any]:
    """Several worker processes sharing one data dir, each with its own extra ``tuneq worker``
    options and environment; yields ``(settings, samplers)`` once every pool process is ready."""
    from tuneq.schemas.settings import load_settings

    work.mkdir(parents=True, exist_ok=True)
    env = {
        "TUNEQ_DATA_DIR": str(work / "data"),
        "TUNEQ_ALLOWED_ROOTS": os.pathsep.join([str(work), *allowed]),
    }
    started: list[tuple[subprocess.Popen[bytes], Path, Any, PeakSampler, int]] = []
    try:
        for number, (options, extra_env) in enumerate(workers):
            log_path = work / f"worker-{queue}-{number}.log"
            log = open(log_path, "wb")  # noqa: SIM115
            process = subprocess.Popen(
                [sys.executable, "-m", "tuneq.cli", "worker", "--queues", queue, *options],
                env={**os.environ, **env, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            sampler = PeakSampler(process.pid)
            sampler.start()
            pools = (
                int(options[options.index("--concurrency") + 1])
                if "--concurrency" in options
                else 1
            )
            started.append((process, log_path, log, sampler, pools))
        deadline = time.monotonic() + 180
        for process, log_path, _log, _sampler, pools in started:
            # Ready once every pool process has imported torch, as in a worker running a while.
            while log_path.read_bytes().count(b"ready for jobs") < pools:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start:\n{log_path.read_text()}")
                time.sleep(0.2)
        yield load_settings(env), [entry[3] for entry in started]
    finally:
        for process, _log_path, log, sampler, _pools in started:
            sampler.stop.set()
            process.terminate()
            process.wait()
            log.close()


def run_job(settings: Any, spec: Any, poll_s: float = 0.2) -> tuple[Any, float]:
    """Submit ``spec`` as the CLI does and wait for it; returns the job and the wall seconds
    from submission to its end."""
    from tuneq.worker.jobs.submit import submit_job
    from tuneq.worker.store import get_job
    from tuneq.worker.store.db import get_engine

    started = time.perf_counter()
    job = submit_job(settings, spec)
    engine = get_engine(settings.database_url)
    while (job := get_job(engine, job.id)).status in ("queued", "running"):
        time.sleep(poll_s)
    wall = time.perf_counter() - started
    assert job.status == "succeeded", job.error
    return job, wall
