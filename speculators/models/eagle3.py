"""The EAGLE-3 draft model: its config, per-sample alignment, the TTT training forward and greedy drafting.

The module is plain PyTorch (no distributed code); `speculators.train` wraps it, the evaluator calls
`propose`, and `speculators.models.io` writes it in the speculators format that vLLM serves.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from speculators.errors import SpeculatorsError
from speculators.models.attention import TTTAttention, causal_attend
from speculators.models.layers import DecoderLayer, FirstDecoderLayer, KVCache, RMSNorm
from speculators.models.loss import shifted_tokens, step_kl, step_valid_mask

INIT_STD = 0.02  # Llama's initializer_range


def target_text_config(target: str | Path) -> dict:
    """The target's config.json as a dict (the text part for multimodal targets)."""
    path = Path(target) / "config.json"
    if not path.is_file():
        raise SpeculatorsError(path, "target config.json not found")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpeculatorsError(path, f"not valid JSON ({e})") from None
    return cfg.get("text_config") or cfg


def _rope_parameters(cfg: dict) -> dict:
    """RoPE settings in transformers-5 form, from either rope_parameters or rope_theta/rope_scaling."""
    if cfg.get("rope_parameters"):
        params = dict(cfg["rope_parameters"])
    else:
        params = dict(cfg.get("rope_scaling") or {})
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params["rope_theta"] = cfg.get("rope_theta", 10000.0)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return params


@dataclass
class Eagle3DraftConfig:
    """Every number needed to rebuild an EAGLE-3 draft. `vocab_size` is the target's vocabulary,
    `draft_vocab_size` the draft head's; aux_layer_ids use vLLM's convention (input of layer i)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: list[int]
    num_layers: int = 1
    ttt_steps: int = 3
    norm_before_residual: bool = True
    norm_before_fc: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 1e4}
    )
    target_hidden_size: int | None = None  # aux state width when it differs from hidden_size

    @property
    def aux_width(self) -> int:
        return len(self.aux_layer_ids) * (self.target_hidden_size or self.hidden_size)

    @classmethod
    def from_target(
        cls,
        target: str | Path,
        *,
        draft_vocab_size: int,
        aux_layer_ids: list[int],
        num_layers: int = 1,
        ttt_steps: int = 3,
        norm_before_residual: bool = True,
        norm_before_fc: bool = False,
        intermediate_size: int | None = None,
    ) -> Eagle3DraftConfig:
        """Dimensions, RoPE and head_dim from the target's config.json (no weights are read).

        MLP width: `intermediate_size` if given, else the target's dense `intermediate_size`; an MoE
        target whose config has none (only expert widths) falls back to 3 * hidden_size.
        """
        cfg = target_text_config(target)
        where = Path(target) / "config.json"
        for key in ("hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers"):
            if key not in cfg:
                raise SpeculatorsError(where, f"missing {key!r}")
        h, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
        ids = [int(i) for i in aux_layer_ids]
        if not ids or len(set(ids)) != len(ids) or not all(0 <= i <= n_layers for i in ids):
            raise SpeculatorsError(
                "aux_layer_ids", f"{ids} must be distinct layer ids in 0..{n_layers} of {where}"
            )
        if not 1 <= draft_vocab_size <= cfg["vocab_size"]:
            raise SpeculatorsError(
                "draft_vocab_size", f"{draft_vocab_size} not in 1..{cfg['vocab_size']} ({where})"
            )
        return cls(
            hidden_size=h,
            intermediate_size=intermediate_size or cfg.get("intermediate_size") or 3 * h,
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or h // cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            draft_vocab_size=draft_vocab_size,
            aux_layer_ids=ids,
            num_layers=num_layers,
            ttt_steps=ttt_steps,
            norm_before_residual=norm_before_residual,
            norm_before_fc=norm_before_fc,
            hidden_act=cfg.get("hidden_act", "silu"),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_parameters=_rope_parameters(cfg),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Eagle3DraftConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SpeculatorsError("draft config", f"unknown keys {sorted(unknown)}")
        return cls(**d)

    def transformer_layer_config(self) -> dict:
        """The draft decoder as a Llama config dict (vLLM's `transformer_layer_config`).

        RoPE is written both as transformers-5 `rope_parameters` and as `rope_theta`/`rope_scaling`
        so readers built on either transformers generation rebuild the same rotary embedding.
        """
        rope = dict(self.rope_parameters)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        return {
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "initializer_range": INIT_STD,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "rope_theta": rope["rope_theta"],
            "rope_scaling": None if scaling.get("rope_type") == "default" else scaling,
            "rope_parameters": rope,
        }


def align_sample(input_ids: Tensor, hidden_states: list[Tensor], loss_mask: Tensor) -> dict:
    """Shift one captured sample [S] so draft position t pairs token x[t+1] with aux states of t.

    hidden_states[:-1] are the aux layers, hidden_states[-1] the target's last (pre-norm) layer.
    Returns input_ids, aux [S-1, n_aux*H], last [S-1, H], loss_mask, position_ids (1..S-1).
    """
    aux = torch.cat(list(hidden_states[:-1]), dim=-1)
    return {
        "input_ids": input_ids[1:],
        "aux": aux[:-1],
        "last": hidden_states[-1][1:],
        "loss_mask": loss_mask[1:],
        "position_ids": torch.arange(1, input_ids.shape[0], device=input_ids.device),
    }


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Eagle3DraftModel(nn.Module):
    """EAGLE-3 draft: fc(aux) and the token embedding feed N Llama layers, a norm and a draft LM head.

    Frozen, copied from the target by `from_target`: `embed_tokens` [V,H], `verifier_norm` (the
    target's final norm) and `verifier_lm_head` (target LM-head rows selected by t2d); the last two
    only make training targets and are not saved. `d2t` [Vd] int64 and `t2d` [V] bool are buffers.
    """

    def __init__(self, config: Eagle3DraftConfig):
        super().__init__()
        self.config = config
        h, v, vd = config.hidden_size, config.vocab_size, config.draft_vocab_size
        self.embed_tokens = _frozen(nn.Embedding(v, h))
        self.input_norm = (
            RMSNorm(config.aux_width, config.rms_norm_eps) if config.norm_before_fc else None
        )
        self.fc = nn.Linear(config.aux_width, h, bias=False)
        self.layers = nn.ModuleList(
            [FirstDecoderLayer(config)]
            + [DecoderLayer(config) for _ in range(config.num_layers - 1)]
        )
        self.norm = RMSNorm(h, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(h, vd, bias=False)
        self.verifier_norm = _frozen(RMSNorm(h, eps=config.rms_norm_eps))
        self.verifier_lm_head = _frozen(nn.Linear(h, vd, bias=False))
        # identity until loaded when the draft keeps the full vocabulary (nothing to load then)
        self.register_buffer("d2t", torch.zeros(vd, dtype=torch.long))
        self.register_buffer("t2d", torch.full((v,), vd == v, dtype=torch.bool))
        self.rotary_emb = LlamaRotaryEmbedding(LlamaConfig(**config.transformer_layer_config()))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random trainable weights (normal, std 0.02; norms 1); frozen target parts zero until loaded."""
        for p in self.parameters():
            if not p.requires_grad:
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, INIT_STD)

    @classmethod
    def from_target(
        cls, config: Eagle3DraftConfig, target: str | Path, d2t: np.ndarray | Tensor | None, t2d
    ) -> Eagle3DraftModel:
        """A fresh draft with embedding, verifier norm and LM-head rows read from the target's files
        (d2t = t2d = None for a full-vocabulary draft)."""
        model = cls(config)
        model.load_target_weights(target, d2t, t2d)
        return model

    @torch.no_grad()
    def load_target_weights(self, target: str | Path, d2t, t2d) -> None:
        from speculators.models.io import check_vocab_mapping, read_target_weights

        d2t, t2d = check_vocab_mapping(
            d2t, t2d, self.config.vocab_size, self.config.draft_vocab_size
        )
        w = read_target_weights(target, self.config.vocab_size, self.config.hidden_size)
        rows = w["lm_head"][t2d].float()
        self.embed_tokens.weight.copy_(w["embed"].float())
        self.verifier_norm.weight.copy_(w["norm"].float())
        self.verifier_lm_head.weight.copy_(rows)
        self.lm_head.weight.copy_(rows)
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    # ---- heads -------------------------------------------------------------------------------
    def draft_logits(self, hidden: Tensor) -> Tensor:
        """Draft-vocab logits from the draft's pre-norm output states."""
        return self.lm_head(self.norm(hidden))

    def target_logits(self, last: Tensor) -> Tensor:
        """Training targets: the target's logits over the draft vocab, from its pre-norm last states."""
        return self.verifier_lm_head(self.verifier_norm(last))

    def _layers(self, embeds, hidden, position_ids, caches, attend) -> Tensor:
        cos, sin = self.rotary_emb(hidden, position_ids)
        hidden = self.layers[0](embeds, hidden, cos, sin, caches[0], attend)
        for layer, cache in zip(self.layers[1:], caches[1:], strict=True):
            hidden = layer(hidden, cos, sin, cache, attend)
        return hidden

    def _fuse(self, aux: Tensor) -> Tensor:
        return self.fc(self.input_norm(aux) if self.input_norm is not None else aux)

    def unroll(self, input_ids, aux, position_ids, document_ids, ttt_steps: int, attention="auto"):
        """Yield the draft's pre-norm output states [1,T,H] of TTT steps 0..ttt_steps-1 (teacher-forced)."""
        ttt = TTTAttention(document_ids[0], attention)
        hidden = self._fuse(aux)
        caches = [KVCache() for _ in self.layers]
        for k in range(ttt_steps):
            ids = shifted_tokens(input_ids[0], document_ids[0], k)[None]
            hidden = self._layers(
                self.embed_tokens(ids), hidden, position_ids + k, caches, ttt.for_step(k)
            )
            yield hidden

    def forward(
        self,
        input_ids: Tensor,
        aux: Tensor,
        last: Tensor,
        loss_mask: Tensor,
        position_ids: Tensor,
        document_ids: Tensor,
        *,
        ttt_steps: int,
        loss_decay: float = 1.0,
        attention: str = "auto",
        count_normalizer: Sequence[float] | Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Training step on one packed batch (batch size 1, T positions, document id -1 = padding).

        Returns (loss, stats): loss = sum_k loss_decay**k * masked-mean KL(target || draft) at step k,
        where step k's logits at t are scored against the target at t+k (same document, loss_mask[t+k]).
        stats are detached sums: kl_k, count_k (positions with a step-k target), full_k (of those,
        greedy-correct at steps 0..k) and prev_k (correct at steps 0..k-1; = count_0 for k = 0).
        count_normalizer [ttt_steps], if given, replaces this batch's count_k as step k's divisor
        (e.g. the count over all ranks divided by the world size, for a global token mean).
        """
        t, cfg = input_ids.shape[1], self.config
        expected = {
            "input_ids": (1, t),
            "aux": (1, t, cfg.aux_width),
            "last": (1, t, cfg.target_hidden_size or cfg.hidden_size),
            "loss_mask": (1, t),
            "position_ids": (1, t),
            "document_ids": (1, t),
        }
        given = dict(zip(expected, (input_ids, aux, last, loss_mask, position_ids, document_ids)))
        for name, shape in expected.items():
            if tuple(given[name].shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(given[name].shape)}")
        mask, docs = loss_mask[0], document_ids[0]
        with torch.no_grad():
            target_x = self.verifier_norm(last[0])
        chain = torch.ones(t, dtype=torch.bool, device=input_ids.device)
        loss = aux.new_zeros((), dtype=torch.float32)
        stats: dict[str, Tensor] = {}
        steps = self.unroll(input_ids, aux, position_ids, document_ids, ttt_steps, attention)
        for k, hidden in enumerate(steps):
            n = max(t - k, 0)
            valid = step_valid_mask(mask, docs, k)
            kl_sum, correct = step_kl(
                self.norm(hidden[0, :n]),
                self.lm_head.weight,
                target_x[k:],
                self.verifier_lm_head.weight,
                valid,
            )
            count = valid.sum()
            prev = (valid & chain[:n]).sum()
            chain[:n] &= correct
            divisor = count.clamp(min=1) if count_normalizer is None else count_normalizer[k]
            loss = loss + (loss_decay**k) * kl_sum / divisor
            stats[f"kl_{k}"] = kl_sum.detach()
            stats[f"count_{k}"] = count
            stats[f"full_{k}"] = (valid & chain[:n]).sum()
            stats[f"prev_{k}"] = prev
        return loss, stats

    @torch.no_grad()
    def propose(
        self, tokens: Tensor, aux: Tensor, k: int, state: DraftState | None = None
    ) -> Tensor:
        """Greedy draft of k target-vocab token ids following tokens[0, -1].

        tokens [1, n+1], aux [1, n, n_aux*H] (the target's aux states at positions 0..n-1). Step 0
        runs over the n positions (position t sees embed(tokens[t+1]) and fc(aux[t]), position id
        t+1); then k-1 steps at the last position feed back its pre-norm state and the drafted token,
        attending to the step-0 prefix and its own earlier copies, as in training.

        With a `state` from an earlier call on a prefix of the same sequence (decoding appends
        the accepted tokens and their aux states), step 0 runs only over the new positions and
        attends to the cached keys of the old ones; any other sequence starts the state afresh.
        """
        n = aux.shape[1]
        if tokens.shape != (1, n + 1):
            raise ValueError(f"tokens must be [1, {n + 1}] for aux of length {n}")
        state = state if state is not None else DraftState()
        m = state.reuse(tokens, len(self.layers))
        if m >= n:  # nothing new to encode, but the last position's output is not kept
            m = state.reset(len(self.layers))
        state.tokens = None  # until this call succeeds: an exception leaves no half-state
        position_ids = torch.arange(m + 1, n + 1, device=tokens.device)[None]
        embeds = self.embed_tokens(tokens[:, m + 1 :])
        hidden = self._layers(
            embeds, self._fuse(aux[:, m:]), position_ids, state.caches, causal_attend
        )
        state.merge()
        hidden = hidden[:, -1:]
        drafted = []
        for j in range(k):
            best = self.draft_logits(hidden)[0, -1].argmax()
            token = best + self.d2t[best]
            drafted.append(token)
            if j + 1 < k:
                pos = position_ids[:, -1:] + j + 1
                hidden = self._layers(
                    self.embed_tokens(token.view(1, 1)), hidden, pos, state.caches, causal_attend
                )
        state.finish(tokens)
        return torch.stack(drafted)


class DraftState:
    """The draft's step-0 keys/values of the positions encoded so far for one growing sequence.

    Speculative decoding only ever appends (accepted tokens and their aux states), so each
    proposal encodes just the new positions instead of the whole prefix again.
    """

    def __init__(self):
        self.caches: list[KVCache] = []
        self.tokens: Tensor | None = None  # tokens[0, : m + 1] of the m encoded positions

    def reuse(self, tokens: Tensor, num_layers: int) -> int:
        """Positions of `tokens` already encoded (0 after a reset for another sequence)."""
        prev = self.tokens
        m = 0 if prev is None else prev.shape[1] - 1
        if m <= 0 or tokens.shape[1] < m + 1 or not torch.equal(tokens[:, : m + 1], prev):
            return self.reset(num_layers)
        return m

    def reset(self, num_layers: int) -> int:
        self.caches = [KVCache() for _ in range(num_layers)]
        self.tokens = None
        return 0

    def merge(self) -> None:
        """Step 0 now covers every position: one cache entry per layer, before drafting."""
        for cache in self.caches:
            if len(cache) > 1:
                keys = torch.cat([e[0] for e in cache], dim=2)
                values = torch.cat([e[1] for e in cache], dim=2)
                cache.entries = [(keys, values)]

    def finish(self, tokens: Tensor) -> None:
        """Forget the drafted positions' keys (the next proposal encodes what was accepted) and
        record the encoded sequence; until then `tokens` is None, so a failed call resets."""
        for cache in self.caches:
            del cache.entries[1:]
        self.tokens = tokens.clone()
