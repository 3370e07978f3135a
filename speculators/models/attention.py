"""Attention masks of the draft's test-time-training (TTT) unroll, as dense SDPA and as flex attention.

At TTT step k the keys are the step-0 keys plus one copy of every position per later step (KV length
(k+1)*T, step-major). Query t sees its document's causal prefix at step 0 and its own copies at steps
1..k; a padding query (document id -1) sees only its own diagonal, so no softmax row is empty.

Three ways to compute it, equal up to rounding: "flex" (a BlockMask, compiled on CUDA), "dense" (one
SDPA over the whole packed row with a [T, (k+1)T] mask: the reference) and "documents" (one SDPA per
document over its own keys only: sum of L^2 instead of T^2 work, the CPU default).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from speculators.models.layers import Attend

KINDS = ("auto", "dense", "documents", "flex")


def resolve_kind(kind: str, device: torch.device) -> str:
    """ "auto" -> flex on CUDA (compiled kernels), per-document SDPA elsewhere (flex has no CPU
    backward, and a dense mask over the packed row wastes most of its work on masked pairs)."""
    if kind not in KINDS:
        raise ValueError(f"attention must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        return "flex" if device.type == "cuda" else "documents"
    return kind


def ttt_mask_mod(document_ids: Tensor):
    """flex-attention mask_mod over (query, key) for document ids [T]; keys may span several steps."""
    t = document_ids.shape[0]

    def mask_mod(b, h, q, kv):
        kv_pos = kv % t
        same_doc_prefix = (q >= kv) & (document_ids[q] == document_ids[kv_pos])
        return (same_doc_prefix & (document_ids[q] != -1)) | (kv_pos == q)

    return mask_mod


def dense_ttt_mask(document_ids: Tensor, step: int) -> Tensor:
    """Boolean mask [T, (step+1)*T], True = attend; the same pattern as `ttt_mask_mod`."""
    t = document_ids.shape[0]
    pos = torch.arange(t, device=document_ids.device)
    same_doc = document_ids[:, None] == document_ids[None, :]
    causal = pos[:, None] >= pos[None, :]
    step0 = (causal & same_doc & (document_ids[:, None] != -1)) | (pos[:, None] == pos[None, :])
    eye = torch.eye(t, dtype=torch.bool, device=document_ids.device)
    return torch.cat([step0] + [eye] * step, dim=1)


def document_runs(document_ids: Tensor) -> list[tuple[int, int, bool]] | None:
    """Maximal runs (start, end, is_padding) of equal ids in [T]; None if a document is split.

    A document whose positions are not contiguous cannot be cut out as one block (its later piece
    attends to the earlier one), so callers fall back to the dense mask then.
    """
    ids = document_ids.tolist()
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            runs.append((start, i, ids[start] == -1))
            start = i
    documents = [ids[s] for s, _, pad in runs if not pad]
    return runs if len(documents) == len(set(documents)) else None


def _run_mask(length: int, step: int, padding: bool, device: torch.device) -> Tensor:
    """[L, (step+1)*L] for one run: causal (or, for padding, diagonal) at step 0, diagonal after."""
    eye = torch.eye(length, dtype=torch.bool, device=device)
    first = eye if padding else torch.ones_like(eye).tril()
    return torch.cat([first] + [eye] * step, dim=1)


# Compiled flex graphs kept per function: one per (KV length, grad mode), i.e. 2 * ttt_steps
# in a run that validates. Past dynamo's default of 8 (ttt_steps >= 5) flex would silently run
# unfused, materialising every score matrix.
FLEX_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_flex():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older one
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), FLEX_RECOMPILE_LIMIT))
            break
    return torch.compile(flex_attention, dynamic=False)


class TTTAttention:
    """Builds one `attend(q, k, v)` per TTT step for a packed batch with document ids [T]."""

    def __init__(self, document_ids: Tensor, kind: str = "auto"):
        self.document_ids = document_ids
        self.kind = resolve_kind(kind, document_ids.device)
        self._runs: list[tuple[int, int, bool]] | None = None

    def for_step(self, step: int) -> Attend:
        if self.kind == "flex":
            return self._flex(step)
        if self.kind == "documents":
            if self._runs is None:
                self._runs = document_runs(self.document_ids) or []
            if self._runs:
                return self._documents(step)
        return self._dense(step)

    def _dense(self, step: int) -> Attend:
        mask = dense_ttt_mask(self.document_ids, step)[None, None]

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        return attend

    def _documents(self, step: int) -> Attend:
        runs, t = self._runs, self.document_ids.shape[0]
        device = self.document_ids.device
        # built once per step and shared by every layer; None = plain causal (no mask tensor)
        masks = [
            None if step == 0 and not padding else _run_mask(e - s, step, padding, device)
            for s, e, padding in runs
        ]

        def attend(q, k, v):
            outs = []
            for (s, e, _), mask in zip(runs, masks, strict=True):
                if mask is None:
                    outs.append(
                        F.scaled_dot_product_attention(
                            q[:, :, s:e],
                            k[:, :, s:e],
                            v[:, :, s:e],
                            is_causal=True,
                            enable_gqa=True,
                        )
                    )
                    continue
                # this run's keys at every step so far, step-major, as in the packed row
                keys = torch.cat([k[:, :, j * t + s : j * t + e] for j in range(step + 1)], dim=2)
                values = torch.cat([v[:, :, j * t + s : j * t + e] for j in range(step + 1)], dim=2)
                outs.append(
                    F.scaled_dot_product_attention(
                        q[:, :, s:e], keys, values, attn_mask=mask, enable_gqa=True
                    )
                )
            return torch.cat(outs, dim=2)

        return attend

    def _flex(self, step: int) -> Attend:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        t = self.document_ids.shape[0]
        device = self.document_ids.device
        # One BlockMask per step (K is small); compiled mask creation avoids a dense [T, KV] tensor.
        block_mask = create_block_mask(
            ttt_mask_mod(self.document_ids),
            None,
            None,
            t,
            (step + 1) * t,
            device=device,
            _compile=device.type == "cuda",
        )
        fn = _compiled_flex() if device.type == "cuda" else flex_attention

        def attend(q, k, v):
            return fn(q, k, v, block_mask=block_mask, enable_gqa=True)

        return attend


def causal_attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain causal attention for a single document whose queries are the last keys (inference)."""
    n_q, n_k = q.shape[2], k.shape[2]
    if n_q == 1:  # one new query sees every cached key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if n_q == n_k:  # a fresh prefix
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    # new positions after a cached prefix: query i is key n_k - n_q + i
    assert n_q < n_k, "causal_attend: more queries than keys"
    keys = torch.arange(n_k, device=q.device)
    mask = keys[None, :] <= (n_k - n_q + torch.arange(n_q, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
