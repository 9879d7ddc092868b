"""Shared by the benchmarks: real IMDB reviews, the matmul ceiling, and result files."""

from __future__ import annotations

import json
import os
import platform
import time
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


def matmul_flops_per_second(dtype_name: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square ``torch.matmul`` in ``dtype_name`` on this machine, now: the
    best of three timings, the ceiling the model's own FLOP/s are compared with."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm up
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best


def encoder_flops(model: Any, lengths: list[int]) -> float:
    """Forward FLOPs of a BERT-style encoder on texts of ``lengths`` tokens, padding excluded:
    2 per weight per token for the dense layers, plus the attention score and mix products."""
    config = model.config
    dense = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() == 2 and "embeddings" not in name
    )
    tokens = sum(lengths)
    attention = 4 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in lengths)
    return 2 * dense * tokens + attention


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "python": platform.python_version(),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
