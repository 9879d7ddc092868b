"""tuneq's dropout kernel draws torch's distribution (each element kept with probability 1 - p,
kept ones scaled by 1 / (1 - p)), independently per element, reproducibly from torch's seed,
with a backward pass that uses the forward's mask; fine-tunes use it where it runs, and every
call it does not handle goes to torch's dropout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import LEARNS, needs_cpu_kernel, unavailable
from tuneq.schemas.specs import FinetuneSpec
from tuneq.worker.ml import cpu_dropout, kernels
from tuneq.worker.ml.cpu_dropout import KernelDropout, apply, new_seed, use_for
from tuneq.worker.ml.finetune import MANIFEST, finetune

AVX2 = "flags : fpu sse2 avx avx2 fma bmi2"
SSE_ONLY = "flags : fpu sse2 sse4_2"


def needs_kernel() -> None:
    """Skips where the CPU lacks AVX2 (see :func:`needs_cpu_kernel`)."""
    needs_cpu_kernel("dropout", cpu_dropout.unavailable, cpu_dropout.library)


@pytest.fixture(autouse=True)
def fresh_library():
    """Each test sees the setting it sets: the loaded kernel (or its absence) is cached."""
    cpu_dropout.library.cache_clear()
    yield
    cpu_dropout.library.cache_clear()


def test_it_runs_only_on_x86_with_avx2_and_the_setting_on(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert "avx2" in str(cpu_dropout.unavailable(SSE_ONLY))
    assert cpu_dropout.unavailable(AVX2) is None
    monkeypatch.setenv("TUNEQ_DROPOUT_KERNEL", "off")
    assert "off" in str(cpu_dropout.unavailable(AVX2))
    monkeypatch.delenv("TUNEQ_DROPOUT_KERNEL")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert "x86-64" in str(cpu_dropout.unavailable(AVX2))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_each_element_is_kept_with_probability_1_minus_p_and_scaled(p: float):
    needs_kernel()
    n = 2**21
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    y = apply(x, p, seed=12345)
    kept = y != 0
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * sigma
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(y[kept], x[kept] * scale)
    # independent draws: neighbours, elements 4,096 apart (the kernel's blocks) and every
    # block of 16,384 elements keep at the rates independence gives
    for gap in (1, 7, 4096):
        both = (kept[gap:] & kept[:-gap]).double().mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5, gap
    rates = kept.view(-1, 16384).double().mean(dim=1)
    block_sigma = (p * (1 - p) / 16384) ** 0.5
    assert (rates - (1 - p)).abs().max().item() < 5 * block_sigma
    # another seed, another mask, drawn independently of the first
    other = apply(x, p, seed=12346) != 0
    overlap = (kept & other).double().mean().item()
    assert abs(overlap - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5


def test_bf16_is_scaled_in_fp32_and_rounded_once():
    needs_kernel()
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = apply(x, 0.1, seed=7)
    kept = y != 0
    assert y.dtype == torch.bfloat16
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    assert torch.equal(y[kept], (x[kept].float() * torch.tensor(1 / 0.9)).bfloat16())
    # zeros are x * 0, as in torch's: a NaN stays NaN wherever it is
    nan = apply(torch.full((1000,), float("nan")).bfloat16(), 0.5, seed=1)
    assert nan.isnan().all()


def test_the_mask_depends_on_the_seed_only_not_on_threads():
    needs_kernel()
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = apply(x, 0.1, seed=99)
        torch.set_num_threads(max(2, threads))
        many = apply(x, 0.1, seed=99)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_the_backward_pass_uses_the_forward_mask_and_torch_seeds_it():
    needs_kernel()
    dropout = KernelDropout(0.2).train()
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(3), requires_grad=True)
    weights = torch.randn(64, 48, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    y = dropout(x)
    (y * weights).sum().backward()
    kept = y.detach() != 0
    assert 0.7 < kept.float().mean().item() < 0.9
    assert x.grad is not None
    assert torch.equal(x.grad, torch.where(kept, weights * torch.tensor(1 / 0.8), 0.0))
    torch.manual_seed(0)
    assert torch.equal(dropout(x.detach()), y.detach())  # reseeded: the same mask
    assert not torch.equal(dropout(x.detach()), y.detach())  # the next call: another


def test_a_profiler_recording_shapes_runs_it_with_every_seed():
    """torch's profiler with ``record_shapes`` records the autograd Function's arguments, the
    seed among them, as C++ integers: a seed of 2**63 or more failed to convert and stopped the
    fine-tune being profiled. The masks stay those of the seed's 64 bits."""
    needs_kernel()
    dropout = KernelDropout(0.1).train()
    x = torch.randn(8, 20, 64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    torch.manual_seed(0)
    seeds = [new_seed() for _ in range(16)]
    assert any(seed % 2**64 >= 2**63 for seed in seeds)  # one with its top bit set
    torch.manual_seed(0)
    with torch.profiler.profile(record_shapes=True) as profiler:
        outputs = []
        for _ in seeds:
            y = dropout(x)
            y.sum().backward()
            outputs.append(y.detach())
    recorded = {event.key for event in profiler.key_averages(group_by_input_shape=True)}
    assert {"_Dropout", "_DropoutBackward"} <= recorded
    for seed, y in zip(seeds, outputs, strict=True):
        assert torch.equal(y, apply(x.detach(), 0.1, seed % 2**64))


def test_what_it_does_not_handle_goes_to_torch(monkeypatch: pytest.MonkeyPatch):
    dropout = KernelDropout(0.1)
    x = torch.randn(32, 16)
    assert torch.equal(dropout.eval()(x), x)  # evaluation: the identity
    dropout.train()
    doubled = dropout(x.double())  # float64: torch's dropout
    assert doubled.dtype == torch.float64 and ((doubled == 0) | (doubled != 0)).all()
    assert torch.equal(KernelDropout(0.0).train()(x), x)
    assert torch.equal(KernelDropout(1.0).train()(x), torch.zeros_like(x))
    monkeypatch.setenv("TUNEQ_DROPOUT_KERNEL", "off")
    cpu_dropout.library.cache_clear()
    assert not cpu_dropout.handles(x, 0.1)


def test_models_get_it_where_it_runs(tiny_model: Path, monkeypatch: pytest.MonkeyPatch):
    from transformers import AutoModelForSequenceClassification

    needs_kernel()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    dropouts = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert dropouts > 0
    assert use_for(model) == dropouts
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, KernelDropout))
    assert cpu_dropout.in_use(model)
    monkeypatch.setenv("TUNEQ_DROPOUT_KERNEL", "off")
    cpu_dropout.library.cache_clear()
    assert use_for(AutoModelForSequenceClassification.from_pretrained(tiny_model)) == 0


def test_a_fine_tune_trains_with_it_and_records_so(
    tiny_model: Path, reviews_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """With the kernel and with torch's dropout (the setting off), the same job learns; the
    job's metrics and manifest say which one trained it."""
    needs_kernel()
    recorded = {}
    for name, setting in (("kernel", "on"), ("torch", "off")):
        monkeypatch.setenv("TUNEQ_DROPOUT_KERNEL", setting)
        cpu_dropout.library.cache_clear()
        spec = FinetuneSpec(data=str(reviews_csv), model=str(tiny_model), train_size=120)
        result = finetune(spec.model_copy(update=LEARNS), tmp_path / name)
        manifest = json.loads((tmp_path / name / MANIFEST).read_text())
        assert result.metrics["accuracy"] >= 0.9, (name, result.metrics["accuracy"])
        recorded[name] = (
            result.metrics["training"]["dropout_kernel"],
            manifest["training"]["dropout_kernel"],
        )
    assert recorded == {"kernel": (True, True), "torch": (False, False)}


def test_the_image_build_step_builds_every_kernel(tmp_path: Path, monkeypatch):
    if kernels.compiler() is None:
        unavailable("no C compiler (cc or gcc) here")
    import subprocess
    import sys

    monkeypatch.setenv("TUNEQ_KERNEL_CACHE", str(tmp_path))
    built = subprocess.run(
        [sys.executable, "-m", "tuneq.worker.ml.kernels"],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout.split()
    assert sorted(Path(path).name.split("-")[0] for path in built) == [
        "cpu_adamw_rows",
        "cpu_attention_bf16",
        "cpu_attention_f32",
        "cpu_dropout",
        "cpu_norm_bf16",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(p).name for p in built)
