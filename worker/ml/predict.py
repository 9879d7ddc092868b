"""Labelling texts with a fine-tuned classifier: length-sorted batches under a token budget,
no gradients, each model loaded once per process, in fp32, bf16 or int8."""

from __future__ import annotations

import copy
import json
import logging
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tuneq.schemas.errors import ModelError
from tuneq.worker.ml.device import avoid_cudnn_attention

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
# Default token budgets per batch (rows × padded length). On the 2-core CPU 8,192 and 16,384 ran
# no faster than 4,096. On an H200, MiniLM-shaped bf16 scoring of 6,000 IMDB reviews ran at
# 9,513 rows/s at 32,768 and 7,830 at 65,536 (bench/results/gpu_score.json).
CPU_BATCH_TOKENS, GPU_BATCH_TOKENS = 4096, 32768
# Texts tokenized per call. A fast tokenizer keeps every truncated text's overflow, offsets and
# token strings until the call returns: 10,000 IMDB reviews at once took 650 MB, 500 took 150.
TOKENIZE_CHUNK = 512
# Texts sorted by length together: a window is tokenized on a thread while the model runs on
# the one before it. A shard of up to this many rows is one window, sorted as a whole.
SORT_WINDOW = 4096


@dataclass(frozen=True)
class Prediction:
    """A text's label (by the model's own names) and that label's probability; for a
    regression model, its value (and the label is the value, printed)."""

    label: str
    score: float
    value: float | None = None


@dataclass(frozen=True)
class Classifier:
    """A loaded model, ready to label texts."""

    model: Any
    tokenizer: Any
    device: Any
    precision: str
    labels: list[str]
    temperature: float = 1.0  # fitted on the evaluation rows when the model was trained
    target_scale: tuple[float, float] | None = None  # a regression model's (mean, std)
    thresholds: list[float] | None = None  # a multi-label model's, one per label
    separator: str = "|"  # joins a multi-label model's labels in one field

    @property
    def regression(self) -> bool:
        return self.target_scale is not None


@lru_cache(maxsize=4)
def load_for_inference(
    folder: str, precision: str = "fp32", trust_remote_code: bool = False
) -> Classifier:
    """The classifier in ``folder``, loaded once per process and precision."""
    import torch

    from tuneq.worker.ml import first_token
    from tuneq.worker.ml.models import load_classifier, load_tokenizer, quiet_transformers

    quiet_transformers()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(folder, folder, trust_remote_code=trust_remote_code)
    model = load_classifier(folder, folder, trust_remote_code=trust_remote_code).eval()
    if precision == "int8":
        if device.type != "cpu":
            raise ModelError("int8 scoring runs on a CPU; use --precision bf16 on a GPU")
        from torch.ao.quantization import quantize_dynamic

        model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    model = model.to(device)
    avoid_cudnn_attention()
    if device.type == "cuda" and precision == "bf16":
        # bf16 weights rather than autocast, which casts every weight again in every batch:
        # on a GPU, where launching kernels sets the pace for a model this size, those casts
        # are as many launches again.
        model = model.to(torch.bfloat16)
    if device.type == "cpu" and precision in ("fp32", "bf16"):
        from tuneq.worker.ml import cpu_attention, cpu_norm, onednn

        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        if dtype == torch.bfloat16 and onednn.available(dtype):
            # The whole model in bf16, not bf16 autocast over fp32 weights, which casts the
            # activations back and forth around every LayerNorm, GELU and residual add. On the
            # Xeon (AMX), alternating runs over 300 IMDB reviews: 38.8-43.5 rows/s in bf16,
            # 37.7-39.6 under autocast; labels as fp32 on 99.85 % of 2,000.
            model = model.to(dtype)
            cpu_attention.use_for(model)
            cpu_norm.use_for(model)
        elif dtype == torch.float32:
            # 400 IMDB reviews on the AVX2 EPYC, alternating: 19.2-19.6 rows/s against
            # 17.4-19.2 with torch's attention, the same probabilities to 6e-8
            cpu_attention.use_fp32_kernel(model, training=False)
        onednn.pack_linear_layers(model, dtype)
    first_token.use_for(model)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    log.info("loaded %s for %s scoring on %s", folder, precision, device)
    manifest = read_manifest(folder)
    calibration = manifest.get("calibration") or {}
    temperature = float(calibration.get("temperature", 1.0))
    problem = getattr(model.config, "problem_type", None)
    thresholds = None
    if problem == "multi_label_classification":
        thresholds = manifest.get("thresholds") or [0.5] * len(labels)
    return Classifier(
        model,
        tokenizer,
        device,
        precision,
        labels,
        temperature,
        target_scale(model, manifest),
        thresholds,
        manifest.get("label_separator") or "|",
    )


def read_manifest(folder: str) -> dict[str, Any]:
    """The ``tuneq.json`` of a tuneq model; empty for any other model."""
    path = Path(folder) / "tuneq.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def target_scale(model: Any, manifest: dict[str, Any]) -> tuple[float, float] | None:
    """How a regression model's outputs map back to its targets; None for a classifier."""
    if getattr(model.config, "problem_type", None) != "regression":
        return None
    scale = manifest.get("target_scale") or {}
    return float(scale.get("mean", 0.0)), float(scale.get("std", 1.0))


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size (rows × longest)
    stays within ``batch_tokens``; short texts share big batches, long ones small ones."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def classify(
    classifier: Classifier,
    texts: list[str],
    *,
    max_length: int = 512,
    batch_tokens: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> np.ndarray:
    """Probabilities, one row per text in the given order, one column per label (the logits
    divided by the model's fitted temperature); for a regression model, one column: the
    predicted value.

    ``batch_tokens`` defaults to the device's budget; ``on_batch`` runs before each batch (a
    cancellation check may raise there)."""
    logits = model_outputs(
        classifier, texts, max_length=max_length, batch_tokens=batch_tokens, on_batch=on_batch
    )
    if classifier.target_scale is not None:
        mean, std = classifier.target_scale
        return logits * std + mean
    if classifier.thresholds is not None:  # one independent probability per label
        return 1 / (1 + np.exp(-logits))
    scaled = logits / classifier.temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def model_outputs(
    classifier: Classifier,
    texts: list[str],
    *,
    max_length: int,
    batch_tokens: int | None,
    on_batch: Callable[[], None] | None,
) -> np.ndarray:
    """The model's raw outputs (logits, fp32), one row per text in the given order."""
    import torch

    if batch_tokens is None:
        on_gpu = classifier.device.type == "cuda"
        batch_tokens = GPU_BATCH_TOKENS if on_gpu else CPU_BATCH_TOKENS

    device = classifier.device
    outputs = np.zeros((len(texts), len(classifier.labels)), dtype=np.float32)
    # On a GPU the logits stay there until the end, so that nothing waits for the GPU and the
    # next batches are padded and queued while it computes; on a CPU they are copied at once.
    on_device: list[tuple[list[int], Any]] = []
    # bf16 autocast where the weights are fp32 (a CPU without oneDNN's bf16); a model loaded
    # in bf16 computes in bf16 as it is.
    autocast = classifier.precision == "bf16" and classifier.model.dtype != torch.bfloat16
    with torch.inference_mode():
        for offset, encoded in tokenized_windows(classifier.tokenizer, texts, max_length):
            for batch in length_batches([len(ids) for ids in encoded], batch_tokens):
                if on_batch is not None:
                    on_batch()
                inputs = padded(classifier.tokenizer, [encoded[i] for i in batch], device)
                with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                    logits = classifier.model(**inputs).logits.float()
                rows = [offset + i for i in batch]
                if device.type == "cuda":
                    on_device.append((rows, logits))
                else:
                    outputs[rows] = logits.numpy()
    if on_device:
        rows = [row for batch_rows, _ in on_device for row in batch_rows]
        outputs[rows] = torch.cat([logits for _, logits in on_device]).cpu().numpy()
    return outputs


def tokenized_windows(
    tokenizer: Any, texts: list[str], max_length: int
) -> Iterator[tuple[int, list[list[int]]]]:
    """``(offset, token ids)`` for each window of texts in order; the next window is tokenized
    on a thread (the tokenizer's Rust code runs without the GIL) while the caller works on this
    one. The first window is one tokenizing chunk, so that the model starts after the first
    ``TOKENIZE_CHUNK`` texts rather than a whole window (on a GPU, where tokenizing sets the
    pace, that wait was a third of a 6,000-row call); the rest are ``SORT_WINDOW`` texts."""
    to_ids = token_ids(tokenizer, max_length)

    def encode(window: range) -> list[list[int]]:
        ids: list[list[int]] = []
        for chunk in range(window.start, window.stop, TOKENIZE_CHUNK):
            ids += to_ids(texts[chunk : min(chunk + TOKENIZE_CHUNK, window.stop)])
        return ids

    first = min(TOKENIZE_CHUNK, SORT_WINDOW)
    bounds = [0, *range(first, len(texts), SORT_WINDOW), len(texts)]
    windows = [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    if len(windows) <= 1:  # one window (or none): nothing to overlap
        yield 0, encode(windows[0]) if windows else []
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as ahead:
        coming = ahead.submit(encode, windows[0])
        for index, window in enumerate(windows):
            encoded = coming.result()
            if index + 1 < len(windows):
                coming = ahead.submit(encode, windows[index + 1])
            yield window.start, encoded


def token_ids(tokenizer: Any, max_length: int) -> Callable[[list[str]], list[list[int]]]:
    """Texts to their token ids, special tokens added and truncated to ``max_length``, as
    ``tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]`` gives them.

    A fast tokenizer's Rust backend is called directly, through a copy set to truncate: it
    skips the offsets, and the attention masks and type ids that the wrapper turns into Python
    lists one row at a time while every other core waits (on 16 cores that conversion, not the
    tokenizing, sets the pace of GPU scoring). Other tokenizers go through their own call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return lambda texts: tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    encoder = truncating_encoder(tokenizer, backend, max_length)
    return lambda texts: [encoding.ids for encoding in encoder.encode_batch_fast(texts)]


# Each tokenizer's truncating copies of its backend, by (max_length, truncation side): a copy
# costs about 19 ms (the whole vocabulary), once per shard and twice more in the parity gate.
_ENCODERS: weakref.WeakKeyDictionary[Any, dict[tuple[int, str], Any]] = weakref.WeakKeyDictionary()


def truncating_encoder(tokenizer: Any, backend: Any, max_length: int) -> Any:
    """A copy of ``tokenizer``'s backend that truncates to ``max_length`` on the tokenizer's
    side and does not pad, made once per tokenizer and setting. A copy, because the wrapper
    resets its own backend's truncation on every call."""
    side = getattr(tokenizer, "truncation_side", "right")
    made = _ENCODERS.setdefault(tokenizer, {})
    if (max_length, side) not in made:
        encoder = copy.copy(backend)
        encoder.no_padding()
        encoder.enable_truncation(max_length, direction=side)
        made[max_length, side] = encoder
    return made[max_length, side]


def padded(tokenizer: Any, rows: list[list[int]], device: Any) -> dict[str, Any]:
    """A batch of token ids padded to its longest row, with its attention mask, on
    ``device``; on a GPU copied from pinned memory without waiting for the copy."""
    import torch

    longest = max(len(ids) for ids in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = np.full((len(rows), longest), pad, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for row, ids in enumerate(rows):
        where = slice(longest - len(ids), longest) if left else slice(0, len(ids))
        input_ids[row, where] = ids
        mask[row, where] = 1
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def agreement(classifier: Classifier, reference: np.ndarray, candidate: np.ndarray) -> float:
    """The share of rows on which two runs of ``classify`` give the same answer: the same
    label; for a multi-label model the same label set; for a regression model a value within
    1 % of the target's standard deviation."""
    if len(reference) == 0:
        return 1.0
    if classifier.target_scale is not None:
        tolerance = 0.01 * classifier.target_scale[1]
        same = np.abs(reference[:, 0] - candidate[:, 0]) <= tolerance
    elif classifier.thresholds is not None:
        thresholds = np.asarray(classifier.thresholds)
        same = ((reference >= thresholds) == (candidate >= thresholds)).all(axis=1)
    else:
        same = reference.argmax(axis=1) == candidate.argmax(axis=1)
    return float(same.mean())


def predict_texts(
    folder: Path, texts: list[str], *, precision: str = "fp32", max_length: int = 512
) -> list[Prediction]:
    """Label ``texts`` in their order."""
    classifier = load_for_inference(str(folder), precision)
    probabilities = classify(classifier, texts, max_length=max_length)
    if classifier.regression:
        values = probabilities[:, 0].astype(float)
        return [Prediction(label=f"{v:.3f}", score=float("nan"), value=v) for v in values]
    if classifier.thresholds is not None:
        chosen = probabilities >= np.asarray(classifier.thresholds)
        return [
            Prediction(
                label=label_set(classifier, row),
                score=float(probabilities[i][row].min()) if row.any() else 0.0,
            )
            for i, row in enumerate(chosen)
        ]
    best = probabilities.argmax(axis=1)
    return [
        Prediction(label=classifier.labels[i], score=float(probabilities[row, i]))
        for row, i in enumerate(best)
    ]


def label_set(classifier: Classifier, chosen: np.ndarray) -> str:
    """A multi-label model's labels for one text, joined as its training data joined them."""
    return classifier.separator.join(
        name for name, on in zip(classifier.labels, chosen, strict=True) if on
    )
