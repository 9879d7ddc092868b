"""The optimizer's step of a fine-tune on short texts, with the word embeddings updated by torch's
fused AdamW and by tuneq's kernel (``tuneq.worker.ml.cpu_adamw_rows``), in one process.

    .venv/bin/python bench/embedding_adamw.py [--rows N] [--name NAME]

Two copies of the packaged MiniLM classifier, each with torch's fused AdamW as tuneq's Trainer
makes it (weight decay 0.01); every step, both optimizers step once, in alternating order, on
the same gradients: the dense layers' drawn once, the word embeddings' zero but for the rows
that step's batch touches (2,000 SST-2 sentences, batches of 8 in length-grouped, shuffled
order, as tuneq's Trainer batches them; one epoch). One copy's optimizer has tuneq's step hooks
(``EmbeddingRowsStep``): torch's step skips the matrix and the kernel updates it, the rows no
step has touched yet by their decay alone. Both copies' parameters are compared at the end.
The fine-tune's own step is timed by ``bench/setting.py --setting embedding_rows_adamw`` in
fresh processes; this isolates the optimizer, which a noisy VM's whole steps blur. Writes
bench/results/embedding_adamw.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from copy import deepcopy as copy_module
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402
from step_profile import sst2_sentences  # noqa: E402


def batches_of_rows(rows: int) -> list[list[int]]:
    """Each step's touched vocabulary rows: batches of 8 length-grouped, in shuffled order."""
    from tuneq.schemas.specs import FinetuneSpec
    from tuneq.worker.ml.models import load_tokenizer, resolve_model_source

    name = FinetuneSpec(data="unused.csv").model
    tokenizer = load_tokenizer(name, resolve_model_source(name))
    encoded = [tokenizer(text, truncation=True)["input_ids"] for text, _ in sst2_sentences(rows)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    random.Random(0).shuffle(batches)
    return [sorted({token for i in batch for token in encoded[i]}) for batch in batches]


def run(rows: int) -> dict[str, Any]:
    import torch

    from tuneq.schemas.specs import FinetuneSpec
    from tuneq.worker.ml import cpu_adamw_rows
    from tuneq.worker.ml.allocator import keep_freed_memory
    from tuneq.worker.ml.cpu_step import EmbeddingRowsStep, SparseEmbeddingGrad
    from tuneq.worker.ml.models import load_classifier, resolve_model_source

    if cpu_adamw_rows.library() is None:
        raise SystemExit(f"the kernel cannot run here: {cpu_adamw_rows.unavailable()}")
    kept = keep_freed_memory()
    steps = batches_of_rows(rows)
    name = FinetuneSpec(data="unused.csv").model

    first = load_classifier(name, resolve_model_source(name), num_labels=2)

    def copy() -> tuple[Any, torch.optim.AdamW]:
        model = copy_module(first)  # the same new head in both
        return model, torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, fused=True)

    (theirs, their_optimizer), (ours, our_optimizer) = copy(), copy()
    sparse = SparseEmbeddingGrad(ours.get_input_embeddings())
    kernel = EmbeddingRowsStep(our_optimizer, sparse)
    generator = torch.Generator().manual_seed(0)
    dense = {
        n: torch.randn(p.shape, generator=generator) * 1e-3
        for n, p in theirs.named_parameters()
        if "word_embeddings" not in n
    }
    embedding_grads = [torch.zeros_like(m.get_input_embeddings().weight) for m in (theirs, ours)]
    for model, embedding_grad in zip((theirs, ours), embedding_grads, strict=True):
        for n, p in model.named_parameters():
            p.grad = embedding_grad if "word_embeddings" in n else dense[n]

    seconds: dict[str, list[float]] = {"torch": [], "tuneq": []}
    previous = torch.zeros(0, dtype=torch.long)
    for index, touched in enumerate(steps):
        rows_now = torch.tensor(touched)
        values = torch.randn(len(touched), embedding_grads[0].shape[1], generator=generator)
        for embedding_grad in embedding_grads:  # as SparseEmbeddingGrad.densify writes them
            embedding_grad.index_fill_(0, previous, 0.0)
            embedding_grad.index_copy_(0, rows_now, values * 1e-3)
        previous = sparse.rows = rows_now
        sparse.came_sparse = True
        arms = [("torch", their_optimizer), ("tuneq", our_optimizer)]
        for arm, optimizer in arms if index % 2 else arms[::-1]:
            started = time.perf_counter()
            optimizer.step()
            seconds[arm].append(time.perf_counter() - started)
    kernel.remove()
    difference = max(
        (a - b).abs().max().item()
        for a, b in zip(theirs.parameters(), ours.parameters(), strict=True)
    )
    quarter = len(steps) // 4

    def medians(arm: str) -> dict[str, float]:
        times = seconds[arm]
        parts = {f"quarter_{q + 1}": times[q * quarter : (q + 1) * quarter] for q in range(4)}
        return {"all": median(times), **{part: median(t) for part, t in parts.items()}}

    live = kernel.live
    return {
        "rows": rows,
        "steps": len(steps),
        "freed_memory_kept": kept,
        "parameters": sum(p.numel() for p in ours.parameters()),
        "embedding_rows": ours.get_input_embeddings().weight.shape[0],
        "rows_touched_at_the_end": int(live.sum()) if live is not None else 0,
        "seconds_per_optimizer_step": {arm: medians(arm) for arm in seconds},
        "tuneq_over_torch": median(seconds["tuneq"]) / median(seconds["torch"]),
        "largest_parameter_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="SST-2 training sentences")
    parser.add_argument("--name", default="embedding_adamw")
    args = parser.parse_args()
    result = run(args.rows)
    print(result)
    print(write_result(args.name, {"machine": machine(), **result}))


if __name__ == "__main__":
    main()
