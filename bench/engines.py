"""ONNX Runtime and OpenVINO as CPU scoring engines, for the side-by-side scoring benchmark.

The model is exported from the same folder tuneq scores with (TorchScript exporter, dynamic
batch and length), fused by ORT's transformer optimizer (attention, LayerNorm, GELU), and, for
ORT's best quantized mode, the fused graph dynamically quantized to int8 weights by ORT's own
tool. OpenVINO compiles the same ONNX files. Batches are made as tuneq makes them
(length-sorted under a token budget), so that the comparison is of the engines, not of the
batching. Needs ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def available(engine: str) -> bool:
    """Whether ``engine`` (onnxruntime, openvino) is installed."""
    try:
        __import__(engine)
    except ImportError:
        return False
    return True


def export(folder: str, target: Path) -> tuple[Path, Path]:
    """The model in ``folder`` as ``target/model.onnx`` (fp32) and ``target/model.int8.onnx``
    (ORT dynamic quantization: int8 weights, activations quantized per batch)."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    target.mkdir(parents=True, exist_ok=True)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sample = tokenizer(["a sample review", "another"], padding=True, return_tensors="pt")
    fp32, int8 = target / "model.onnx", target / "model.int8.onnx"
    axes = {name: {0: "batch", 1: "length"} for name in INPUTS}
    with torch.no_grad():
        torch.onnx.export(
            model,
            tuple(sample[name] for name in INPUTS),
            str(fp32),
            input_names=list(INPUTS),
            output_names=["logits"],
            dynamic_axes={**axes, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    # ORT's own recipe for BERT: fuse attention, LayerNorm and GELU, then quantize the fused
    # graph's weights to int8.
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(
        str(fp32),
        model_type="bert",
        num_heads=model.config.num_attention_heads,
        hidden_size=model.config.hidden_size,
    )
    fused.save_model_to_file(str(fp32))
    quantize_dynamic(
        str(fp32),
        str(int8),
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # fused ops' outputs
    )
    return fp32, int8


def onnxruntime_session(path: Path, threads: int) -> Any:
    """A function from a feed of int64 arrays to logits, on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    runner = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: runner.run(["logits"], feed)[0]


def openvino_session(path: Path, threads: int, precision: str = "f32") -> Any:
    """The same on OpenVINO's CPU plugin, latency mode, in ``precision`` (f32, or bf16: its
    default on a CPU that computes bf16, and its fastest mode there)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        str(path),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision},
    )
    request = compiled.create_infer_request()
    return lambda feed: request.infer(feed)[compiled.output(0)]


SESSIONS = {"onnxruntime": onnxruntime_session, "openvino": openvino_session}


def classify(
    engine: str, path: Path, folder: str, texts: list[str], threads: int, **options: str
) -> tuple[list[int], float]:
    """Label ids for ``texts`` in order, and the seconds it took (tokenizing included, the
    session built and warmed up before); ``options`` go to the engine's session."""
    from transformers import AutoTokenizer

    from tuneq.worker.ml.predict import CPU_BATCH_TOKENS, length_batches

    tokenizer = AutoTokenizer.from_pretrained(folder)
    run = SESSIONS[engine](path, threads, **options)

    def feed(padded: Any) -> dict[str, np.ndarray]:
        ids = padded["input_ids"].astype(np.int64)
        return {
            "input_ids": ids,
            "attention_mask": padded["attention_mask"].astype(np.int64),
            "token_type_ids": np.zeros_like(ids),
        }

    run(
        feed(
            tokenizer(texts[:8], padding=True, truncation=True, max_length=512, return_tensors="np")
        )
    )
    started = time.perf_counter()
    encoded = tokenizer(texts, truncation=True, max_length=512)["input_ids"]
    labels = np.zeros(len(texts), dtype=np.int64)
    for batch in length_batches([len(ids) for ids in encoded], CPU_BATCH_TOKENS):
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="np")
        labels[batch] = run(feed(padded)).argmax(axis=1)
    return labels.tolist(), time.perf_counter() - started
