"""Job specifications: what a user asks for, validated before anything is queued.

Each field's description is also the help text of the matching CLI option.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


def check_notify_url(value: str | None) -> str | None:
    """A notification goes over HTTP(S) only: no file:// or other schemes."""
    if value is not None and not re.match(r"^https?://[^\s/]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value


# Fields that every kind of job has, defined once.
Columns = Annotated[
    list[str] | None,
    Field(
        description="Column names of a CSV or TSV file that has no header row, in order, "
        "e.g. text,label."
    ),
]
TrustRemoteCode = Annotated[
    bool,
    Field(
        description="Run Python code that ships with the model (auto_map in its config); "
        "only for models whose code you trust."
    ),
]
Device = Annotated[
    Literal["auto", "cpu", "gpu"],
    Field(
        description="Where the job runs: cpu or gpu (the queue of that name), or auto: the gpu "
        "queue when a live worker listens on it, else cpu."
    ),
]
Queue = Annotated[
    str | None,
    Field(description="Worker queue to send the job to; default: chosen by device."),
]
PRIORITY_LEVELS = ("high", "normal", "low")  # the order in which waiting jobs start
Priority = Annotated[
    Literal["high", "normal", "low"],
    Field(
        description="Place in the queue: high jobs start before normal ones, normal before low "
        "(on Redis; the embedded broker keeps arrival order)."
    ),
]
NotifyUrl = Annotated[
    str | None,
    AfterValidator(check_notify_url),
    Field(description="URL (http or https) to POST a JSON summary to when the job ends."),
]


# The default learning rate falls with the training set's size: in bench/quality.py 1e-4 was
# best or within a point on every set of at most 1,839 training rows, 5e-5 led on the two of
# 5,000 and 10,000. No set lies in between, so the threshold is a round number in the gap.
SMALL_SET_LEARNING_RATE = 1e-4
LARGE_SET_LEARNING_RATE = 5e-5
LARGE_SET_ROWS = 3000


def default_learning_rate(train_rows: int) -> float:
    """The peak learning rate of a fine-tune that names none, for ``train_rows`` training rows
    (after any evaluation rows are held out)."""
    return LARGE_SET_LEARNING_RATE if train_rows >= LARGE_SET_ROWS else SMALL_SET_LEARNING_RATE


# Attention dropout, where the model has that setting and the spec names none: paired runs of
# bench/quality.py (--compare attention_dropout=0) on its nine sets gave macro-F1 (Spearman for
# regression) +0.01 points on average against the model's own 0.1, 10 pairs up and 11 down, so
# the model's own is not kept for regularisation it does not measurably give; on a CPU, 0 takes
# the fast attention kernel and halves a fine-tune's time.
DEFAULT_ATTENTION_DROPOUT = 0.0


# The metrics that measure each task; the first is the default.
TASK_METRICS = {
    "classification": ("macro_f1", "accuracy", "loss"),
    "multi_label": ("micro_f1", "macro_f1", "loss"),
    "regression": ("mae", "spearman", "loss"),
}


class FinetuneSpec(BaseModel):
    """A fine-tune of a pretrained encoder into a text classifier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["finetune"] = "finetune"
    data: str = Field(
        description="Training data: a Hub data set name (imdb) or a CSV, TSV, JSON lines or "
        "Parquet file (optionally .gz), or a folder of them (train.* and test.* files are splits)."
    )
    model: str = Field(
        "minilm",
        description="Base model: minilm (packaged, offline), a Hub name (bert-base-uncased) "
        "or a local folder.",
    )
    name: str | None = Field(
        None,
        description="Name to register the model under; default: the data set's name + "
        "'-classifier'.",
    )
    eval_data: str | None = Field(
        None,
        description="Separate evaluation data; default: the data's test split, if any, "
        "else rows held out of the training data.",
    )
    columns: Columns = None
    text_column: str = Field("text", description="Column that holds the text.")
    label_column: str = Field("label", description="Column that holds the label (int or string).")
    eval_text_column: str | None = Field(
        None,
        description="Text column of the evaluation data (--eval-data or a test split), where "
        "it differs from the training data's; default: --text-column.",
    )
    eval_label_column: str | None = Field(
        None,
        description="Label column of the evaluation data, where it differs; default: "
        "--label-column.",
    )
    encoding: str = Field(
        "utf-8", description="Text encoding of CSV or TSV training and evaluation files."
    )
    label_names: list[str] | None = Field(
        None,
        description="Names for integer labels 0, 1, … in order, e.g. negative,positive.",
    )
    train_size: Annotated[int, Field(ge=2)] | None = Field(
        None, description="Train on this many rows, drawn by a seeded shuffle; default: all."
    )
    eval_size: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="Evaluate on this many rows (seeded shuffle); default: all, or 20% "
        "held out when there is no evaluation data. 0: train on every row and evaluate "
        "nothing (the last weights are kept; no early stopping, calibration or thresholds).",
    )
    max_length: int | None = Field(
        None,
        ge=8,
        le=8192,
        description="Truncate texts to this many tokens; default: enough for 99% of the "
        "training texts, at most 256.",
    )
    epochs: float = Field(
        3.0,
        gt=0,
        le=100,
        description="Training epochs (the most, with --patience); the best evaluation's "
        "weights are kept.",
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Training batch size.")
    learning_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Peak learning rate; default: 1e-4 below 3,000 training rows, 5e-5 from "
        "3,000 on (chosen from bench/quality.py).",
    )
    warmup: float = Field(
        0.1, ge=0, description="Warm-up: a fraction of the steps (< 1) or a number of steps."
    )
    weight_decay: float = Field(0.01, ge=0, lt=1, description="AdamW weight decay.")
    seed: int = Field(42, description="Seed for the shuffle, the new head and the Trainer.")
    attention_dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Dropout on attention weights while training; default 0 (where the model "
        "has that setting): the model's own (0.1 for BERT; pass it to keep it) made no "
        "measurable difference on the quality benchmark's nine sets, and 0 trains about twice "
        "as fast on a CPU, where drawing that mask costs more than the attention itself.",
    )
    notify: NotifyUrl = None
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Training arithmetic: bf16 autocast (weights and optimizer stay fp32), fp32, "
        "or auto: bf16 where the CPU or GPU computes it natively, else fp32.",
    )
    trust_remote_code: TrustRemoteCode = False
    checkpoint_steps: int | None = Field(
        200,
        ge=1,
        description="Checkpoint every this many steps; a retry after a lost worker resumes "
        "from the newest. Null for none.",
    )
    keep_checkpoints: bool = Field(
        False,
        description="Keep the checkpoints of a run that fails, so that `tuneq retry --resume` "
        "goes on from the newest; default: removed when the job ends.",
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Also evaluate every this many steps (each costs one pass over the eval "
        "data); default: after each epoch. Each evaluation is a candidate for the best model.",
    )
    task: Literal["classification", "regression", "multi_label"] = Field(
        "classification",
        description="classification: one label per text; multi_label: any number of labels "
        "per text (a column of lists, or labels joined by --label-separator); regression: a "
        "number per text (the label column holds numbers, e.g. a 1-10 rating).",
    )
    label_separator: str = Field(
        "|",
        min_length=1,
        description="multi_label: the separator of labels joined in one text field, as in "
        "action|comedy. A column of lists (JSON lines, Parquet) needs none.",
    )
    metric: Literal["macro_f1", "accuracy", "loss", "mae", "spearman", "micro_f1"] | None = Field(
        None,
        description="Evaluation metric that picks the best checkpoint (the one registered) and "
        "that --patience watches: macro_f1 or accuracy (classification), micro_f1 or macro_f1 "
        "(multi_label), mae or spearman (regression), or loss (lower is better); default: the "
        "first of the task's.",
    )
    label_error_folds: int | None = Field(
        None,
        ge=2,
        le=10,
        description="Look for training rows whose label is probably wrong: train this many "
        "extra models, each on all folds but one, score the rows each did not see, and rank "
        "them by how unlikely their given label is (confident learning, cleanlab). Writes "
        "label_issues.csv beside the model; costs about this many more fine-tunes.",
    )
    patience: int | None = Field(
        None,
        ge=1,
        description="Early stopping: stop after this many evaluations in a row without an "
        "improvement of --metric; default: train every epoch.",
    )
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Also report the run to these experiment trackers, through the Trainer's "
        "own integrations (comma-separated): tensorboard writes event files into the model "
        "folder's runs/ (tensorboard --logdir the models folder); mlflow logs to the worker's "
        "MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME. The worker needs the package.",
    )
    device: Device = "auto"
    queue: Queue = None
    priority: Priority = "normal"

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and not re.match(MODEL_NAME_PATTERN, value):
            raise ValueError(
                "must be lower-case letters, digits, '.', '_' or '-' (at most 64), "
                "like imdb-sentiment"
            )
        return value

    @field_validator("label_names")
    @classmethod
    def _check_label_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if len(value) < 2:
                raise ValueError("give at least two names, e.g. negative,positive")
            if len(set(value)) != len(value):
                raise ValueError("names must be different")
        return value

    @model_validator(mode="after")
    def _check_task(self) -> FinetuneSpec:
        allowed = TASK_METRICS[self.task]
        if self.metric is not None and self.metric not in allowed:
            raise ValueError(
                f"metric {self.metric} does not measure {self.task}; use one of "
                f"{', '.join(allowed)}"
            )
        if self.task != "classification" and self.label_error_folds is not None:
            raise ValueError(f"label_error_folds works on classification, not {self.task}")
        if self.task == "regression" and self.label_names is not None:
            raise ValueError("label_names name classes; a regression target has none")
        return self

    def chosen_metric(self) -> str:
        """The metric that picks the best checkpoint: the one asked for, or the task's."""
        return self.metric or TASK_METRICS[self.task][0]

    @model_validator(mode="after")
    def _check_evaluation(self) -> FinetuneSpec:
        if self.eval_size != 0:
            return self
        if self.patience is not None:
            raise ValueError(
                "early stopping needs evaluation data: patience counts evaluations without an "
                "improvement, and eval_size 0 holds no rows out to evaluate; drop patience, or "
                "keep rows for evaluation (eval_size N, or eval_data FILE)"
            )
        needing = {
            "eval_data": "names evaluation rows",
            "metric": "chooses the best evaluation",
            "eval_steps": "schedules evaluations",
            "label_error_folds": "chooses each fold model's best evaluation",
        }
        for name, does in needing.items():
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name} {does}, and eval_size 0 evaluates nothing; drop one of the two"
                )
        return self

    def evaluated(self) -> bool:
        """Whether the fine-tune evaluates at all (``eval_size`` 0: it trains on every row)."""
        return self.eval_size != 0

    @model_validator(mode="after")
    def _check_warmup(self) -> FinetuneSpec:
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise ValueError("warmup must be a fraction below 1 or a whole number of steps")
        return self

    def model_name(self) -> str:
        """The name the fine-tuned model is registered under."""
        if self.name:
            return self.name
        stem = re.split(r"[\\/]", self.data.rstrip("/\\"))[-1]
        stem = re.sub(r"(\.gz)?$", "", stem)
        stem = re.sub(r"\.(csv|tsv|jsonl|json|parquet)$", "", stem)
        stem = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
        return f"{stem[:50]}-classifier"


class ScoreSpec(BaseModel):
    """A batch-predict job: label every row of a file with a fine-tuned model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["score"] = "score"
    model: str = Field(
        description="Model: a registered name (its latest version), name:version, or a folder."
    )
    input: str = Field(
        description="File to score: CSV, TSV, JSON lines or Parquet, optionally .gz."
    )
    output: str = Field(
        description="Scored file; its suffix (.csv, .tsv, .jsonl, .parquet, + .gz) sets the "
        "format. Every input row and column, in order, plus label and score."
    )
    columns: Columns = None
    text_column: str = Field("text", description="Column that holds the text to label.")
    id_column: str | None = Field(
        None, description="Column that identifies rows; named in messages about bad rows."
    )
    encoding: str = Field("utf-8", description="Text encoding of a CSV or TSV input.")
    probabilities: bool = Field(
        False, description="Add one probability column per label (prob_<label>)."
    )
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto",
        description="Numeric mode: auto (bf16 where the CPU or GPU computes it natively and it "
        "gives fp32's labels on 99.5 % of a sample of the input's first rows, pooled with what "
        "earlier jobs sampled for the same weights on the same kind of hardware; else fp32); "
        "fp32; bf16; int8 dynamic quantisation (CPU).",
    )
    max_length: int = Field(512, ge=8, le=8192, description="Truncate texts to this many tokens.")
    batch_tokens: int | None = Field(
        None,
        ge=64,
        description="Token budget of a batch (rows × padded length); default 4096 on a CPU, "
        "32768 on a GPU.",
    )
    trust_remote_code: TrustRemoteCode = False
    shard_rows: int = Field(
        1000, ge=1, description="Rows per shard; shards are scored by any listening worker."
    )
    device: Device = "auto"
    queue: Queue = None
    priority: Priority = "normal"
    notify: NotifyUrl = None
    model_path: str | None = Field(
        None, description="Model folder, resolved when the job is submitted (set by tuneq)."
    )

    @model_validator(mode="after")
    def _check_int8_device(self) -> ScoreSpec:
        if self.precision == "int8" and self.device == "gpu":
            raise ValueError(
                "int8 scoring runs on a CPU: use precision bf16 on a GPU, or device cpu"
            )
        return self

    @field_validator("output")
    @classmethod
    def _check_output(cls, value: str) -> str:
        name = value.lower().removesuffix(".gz")
        if not name.endswith(OUTPUT_SUFFIXES):
            raise ValueError(f"must end in {', '.join(OUTPUT_SUFFIXES)} (optionally + .gz)")
        if value.lower().endswith(".parquet.gz"):
            raise ValueError("Parquet is compressed already: use .parquet")
        return value


OUTPUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


JobSpec = Annotated[FinetuneSpec | ScoreSpec, Field(discriminator="kind")]
SPEC_CLASSES: dict[str, type[FinetuneSpec] | type[ScoreSpec]] = {
    "finetune": FinetuneSpec,
    "score": ScoreSpec,
}


def parse_spec(raw: dict[str, Any]) -> FinetuneSpec | ScoreSpec:
    """Validate a spec read from a job file or a database row."""
    kind = raw.get("kind", "finetune")
    if kind not in SPEC_CLASSES:
        raise ValueError(f"unknown job kind {kind!r}; tuneq runs: {', '.join(SPEC_CLASSES)}")
    return SPEC_CLASSES[kind].model_validate(raw)
