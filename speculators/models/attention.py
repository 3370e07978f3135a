"""Attention masks of the draft's test-time-training (TTT) unroll, as dense SDPA and as flex attention.

At TTT step k the keys are the step-0 keys plus one copy of every position per later step (KV length
(k+1)*T, step-major). Query t sees its document's causal prefix at step 0 and its own copies at steps
1..k; a padding query (document id -1) sees only its own diagonal, so no softmax row is empty.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from speculators.models.layers import Attend

KINDS = ("auto", "dense", "flex")


def resolve_kind(kind: str, device: torch.device) -> str:
    """ "auto" -> flex on CUDA (compiled kernels), dense elsewhere (flex has no CPU backward)."""
    if kind not in KINDS:
        raise ValueError(f"attention must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        return "flex" if device.type == "cuda" else "dense"
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


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class TTTAttention:
    """Builds one `attend(q, k, v)` per TTT step for a packed batch with document ids [T]."""

    def __init__(self, document_ids: Tensor, kind: str = "auto"):
        self.document_ids = document_ids
        self.kind = resolve_kind(kind, document_ids.device)
        self._step0 = None

    def for_step(self, step: int) -> Attend:
        if self.kind == "flex":
            return self._flex(step)
        return self._dense(step)

    def _dense(self, step: int) -> Attend:
        mask = dense_ttt_mask(self.document_ids, step)[None, None]

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

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
    if q.shape[2] == 1:  # one new query sees every cached key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert q.shape[2] == k.shape[2], "causal_attend expects a fresh prefix"
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
