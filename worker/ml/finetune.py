"""Fine-tuning: a spec and an output folder in, a saved classifier and its metrics out.

Knows nothing of Celery or the database; progress goes to an ``on_progress`` callback.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PrinterCallback, TrainerCallback, set_seed

from tuneq.schemas.errors import ConfigError
from tuneq.schemas.specs import DEFAULT_ATTENTION_DROPOUT, FinetuneSpec, default_learning_rate
from tuneq.worker.ml import cpu_attention, cpu_dropout, first_token
from tuneq.worker.ml.best_model import (
    BestModel,
    Evaluation,
    check_learned,
    check_learned_unevaluated,
)
from tuneq.worker.ml.calibration import softmax
from tuneq.worker.ml.cpu_step import CpuStepTrainer
from tuneq.worker.ml.data import Examples, TrainingData, load_training_data
from tuneq.worker.ml.device import avoid_cudnn_attention, training_bf16
from tuneq.worker.ml.label_errors import find_label_issues
from tuneq.worker.ml.model_card import write_model_card
from tuneq.worker.ml.models import (
    attention_dropout_keys,
    attention_dropout_override,
    load_classifier,
    load_tokenizer,
    resolve_model_source,
)
from tuneq.worker.ml.plots import write_plots
from tuneq.worker.ml.tasks import PROBLEM_TYPES, Task
from tuneq.worker.ml.vocabulary import unknown_share, vocabulary_warning

Progress = Callable[[dict[str, Any]], None]
MANIFEST = "tuneq.json"
CURVES = ("loss_curve", "eval_curve")
TRAINER_DIR = ".trainer"
BEST_DIR = "best"
AUTO_MAX_LENGTH = 256  # the most a default length grows to
LENGTH_SAMPLE = 2000  # training texts measured to choose it


@dataclass
class FinetuneResult:
    """What a finished fine-tune produced: metrics, labels and the data's fingerprint."""

    metrics: dict[str, Any]
    label_names: list[str]
    fingerprint: str
    phases: dict[str, float] = field(default_factory=dict)
    resumed_from: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class PhaseTimer:
    """Wall time per phase of a job, in seconds."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def finetune(
    spec: FinetuneSpec,
    out_dir: Path,
    on_progress: Progress | None = None,
    checkpoint_dir: Path | None = None,
    on_warning: Callable[[str], None] | None = None,
    hand_back: Callable[[], bool] | None = None,
) -> FinetuneResult:
    """Fine-tune ``spec.model`` on ``spec.data`` and save the classifier into ``out_dir``.

    With ``checkpoint_dir``, a checkpoint is saved there every ``spec.checkpoint_steps`` steps,
    and training resumes from the newest complete one found there (after a lost worker).
    ``on_warning`` hears about problems that do not stop the job (a vocabulary that does not
    cover the data). Once ``hand_back()`` is true, training checkpoints at the end of its step
    and stops there, raising :class:`HandedBack` (with checkpoints on; without, it trains on).
    """
    report = on_progress or (lambda _progress: None)
    check_trackers(spec.report_to)
    timer = PhaseTimer()
    with timer.phase("load_data"):
        report({"phase": "loading data"})
        data = load_training_data(spec)
    with timer.phase("load_model"):
        report({"phase": "loading model"})
        source = resolve_model_source(spec.model)
        spec = resolved_spec(spec, data, source)
        tokenizer = load_tokenizer(spec.model, source, trust_remote_code=spec.trust_remote_code)
        warning = vocabulary_warning(spec.model, unknown_share(tokenizer, data.train.texts))
        warnings = [warning] if warning else []
        if warning and on_warning:
            on_warning(warning)
        model = new_model(spec, source, data.label_names)
        avoid_cudnn_attention()
    task = Task.of(spec.task, data.label_names, data.train)
    with timer.phase("tokenize"):
        report({"phase": "tokenizing"})
        max_length = spec.max_length or choose_max_length(tokenizer, data.train.texts)
        train_set = tokenize(tokenizer, task.model_targets(data.train), max_length)
        eval_set = (
            tokenize(tokenizer, task.model_targets(data.eval), max_length, sort_by_length=True)
            if spec.evaluated()
            else None
        )
    keeper = BestModel(
        spec.chosen_metric(),
        spec.patience,
        (checkpoint_dir or out_dir / TRAINER_DIR) / BEST_DIR,
        task.scorer(),
    )
    trainer, curves = build_trainer(
        spec, model, tokenizer, train_set, eval_set, out_dir, report, keeper, checkpoint_dir,
        trackers=True,
    )  # fmt: skip
    resume = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if resume is not None:
        report({"phase": "resuming", "checkpoint": resume.name})
    pause = None
    if hand_back and checkpoints_into(spec, checkpoint_dir) is not None:
        pause = HandBackAtStepEnd(hand_back)
        trainer.add_callback(pause)
    with timer.phase("train"):
        train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if pause and pause.step is not None and checkpoint_dir:
        saved = latest_checkpoint(checkpoint_dir)
        raise HandedBack(pause.step, trainer.state.max_steps, saved.name if saved else None)
    final_step = int(train_output.global_step)
    last_loss = curves.train[-1]["loss"] if curves.train else float(train_output.training_loss)
    if eval_set is None:  # every row trained: the last weights are the model
        check_learned_unevaluated(last_loss, data.train.labels, spec)
        metrics = task.unevaluated_metrics()
        training = {
            "evaluated": False,
            "final_step": final_step,
            "max_steps": trainer.state.max_steps,
            "stopped_early": False,
            "stop_reason": "trained every epoch on every row; nothing held out to evaluate",
        }
    else:
        with timer.phase("eval"):
            best = choose_best(trainer, keeper, final_step, report)
        check_learned(best, last_loss, data.train.labels, spec, warnings)
        metrics = task.final_metrics(best)
        metrics["eval_loss"] = best.metrics["eval_loss"]
        training = keeper.summary(trainer.state.max_steps, final_step)
    with timer.phase("save"):
        report({"phase": "saving"})
        shutil.rmtree(out_dir / TRAINER_DIR, ignore_errors=True)
        # save_pretrained rather than Trainer.save_model, which adds a pickled training_args.bin
        trainer.model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    if spec.label_error_folds:
        with timer.phase("label_errors"):
            metrics["label_issues"] = find_label_issues(
                spec.label_error_folds,
                data,
                lambda train, held_out, fold: fold_probabilities(
                    spec,
                    source,
                    tokenizer,
                    task,
                    (train, held_out),
                    max_length,
                    data.eval,
                    out_dir / TRAINER_DIR / f"fold-{fold}",
                ),
                out_dir,
                report,
                spec.seed,
            )
        shutil.rmtree(out_dir / TRAINER_DIR, ignore_errors=True)
    metrics.update(
        train_loss=float(train_output.training_loss),
        train_steps=final_step,
        precision="bf16" if training_bf16(spec.precision) else "fp32",
        train_samples_per_second=float(train_output.metrics.get("train_samples_per_second", 0)),
        training={
            **training,
            "max_length": max_length,
            "learning_rate": spec.learning_rate,
            "attention_dropout": spec.attention_dropout,  # None: the model has no such setting
            "dropout_kernel": cpu_dropout.in_use(trainer.model),
            "embedding_rows_adamw": trainer.embedding_rows_adamw,
            "attention_kernel": cpu_attention.in_use(trainer.model),
            "first_token_only": first_token.in_use(trainer.model),
        },
        loss_curve=curves.train,
        eval_curve=curves.eval,
        data=data.summary,
    )
    with timer.phase("plots"):
        metrics["plots"] = write_plots(out_dir, metrics, data.label_names)
    result = FinetuneResult(
        metrics,
        data.label_names,
        data.fingerprint,
        timer.seconds,
        resumed_from=resume.name if resume else None,
        warnings=warnings,
    )
    write_manifest(out_dir, spec, result, data)
    return result


class ExampleSet:
    """Tokenized examples as the Trainer wants them: a list of dicts (unpadded)."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]


def resolved_spec(spec: FinetuneSpec, data: TrainingData, source: str) -> FinetuneSpec:
    """``spec`` with the defaults that depend on the data or the model filled in: the learning
    rate, by the number of training rows; attention dropout 0 where the model has that setting
    (a model without one trains as it is). Everything after (the Trainer, the messages, the
    manifest) sees the values the run used."""
    update: dict[str, Any] = {}
    if spec.learning_rate is None:
        update["learning_rate"] = default_learning_rate(len(data.train.texts))
    if spec.attention_dropout is None and attention_dropout_keys(
        spec.model, source, trust_remote_code=spec.trust_remote_code
    ):
        update["attention_dropout"] = DEFAULT_ATTENTION_DROPOUT
    return spec.model_copy(update=update) if update else spec


def new_model(spec: FinetuneSpec, source: str, label_names: list[str]) -> Any:
    """The base model with a new head for ``label_names``, drawn from ``spec.seed``."""
    import torch

    # The new head is drawn from the global RNG while loading, before the Trainer seeds it:
    # unseeded, the same spec gave another model (and other predictions) in each process.
    set_seed(spec.seed)
    model = load_classifier(
        spec.model,
        source,
        trust_remote_code=spec.trust_remote_code,
        num_labels=len(label_names),
        problem_type=PROBLEM_TYPES[spec.task],
        ignore_mismatched_sizes=True,  # a head for 2 labels on a base, now 3: a new head
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        **attention_dropout_override(
            spec.model,
            source,
            spec.attention_dropout,
            trust_remote_code=spec.trust_remote_code,
        ),
    )
    cpu_dropout.use_for(model)
    if not torch.cuda.is_available():  # before first_token reads the attention
        cpu_attention.use_fp32_kernel(model, training=True, autocast=training_bf16(spec.precision))
    first_token.use_for(model)
    return model


def choose_best(trainer: Any, keeper: BestModel, final_step: int, report: Progress) -> Evaluation:
    """After training: evaluate the final weights unless that was their last step's
    evaluation, and put the best evaluation's weights into the model."""
    if keeper.last is None or keeper.last.step != final_step:
        report({"phase": "evaluating"})
        trainer.evaluate()
    return keeper.load_best_into(trainer.model, final_step)


def fold_probabilities(
    spec: FinetuneSpec,
    source: str,
    tokenizer: Any,
    task: Task,
    rows: tuple[Examples, Examples],
    max_length: int,
    evaluation: Examples,
    work: Path,
) -> np.ndarray:
    """Train a new model on ``rows[0]`` as the job's own is trained (the best evaluation on
    the job's evaluation rows kept), and return its probabilities for ``rows[1]``."""
    train, held_out = rows
    model = new_model(spec, source, task.label_names)
    keeper = BestModel(spec.chosen_metric(), spec.patience, work / BEST_DIR, task.scorer())
    trainer, _ = build_trainer(
        spec,
        model,
        tokenizer,
        tokenize(tokenizer, task.model_targets(train), max_length),
        tokenize(tokenizer, task.model_targets(evaluation), max_length, sort_by_length=True),
        work,
        lambda _progress: None,
        keeper,
    )
    final_step = int(trainer.train().global_step)
    choose_best(trainer, keeper, final_step, lambda _progress: None)
    logits = held_out_logits(trainer.model, tokenizer, held_out, max_length, spec)
    shutil.rmtree(work, ignore_errors=True)
    return softmax(logits)


def held_out_logits(
    model: Any, tokenizer: Any, examples: Examples, max_length: int, spec: FinetuneSpec
) -> np.ndarray:
    """The model's logits for ``examples``, in their order. Not ``Trainer.predict``: with
    length-grouped sampling the Trainer reorders evaluation rows too (transformers 5)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    rows = tokenize(tokenizer, examples, max_length).features
    ids = [{"input_ids": row["input_ids"]} for row in rows]
    size, bf16 = spec.batch_size * 2, training_bf16(spec.precision)
    out = []
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for start in range(0, len(ids), size):
            padded = tokenizer.pad(ids[start : start + size], return_tensors="pt")
            logits = model(**{k: v.to(device) for k, v in padded.items()}).logits
            out.append(logits.float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def choose_max_length(tokenizer: Any, texts: list[str]) -> int:
    """Enough tokens for 99 % of ``texts`` (a sample of them), rounded up to a multiple of 8, at
    most 256: short sentences stop paying for room they never use, and long reviews keep the
    length whose cost a 2-core CPU can bear (512 tokens costs 2.5x the time of 256)."""
    sample = texts[:: max(1, len(texts) // LENGTH_SAMPLE)][:LENGTH_SAMPLE]
    lengths = [len(ids) for ids in tokenizer(sample, truncation=True, max_length=512)["input_ids"]]
    wanted = int(np.quantile(lengths, 0.99)) if lengths else AUTO_MAX_LENGTH
    return int(min(AUTO_MAX_LENGTH, max(16, -(-wanted // 8) * 8)))


def tokenize(
    tokenizer: Any, examples: Examples, max_length: int, sort_by_length: bool = False
) -> ExampleSet:
    """Truncate to ``max_length``; padding happens per batch in the collator."""
    encoded = tokenizer(examples.texts, truncation=True, max_length=max_length)
    features = [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(
            encoded["input_ids"], encoded["attention_mask"], examples.labels, strict=True
        )
    ]
    if sort_by_length:  # evaluation order does not matter; sorted batches waste no padding
        features.sort(key=lambda f: len(f["input_ids"]))
    return ExampleSet(features)


@dataclass
class LossCurves:
    """Losses logged while training: ``{"step", "loss"}`` points, train and eval."""

    train: list[dict[str, float]] = field(default_factory=list)
    eval: list[dict[str, float]] = field(default_factory=list)


def checkpoints_into(spec: FinetuneSpec, checkpoint_dir: Path | None) -> Path | None:
    """Where the Trainer saves checkpoints: ``checkpoint_dir`` where the job gives one and
    ``spec.checkpoint_steps`` is set; None where it saves none."""
    return checkpoint_dir if spec.checkpoint_steps is not None else None


def build_trainer(
    spec: FinetuneSpec,
    model: Any,
    tokenizer: Any,
    train_set: ExampleSet,
    eval_set: ExampleSet | None,
    out_dir: Path,
    report: Progress,
    keeper: BestModel,
    checkpoint_dir: Path | None = None,
    *,
    trackers: bool = False,
) -> tuple[Any, LossCurves]:
    """A Trainer that reports progress through ``report``, evaluates on ``eval_set`` (if
    any) as :class:`EvalSchedule` says, keeps the best evaluation with ``keeper``, and saves
    nothing by itself but checkpoints into ``checkpoint_dir``, when given. With ``trackers``
    it also reports to the experiment trackers ``spec.report_to`` names."""
    import torch
    from transformers import DataCollatorWithPadding, TrainingArguments

    steps_per_epoch = -(-len(train_set) // spec.batch_size)
    checkpoints = checkpoints_into(spec, checkpoint_dir)
    args = TrainingArguments(
        output_dir=str(checkpoints or out_dir / TRAINER_DIR),
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size * 2,
        num_train_epochs=spec.epochs,
        learning_rate=spec.learning_rate,
        warmup_steps=spec.warmup if spec.warmup < 1 else int(spec.warmup),
        weight_decay=spec.weight_decay,
        seed=spec.seed,
        data_seed=spec.seed,
        train_sampling_strategy="group_by_length",
        eval_strategy="no",  # EvalSchedule decides when
        save_strategy="no" if checkpoints is None else "steps",
        save_steps=spec.checkpoint_steps or 500,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=max(1, min(50, steps_per_epoch // 5)),
        report_to=[t for t in spec.report_to if t != "tensorboard"] if trackers else "none",
        run_name=spec.name,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=training_bf16(spec.precision),
        optim="adamw_torch_fused",  # one kernel for all parameters: AdamW took a fifth of a step
        dataloader_num_workers=0,
    )
    curves = LossCurves()
    trainer = CpuStepTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=keeper.compute_metrics,
        callbacks=[
            ProgressCallback(report, curves),
            *([EvalSchedule(spec.eval_steps, report), keeper] if eval_set is not None else []),
            CheckpointMarker(),
            *(tracker_callbacks(spec.report_to, out_dir) if trackers else []),
        ],
    )
    trainer.remove_callback(PrinterCallback)  # progress goes to the job row, not to stdout
    return trainer, curves


TENSORBOARD_DIR = "runs"  # in the model folder, where the Hub's model repositories keep them
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def check_trackers(report_to: list[str]) -> None:
    """Refuse, before any work, a tracker whose package this worker lacks."""
    import importlib.util

    for tracker in report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[tracker]) is None:
            raise ConfigError(
                f"report_to {tracker} needs the {tracker} package on the worker: pip install "
                f"{TRACKER_PACKAGES[tracker]} (or drop --report-to {tracker})"
            )


def tracker_callbacks(report_to: list[str], out_dir: Path) -> list[Any]:
    """The Trainer's own TensorBoard integration, writing into the model folder (the others
    in ``report_to`` the Trainer adds itself)."""
    if "tensorboard" not in report_to:
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR)))]


class EvalSchedule(TrainerCallback):  # type: ignore[misc]
    """Evaluates at the end of every epoch, and every ``every`` steps when set: the points of
    the eval-loss curve, and the candidates for the best model."""

    def __init__(self, every: int | None, report: Progress) -> None:
        self.every = every
        self.report = report
        self.evaluated_at = -1

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.every and state.global_step % self.every == 0:
            self.evaluate(state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.evaluated_at < state.global_step:
            self.evaluate(state, control)

    def evaluate(self, state: Any, control: Any) -> None:
        control.should_evaluate = True
        step, total = state.global_step, state.max_steps
        self.report({"phase": "evaluating", "step": step, "total": total})

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.evaluated_at = state.global_step


COMPLETE_MARKER = "tuneq-complete"


class CheckpointMarker(TrainerCallback):  # type: ignore[misc]
    """Marks a checkpoint complete once the Trainer has written all of it. Trainer checkpoints
    are not atomic (transformers#27820): a folder without the marker is never resumed from."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / COMPLETE_MARKER).write_text(f"{state.global_step}\n")


class HandedBack(Exception):  # noqa: N818 - an outcome, not an error
    """Training stopped at ``step`` of ``total`` because its worker is stopping; it resumes
    from ``checkpoint`` (the one saved at that step) on the next worker."""

    def __init__(self, step: int, total: int, checkpoint: str | None) -> None:
        super().__init__(f"stopped at step {step} of {total}; checkpoint {checkpoint}")
        self.step, self.total, self.checkpoint = step, total, checkpoint


class HandBackAtStepEnd(TrainerCallback):  # type: ignore[misc]
    """Once ``asked()``, saves a checkpoint at the end of the current step and stops training
    there (the Trainer saves after ``on_step_end``, then leaves its loop). The last step is
    left to finish: the job is done then."""

    def __init__(self, asked: Callable[[], bool]) -> None:
        self.asked = asked
        self.step: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.step is None and state.global_step < state.max_steps and self.asked():
            self.step = state.global_step
            control.should_save = control.should_training_stop = True


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``, if any."""
    complete = [
        path
        for path in folder.glob("checkpoint-*")
        if (path / COMPLETE_MARKER).is_file() and path.name.split("-")[-1].isdigit()
    ]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


CURVE_POINTS = 200  # the live loss curve on a running job's row: enough to draw, small to write


def thinned(points: list[list[float]], most: int = CURVE_POINTS) -> list[list[float]]:
    """At most ``most`` of ``points``, evenly spaced, always with the newest."""
    if len(points) <= most:
        return points
    every = -(-len(points) // most)
    kept = points[::every]
    return kept if kept[-1] is points[-1] else [*kept[: most - 1], points[-1]]


class ProgressCallback(TrainerCallback):  # type: ignore[misc]
    """Reports steps and losses to tuneq while the Trainer runs."""

    def __init__(self, report: Progress, curves: LossCurves) -> None:
        self.report = report
        self.curves = curves
        self.started = time.monotonic()
        self.first_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.monotonic()
        self.first_step = state.global_step  # above 0 when resumed from a checkpoint
        history = [log for log in state.log_history if "step" in log]
        self.curves.train[:] = [train_point(log["step"], log) for log in history if "loss" in log]
        self.curves.eval[:] = [
            eval_point(log["step"], log) for log in history if "eval_loss" in log
        ]
        self.report({"phase": "training", "step": 0, "total": state.max_steps})

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        elapsed = time.monotonic() - self.started
        step, total = state.global_step, state.max_steps
        done = step - self.first_step
        eta = elapsed / done * (total - step) if done > 0 else None
        self.report(
            {
                "phase": "training",
                "step": step,
                "total": total,
                "epoch": round(float(state.epoch or 0), 3),
                "loss": self.curves.train[-1]["loss"] if self.curves.train else None,
                "steps_per_s": round(done / elapsed, 3) if done > 0 and elapsed > 0 else None,
                "eta_s": round(eta, 1) if eta is not None else None,
                "curve": thinned([[p["step"], p["loss"]] for p in self.curves.train]),
            }
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.curves.train.append(train_point(state.global_step, logs))
        if logs and "eval_loss" in logs:
            self.curves.eval.append(eval_point(state.global_step, logs))


def train_point(step: int, logs: dict[str, Any]) -> dict[str, float]:
    return {"step": step, "loss": round(float(logs["loss"]), 5)}


def eval_point(step: int, logs: dict[str, Any]) -> dict[str, float]:
    """A point of the evaluation curve: the loss, and the metrics that choose the best model."""
    point = {"step": step, "loss": round(float(logs["eval_loss"]), 5)}
    for name in ("accuracy", "macro_f1"):
        if f"eval_{name}" in logs:
            point[name] = round(float(logs[f"eval_{name}"]), 6)
    return point


def write_manifest(
    out_dir: Path, spec: FinetuneSpec, result: FinetuneResult, data: TrainingData
) -> None:
    """``tuneq.json``: how the model was made, so the folder explains itself; and the same as a
    model card (``README.md``) for people."""
    import torch
    import transformers

    manifest = {
        "name": spec.model_name(),
        "base_model": spec.model,
        "spec": spec.model_dump(mode="json"),
        "labels": result.label_names,
        "metrics": {k: v for k, v in result.metrics.items() if k not in CURVES},
        **{key: result.metrics.get(key, []) for key in CURVES},
        "task": spec.task,
        "data_fingerprint": data.fingerprint,
        "calibration": result.metrics.get("calibration"),
        "target_scale": result.metrics.get("target_scale"),
        "thresholds": result.metrics.get("thresholds"),
        "label_separator": spec.label_separator if spec.task == "multi_label" else None,
        "training": result.metrics.get("training"),
        "warnings": result.warnings,
        "phases": result.phases,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    write_model_card(out_dir, manifest)
