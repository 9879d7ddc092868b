"""Job specifications: what a user asks for, validated before anything is queued.

Each field's description is also the help text of the matching CLI option.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


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
    text_column: str = Field("text", description="Column that holds the text.")
    label_column: str = Field("label", description="Column that holds the label (int or string).")
    label_names: list[str] | None = Field(
        None,
        description="Names for integer labels 0, 1, … in order, e.g. negative,positive.",
    )
    train_size: Annotated[int, Field(ge=2)] | None = Field(
        None, description="Train on this many rows, drawn by a seeded shuffle; default: all."
    )
    eval_size: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Evaluate on this many rows (seeded shuffle); default: all, or 20% "
        "held out when there is no evaluation data.",
    )
    max_length: int = Field(256, ge=8, le=8192, description="Truncate texts to this many tokens.")
    epochs: float = Field(1.0, gt=0, le=100, description="Training epochs.")
    batch_size: int = Field(8, ge=1, le=4096, description="Training batch size.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate.")
    warmup: float = Field(
        0.1, ge=0, description="Warm-up: a fraction of the steps (< 1) or a number of steps."
    )
    weight_decay: float = Field(0.01, ge=0, lt=1, description="AdamW weight decay.")
    seed: int = Field(42, description="Seed for the shuffle, the new head and the Trainer.")
    queue: str = Field("cpu", description="Worker queue to send the job to.")

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


JobSpec = FinetuneSpec


def parse_spec(raw: dict[str, Any]) -> JobSpec:
    """Validate a spec read from a job file or a database row."""
    kind = raw.get("kind", "finetune")
    if kind != "finetune":
        raise ValueError(f"unknown job kind {kind!r}; tuneq runs: finetune")
    return FinetuneSpec.model_validate(raw)
