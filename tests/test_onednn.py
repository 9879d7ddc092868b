"""Linear layers packed for oneDNN compute what ``nn.Linear`` does, in a whole classifier too."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import unavailable
from tuneq.worker.ml.onednn import PackedLinear, available, pack_linear_layers
from tuneq.worker.ml.predict import load_for_inference


@pytest.fixture(autouse=True)
def onednn_fp32() -> None:
    if not available(torch.float32):
        unavailable("oneDNN's fp32 linear does not run on this machine")


@pytest.mark.parametrize("shape", [(8, 256, 384), (1, 500, 384), (3, 17, 384), (5, 384)], ids=str)
def test_a_packed_layer_computes_what_linear_computes(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 1536)
    packed = PackedLinear(linear, torch.float32)
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected, got = linear(x), packed(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_a_packed_layer_takes_a_strided_input() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64, 10).transpose(1, 2)  # not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear, torch.float32)(x), linear(x))


def test_a_layer_with_gelu_computes_gelu_of_linear() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 1536)
    x = torch.randn(3, 50, 384)
    with torch.inference_mode():
        expected = torch.nn.functional.gelu(linear(x))
        got = PackedLinear(linear, torch.float32, gelu=True)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_a_bf16_layer_computes_what_autocast_computes() -> None:
    if not available(torch.bfloat16):
        pytest.skip("this CPU has no bf16 for oneDNN")  # fp32 is what CI needs from this file
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 384)
    x = torch.randn(4, 100, 384)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        expected = linear(x)
        got = PackedLinear(linear, torch.bfloat16)(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_a_packed_classifier_gives_the_same_probabilities(trained_tiny_model: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(trained_tiny_model).eval()
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    packed = copy.deepcopy(model)
    assert pack_linear_layers(packed, torch.float32) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    # each feed-forward block's GELU is folded into its first product
    fused = [m for m in packed.modules() if isinstance(m, PackedLinear) and m.gelu]
    assert len(fused) == model.config.num_hidden_layers
    assert not any(type(m).__name__ == "GELUActivation" for m in packed.modules())

    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_model)
    texts = ["superb loved it", "awful dull worst of the year", "brilliant moving film", "hated"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = model(**inputs).logits.softmax(-1)
        got = packed(**inputs).logits.softmax(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_scoring_on_the_cpu_loads_packed_layers(trained_tiny_model: Path) -> None:
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if not available(dtype):
            continue
        model = load_for_inference(str(trained_tiny_model), precision).model
        layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
        assert layers and all(m.dtype == dtype for m in layers)
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        # in bf16 the whole model is bf16 (embeddings, LayerNorm): no casts around each op
        assert {p.dtype for p in model.parameters()} <= {dtype}
