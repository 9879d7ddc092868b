"""What one tuneq setting changes in a fine-tune, in one run: each way, in fresh processes.

    .venv/bin/python bench/setting.py [--setting SETTING]
        [--texts sst2|imdb] [--rows N] [--precision fp32|auto|bf16] [--pairs N] [--name NAME]

tuneq's ``finetune`` (one epoch, batch 8, fp32 unless ``--precision`` says otherwise (``auto``:
tuneq's default), the packaged MiniLM; no evaluation) on 2,000
SST-2 sentences (``--texts imdb``: 200 IMDB training reviews truncated to 512 tokens), each run
in a fresh process that starts as a worker's pool process does (``keep_freed_memory()``), with
the setting on (tuneq's default) and off, alternating, ``--pairs`` times:

- ``keep_freed_memory``: the allocator setting of worker processes
  (``tuneq.worker.ml.allocator``), off meaning glibc's defaults;
- ``dropout_kernel``: tuneq's dropout kernel (``tuneq.worker.ml.cpu_dropout``), off meaning
  torch's dropout;
- ``clip_in_optimizer``: gradient clipping inside fused AdamW's pass
  (``tuneq.worker.ml.cpu_step``), off meaning the Trainer's own clipping;
- ``sparse_embedding_grad``: the word embeddings' gradient made from the rows a batch touched
  (``tuneq.worker.ml.cpu_step``), off meaning the embedding's dense backward;
- ``first_token_only``: the last layer computed for the first token only
  (``tuneq.worker.ml.first_token``), off meaning every position;
- ``attention_kernel``: tuneq's attention kernels (in a fine-tune, fp32 or under bf16
  autocast, the fp32 one of ``tuneq.worker.ml.cpu_attention_f32``, where it wins its race with
  torch's), off meaning torch's SDPA;
- ``embedding_rows_adamw``: the word embeddings' AdamW update in tuneq's kernel, the rows no
  batch has touched yet decayed only (``tuneq.worker.ml.cpu_adamw_rows``), off meaning torch's
  fused AdamW over every row.

Per run: seconds a step, the process's system and user CPU seconds, minor page faults, and its
peak resident memory. Writes bench/results/setting.json (or NAME.json). Files written before
this script had its name (``bench/allocator.py``) call the two arms ``kept`` and
``glibc_defaults``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import machine, write_result

HERE = Path(__file__).resolve().parent
SETTINGS = (
    "keep_freed_memory",
    "dropout_kernel",
    "clip_in_optimizer",
    "sparse_embedding_grad",
    "first_token_only",
    "attention_kernel",
    "embedding_rows_adamw",
)


def one_run(texts: str, rows: int, precision: str) -> None:
    """The child: fine-tune once, print what it measured as one JSON line."""
    import resource

    from step_profile import TEXTS, tuneq_finetune

    from tuneq.schemas.settings import load_settings
    from tuneq.worker.ml.allocator import keep_freed_memory
    from tuneq.worker.ml.models import quiet_transformers

    kept = keep_freed_memory()  # as a worker's pool process does when it starts
    quiet_transformers()
    kind = TEXTS[texts]
    data = kind.load(rows)
    before = resource.getrusage(resource.RUSAGE_SELF)
    run = tuneq_finetune(data, Path(tempfile.mkdtemp()), precision, kind.tuneq_max_length)
    after = resource.getrusage(resource.RUSAGE_SELF)
    settings = load_settings()
    print(
        json.dumps(
            {
                "freed_memory_kept": kept,
                "dropout_kernel_setting": settings.dropout_kernel,
                "dropout_kernel": run["dropout_kernel"],
                "clip_in_optimizer_setting": settings.clip_in_optimizer,
                "sparse_embedding_grad_setting": settings.sparse_embedding_grad,
                "first_token_only_setting": settings.first_token_only,
                "attention_kernel_setting": settings.attention_kernel,
                "embedding_rows_adamw_setting": settings.embedding_rows_adamw,
                "embedding_rows_adamw": run["embedding_rows_adamw"],
                "attention_kernel": run["attention_kernel"],
                "precision": run["precision"],
                "seconds_per_step": run["seconds_per_step"],
                "steps": run["steps"],
                "system_s": round(after.ru_stime - before.ru_stime, 2),
                "user_s": round(after.ru_utime - before.ru_utime, 2),
                "minor_faults": after.ru_minflt - before.ru_minflt,
                "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
            }
        )
    )


def child(setting: str, texts: str, rows: int, precision: str, on: bool) -> dict[str, Any]:
    env = {**os.environ, f"TUNEQ_{setting.upper()}": "true" if on else "false"}
    command = [sys.executable, __file__, "--child", "--texts", texts, "--rows", str(rows)]
    command += ["--precision", precision]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=HERE)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=SETTINGS, default="keep_freed_memory")
    parser.add_argument("--texts", choices=("sst2", "imdb"), default="sst2")
    parser.add_argument("--rows", type=int, help="default: 2,000 sentences or 200 reviews")
    parser.add_argument("--precision", choices=("fp32", "auto", "bf16"), default="fp32")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--name", default="setting", help="results file, bench/results/NAME.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = args.rows or (2000 if args.texts == "sst2" else 200)
    if args.child:
        one_run(args.texts, rows, args.precision)
        return
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for pair in range(args.pairs):
        # alternate which goes first, so that a drift of the machine's speed hits both
        for on in (True, False) if pair % 2 == 0 else (False, True):
            run = child(args.setting, args.texts, rows, args.precision, on)
            runs["on" if on else "off"].append(run)
            print(args.setting, "on" if on else "off", run, flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    summary: dict[str, Any] = {
        key: {name: median(name, key) for name in runs}
        for key in ("seconds_per_step", "system_s", "user_s", "minor_faults", "peak_rss_mb")
    }
    summary["step_time_on_over_off"] = (
        summary["seconds_per_step"]["on"] / summary["seconds_per_step"]["off"]
    )
    result = {
        "machine": machine(),
        "setting": args.setting,
        "texts": args.texts,
        "rows": rows,
        "precision": args.precision,
        "pairs": args.pairs,
        "medians": summary,
        "runs": runs,
    }
    print(json.dumps(summary, indent=1))
    print(write_result(args.name, result))


if __name__ == "__main__":
    main()
