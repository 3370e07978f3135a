"""The draft's Llama building blocks: attention with a step-growing KV list, gated MLP, decoder layers.

Layer 0 is EAGLE-3's first layer (q/k/v read `cat(input_layernorm(embed), hidden_norm(h))`, 2H wide);
later layers are plain Llama layers. Parameter names match what vLLM's Eagle3 Llama draft loads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm as RMSNorm

# attend(q [B,nH,T,hd], k [B,nKV,S,hd], v [B,nKV,S,hd]) -> [B,nH,T,hd]
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]

__all__ = ["Attend", "DecoderLayer", "FirstDecoderLayer", "KVCache", "RMSNorm"]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B,heads,T,hd] by cos/sin [B,T,hd] (Llama's half-split convention, as in vLLM)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """One layer's keys/values, one (k, v) entry per TTT step.

    A plain object rather than a list on purpose: module wrappers that rebuild their arguments
    through pytree (FSDP2's post-backward hook, mixed-precision input casts) copy lists, so
    entries appended to a list argument would be lost between steps.
    """

    def __init__(self):
        self.entries: list[tuple[Tensor, Tensor]] = []

    def append(self, kv: tuple[Tensor, Tensor]) -> None:
        self.entries.append(kv)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class Attention(nn.Module):
    """Grouped-query attention whose keys/values accumulate in `cache` (one entry per TTT step)."""

    def __init__(self, cfg, in_features: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(in_features, q_out, bias=False)
        self.k_proj = nn.Linear(in_features, kv_out, bias=False)
        self.v_proj = nn.Linear(in_features, kv_out, bias=False)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, attend: Attend
    ) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.append((k, v))
        # Keys of all steps so far, step-major: key j*T + i is position i at step j.
        keys = torch.cat([c[0] for c in cache], dim=2) if len(cache) > 1 else k
        values = torch.cat([c[1] for c in cache], dim=2) if len(cache) > 1 else v
        out = attend(q, keys, values)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act_fn = ACT2FN[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FirstDecoderLayer(nn.Module):
    """EAGLE-3 layer 0: attention over [normed token embedding | normed fused state], 2H wide."""

    def __init__(self, cfg):
        super().__init__()
        h = cfg.hidden_size
        self.norm_before_residual = cfg.norm_before_residual
        self.input_layernorm = RMSNorm(h, eps=cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, 2 * h)
        self.post_attention_layernorm = RMSNorm(h, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, embeds, hidden, cos, sin, cache, attend: Attend) -> Tensor:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        hidden = residual + self.self_attn(x, cos, sin, cache, attend)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DecoderLayer(nn.Module):
    """A standard pre-norm Llama decoder layer (draft layers 1..N-1)."""

    def __init__(self, cfg):
        super().__init__()
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, h)
        self.post_attention_layernorm = RMSNorm(h, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, hidden, cos, sin, cache, attend: Attend) -> Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, cache, attend)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))
