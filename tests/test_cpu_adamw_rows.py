"""tuneq's AdamW kernel for the word embeddings: the rows a step has touched get torch's fused
AdamW update, the others their weight decay alone, which is what torch's update computes for a
row whose gradient and moments are zero. Checked against torch's own fused AdamW, step for
step, on the parameters, both moments and the step count, and through the optimizer's step
hooks as tuneq's Trainer uses them, a resumed optimizer included."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import needs_cpu_kernel
from tuneq.worker.ml import cpu_adamw_rows
from tuneq.worker.ml.cpu_step import EmbeddingRowsStep, SparseEmbeddingGrad


@pytest.fixture(autouse=True)
def needs_kernel() -> None:
    """Skips where the CPU lacks AVX2 (see :func:`needs_cpu_kernel`)."""
    needs_cpu_kernel("AdamW rows", cpu_adamw_rows.unavailable, cpu_adamw_rows.library)


ROWS, WIDTH = 300, 48
HYPER = {"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to within a rounding (torch's vector code may fuse a multiply-add that the kernel
    rounds in two on another CPU; on the CPUs measured they are equal to the bit)."""
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-12)


def touched(step: int) -> torch.Tensor:
    """The rows step ``step`` touches: a few of the first hundred, some seen before."""
    generator = torch.Generator().manual_seed(step)
    return torch.randperm(100, generator=generator)[:12]


def sparse_grad(rows: torch.Tensor, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    grad = torch.zeros(ROWS, WIDTH)
    grad[rows] = torch.randn(len(rows), WIDTH, generator=generator) * 0.1
    return grad


def test_the_kernel_steps_as_torchs_fused_adamw() -> None:
    """Six steps, the learning rate changing and the clip's grad_scale on some: the kernel's
    parameters, moments, step and (scaled) gradient against torch's fused AdamW's."""
    start = torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(0))
    reference = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([reference], fused=True, **HYPER)
    group = optimizer.param_groups[0]
    ours = start.clone()
    state = cpu_adamw_rows.new_state(ours)
    live = torch.zeros(ROWS, dtype=torch.bool)
    for step in range(1, 7):
        rows = touched(step)
        live[rows] = True
        grad = sparse_grad(rows, step)
        scale = torch.tensor(2.5) if step % 2 else None
        group["lr"] = HYPER["lr"] * (1 - step / 10)  # as a schedule moves it
        reference.grad = grad.clone()
        optimizer.grad_scale = scale  # fused AdamW divides the gradients by it
        optimizer.step()
        our_grad = grad.clone()
        cpu_adamw_rows.update(ours, our_grad, state, group, live, scale)
        theirs = optimizer.state[reference]
        close(ours, reference.detach())
        close(state["exp_avg"], theirs["exp_avg"])
        close(state["exp_avg_sq"], theirs["exp_avg_sq"])
        close(our_grad, reference.grad)  # left divided by grad_scale, as torch's are
        assert float(state["step"]) == float(theirs["step"]) == step
    # rows no step touched were decayed, nothing more, in both; and the touched moved further
    never = ~live
    assert never.sum() == ROWS - live.sum() > 150
    assert torch.equal(ours[never], reference.detach()[never])
    assert not torch.equal(ours[never], start[never])  # the decay did apply
    assert torch.all(state["exp_avg"][never] == 0) and torch.all(state["exp_avg_sq"][never] == 0)
    assert (ours[live] - start[live]).abs().mean() > 10 * (ours[never] - start[never]).abs().mean()


def test_a_touched_row_left_out_of_live_is_updated_wrongly() -> None:
    """The live rows matter: a touched row the kernel is told is not live gets the decay only,
    and differs from torch's."""
    start = torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(0))
    reference = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([reference], fused=True, **HYPER)
    ours, state = start.clone(), cpu_adamw_rows.new_state(start)
    rows = touched(1)
    reference.grad = sparse_grad(rows, 1)
    optimizer.step()
    live = torch.zeros(ROWS, dtype=torch.bool)
    live[rows[1:]] = True  # the first touched row left out
    cpu_adamw_rows.update(ours, sparse_grad(rows, 1), state, optimizer.param_groups[0], live)
    assert not torch.allclose(ours[rows[0]], reference.detach()[rows[0]])
    close(ours[rows[1:]], reference.detach()[rows[1:]])


def test_live_rows_are_those_with_moments() -> None:
    state = cpu_adamw_rows.new_state(torch.zeros(6, 4))
    state["exp_avg"][1, 2] = 1e-9
    state["exp_avg_sq"][4, 0] = 1e-20
    assert cpu_adamw_rows.live_rows(state).tolist() == [False, True, False, False, True, False]


def test_handles_only_what_it_computes() -> None:
    weight = torch.nn.Parameter(torch.zeros(5, 4))

    def group(**options: Any) -> dict[str, Any]:
        return torch.optim.AdamW([weight], **{"fused": True, **options}).param_groups[0]

    assert cpu_adamw_rows.handles(group(), weight)
    assert not cpu_adamw_rows.handles(group(fused=False), weight)
    assert not cpu_adamw_rows.handles(group(amsgrad=True), weight)
    assert not cpu_adamw_rows.handles(group(maximize=True), weight)
    assert not cpu_adamw_rows.handles(group(), torch.zeros(5, 4, dtype=torch.bfloat16))
    assert not cpu_adamw_rows.handles(group(), torch.zeros(4, 5).t())  # not contiguous
    assert not cpu_adamw_rows.handles(group(), torch.zeros(20))
    adam = torch.optim.Adam([weight], fused=True)  # Adam's decay is not AdamW's
    assert not cpu_adamw_rows.handles(adam.param_groups[0], weight)


def embedding_steps(
    embedding: torch.nn.Embedding,
    other: torch.nn.Parameter,
    optimizer: torch.optim.AdamW,
    steps: range,
    sparse: SparseEmbeddingGrad | None,
) -> None:
    """Steps of a loss on the rows each step touches (and on ``other``); with ``sparse``, the
    embedding's gradient is made sparse and densified as tuneq's Trainer does before the
    optimizer."""
    for step in steps:
        optimizer.zero_grad()
        generator = torch.Generator().manual_seed(2000 + step)
        ids = touched(step).reshape(3, 4)
        target = torch.randn(3, 4, WIDTH, generator=generator)
        loss = ((embedding(ids) - target) ** 2).mean() + (other**2).sum()
        loss.backward()
        if sparse is not None:
            sparse.densify()
        optimizer.step()


def test_the_optimizers_hooks_step_the_matrix_and_a_resumed_one_knows_its_live_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the step hooks, beside another parameter that torch's step keeps: the same
    model as torch's AdamW on the dense gradient, before and after a resume from the state
    dict (whose rows with moments must be updated in full though no step since touched them)."""
    start = torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(5))

    def model() -> tuple[torch.nn.Embedding, torch.nn.Parameter]:
        embedding = torch.nn.Embedding(ROWS, WIDTH)
        embedding.weight.data.copy_(start)
        return embedding, torch.nn.Parameter(torch.ones(7))

    theirs, their_other = model()
    their_optimizer = torch.optim.AdamW([theirs.weight, their_other], fused=True, **HYPER)
    ours, our_other = model()
    ours.sparse = True
    our_optimizer = torch.optim.AdamW([ours.weight, our_other], fused=True, **HYPER)
    sparse = SparseEmbeddingGrad(ours)
    assert EmbeddingRowsStep.applies(our_optimizer, ours.weight)
    rows_step = EmbeddingRowsStep(our_optimizer, sparse)
    updated: list[torch.Tensor] = []  # the matrices the kernel updated
    update = cpu_adamw_rows.update

    def spy(param: torch.Tensor, *args: Any) -> None:
        updated.append(param)
        update(param, *args)

    monkeypatch.setattr(cpu_adamw_rows, "update", spy)

    embedding_steps(theirs, their_other, their_optimizer, range(1, 4), None)
    embedding_steps(ours, our_other, our_optimizer, range(1, 4), sparse)
    assert len(updated) == 3 and all(param is ours.weight for param in updated)
    close(ours.weight.detach(), theirs.weight.detach())
    close(our_other.detach(), their_other.detach())
    assert not torch.equal(our_other.detach(), torch.ones(7))  # torch's step moved it
    assert rows_step.live is not None and rows_step.live.sum() > 12
    saved = our_optimizer.state_dict()
    rows_step.remove()

    # a new process resumes: a new optimizer loads the state, and the hooks attach again
    resumed = torch.optim.AdamW([ours.weight, our_other], fused=True, **HYPER)
    resumed.load_state_dict(saved)
    resumed_step = EmbeddingRowsStep(resumed, SparseEmbeddingGrad(ours))
    embedding_steps(theirs, their_other, their_optimizer, range(20, 23), None)
    embedding_steps(ours, our_other, resumed, range(20, 23), resumed_step.sparse)
    close(ours.weight.detach(), theirs.weight.detach())
    state, their_state = resumed.state[ours.weight], their_optimizer.state[theirs.weight]
    close(state["exp_avg"], their_state["exp_avg"])
    assert float(state["step"]) == float(their_state["step"]) == 6
    assert len(updated) == 6
    resumed_step.remove()
    assert not resumed._optimizer_step_pre_hooks and not resumed._optimizer_step_post_hooks
