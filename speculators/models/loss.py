"""Per-step TTT loss of the draft: masked forward KL over the draft vocabulary, in fp32, chunk by chunk.

The gradient is formed chunk by chunk during the forward pass (a fused linear + KL), so fp32 logits of
all K steps never exist at once. Also the accuracy statistics (sums, so ranks can all-reduce them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of one fp32 logits chunk (rows x draft vocab): 2**24 floats = 64 MiB per live tensor.
CHUNK_ELEMENTS = 1 << 24


def step_valid_mask(loss_mask: Tensor, document_ids: Tensor, step: int) -> Tensor:
    """Which positions t < T-step have a target at `step`: loss_mask[t+step] and t+step in t's document."""
    t = loss_mask.shape[0]
    if step >= t:
        return torch.zeros(0, dtype=torch.bool, device=loss_mask.device)
    target_doc = document_ids[step:]
    same_doc = (document_ids[: t - step] == target_doc) & (target_doc != -1)
    return same_doc & loss_mask[step:].bool()


def shifted_tokens(input_ids: Tensor, document_ids: Tensor, step: int) -> Tensor:
    """Teacher-forced input of `step`: token t+step of t's document, 0 past a document's end."""
    out = torch.zeros_like(input_ids)
    t = input_ids.shape[0]
    if step >= t:
        return out
    same_doc = document_ids[: t - step] == document_ids[step:]
    out[: t - step] = torch.where(same_doc, input_ids[step:], 0)
    return out


def _compute_dtype(x: Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _FusedStepKL(torch.autograd.Function):
    """Masked KL(target || draft) summed over positions, with its gradient computed chunk by chunk
    in the forward pass: only [rows, Vd] fp32 blocks ever exist and nothing is recomputed later."""

    @staticmethod
    def forward(ctx, x, weight, target_x, target_weight, valid, rows: int):
        dtype = _compute_dtype(x)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w, tw = weight.to(dtype), target_weight.to(dtype)
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        kl_total = torch.zeros((), dtype=torch.float32, device=x.device)
        correct = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, x.shape[0], rows):
                sl = slice(start, start + rows)
                xc, m = x[sl].to(dtype), valid[sl].to(torch.float32)
                logits = (xc @ w.T).float()
                target = (target_x[sl].to(dtype) @ tw.T).float()
                target_logp = F.log_softmax(target, dim=-1)
                draft_logp = F.log_softmax(logits, dim=-1)
                target_p = target_logp.exp()
                kl_total += ((target_p * (target_logp - draft_logp)).sum(-1) * m).sum()
                correct[sl] = logits.argmax(-1) == target.argmax(-1)
                if need_x or need_w:
                    # d KL / d logits = softmax(draft) - softmax(target), per valid position
                    g = ((draft_logp.exp() - target_p) * m[:, None]).to(dtype)
                    if need_x:
                        grad_x[sl] = (g @ w).to(x.dtype)
                    if need_w:
                        grad_w += (g.T @ xc).float()
        ctx.mark_non_differentiable(correct)
        # Kept until backward: in the compute dtype (bf16 under autocast), K of them are alive.
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_x if need_x else None, grad_w.to(dtype) if need_w else None)
        return kl_total, correct

    @staticmethod
    def backward(ctx, grad_kl, _grad_correct):
        grad_x, grad_w = ctx.saved_tensors
        return (
            grad_x * grad_kl.to(grad_x.dtype) if grad_x is not None else None,
            (grad_w * grad_kl.to(grad_w.dtype)).to(ctx.weight_dtype)
            if grad_w is not None
            else None,
            None,
            None,
            None,
            None,
        )


def step_kl(
    x: Tensor,
    weight: Tensor,
    target_x: Tensor,
    target_weight: Tensor,
    valid: Tensor,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Summed masked KL(target || draft) and per-position greedy agreement for one aligned step.

    x [N,H]: the draft's normed output states, weight [Vd,H] its LM head; target_x [N,H]: the
    target's normed last states already shifted by the step, target_weight [Vd,H]; valid [N] bool.
    Logits are fp32 (matmuls in the autocast dtype when autocast is on). Returns (kl_sum, correct).
    """
    rows = max(1, chunk_elements // weight.shape[0])
    return _FusedStepKL.apply(x, weight, target_x.detach(), target_weight.detach(), valid, rows)


def step_metrics(stats: dict[str, Tensor | float], ttt_steps: int) -> dict[str, float]:
    """Turn summed stats (after any all-reduce) into per-step KL, accuracies and acceptance length.

    cond_acc_k = full_k / prev_k (greedy agreement at step k given steps 0..k-1 agreed);
    full_acc_k = prod_{j<=k} cond_acc_j, the chance that the first k+1 drafts are all accepted;
    chaining the conditionals keeps full_acc non-increasing even though the set of positions that
    have a step-k target shrinks with k. acceptance_length = 1 + sum_k full_acc_k.
    """
    out: dict[str, float] = {}
    full_acc = 1.0
    acceptance = 1.0
    for k in range(ttt_steps):
        count = float(stats[f"count_{k}"])
        prev = float(stats[f"prev_{k}"])
        full = float(stats[f"full_{k}"])
        cond = full / prev if prev > 0 else 0.0
        full_acc *= cond
        acceptance += full_acc
        out[f"kl_{k}"] = float(stats[f"kl_{k}"]) / count if count > 0 else 0.0
        out[f"cond_acc_{k}"] = cond
        out[f"full_acc_{k}"] = full_acc
    out["acceptance_length"] = acceptance
    return out
