"""Model quality: what a fine-tune with tuneq's defaults gives, against the best run of a
learning-rate x epochs grid, on real data sets, with the packaged MiniLM.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/quality.py                 # every set, as planned
    .venv/bin/python bench/quality.py --sets uci-yelp,sst2-1k --seeds 1
    .venv/bin/python bench/quality.py --table                          # the README's table
    .venv/bin/python bench/quality.py --compare attention_dropout=0    # a change, paired

Runs are added to ``bench/results/quality.json`` one by one as they end, so an interrupted
benchmark goes on where it stopped; a run already in the file (same set, seed and settings) is
not repeated unless ``--rerun``. Each run calls the work function ``finetune`` directly (no
queue), with the set's rows and the settings under test, and records accuracy, macro-F1, the
calibration error before and after temperature scaling, how training ended, and wall time.

``--compare FIELD=VALUE`` weighs one change to the defaults (a spec field, such as attention
dropout) on every set: for each set and seed it runs the defaults and the changed defaults one
after the other, on the same machine and split, and keeps the pair in
``bench/results/quality_compare.json``; ``--table`` then prints the paired differences too.

On a machine without ``../shared/data`` (a lent GPU), ``--export DIR`` writes each set's chosen
rows per seed here, and ``--rows-from DIR`` runs on them there; ``--shard I/N`` and ``--out``
split a comparison over N processes, and ``--merge FILE ...`` folds their files into this one:

    .venv/bin/python bench/quality.py --export rows --seeds 5          # here
    python3 bench/quality.py --compare attention_dropout=0.1 --rows-from rows \
        --model MODEL_FOLDER --shard 0/6 --out quality_0.json          # there; and 1/6 ... 5/6
    .venv/bin/python bench/quality.py --merge quality_*.json           # here again

(bench/gpu_bundle.py and bench/gpu_check.sh do the first two for a lent GPU.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED_DATA, commit, cpu_name, machine  # noqa: E402

RESULTS_FILE = RESULTS / "quality.json"
COMPARE_FILE = RESULTS / "quality_compare.json"
GRID = {"learning_rate": [5e-5, 1e-4, 2e-4], "epochs": [1, 3]}
HEADLINE = "macro_f1"


@dataclass(frozen=True)
class DataSet:
    """A benchmark set: the spec fields that select its rows, and how many seeds it needs
    (several where the evaluation set is small, so the spread shows)."""

    name: str
    what: str
    fields: dict[str, Any]
    seeds: int = 1
    prepare: str | None = None  # a function below that writes the files the fields name
    extra: dict[str, Any] = field(default_factory=dict)


IMDB = {"data": str(SHARED_DATA / "imdb"), "label_names": ["negative", "positive"]}
SST2 = {
    "data": str(SHARED_DATA / "sst2" / "train.tsv.gz"),
    "eval_data": str(SHARED_DATA / "sst2" / "dev.tsv"),
    "text_column": "sentence",
    "eval_text_column": "content",  # the dev file names it differently
    "label_names": ["negative", "positive"],
}


def uci(domain: str) -> dict[str, Any]:
    return {
        "data": f"{domain}.tsv",  # the .txt file, linked under a name that says its format
        "columns": ["text", "label"],
        "label_names": ["negative", "positive"],
        "train_size": 800,
        "eval_size": 200,
    }


SETS = [
    DataSet(
        "imdb-1k",
        "IMDB, the recipe's 1,000 / 400",
        {**IMDB, "train_size": 1000, "eval_size": 400},
        seeds=3,
    ),
    DataSet("sst2-1k", "SST-2, 1,000 train, dev 872", {**SST2, "train_size": 1000}),
    DataSet("uci-amazon", "UCI Amazon, 800 / 200", uci("amazon_cells"), 3, "tab_separated"),
    DataSet("uci-yelp", "UCI Yelp, 800 / 200", uci("yelp"), 3, "tab_separated"),
    DataSet("uci-imdb", "UCI IMDB, 800 / 200", uci("imdb"), 3, "tab_separated"),
    DataSet("xlmt-en", "XLM-T English tweets, 3 classes", {}, prepare="english_tweets"),
    DataSet("sst2-10k", "SST-2, 10,000 train, dev 872", {**SST2, "train_size": 10000}),
    DataSet("imdb-5k", "IMDB, 5,000 / 1,000", {**IMDB, "train_size": 5000, "eval_size": 1000}),
    DataSet(
        "imdb-rating",
        "IMDB ratings 1-10 (regression), 1,000 / 400",
        {
            "data": str(SHARED_DATA / "imdb"),
            "task": "regression",
            "label_column": "rating",
            "train_size": 1000,
            "eval_size": 400,
        },
    ),
]


def tab_separated(work: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The UCI ``.txt`` file, linked as ``.tsv``: it is tab-separated text without a header."""
    link = work / data["data"]
    domain = link.name.removesuffix(".tsv")
    if not link.exists():
        link.symlink_to(SHARED_DATA / "uci_sentences" / f"{domain}_labelled.txt")
    return {"data": str(link)}


def english_tweets(work: Path, data: dict[str, Any]) -> dict[str, Any]:
    """XLM-T's English rows, train and test, as two JSON-lines files."""
    paths = {}
    for split in ("train", "test"):
        source = SHARED_DATA / "xlmt" / f"{split}.jsonl"
        rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
        path = work / f"xlmt-en-{split}.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for row in rows:
                if row.get("lang") == "english":
                    out.write(json.dumps({"text": row["text"], "label": row["label"]}) + "\n")
        paths[split] = str(path)
    return {"data": paths["train"], "eval_data": paths["test"]}


def settings_list(
    grid: dict[str, list[float]], train_rows: int | None = None
) -> list[dict[str, Any]]:
    """The defaults (no tuning flag) first, unless they are a grid point (the same run, so it
    is not run twice), then every grid point. The defaults' learning rate depends on the set's
    training rows: until a run of the set has recorded them (``train_rows`` None), the
    defaults run as such."""
    points: list[dict[str, Any]] = []
    for learning_rate in grid["learning_rate"]:
        for epochs in grid["epochs"]:
            points.append({"learning_rate": learning_rate, "epochs": epochs})
    return points if default_point(train_rows) in points else [{}, *points]


def default_point(train_rows: int | None) -> dict[str, Any] | None:
    """The grid coordinates of a fine-tune with no tuning flags on a set of ``train_rows``
    training rows; None while they are unknown."""
    from tuneq.schemas.specs import FinetuneSpec, default_learning_rate

    if train_rows is None:
        return None
    spec = FinetuneSpec(data="x.csv")
    epochs = int(spec.epochs) if spec.epochs == int(spec.epochs) else spec.epochs
    return {"learning_rate": default_learning_rate(train_rows), "epochs": epochs}


def recorded_train_rows(runs: list[dict[str, Any]], name: str) -> int | None:
    """How many rows set ``name`` trains on, from its recorded runs (one that diverged records
    none); None before any."""
    return next((r["train_rows"] for r in runs if r["set"] == name and "train_rows" in r), None)


def run_key(set_name: str, seed: int, settings: dict[str, Any]) -> str:
    return json.dumps([set_name, seed, settings], sort_keys=True)


def fine_tune(
    data: dict[str, Any], settings: dict[str, Any], seed: int, model: str = "minilm"
) -> dict[str, Any]:
    """One fine-tune; its headline figures, or why it was refused (a run that learned
    nothing)."""
    import torch

    from tuneq.schemas.errors import TrainingDiverged
    from tuneq.schemas.specs import FinetuneSpec
    from tuneq.worker.ml.device import training_bf16
    from tuneq.worker.ml.finetune import finetune

    spec = FinetuneSpec(model=model, seed=seed, checkpoint_steps=None, **data, **settings)
    # The defaults train under bf16 autocast where the CPU computes bf16 (AMX, AVX512-BF16) and
    # in fp32 elsewhere: each run says which, and on what.
    ran_on = {
        "cpu": cpu_name(),
        **({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}),
        "training_precision": "bf16" if training_bf16(spec.precision) else "fp32",
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        try:
            result = finetune(spec, Path(out))
        except TrainingDiverged as exc:
            return {
                "diverged": str(exc),
                "wall_s": round(time.perf_counter() - started, 1),
                **ran_on,
            }
    metrics = result.metrics
    if spec.task == "regression":
        headline = {k: round(metrics[k], 4) for k in ("mae", "rmse", "spearman", "constant_mae")}
    else:
        headline = {
            "accuracy": round(metrics["accuracy"], 4),
            "macro_f1": round(metrics["macro_f1"], 4),
            "ece": metrics["calibration"]["ece_before"],
            "ece_calibrated": metrics["calibration"]["ece_after"],
            "temperature": metrics["calibration"]["temperature"],
        }
    return {
        **headline,
        "eval_loss": round(metrics["eval_loss"], 4),
        "training": metrics["training"],
        "train_rows": metrics["data"]["train_rows"],
        "eval_rows": metrics["data"]["eval_rows"],
        "train_s": result.phases.get("train"),
        "wall_s": round(time.perf_counter() - started, 1),
        **ran_on,
    }


def load_results(path: Path = RESULTS_FILE) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": []}


def save_results(results: dict[str, Any], path: Path = RESULTS_FILE) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(results, indent=1) + "\n")
    staging.replace(path)


def set_fields(data_set: DataSet, work: Path) -> dict[str, Any]:
    """The spec fields that select ``data_set``'s rows, its files prepared in ``work``."""
    data = dict(data_set.fields)
    if data_set.prepare:
        data.update(globals()[data_set.prepare](work, data))
    return data


def export_rows(sets: list[DataSet], seeds: int | None, folder: Path) -> None:
    """Each set's training and evaluation rows, as tuneq chooses them for each seed, into
    ``folder/SET/SEED/`` (``train.jsonl.gz``, ``test.jsonl.gz``) with the spec fields that
    read them back (``fields.json``)."""
    import gzip

    from tuneq.schemas.specs import FinetuneSpec
    from tuneq.worker.ml.data import load_training_data

    with tempfile.TemporaryDirectory() as work:
        for data_set in sets:
            data = set_fields(data_set, Path(work))
            for seed in range(seeds or data_set.seeds):
                chosen = load_training_data(FinetuneSpec(model="minilm", seed=seed, **data))
                target = folder / data_set.name / str(seed)
                target.mkdir(parents=True, exist_ok=True)
                regression = data.get("task") == "regression"
                for split, rows in (("train", chosen.train), ("test", chosen.eval)):
                    labels = (
                        rows.labels if regression else [chosen.label_names[i] for i in rows.labels]
                    )
                    lines = (
                        json.dumps({"text": t, "label": y})
                        for t, y in zip(rows.texts, labels, strict=True)
                    )
                    (target / f"{split}.jsonl.gz").write_bytes(
                        gzip.compress("\n".join(lines).encode() + b"\n", 9)
                    )
                fields: dict[str, Any] = {"label_column": "label"}  # "data": wherever it lands
                if regression:
                    fields["task"] = "regression"
                else:
                    fields["label_names"] = chosen.label_names
                (target / "fields.json").write_text(json.dumps(fields))
                print(f"{target}: {len(chosen.train)} / {len(chosen.eval)} rows", flush=True)


def exported_fields(folder: Path, name: str, seed: int) -> dict[str, Any]:
    """The spec fields of rows ``export_rows`` wrote, read from wherever ``folder`` now is."""
    target = folder / name / str(seed)
    return {**json.loads((target / "fields.json").read_text()), "data": str(target)}


def run(
    sets: list[DataSet],
    seeds: int | None,
    only: str | None,
    rerun: bool,
    points_wanted: list[dict[str, Any]] | None = None,
) -> None:
    results = load_results()
    results.setdefault("machines", {})[cpu_name()] = machine()
    results["grid"] = GRID
    done = {run_key(r["set"], r["seed"], r["settings"]) for r in results["runs"]}
    with tempfile.TemporaryDirectory() as work:
        for data_set in sets:
            data = set_fields(data_set, Path(work))
            train_rows = recorded_train_rows(results["runs"], data_set.name)
            points = settings_list(GRID, train_rows)
            if only == "defaults":
                points = [p for p in points if p in ({}, default_point(train_rows))]
            elif only == "grid":
                points = [p for p in points if p != {}]
            if points_wanted is not None:
                points = [p for p in points if p in points_wanted]
            for seed in range(seeds or data_set.seeds):
                for settings in points:
                    key = run_key(data_set.name, seed, settings)
                    if key in done and not rerun:
                        continue
                    print(f"{data_set.name} seed {seed} {settings or 'defaults'} ...", flush=True)
                    outcome = fine_tune(data, settings, seed)
                    print(f"  {outcome}", flush=True)
                    results["runs"] = [
                        r
                        for r in results["runs"]
                        if run_key(r["set"], r["seed"], r["settings"]) != key
                    ]
                    results["runs"].append(
                        {
                            "set": data_set.name,
                            "seed": seed,
                            "settings": settings,
                            "commit": commit(),
                            **outcome,
                        }
                    )
                    save_results(results)


def parse_points(text: str | None) -> list[dict[str, Any]] | None:
    """``"5e-5x3,1e-4x3"`` as grid points; None for every point."""
    if not text:
        return None
    points = []
    for item in text.split(","):
        learning_rate, _, epochs = item.partition("x")
        points.append({"learning_rate": float(learning_rate), "epochs": int(epochs)})
    return points


def parse_change(text: str) -> dict[str, Any]:
    """``FIELD=VALUE`` as a spec override; the value is read as JSON where it parses (numbers,
    true/false), else kept as text."""
    from tuneq.schemas.specs import FinetuneSpec

    name, _, value = text.partition("=")
    if not value or name not in FinetuneSpec.model_fields:
        raise SystemExit(f"--compare wants FIELD=VALUE with a fine-tune spec field, not {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return {name: parsed}


# Relative cost of a set's run, to deal the largest out first when a comparison is sharded.
COST = {"sst2-10k": 10, "imdb-5k": 8, "imdb-rating": 3, "imdb-1k": 3, "xlmt-en": 2}


def compare(
    sets: list[DataSet],
    seeds: int | None,
    change: dict[str, Any],
    rerun: bool,
    rows_from: Path | None = None,
    shard: tuple[int, int] = (0, 1),
    out: Path = COMPARE_FILE,
    model: str = "minilm",
) -> None:
    """The defaults and the defaults with ``change``, run back to back per set and seed; with
    ``shard`` (I, N), only the I-th of every N pairs, dealt largest first."""
    results = load_results(out)
    results.setdefault("machines", {})[cpu_name()] = machine()
    label = json.dumps(change, sort_keys=True)
    done = {run_key(r["set"], r["seed"], r["change"]) for r in results["runs"]}

    def seeds_of(data_set: DataSet) -> int:
        if seeds:
            return seeds
        if rows_from is not None:  # as many as were exported
            return sum(1 for _ in (rows_from / data_set.name).iterdir())
        return data_set.seeds

    pairs = [(s, seed) for s in sets for seed in range(seeds_of(s))]
    pairs.sort(key=lambda pair: -COST.get(pair[0].name, 1))
    pairs = pairs[shard[0] :: shard[1]]
    prepared: dict[str, dict[str, Any]] = {}  # each set's files, written once
    with tempfile.TemporaryDirectory() as work:
        for data_set, seed in pairs:
            key = run_key(data_set.name, seed, change)
            if key in done and not rerun:
                continue
            if rows_from is not None:
                data = exported_fields(rows_from, data_set.name, seed)
            else:
                if data_set.name not in prepared:
                    prepared[data_set.name] = set_fields(data_set, Path(work))
                data = prepared[data_set.name]
            print(f"{data_set.name} seed {seed}: defaults, then {label} ...", flush=True)
            pair = {
                "defaults": fine_tune(data, {}, seed, model),
                "changed": fine_tune(data, change, seed, model),
            }
            print(f"  {pair}", flush=True)
            results["runs"] = [
                r for r in results["runs"] if run_key(r["set"], r["seed"], r["change"]) != key
            ]
            results["runs"].append(
                {
                    "set": data_set.name,
                    "seed": seed,
                    "change": change,
                    "commit": commit(),
                    **({"rows": "exported"} if rows_from is not None else {}),
                    **pair,
                }
            )
            save_results(results, out)


def merge(files: list[Path], into: Path = COMPARE_FILE) -> None:
    """Fold other comparison files' runs (and machines) into ``into``; a pair in both keeps
    the newer file's."""

    def pair_key(run: dict[str, Any]) -> str:
        return run_key(run["set"], run["seed"], run["change"]) + ran_on(run["defaults"])

    results = load_results(into)
    for path in files:
        other = load_results(path)
        results.setdefault("machines", {}).update(other.get("machines", {}))
        keys = {pair_key(r) for r in other["runs"]}
        results["runs"] = [r for r in results["runs"] if pair_key(r) not in keys] + other["runs"]
    save_results(results, into)
    print(f"{into}: {len(results['runs'])} pairs")


def compare_table(results: dict[str, Any]) -> str:
    """Per change and set: the headline metric of the defaults (of the commit that ran them)
    and of the changed defaults (means over the same seeds), the difference, and the training
    time of each."""
    lines = [
        "| change | set | defaults then | changed | difference (points) | seeds | train s: "
        "defaults → changed | trained on |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    by_set = {s.name: s for s in SETS}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results.get("runs", []):
        if "diverged" in r["defaults"] or "diverged" in r["changed"]:
            continue
        groups.setdefault((json.dumps(r["change"], sort_keys=True), r["set"]), []).append(r)
    for (label, name), pairs in sorted(
        groups.items(), key=lambda g: (g[0][0], list(by_set).index(g[0][1]))
    ):
        key = "spearman" if "mae" in pairs[0]["defaults"] else HEADLINE
        a = statistics.fmean(p["defaults"][key] for p in pairs)
        b = statistics.fmean(p["changed"][key] for p in pairs)
        ta = statistics.fmean(p["defaults"]["train_s"] for p in pairs)
        tb = statistics.fmean(p["changed"]["train_s"] for p in pairs)
        where = sorted({ran_on(p["defaults"]) for p in pairs})
        lines.append(
            f"| {label} | {by_set[name].what} | {fmt(a)} | {fmt(b)} | {fmt(100 * (b - a), 2)} "
            f"| {len(pairs)} | {ta:.0f} → {tb:.0f} | {', '.join(where)} |"
        )
    return "\n".join(lines)


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per set: the defaults' mean over seeds, the best grid point's mean, and the gap."""
    rows = []
    for data_set in SETS:
        runs, complete = comparable_runs(results["runs"], data_set.name)
        if not runs:
            continue
        by_settings: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            by_settings.setdefault(json.dumps(r["settings"], sort_keys=True), []).append(r)
        means = {key: mean_of(group) for key, group in by_settings.items()}
        headline = "spearman" if "mae" in runs[0] else HEADLINE
        point = default_point(recorded_train_rows(runs, data_set.name))
        defaults = means.get("{}") or means.get(json.dumps(point, sort_keys=True))
        grid = {k: v for k, v in means.items() if k != "{}" and v["seeds"]}
        best_key = max(grid, key=lambda k: grid[k].get(headline, -1.0), default=None)
        rows.append(
            {
                "set": data_set.name,
                "what": data_set.what,
                "defaults": defaults,
                "best_grid": {"settings": json.loads(best_key), **grid[best_key]}
                if best_key
                else None,
                "headline": headline,
                "defaults_are_grid_point": "{}" not in means,
                "grid_points": len(grid),
                "grid_complete": complete,
                "seeds_compared": sorted({r["seed"] for r in runs}),
                "ran_on": sorted({ran_on(r) for r in runs}),
                "gap_points": round(100 * (grid[best_key][headline] - defaults[headline]), 2)
                if best_key and defaults and defaults["seeds"]
                else None,
            }
        )
    return rows


def comparable_runs(runs: list[dict[str, Any]], name: str) -> tuple[list[dict[str, Any]], bool]:
    """A set's runs on the seeds that every settings point has (so that no point's mean is
    over other splits than another's), and whether there are such seeds; without any, every
    run, and False: a partial grid."""
    runs = [r for r in runs if r["set"] == name]
    points = {json.dumps(r["settings"], sort_keys=True) for r in runs}
    wanted = {
        json.dumps(p, sort_keys=True) for p in settings_list(GRID, recorded_train_rows(runs, name))
    }
    seeds = {
        seed
        for seed in {r["seed"] for r in runs}
        if {json.dumps(r["settings"], sort_keys=True) for r in runs if r["seed"] == seed}
        >= (points | wanted)
    }
    if not seeds:
        return runs, False
    return [r for r in runs if r["seed"] in seeds], True


def ran_on(run: dict[str, Any]) -> str:
    """Where a run trained, in a few words: the GPU, or the processor's make and its bf16
    instructions, and the training precision ("EPYC AVX512-BF16 bf16", "H200 bf16")."""
    if "gpu" in run:
        return f"{run['gpu'].removeprefix('NVIDIA ')} {run.get('training_precision', '?')}"
    cpu = run.get("cpu", "?")
    make = "Xeon" if "Xeon" in cpu else "EPYC" if "EPYC" in cpu else cpu.split(" (")[0]
    isa = cpu.rsplit(" (", 1)[1].rstrip(")") if cpu.endswith(")") else ""
    return " ".join(part for part in (make, isa, run.get("training_precision", "?")) if part)


def mean_of(group: list[dict[str, Any]]) -> dict[str, Any]:
    learned = [r for r in group if "diverged" not in r]
    out: dict[str, Any] = {"seeds": len(learned), "diverged": len(group) - len(learned)}
    for key in ("accuracy", "macro_f1", "ece", "ece_calibrated", "mae", "spearman", "wall_s"):
        values = [r[key] for r in learned if key in r]
        if values:
            out[key] = round(statistics.fmean(values), 4)
            out[f"{key}_spread"] = round(max(values) - min(values), 4)
    return out


def table(results: dict[str, Any]) -> str:
    """The README's table, from the results file: macro-F1 for classification sets, Spearman
    for regression (its MAE in the accuracy column)."""
    lines = [
        "| set | defaults: macro-F1 or Spearman (spread) | accuracy or MAE | ECE → calibrated "
        "| best grid run | its score | gap (points) | seeds | grid | wall s | trained on |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---|",
    ]
    for row in summarise(results):
        d, b = row["defaults"] or {}, row["best_grid"] or {}
        key = row["headline"]
        settings = b.get("settings", {})
        best = f"lr {settings['learning_rate']:g}, {settings['epochs']} ep" if b else "-"
        second = d.get("mae") if key == "spearman" else d.get("accuracy")
        lines.append(
            f"| {row['what']} | {fmt(d.get(key))} ({fmt(d.get(f'{key}_spread'))}) "
            f"| {fmt(second)} | {fmt(d.get('ece'))} → {fmt(d.get('ece_calibrated'))} "
            f"| {best} | {fmt(b.get(key))} | {fmt(row['gap_points'], 2)} "
            f"| {d.get('seeds', 0)} "
            f"| {'all 6' if row['grid_complete'] else str(row['grid_points']) + ' of 6'} "
            f"| {fmt(d.get('wall_s'), 0)} | {', '.join(row['ran_on'])} |"
        )
    return "\n".join(lines)


def fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", help="comma-separated set names (default: all)")
    parser.add_argument("--seeds", type=int, help="seeds per set (default: the set's own)")
    parser.add_argument("--only", choices=["defaults", "grid"], help="run only these settings")
    parser.add_argument(
        "--points",
        metavar="LRxEPOCHS,...",
        help="run only these grid points, e.g. 5e-5x3,1e-4x3 (a further seed of the leaders)",
    )
    parser.add_argument("--rerun", action="store_true", help="repeat runs already recorded")
    parser.add_argument("--table", action="store_true", help="print the README tables and exit")
    parser.add_argument(
        "--compare",
        metavar="FIELD=VALUE",
        help="run the defaults and the defaults with this change, paired, on every set",
    )
    parser.add_argument("--export", type=Path, metavar="DIR", help="write each set's rows and exit")
    parser.add_argument(
        "--rows-from", type=Path, metavar="DIR", help="compare on rows --export wrote"
    )
    parser.add_argument("--shard", default="0/1", metavar="I/N", help="run every N-th pair from I")
    parser.add_argument(
        "--model", default="minilm", help="the model a comparison fine-tunes (a folder on a GPU)"
    )
    parser.add_argument("--out", type=Path, default=COMPARE_FILE, help="the comparison's file")
    parser.add_argument(
        "--merge", type=Path, nargs="+", metavar="FILE", help="fold comparison files in and exit"
    )
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.table:
        results = load_results()
        results["summary"] = summarise(results)
        save_results(results)
        print(table(results))
        if COMPARE_FILE.is_file():
            print()
            print(compare_table(load_results(COMPARE_FILE)))
        return
    names = args.sets.split(",") if args.sets else [s.name for s in SETS]
    unknown = set(names) - {s.name for s in SETS}
    if unknown:
        parser.error(f"unknown sets {sorted(unknown)}; known: {[s.name for s in SETS]}")
    by_name = {s.name: s for s in SETS}
    chosen = [by_name[name] for name in names]
    if args.export:
        export_rows(chosen, args.seeds, args.export)
    elif args.compare:
        index, _, count = args.shard.partition("/")
        change = parse_change(args.compare)
        shard = (int(index), int(count))
        compare(chosen, args.seeds, change, args.rerun, args.rows_from, shard, args.out, args.model)
    else:
        run(chosen, args.seeds, args.only, args.rerun, parse_points(args.points))


if __name__ == "__main__":
    main()
