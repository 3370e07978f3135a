"""The fused chunked fp32 KL: same values and gradients as plain autograd, and the metric arithmetic."""

import pytest
import torch
import torch.nn.functional as F

from speculators.models.loss import step_kl, step_metrics


def _heads(h=16, vd=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    draft = torch.nn.Linear(h, vd, bias=False)
    target = torch.nn.Linear(h, vd, bias=False)
    with torch.no_grad():
        draft.weight.copy_(torch.randn(vd, h, generator=g))
        target.weight.copy_(torch.randn(vd, h, generator=g))
    return draft, target


@pytest.mark.parametrize("rows", [1, 3, 7, 1000])
def test_chunked_kl_equals_a_direct_kl_with_the_same_gradients(rows):
    draft, target = _heads()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    last = torch.randn(23, 16, generator=g)
    valid = torch.rand(23, generator=g) > 0.3

    kl, correct = step_kl(hidden, draft.weight, last, target.weight, valid, rows * 50)
    kl.backward()
    assert target.weight.grad is None  # targets carry no gradient
    grad_chunked = (hidden.grad.clone(), draft.weight.grad.clone())
    hidden.grad = None
    draft.weight.grad = None

    with torch.no_grad():
        p = F.softmax(target(last), -1)
    direct = (p * (p.log() - F.log_softmax(draft(hidden), -1))).sum(-1)[valid].sum()
    direct.backward()
    torch.testing.assert_close(kl, direct)
    torch.testing.assert_close(grad_chunked[0], hidden.grad)
    torch.testing.assert_close(grad_chunked[1], draft.weight.grad)
    assert torch.equal(correct, draft(hidden).argmax(-1) == target(last).argmax(-1))


def test_kl_is_computed_in_fp32_from_bf16_states():
    draft, target = _heads()
    draft, target = draft.to(torch.bfloat16), target.to(torch.bfloat16)
    hidden = torch.randn(9, 16, dtype=torch.bfloat16, requires_grad=True)
    last = torch.randn(9, 16).bfloat16()
    kl, _ = step_kl(hidden, draft.weight, last, target.weight, torch.ones(9).bool())
    assert kl.dtype == torch.float32 and kl > 0
    kl.backward()
    assert torch.isfinite(hidden.grad.float()).all()


def test_empty_step_gives_zero_and_no_positions():
    draft, target = _heads()
    empty = torch.zeros(0, 16)
    kl, correct = step_kl(empty, draft.weight, empty, target.weight, torch.zeros(0).bool())
    assert kl.item() == 0.0 and correct.shape == (0,)


def test_metrics_chain_conditional_accuracies():
    stats = {"kl_0": 4.0, "count_0": 8, "prev_0": 8, "full_0": 6}
    stats |= {"kl_1": 3.0, "count_1": 6, "prev_1": 5, "full_1": 4}
    stats |= {"kl_2": 0.0, "count_2": 4, "prev_2": 0, "full_2": 0}
    m = step_metrics(stats, 3)
    assert m["kl_0"] == 0.5 and m["kl_1"] == 0.5
    assert m["cond_acc_0"] == 0.75 and m["cond_acc_1"] == 0.8 and m["cond_acc_2"] == 0.0
    assert m["full_acc_0"] == 0.75 and m["full_acc_1"] == pytest.approx(0.6)
    assert m["acceptance_length"] == pytest.approx(1 + 0.75 + 0.6)
