"""Scoring speed on a GPU: the tutorial's predict() against tuneq's classify() in fp32 and bf16,
with a MiniLM-L6-shaped BERT of RANDOM weights (speed only: its labels mean nothing).

    python3 bench/gpu_score.py --out gpu_score.json                 # on a CUDA GPU
    python3 bench/gpu_score.py --device cpu --rows 200 --matmul-size 1024 --out /tmp/x.json

The model is built from a config (6 layers, 384 wide, 12 heads, 1536 intermediate, as
all-MiniLM-L6-v2) with a WordPiece vocabulary trained on the reviews themselves, so that nothing
is downloaded and no model package is needed. Reviews come from a CSV with a ``text`` column,
by default the first 2,000 of ../shared/data/imdb/test.csv.gz; where that folder is missing (a
GPU machine), pass a slice of it with --data (see bench/score.py for the CPU
benchmark with a fine-tuned model, whose labels do mean something). Prints one JSON object and
writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SHARED_DATA,
    encoder_flops,
    machine,
    matmul_flops_per_second,
    synchronize,
    tutorial_predict,
)

DEFAULT_DATA = SHARED_DATA / "imdb" / "test.csv.gz"
RANDOM_WEIGHTS = "RANDOM WEIGHTS: a speed measurement only; the labels mean nothing"
MINILM_L6 = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}


def read_texts(path: Path, rows: int) -> list[str]:
    """The first ``rows`` texts of a CSV (optionally gzipped) with a ``text`` column."""
    from pyarrow import csv

    table = csv.read_csv(path)
    return [str(text) for text in table.column("text").to_pylist()[:rows]]


def build_model(folder: Path, texts: list[str], vocab_size: int) -> Any:
    """A MiniLM-L6-shaped BertForSequenceClassification with random weights and a WordPiece
    vocabulary trained on ``texts``, saved into ``folder``; returns the model."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, show_progress=False)
    tokenizer = BertTokenizer(vocab=wordpiece.get_vocab())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=MINILM_L6["hidden_size"],
        num_hidden_layers=MINILM_L6["num_hidden_layers"],
        num_attention_heads=MINILM_L6["num_attention_heads"],
        intermediate_size=MINILM_L6["intermediate_size"],
        max_position_embeddings=MINILM_L6["max_position_embeddings"],
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def tuneq_classify(
    folder: str, texts: list[str], precision: str, batch_tokens: int, device: str
) -> tuple[list[int], float]:
    """tuneq's own scoring path in this process: ``load_for_inference`` (which puts the model
    on CUDA whenever torch sees a GPU) and ``classify``; bf16 is autocast."""
    from tuneq.worker.ml.predict import classify, load_for_inference

    classifier = load_for_inference(folder, precision)
    if classifier.device.type != device:
        raise SystemExit(f"tuneq loaded the model on {classifier.device}, not on {device}")
    classify(classifier, texts[:8], batch_tokens=batch_tokens)  # warm up
    synchronize(device)
    started = time.perf_counter()
    probabilities = classify(classifier, texts, batch_tokens=batch_tokens)
    synchronize(device)
    return [int(i) for i in probabilities.argmax(axis=1)], time.perf_counter() - started


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def gpu_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "fp32_matmul_allows_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV with a text column")
    parser.add_argument("--rows", type=int, default=2000, help="reviews to score")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--vocab-size", type=int, default=30522, help="WordPiece vocabulary")
    parser.add_argument(
        "--batch-tokens",
        default="4096,32768",
        help="classify() token budgets to time, comma-separated; tuneq's defaults are 4096 "
        "on a CPU and 32768 on a GPU",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: tuneq takes any GPU it sees
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from transformers import AutoTokenizer

    from tuneq.worker.ml.models import quiet_transformers

    quiet_transformers()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; run with --device cpu to exercise the code")
    budgets = [int(b) for b in args.batch_tokens.split(",") if b.strip()]
    texts = read_texts(args.data, args.rows)
    work = Path(tempfile.mkdtemp(prefix="tuneq-bench-gpu-"))
    folder = str(work / "minilm-l6-random")
    model = build_model(Path(folder), texts, args.vocab_size)
    lengths = [
        len(ids)
        for ids in AutoTokenizer.from_pretrained(folder)(texts, truncation=True, max_length=512)[
            "input_ids"
        ]
    ]
    flops = encoder_flops(model, lengths)
    padded_flops = encoder_flops(model, [512] * len(texts))
    parameters = sum(p.numel() for p in model.parameters())
    del model
    ceiling = {
        name: matmul_flops_per_second(name, args.matmul_size, device=args.device)
        for name in ("fp32", "bf16")
    }
    print(f"{RANDOM_WEIGHTS}\nmatmul {args.matmul_size}²: {ceiling}", file=sys.stderr, flush=True)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    runs: dict[str, Any] = {}

    def record(name: str, labels: list[int], seconds: float, precision: str) -> None:
        runs[name] = {
            "rows_per_s": round(len(texts) / seconds, 2),
            "seconds": round(seconds, 3),
            "model_flops_per_s": flops / seconds,
            "utilisation_of_matmul": flops / seconds / ceiling[precision],
            "labels": labels,
        }
        if args.device == "cuda":
            runs[name]["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
        shown = {k: v for k, v in runs[name].items() if k != "labels"}
        print(name, shown, file=sys.stderr, flush=True)

    labels, seconds = tutorial_predict(folder, texts, args.device)
    record("tutorial_predict_fp32_pad512_batch8", labels, seconds, "fp32")
    runs["tutorial_predict_fp32_pad512_batch8"]["padded_flops_per_s"] = padded_flops / seconds
    for precision in ("fp32", "bf16"):
        for budget in budgets:
            labels, seconds = tuneq_classify(folder, texts, precision, budget, args.device)
            record(f"tuneq_classify_{precision}_batch_tokens_{budget}", labels, seconds, precision)

    tutorial = runs["tutorial_predict_fp32_pad512_batch8"]
    reference = runs[f"tuneq_classify_fp32_batch_tokens_{budgets[0]}"]["labels"]
    for run in runs.values():
        run["labels_agree_with_tutorial"] = agreement(run["labels"], tutorial["labels"])
        run["labels_agree_with_tuneq_fp32"] = agreement(run["labels"], reference)
        run["speedup_vs_tutorial"] = run["rows_per_s"] / tutorial["rows_per_s"]
    for run in runs.values():
        del run["labels"]
    result = {
        "note": RANDOM_WEIGHTS + "; label agreement only shows that the paths compute the same "
        "function (random logits sit close together, so bf16 flips more of them than a "
        "fine-tuned model would)",
        "device": args.device,
        "gpu": gpu_info(),
        "machine": machine(),
        "platform": platform.platform(),
        "transformers": __import__("transformers").__version__,
        "data": str(args.data),
        "rows": len(texts),
        "mean_tokens": sum(lengths) / len(lengths),
        "model": {
            "shape": "MiniLM-L6 (BertForSequenceClassification)",
            **MINILM_L6,
            "vocab_size": len(AutoTokenizer.from_pretrained(folder)),
            "parameters": parameters,
            "weights": "random (torch.manual_seed(0))",
        },
        "model_flops": flops,
        "model_flops_padded_to_512": padded_flops,
        "matmul_size": args.matmul_size,
        "matmul_flops_per_s": ceiling,
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
