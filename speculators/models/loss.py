"""Per-step TTT loss of the draft: masked forward KL over the draft vocabulary, in fp32, chunk by chunk.

Each chunk of positions recomputes its logits in backward (activation checkpointing), so fp32 logits of
all K steps never exist at once. Also the accuracy statistics (sums, so ranks can all-reduce them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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


def _chunk_kl(draft_head, target_head, hidden: Tensor, last: Tensor, valid: Tensor):
    logits = draft_head(hidden).float()
    with torch.no_grad():
        target = target_head(last).float()
        target_logp = F.log_softmax(target, dim=-1)
        target_p = target_logp.exp()
    draft_logp = F.log_softmax(logits, dim=-1)
    kl = (target_p * (target_logp - draft_logp)).sum(-1)
    kl_sum = (kl * valid).sum()
    correct = logits.detach().argmax(-1) == target.argmax(-1)
    return kl_sum, correct


def step_kl(
    draft_head: Callable[[Tensor], Tensor],
    target_head: Callable[[Tensor], Tensor],
    hidden: Tensor,
    last: Tensor,
    valid: Tensor,
    vocab_size: int,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Summed masked KL(target || draft) and per-position greedy agreement for one aligned step.

    hidden [N,H] are the draft's pre-norm states, last [N,H] the target's last-layer states already
    shifted by the step, valid [N] bool. Returns (kl_sum with grad, correct [N] bool).
    """
    n = hidden.shape[0]
    rows = max(1, chunk_elements // vocab_size)
    kl_total = hidden.new_zeros((), dtype=torch.float32)
    correct = []
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        args = (draft_head, target_head, hidden[sl], last[sl], valid[sl].float())
        if torch.is_grad_enabled() and hidden.requires_grad:
            kl_sum, ok = checkpoint(_chunk_kl, *args, use_reentrant=False)
        else:
            kl_sum, ok = _chunk_kl(*args)
        kl_total = kl_total + kl_sum
        correct.append(ok)
    if not correct:
        return kl_total, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return kl_total, torch.cat(correct)


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
