"""Scoring speed: a tuneq scoring job (one worker) against the tutorial's predict() and
transformers.pipeline, on real IMDB test reviews with a fine-tuned MiniLM, all in one run.

    .venv/bin/python bench/score.py --model PATH   # a fine-tuned model folder
    .venv/bin/python bench/score.py                # fine-tunes MiniLM on 1,000 reviews first
    .venv/bin/python bench/score.py --model PATH --name score_epyc   # another processor

Writes bench/results/score.json (or NAME.json). Every figure in it comes from this run on this
machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engines  # noqa: E402
from common import (  # noqa: E402
    encoder_flops,
    imdb_reviews,
    machine,
    matmul_flops_per_second,
    onednn_linear_flops_per_second,
    run_job,
    timed_dtypes,
    tuneq_workers,
    tutorial_predict,
    write_result,
)


def pipeline_run(folder: str, texts: list[str], batch_size: int) -> tuple[list[str], float]:
    from transformers import pipeline

    classify = pipeline("text-classification", model=folder, tokenizer=folder, device="cpu")
    classify(texts[:2], truncation=True, max_length=512)  # warm up
    started = time.perf_counter()
    out = classify(texts, batch_size=batch_size, truncation=True, max_length=512)
    return [o["label"] for o in out], time.perf_counter() - started


def tuneq_job(
    folder: str,
    source: Path,
    output: Path,
    precision: str,
    work: Path,
    worker_options: tuple[list[str], dict[str, str]] = ([], {}),
) -> dict[str, Any]:
    """A real scoring job: a worker process on the embedded broker, submitted as the CLI does;
    ``worker_options`` are its extra ``tuneq worker`` options and environment."""
    from tuneq.schemas.specs import ScoreSpec
    from tuneq.worker import store
    from tuneq.worker.io.files import iter_batches
    from tuneq.worker.store.db import get_engine

    work.mkdir(parents=True, exist_ok=True)
    allowed = [str(source.parent), folder]
    with tuneq_workers(work, allowed, "bench", [worker_options]) as (settings, _samplers):
        spec = ScoreSpec(
            model=folder,
            model_path=folder,
            input=str(source),
            output=str(output),
            precision=precision,  # type: ignore[arg-type]
            queue="bench",
        )
        job, wall = run_job(settings, spec)
        events = store.list_events(get_engine(settings.database_url), job.id)
    labels = [r["label"] for b in iter_batches(output) for r in b.to_pylist()]
    reason = next(event.message for event in events if event.kind == "precision")
    return {
        "metrics": job.metrics,
        "wall_from_submit_s": round(wall, 2),
        "labels": labels,
        "precision_reason": reason,
    }


# The environment that keeps torch's attention where tuneq's bf16 kernel would run.
TORCH_ATTENTION = {"TUNEQ_ATTENTION_KERNEL": "false"}


def in_process_classify(
    folder: str, texts: list[str], precision: str, env: dict[str, str] | None = None
) -> float:
    """Seconds for tuneq's own batching and forward pass (``classify``) on ``texts`` in this
    process, model loaded (under ``env``, set while it loads): the job's compute without its
    staging, queueing and file writing."""
    from tuneq.worker.ml import cpu_attention
    from tuneq.worker.ml.predict import classify, load_for_inference

    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        # What an earlier call loaded under another environment: the model, and whether the
        # attention kernel runs in this process.
        for cached in (load_for_inference, cpu_attention.library, cpu_attention.kernel):
            cached.cache_clear()
        classifier = load_for_inference(folder, precision)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    classify(classifier, texts[:8])  # warm up
    started = time.perf_counter()
    classify(classifier, texts)
    return time.perf_counter() - started


def ceilings() -> dict[str, dict[str, float]]:
    """The FLOP/s the model's are compared with, per dtype: a 2048² ``torch.matmul`` (the
    issue's reference) and tuneq's oneDNN linear on the model's widest layer."""
    dtypes = timed_dtypes()
    return {
        "matmul": {name: matmul_flops_per_second(name) for name in dtypes},
        "onednn_linear": {name: onednn_linear_flops_per_second(name) for name in dtypes},
    }


def rates(flops: float, seconds: float, dtype: str) -> dict:
    """The model's FLOP/s in a run and the dtype whose ceilings they are compared with (once
    both ceilings are measured, by :func:`against_the_best`)."""
    return {"model_flops_per_s": flops / seconds, "flops_dtype": dtype}


def against_the_best(
    runs: dict[str, dict[str, Any]], *measured: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Each run's shares against the best each ceiling did in the run (at the start or the
    end): a ceiling measured while the machine was briefly slow (the Xeon's bf16 ``matmul`` once
    ran at 1,033 GFLOP/s at the start and 1,888 at the end) would flatter every share."""
    best = {
        kind: {dtype: max(ceiling[kind][dtype] for ceiling in measured) for dtype in per_dtype}
        for kind, per_dtype in measured[0].items()
    }
    for run in runs.values():
        if "flops_dtype" in run:
            dtype = run["flops_dtype"]
            run["utilisation_of_matmul"] = run["model_flops_per_s"] / best["matmul"][dtype]
            run["utilisation_of_onednn_linear"] = (
                run["model_flops_per_s"] / best["onednn_linear"][dtype]
            )
    return best


def agreement(a: list[Any], b: list[Any]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def engine_runs(
    folder: str, texts: list[str], work: Path, id2label: dict[int, str]
) -> dict[str, dict[str, Any]]:
    """The model on ONNX Runtime (fp32, and its int8 dynamic quantization) and on OpenVINO (the
    same two ONNX files, and bf16 where the CPU has it), where they are installed: rows/s and
    labels."""
    import torch

    installed = [e for e in ("onnxruntime", "openvino") if engines.available(e)]
    if "onnxruntime" not in installed:
        print("onnxruntime is not installed (pip install -e '.[bench]'): no engine runs")
        return {}
    files = dict(zip(("fp32", "int8"), engines.export(folder, work), strict=True))
    # Each engine's modes: the ONNX file it runs and its session's options. OpenVINO also runs
    # the fp32 file in bf16 where the CPU computes bf16 (its own default there).
    modes: list[tuple[str, str, Path, dict[str, str]]] = [
        (engine, mode, path, {}) for engine in installed for mode, path in files.items()
    ]
    if "openvino" in installed and "bf16" in timed_dtypes():
        modes.append(("openvino", "bf16", files["fp32"], {"precision": "bf16"}))
    runs = {}
    for engine, mode, path, options in modes:
        try:
            ids, seconds = engines.classify(
                engine, path, folder, texts, torch.get_num_threads(), **options
            )
        except Exception as exc:  # an engine that cannot run a file: say so, go on
            runs[f"{engine}_{mode}"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        runs[f"{engine}_{mode}"] = {
            "rows_per_s": len(texts) / seconds,
            "seconds": seconds,
            "labels": [id2label[i] for i in ids],
        }
    return runs


def fine_tune_minilm(folder: Path) -> str:
    from tuneq.schemas.specs import FinetuneSpec
    from tuneq.worker.ml.finetune import finetune

    spec = FinetuneSpec(
        data=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imdb"),
        train_size=1000,
        eval_size=400,
        label_names=["negative", "positive"],
    )
    folder.mkdir(parents=True, exist_ok=True)
    finetune(spec, folder)
    return str(folder)


def write_reviews(path: Path, reviews: list[dict[str, Any]]) -> Path:
    """The file a scoring job reads: id, text and the true label as ``gold`` (not ``label``:
    tuneq adds that column)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "gold"])
        writer.writerows((r["id"], r["text"], r["label"]) for r in reviews)
    return path


def bigger_jobs(
    folder: str, rows: int, work: Path, dtypes: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """The default job, and the bf16 job where the CPU has bf16, on ``rows`` IMDB reviews,
    the test set's then the training set's (a job as big as the user's, not as the
    benchmark's 2,000)."""
    reviews = imdb_reviews("test", min(rows, 25_000), seed=2)
    reviews += imdb_reviews("train", rows - len(reviews), seed=2)
    source = write_reviews(work / f"reviews-{rows}.csv", reviews)
    runs = {}
    for precision in ("auto", *(["bf16"] if "bf16" in dtypes else [])):
        job = tuneq_job(
            folder,
            source,
            work / f"out-{precision}-{rows}.csv",
            precision,
            work / f"run-{precision}-{rows}",
        )
        runs[f"tuneq_{precision}_{rows}_rows"] = {
            "rows": rows,
            "precision": job["metrics"]["precision"],
            "rows_per_s": job["metrics"]["rows_per_second"],
            "seconds": job["metrics"]["seconds"],
            "scoring_seconds": job["metrics"]["scoring_seconds"],
            "precision_reason": job["precision_reason"],
        }
        print(precision, rows, runs[f"tuneq_{precision}_{rows}_rows"], flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="fine-tuned model folder (default: fine-tune MiniLM)")
    parser.add_argument("--rows", type=int, default=2000, help="IMDB test reviews to score")
    parser.add_argument("--sample", type=int, default=200, help="rows to pick a pipeline batch")
    parser.add_argument(
        "--name",
        default="score",
        help="results file, bench/results/NAME.json (one per processor kept side by side)",
    )
    parser.add_argument(
        "--job-rows",
        type=int,
        default=0,
        help="also run the default and bf16 jobs on this many other reviews (the parity "
        "gate's cost is fixed below 25,600 rows, so a bigger job shows what it costs in "
        "proportion); 0: skip",
    )
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneq.schemas.settings import load_settings
    from tuneq.worker.ml.first_token import last_layer

    work = Path(tempfile.mkdtemp(prefix="tuneq-bench-score-"))
    folder = args.model or fine_tune_minilm(work / "model")
    reviews = imdb_reviews("test", args.rows, seed=1)
    texts = [r["text"] for r in reviews]
    source = write_reviews(work / "reviews.csv", reviews)

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    id2label = model.config.id2label
    lengths = [
        len(ids)
        for ids in AutoTokenizer.from_pretrained(folder)(texts, truncation=True, max_length=512)[
            "input_ids"
        ]
    ]
    whole_flops = encoder_flops(model, lengths)
    # tuneq's runs compute the last layer for the first token only (tuneq.worker.ml.first_token,
    # on by default): fewer FLOPs than the engines' whole model, and their shares count those
    first_token = load_settings().first_token_only and last_layer(model) is not None
    flops = encoder_flops(model, lengths, first_token_only=first_token)
    ceiling = ceilings()
    print(f"ceilings: {ceiling}; model FLOPs {whole_flops:.3e}, tuneq's {flops:.3e}", flush=True)

    runs: dict[str, Any] = {}
    labels_a, seconds_a = tutorial_predict(folder, texts)
    runs["tutorial_predict"] = {"rows_per_s": len(texts) / seconds_a, "seconds": seconds_a}
    print("tutorial", runs["tutorial_predict"], flush=True)

    trial = {}
    for batch_size in (1, 4, 8, 32):
        _, seconds = pipeline_run(folder, texts[: args.sample], batch_size)
        trial[batch_size] = args.sample / seconds
    best = max(trial, key=trial.__getitem__)
    labels_b, seconds_b = pipeline_run(folder, texts, best)
    runs["pipeline"] = {
        "batch_size": best,
        "rows_per_s": len(texts) / seconds_b,
        "seconds": seconds_b,
        "rows_per_s_by_batch_size_on_sample": trial,
    }
    print("pipeline", runs["pipeline"], flush=True)

    tutorial_labels = [id2label[i] for i in labels_a]
    # auto: the default. "auto_again": the default job once more on the first one's database,
    # where its parity gate's evidence lets it take bf16 without sampling.
    precisions = ["fp32", "auto", *(["bf16", "auto_again"] if "bf16" in timed_dtypes() else [])]
    precisions.append("int8")
    for name in precisions:
        precision = name.removesuffix("_again")
        job = tuneq_job(
            folder, source, work / f"out-{name}.csv", precision, work / f"run-{precision}"
        )
        seconds = job["metrics"]["seconds"]
        chosen = job["metrics"]["precision"]
        runs[f"tuneq_{name}"] = {
            "precision": chosen,
            "rows_per_s": job["metrics"]["rows_per_second"],
            "seconds": seconds,
            "wall_from_submit_s": job["wall_from_submit_s"],
            "precision_reason": job["precision_reason"],
            "labels_agree_with_tutorial": agreement(job["labels"], tutorial_labels),
            "labels_agree_with_tuneq_fp32": agreement(
                job["labels"], runs.get("tuneq_fp32", {}).get("labels", job["labels"])
            ),
            **rates(flops, seconds, "bf16" if chosen == "bf16" else "fp32"),
            "labels": job["labels"],
        }
        print(name, {k: v for k, v in runs[f"tuneq_{name}"].items() if k != "labels"}, flush=True)
    fp32_labels = runs["tuneq_fp32"]["labels"]
    truth = [id2label[r["label"]] for r in reviews]

    def worker_variant(
        name: str,
        precision: str,
        options: tuple[list[str], dict[str, str]],
        worker: str,
        computed: float = flops,
    ) -> None:
        """A job on a worker started with other ``options``, its labels against fp32's."""
        job = tuneq_job(
            folder, source, work / f"out-{name}.csv", precision, work / f"run-{name}", options
        )
        seconds = job["metrics"]["seconds"]
        runs[name] = {
            "rows_per_s": job["metrics"]["rows_per_second"],
            "seconds": seconds,
            "worker": worker,
            "labels_agree_with_tuneq_fp32": agreement(job["labels"], fp32_labels),
            "accuracy": agreement(job["labels"], truth),
            **rates(computed, seconds, precision),
        }
        print(name, runs[name], flush=True)

    if "bf16" in timed_dtypes():
        # The bf16 job again with torch's attention instead of tuneq's kernel: what the kernel
        # gives, measured in the same run.
        worker_variant(
            "tuneq_bf16_torch_attention",
            "bf16",
            ([], TORCH_ATTENTION),
            "TUNEQ_ATTENTION_KERNEL=false",
        )
    if first_token:
        # The fp32 job with the whole last layer: what computing the first token only gives.
        worker_variant(
            "tuneq_fp32_whole_last_layer",
            "fp32",
            ([], {"TUNEQ_FIRST_TOKEN_ONLY": "false"}),
            "TUNEQ_FIRST_TOKEN_ONLY=false",
            whole_flops,
        )
    # The same fp32 job on one worker with two single-threaded processes (shards side by side):
    # the layout the scaling benchmark found fastest for scoring on this machine.
    worker_variant(
        "tuneq_fp32_2_processes",
        "fp32",
        (["--concurrency", "2"], {}),
        "--concurrency 2 (each process takes its share of the cores)",
    )
    # tuneq's own classify() in this process; bf16 also with torch's attention.
    in_process = [(precision, precision, None) for precision in timed_dtypes()]
    if "bf16" in timed_dtypes():
        in_process.append(("bf16_torch_attention", "bf16", TORCH_ATTENTION))
    for name, precision, env in in_process:
        seconds = in_process_classify(folder, texts, precision, env)
        runs[f"classify_in_process_{name}"] = {
            "rows_per_s": len(texts) / seconds,
            "seconds": seconds,
            **rates(flops, seconds, precision),
        }
        print(name, "in process", runs[f"classify_in_process_{name}"], flush=True)
    for name, run in engine_runs(folder, texts, work / "onnx", id2label).items():
        if "error" in run:
            runs[name] = run
            print(name, run, flush=True)
            continue
        labels = run.pop("labels")
        runs[name] = {
            **run,
            "labels_agree_with_tuneq_fp32": agreement(labels, fp32_labels),
            "accuracy": agreement(labels, truth),
            **rates(whole_flops, run["seconds"], "bf16" if name.endswith("bf16") else "fp32"),
        }
        print(name, runs[name], flush=True)
    if args.job_rows:
        runs.update(bigger_jobs(folder, args.job_rows, work, timed_dtypes()))
    ceiling_after = ceilings()
    print(f"ceilings at the end: {ceiling_after}", flush=True)
    best_ceiling = against_the_best(runs, ceiling, ceiling_after)
    pipeline_agree = agreement(labels_b, tutorial_labels)
    for name in (f"tuneq_{name}" for name in precisions):
        runs[name]["accuracy"] = agreement(runs[name].pop("labels"), truth)
    runs["tutorial_predict"]["accuracy"] = agreement(tutorial_labels, truth)
    a, b = runs["tutorial_predict"]["rows_per_s"], runs["pipeline"]["rows_per_s"]
    result = {
        "machine": machine(),
        "rows": len(texts),
        "mean_tokens": sum(lengths) / len(lengths),
        "model": folder,
        "model_flops": whole_flops,  # the whole model's; the engines' shares count these
        "tuneq_flops": flops,  # what tuneq's runs compute; their shares count these
        "ceiling_flops_per_s": ceiling,
        "ceiling_flops_per_s_at_the_end": ceiling_after,
        "ceiling_flops_per_s_best": best_ceiling,  # what every utilisation is against
        "pipeline_labels_agree_with_tutorial": pipeline_agree,
        "runs": runs,
        "speedups": {
            name: {
                "vs_tutorial": runs[name]["rows_per_s"] / a,
                "vs_pipeline": runs[name]["rows_per_s"] / b,
            }
            for name in (
                "tuneq_fp32",
                "tuneq_auto",
                "tuneq_auto_again",
                "tuneq_fp32_2_processes",
                "tuneq_bf16",
                "tuneq_bf16_torch_attention",
                "tuneq_int8",
                "onnxruntime_fp32",
                "onnxruntime_int8",
                "openvino_fp32",
                "openvino_int8",
                "openvino_bf16",
            )
            if "rows_per_s" in runs.get(name, {})
        },
        "torch_threads": torch.get_num_threads(),
    }
    print(write_result(args.name, result))


if __name__ == "__main__":
    main()
