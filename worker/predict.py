"""Labelling texts with a fine-tuned classifier: length-sorted batches, no gradients."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from tuneq.schemas.errors import ModelError
from tuneq.worker.store import find_model


@dataclass(frozen=True)
class Prediction:
    """A text's label (by the model's own names) and that label's probability."""

    label: str
    score: float


def model_folder(engine: Engine, ref: str) -> Path:
    """The folder of ``ref``: a registered ``name`` or ``name:version``, or a model folder.

    A bare name is looked up in the registry first; a ref with a slash or a leading dot is a
    folder.
    """
    path = Path(ref).expanduser()
    looks_like_path = "/" in ref or os.sep in ref or ref.startswith((".", "~"))
    if looks_like_path or (path.is_dir() and not has_model(engine, ref)):
        if not path.is_dir():
            raise ModelError(f"model folder {ref} does not exist")
        if not (path / "config.json").is_file():
            raise ModelError(f"{ref} is not a model folder: it has no config.json")
        return path.resolve()
    folder = Path(find_model(engine, ref).path)
    if not folder.is_dir():
        raise ModelError(f"model {ref!r} is registered at {folder}, but that folder is missing")
    return folder


def has_model(engine: Engine, ref: str) -> bool:
    try:
        find_model(engine, ref)
    except ModelError:
        return False
    return True


@lru_cache(maxsize=4)
def load_for_inference(folder: str) -> tuple[Any, Any, Any]:
    """Model, tokenizer and device for ``folder``, loaded once per process."""
    import torch

    from tuneq.worker.models import load_classifier, load_tokenizer, quiet_transformers

    quiet_transformers()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(folder, folder)
    model = load_classifier(folder, folder).to(device).eval()
    return model, tokenizer, device


def predict_texts(
    folder: Path, texts: list[str], *, batch_size: int = 32, max_length: int = 512
) -> list[Prediction]:
    """Label ``texts`` in their order; batches are formed from length-sorted texts."""
    import torch

    model, tokenizer, device = load_for_inference(str(folder))
    id2label = model.config.id2label
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    results: list[Prediction | None] = [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            logits = model(**{k: v.to(device) for k, v in padded.items()}).logits
            probabilities = torch.softmax(logits.float(), dim=-1)
            scores, labels = probabilities.max(dim=-1)
            for i, label, score in zip(batch, labels.tolist(), scores.tolist(), strict=True):
                results[i] = Prediction(label=id2label[label], score=score)
    return [r for r in results if r is not None]
