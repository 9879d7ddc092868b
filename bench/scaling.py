"""Scaling: scoring rows/s with one and two worker processes on this machine, in one run.

    .venv/bin/python bench/scaling.py --model FOLDER     # a fine-tuned model folder
    .venv/bin/python bench/scaling.py                    # fine-tunes MiniLM on 1,000 reviews first

Each layout scores the same IMDB test reviews as one job split into shards, on the embedded
broker: one worker process; one worker with two pool processes; two workers with the default
threads (the machine's cores split among every worker process on it); and two workers that
each take every core, as before threads were shared per host. Writes
bench/results/NAME.json (``--name``, default ``scaling``; one per processor kept side by side).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import imdb_reviews, machine, run_job, tuneq_workers, write_result  # noqa: E402

from tuneq.worker.ml.threads import host_cores  # noqa: E402

LAYOUTS: dict[str, list[tuple[list[str], dict[str, str]]]] = {
    "1 worker, 1 process": [([], {})],
    "1 worker, --concurrency 2": [(["--concurrency", "2"], {})],
    "2 workers, defaults (the host's cores split between them)": [([], {})] * 2,
    # what two workers did before threads were shared per host: each took every core
    "2 workers, each with every core (TUNEQ_WORKER_THREADS=cores)": [
        ([], {"TUNEQ_WORKER_THREADS": str(host_cores())})
    ]
    * 2,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="fine-tuned model folder (default: fine-tune MiniLM)")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--shard-rows", type=int, default=50)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--name", default="scaling", help="results file bench/results/NAME.json")
    args = parser.parse_args()

    from tuneq.schemas.specs import ScoreSpec

    work = Path(tempfile.mkdtemp(prefix="tuneq-bench-scaling-"))
    if args.model:
        folder = args.model
    else:
        from score import fine_tune_minilm

        folder = fine_tune_minilm(work / "model")
    source = work / "reviews.csv"
    with open(source, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows((r["id"], r["text"]) for r in imdb_reviews("test", args.rows, seed=3))

    runs: dict[str, Any] = {}
    for number, (layout, workers) in enumerate(LAYOUTS.items()):
        with tuneq_workers(work / f"layout-{number}", [str(work), folder], "bench", workers) as (
            settings,
            _samplers,
        ):
            spec = ScoreSpec(
                model=folder,
                model_path=folder,
                input=str(source),
                output=str(work / f"out-{number}.csv"),
                precision=args.precision,  # type: ignore[arg-type]
                shard_rows=args.shard_rows,
                queue="bench",
            )
            job, wall = run_job(settings, spec)
        runs[layout] = {
            "rows_per_s": job.metrics["rows_per_second"],
            "seconds": job.metrics["seconds"],
            "wall_from_submit_s": round(wall, 2),
            "processes_that_took_shards": job.metrics["workers"],
        }
        print(layout, runs[layout], flush=True)
    base = runs[next(iter(LAYOUTS))]["rows_per_s"]
    for run in runs.values():
        run["vs_one_process"] = run["rows_per_s"] / base
    result = {
        "machine": machine(),
        "rows": args.rows,
        "shard_rows": args.shard_rows,
        "precision": args.precision,
        "model": folder,
        "runs": runs,
    }
    print(write_result(args.name, result))


if __name__ == "__main__":
    main()
