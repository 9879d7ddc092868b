"""Scoring speed on a GPU: the tutorial's predict() against tuneq's classify() in fp32 and bf16,
with BERT-shaped models of RANDOM weights (speed only: their labels mean nothing): MiniLM-L6's
shape and bert-base's.

    python3 bench/gpu_score.py --out gpu_score.json                 # on a CUDA GPU
    python3 bench/gpu_score.py --device cpu --rows 200 --matmul-size 1024 --out /tmp/x.json

Each model is built from a config (MiniLM-L6: 6 layers, 384 wide, 12 heads, 1536 intermediate;
bert-base: 12 layers, 768 wide, 12 heads, 3072 intermediate) with a WordPiece vocabulary
trained on the reviews themselves, so that nothing is downloaded and no model package is
needed. Reviews come from a CSV with a ``text`` column, by default the first 2,000 of
../shared/data/imdb/test.csv.gz; where that folder is missing (a GPU machine), pass a slice of
it with --data (see bench/score.py for the CPU benchmark with a fine-tuned model, whose labels
do mean something). Tokenizing alone is timed too: on a GPU it can set the pace. Prints one
JSON object and writes it to --out.
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
SHAPES = {
    "minilm": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "max_position_embeddings": 512,
    },
    "bert-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 512,
    },
}


def read_texts(path: Path, rows: int) -> list[str]:
    """The first ``rows`` texts of a CSV (optionally gzipped) with a ``text`` column."""
    from pyarrow import csv

    table = csv.read_csv(path)
    return [str(text) for text in table.column("text").to_pylist()[:rows]]


def build_tokenizer(folder: Path, texts: list[str], vocab_size: int) -> Any:
    """A WordPiece vocabulary trained on ``texts``, saved into ``folder``."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, show_progress=False)
    tokenizer = BertTokenizer(vocab=wordpiece.get_vocab())
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(folder: Path, tokenizer: Any, shape: str) -> Any:
    """A BertForSequenceClassification of ``shape`` with random weights and ``tokenizer``'s
    vocabulary, saved into ``folder``; returns the model."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(tokenizer),
        **SHAPES[shape],
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def tokenize_rates(folder: str, texts: list[str]) -> dict[str, float]:
    """Rows/s of tokenizing alone, in the chunks tuneq's scoring tokenizes in: through the
    tokenizer's own call, and through ``token_ids`` (its Rust backend, ids only), which tuneq
    uses."""
    from transformers import AutoTokenizer

    from tuneq.worker.ml import predict

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ways = {"tokenizer_call": lambda chunk: tokenizer(chunk, truncation=True, max_length=512)}
    if hasattr(predict, "token_ids"):  # not in a "before" commit's package
        ways["token_ids"] = predict.token_ids(tokenizer, 512)
    rates = {}
    for name, encode in ways.items():
        encode(texts[: predict.TOKENIZE_CHUNK])
        started = time.perf_counter()
        for start in range(0, len(texts), predict.TOKENIZE_CHUNK):
            encode(texts[start : start + predict.TOKENIZE_CHUNK])
        rates[name] = round(len(texts) / (time.perf_counter() - started), 1)
    return rates


def tuneq_classify(
    folder: str, texts: list[str], precision: str, batch_tokens: int, device: str
) -> tuple[list[int], float]:
    """tuneq's own scoring path in this process: ``load_for_inference`` (which puts the model
    on CUDA whenever torch sees a GPU) and ``classify``; the better of two passes."""
    from tuneq.worker.ml.predict import classify, load_for_inference

    classifier = load_for_inference(folder, precision)
    if classifier.device.type != device:
        raise SystemExit(f"tuneq loaded the model on {classifier.device}, not on {device}")
    classify(classifier, texts[:8], batch_tokens=batch_tokens)  # warm up
    best = float("inf")
    for _ in range(2):  # the first pass meets each batch shape for the first time
        synchronize(device)
        started = time.perf_counter()
        probabilities = classify(classifier, texts, batch_tokens=batch_tokens)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return [int(i) for i in probabilities.argmax(axis=1)], best


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
    parser.add_argument(
        "--tutorial-rows", type=int, default=2000, help="of those, scored by the tutorial"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--vocab-size", type=int, default=30522, help="WordPiece vocabulary")
    parser.add_argument("--shapes", default="minilm,bert-base", help=f"of {sorted(SHAPES)}")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--skip-tutorial", action="store_true")
    parser.add_argument(
        "--batch-tokens",
        default="32768",
        help="classify() token budgets to time, comma-separated; tuneq's defaults are 4096 "
        "on a CPU and 32768 on a GPU",
    )
    parser.add_argument(
        "--explore",
        action="store_true",
        help="also time bf16 classify() of the first shape with other tokenizing chunks and "
        "sort windows (TOKENIZE_CHUNK, SORT_WINDOW), to choose them",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: tuneq takes any GPU it sees

    import torch

    from tuneq.worker.ml.models import quiet_transformers

    quiet_transformers()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; run with --device cpu to exercise the code")
    budgets = [int(b) for b in args.batch_tokens.split(",") if b.strip()]
    texts = read_texts(args.data, args.rows)
    work = Path(tempfile.mkdtemp(prefix="tuneq-bench-gpu-"))
    tokenizer = build_tokenizer(work / "tokenizer", texts, args.vocab_size)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=512)["input_ids"]]
    ceiling = {
        name: matmul_flops_per_second(name, args.matmul_size, device=args.device)
        for name in ("fp32", "bf16")
    }
    print(f"{RANDOM_WEIGHTS}\nmatmul {args.matmul_size}²: {ceiling}", file=sys.stderr, flush=True)
    shapes = {}
    for shape in args.shapes.split(","):
        folder = str(work / shape)
        model = build_model(Path(folder), tokenizer, shape)
        flops = encoder_flops(model, lengths)
        shapes[shape] = {
            "model": {
                "shape": f"{shape} (BertForSequenceClassification)",
                **SHAPES[shape],
                "vocab_size": len(tokenizer),
                "parameters": sum(p.numel() for p in model.parameters()),
                "weights": "random (torch.manual_seed(0))",
            },
            "model_flops": flops,
            "tokenize_rows_per_s": tokenize_rates(folder, texts),
            "runs": score_runs(args, folder, texts, flops, ceiling, budgets),
        }
        if args.explore and shape == args.shapes.split(",")[0]:
            shapes[shape]["windows"] = explore_windows(
                folder, texts, flops, ceiling["bf16"], args.device
            )
        del model
    result = {
        "note": RANDOM_WEIGHTS + "; label agreement only shows that the paths compute the same "
        "function (random logits sit close together, so bf16 flips more of them than a "
        "fine-tuned model would)",
        "device": args.device,
        "gpu": gpu_info(),
        "machine": machine(),
        "platform": platform.platform(),
        "transformers": __import__("transformers").__version__,
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: parallel)"),
        "data": str(args.data),
        "rows": len(texts),
        "mean_tokens": sum(lengths) / len(lengths),
        "matmul_size": args.matmul_size,
        "matmul_flops_per_s": ceiling,
        "shapes": shapes,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


EXPLORED = [(512, 4096), (2048, 4096), (512, 1024), (1024, 2048), (2048, 8192)]


def explore_windows(
    folder: str, texts: list[str], flops: float, ceiling: float, device: str
) -> list[dict[str, Any]]:
    """bf16 classify() with other (TOKENIZE_CHUNK, SORT_WINDOW) pairs, the module's own first."""
    from tuneq.worker.ml import predict

    own = (predict.TOKENIZE_CHUNK, predict.SORT_WINDOW)
    found = []
    try:
        for chunk, window in [own, *(pair for pair in EXPLORED if pair != own)]:
            predict.TOKENIZE_CHUNK, predict.SORT_WINDOW = chunk, window
            _labels, seconds = tuneq_classify(folder, texts, "bf16", 32768, device)
            found.append(
                {
                    "tokenize_chunk": chunk,
                    "sort_window": window,
                    "rows_per_s": round(len(texts) / seconds, 1),
                    "utilisation_of_matmul": flops / seconds / ceiling,
                }
            )
            print(folder, found[-1], file=sys.stderr, flush=True)
    finally:
        predict.TOKENIZE_CHUNK, predict.SORT_WINDOW = own
    return found


def score_runs(
    args: argparse.Namespace,
    folder: str,
    texts: list[str],
    flops: float,
    ceiling: dict[str, float],
    budgets: list[int],
) -> dict[str, Any]:
    """The tutorial (on its share of the rows) and tuneq's classify() per precision and token
    budget, with rows/s, the share of the matmul rate and label agreement."""
    import torch

    runs: dict[str, Any] = {}

    def record(name: str, labels: list[int], seconds: float, rows: int, precision: str) -> None:
        work = flops * rows / len(texts)
        runs[name] = {
            "rows": rows,
            "rows_per_s": round(rows / seconds, 2),
            "seconds": round(seconds, 3),
            "model_flops_per_s": work / seconds,
            "utilisation_of_matmul": work / seconds / ceiling[precision],
            "labels": labels,
        }
        if args.device == "cuda":
            runs[name]["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
        shown = {k: v for k, v in runs[name].items() if k != "labels"}
        print(folder, name, shown, file=sys.stderr, flush=True)

    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tutorial_rows = min(args.tutorial_rows, len(texts))
    if not args.skip_tutorial:
        labels, seconds = tutorial_predict(folder, texts[:tutorial_rows], args.device)
        record("tutorial_predict_fp32_pad512_batch8", labels, seconds, tutorial_rows, "fp32")
    for precision in args.precisions.split(","):
        for budget in budgets:
            labels, seconds = tuneq_classify(folder, texts, precision, budget, args.device)
            name = f"tuneq_classify_{precision}_batch_tokens_{budget}"
            record(name, labels, seconds, len(texts), precision)

    reference = next(iter(runs.values()))["labels"]
    tutorial = runs.get("tutorial_predict_fp32_pad512_batch8")
    for run in runs.values():
        run["labels_agree_with_first_run"] = agreement(
            run["labels"][:tutorial_rows], reference[:tutorial_rows]
        )
        if tutorial:
            run["speedup_vs_tutorial"] = run["rows_per_s"] / tutorial["rows_per_s"]
    for run in runs.values():
        del run["labels"]
    return runs


if __name__ == "__main__":
    main()
