"""Where bf16 scoring's time goes on a CPU, and what the attention kernel can do, all in one run.

    .venv/bin/python bench/attention.py --model PATH [--rows 300] [--name NAME]

Two parts. First, tuneq's ``classify`` on IMDB test reviews (the scoring benchmark's rows) in
bf16 and fp32 under torch's profiler, operator time summed by kind, each kind's FLOP/s where
it has FLOPs: the dense products against the attention's own two products. Second, torch's
scaled-dot-product attention alone at MiniLM's shapes (12 heads of 32) for the batches tuneq's
4,096-token budget makes, against the same number of score elements in 6 heads of 64 (bert-base's
head size), against fp32, against the plain products-and-softmax it replaces, and tuneq's own
kernel (``worker/ml/cpu_attention.py``) where the CPU has AVX512-BF16. Writes
bench/results/attention.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    encoder_flops,
    imdb_reviews,
    machine,
    matmul_flops_per_second,
    timed_dtypes,
    write_result,
)

# Operators by kind; the rest is indexing, views and the operators' own overhead.
KINDS = {
    "dense products": ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "tuneq::attention_bf16"),
    # with the residual add before it where tuneq's kernel fuses the two (worker/ml/cpu_norm.py)
    "layer norm": ("aten::native_layer_norm", "tuneq::add_layer_norm_bf16"),
    "residual adds": ("aten::add",),
    "padding mask": ("aten::where", "aten::bitwise_and", "aten::all", "aten::index"),
}
BATCH_TOKENS = 4096  # tuneq's CPU budget per batch
LENGTHS = (64, 128, 270, 512)  # 270: the scoring benchmark's mean review


def profiled(folder: str, texts: list[str], precision: str) -> dict[str, Any]:
    """``classify`` on ``texts`` timed three times, then once under the profiler: seconds and
    each kind's share of the operators' time."""
    import torch

    from tuneq.worker.ml.predict import classify, load_for_inference

    classifier = load_for_inference(folder, precision)
    classify(classifier, texts[:16])  # warm up
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        classify(classifier, texts)
        seconds.append(time.perf_counter() - started)
    with torch.profiler.profile() as profile:
        classify(classifier, texts)
    self_us = {e.key: e.self_cpu_time_total for e in profile.key_averages()}
    total = sum(self_us.values())
    by_kind = {kind: sum(self_us.get(op, 0.0) for op in ops) for kind, ops in KINDS.items()}
    by_kind["other"] = total - sum(by_kind.values())
    return {
        "seconds": min(seconds),
        "share_of_operator_time": {k: v / total for k, v in by_kind.items()},
    }


def timed(fn: Callable[[], Any], repeats: int = 20) -> float:
    """Seconds per call, after two warm-up calls."""
    fn()
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def variants(rows: int, length: int) -> dict[str, tuple[int, int, Callable[[], Any]]]:
    """The attention calls compared at one batch shape: name to (heads, head size, call)."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own name

    from tuneq.worker.ml import cpu_attention

    def qkv(heads: int, size: int, dtype: torch.dtype) -> list[torch.Tensor]:
        return [torch.randn(rows, heads, length, size, dtype=dtype) for _ in range(3)]

    bf16, fp32, wide = (
        qkv(12, 32, torch.bfloat16),
        qkv(12, 32, torch.float32),
        qkv(6, 64, torch.bfloat16),
    )
    # a padding mask as BERT passes one: every key kept but the last half of the last row's
    keep = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    keep[-1, ..., length // 2 :] = False

    def explicit() -> torch.Tensor:
        q, k, v = bf16
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.matmul(scores.masked_fill(~keep, -1e4).softmax(-1), v)

    sdpa = F.scaled_dot_product_attention
    calls = {
        "sdpa bf16, 12 heads of 32 (MiniLM), padding mask": (
            12, 32, lambda: sdpa(*bf16, attn_mask=keep)
        ),
        "sdpa bf16, 12 heads of 32, no mask": (12, 32, lambda: sdpa(*bf16)),
        "sdpa fp32, 12 heads of 32, no mask": (12, 32, lambda: sdpa(*fp32)),
        "sdpa bf16, 6 heads of 64 (half the score elements), no mask": (6, 64, lambda: sdpa(*wide)),
        "products and softmax, bf16, 12 heads of 32, padding mask": (12, 32, explicit),
    }  # fmt: skip
    if cpu_attention.kernel() is not None:
        rows_kept = keep.view(rows, length)
        calls["tuneq's kernel, bf16, 12 heads of 32, padding mask"] = (
            12,
            32,
            lambda: cpu_attention.attention(*bf16, rows_kept, 32**-0.5),
        )
        calls["tuneq's kernel, bf16, 6 heads of 64, no mask"] = (
            6, 64, lambda: cpu_attention.attention(*wide, None, 64**-0.5)
        )  # fmt: skip
    return calls


def kernel_runs(matmul_bf16: float) -> list[dict[str, Any]]:
    """Attention alone per batch shape: ms, the attention's FLOP/s and its share of the bf16
    matmul rate, and ns per score element (rows × heads × length²)."""
    import torch

    torch.manual_seed(0)
    runs = []
    for length in LENGTHS:
        rows = max(1, BATCH_TOKENS // length)
        for name, (heads, size, call) in variants(rows, length).items():
            seconds = timed(call)
            flops = 4 * rows * heads * length * length * size
            runs.append(
                {
                    "variant": name,
                    "rows": rows,
                    "length": length,
                    "ms": seconds * 1e3,
                    "flops_per_s": flops / seconds,
                    "of_bf16_matmul": flops / seconds / matmul_bf16,
                    "ns_per_score_element": seconds * 1e9 / (rows * heads * length * length),
                }
            )
            print(runs[-1], flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="fine-tuned model folder")
    parser.add_argument("--rows", type=int, default=300, help="IMDB test reviews to profile")
    parser.add_argument("--name", default="attention", help="results file, bench/results/NAME.json")
    args = parser.parse_args()
    if "bf16" not in timed_dtypes():
        sys.exit("this CPU does not compute bf16 natively: there is no bf16 scoring to profile")

    from transformers import AutoModelForSequenceClassification

    from tuneq.worker.ml.predict import load_for_inference, token_ids

    texts = [r["text"] for r in imdb_reviews("test", args.rows, seed=1)]
    tokenizer = load_for_inference(args.model, "bf16").tokenizer
    lengths = [len(ids) for ids in token_ids(tokenizer, 512)(texts)]
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    config = model.config
    attention_flops = (
        4 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in lengths)
    )
    total_flops = encoder_flops(model, lengths)
    ceiling = {name: matmul_flops_per_second(name) for name in ("fp32", "bf16")}
    print("matmul ceilings", ceiling, flush=True)
    scoring = {}
    for precision in ("bf16", "fp32"):
        run = profiled(args.model, texts, precision)
        share = run["share_of_operator_time"]
        run["model_flops_per_s"] = total_flops / run["seconds"]
        run["of_matmul"] = run["model_flops_per_s"] / ceiling[precision]
        # each kind's own FLOP/s, its time taken as its share of the timed run
        for kind, flops in (
            ("dense products", total_flops - attention_flops),
            ("attention", attention_flops),
        ):
            run[f"{kind} flops_per_s"] = flops / (share[kind] * run["seconds"])
        scoring[precision] = run
        print(precision, run, flush=True)
    kernels = kernel_runs(ceiling["bf16"])
    path = write_result(
        args.name,
        {
            "machine": machine(),
            "model": args.model,
            "rows": len(texts),
            "mean_tokens": sum(lengths) / len(lengths),
            "attention_share_of_model_flops": attention_flops / total_flops,
            "matmul_flops_per_s": ceiling,
            "matmul_flops_per_s_at_the_end": {
                name: matmul_flops_per_second(name) for name in ("fp32", "bf16")
            },
            "scoring": scoring,
            "attention_kernel": kernels,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
