"""Chain speculative decoding with a transformers target: draft K, verify in one forward.

The target keeps one DynamicCache per prompt; a verification step feeds only the last emitted
token plus the K draft tokens and crops the cache back to the accepted prefix on rejection.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Proposer(Protocol):
    """A draft: given tokens x_0..x_n and the target's aux states at 0..n-1, propose k tokens."""

    def propose(self, tokens: torch.Tensor, aux: torch.Tensor, k: int) -> torch.Tensor: ...


def _crop(cache, keep: int) -> None:
    """Drop cached positions past `keep` (rejected draft tokens)."""
    extra = cache.get_seq_length() - keep
    if extra <= 0:
        return
    # transformers 5 takes a negative count of tokens to remove, 4.x the length to keep.
    if "tokens_to_remove" in inspect.signature(cache.crop).parameters:
        cache.crop(-extra)
    else:
        cache.crop(keep)


class Target:
    """The verifier: incremental forwards over a KV cache, returning logits and aux states."""

    def __init__(self, model, aux_layer_ids: list[int] | None = None):
        self.model = model
        self.aux_layer_ids = list(aux_layer_ids or [])
        n_layers = model.config.num_hidden_layers
        bad = [i for i in self.aux_layer_ids if not 0 <= i <= n_layers]
        if bad:
            raise ValueError(f"aux layer ids {bad} outside 0..{n_layers}")
        # Layer L means the final pre-norm state; transformers' hidden_states[L] is post-norm,
        # so take it from the input of the final norm instead.
        self._final = None
        if n_layers in self.aux_layer_ids:
            model.get_decoder().norm.register_forward_pre_hook(self._keep_final)
        self.device = next(model.parameters()).device
        # transformers 5.x renamed `past_key_values` to `cache`; 4.x only knows the old name.
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.positions = 0  # positions the target has processed, all calls together
        self.forwards = 0

    def _keep_final(self, module, args):
        self._final = args[0]

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, ids: list[int], cache, want_aux: bool = False):
        """Run `ids` after what `cache` holds; return (logits [m, V] fp32, aux [m, A] or None)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        kwargs = {self.cache_arg: cache}
        out = self.model(input_ids=x, use_cache=True, output_hidden_states=want_aux, **kwargs)
        self.positions += len(ids)
        self.forwards += 1
        aux = None
        if want_aux:
            # hidden_states[i] is the input of decoder layer i: vLLM's aux convention.
            states = list(out.hidden_states[:-1]) + [self._final]
            aux = torch.cat([states[i][0] for i in self.aux_layer_ids], dim=-1)
        return out.logits[0].float(), aux


@dataclass
class DecodeStats:
    """Counts of one or more speculative decodes, in vLLM's terms."""

    k: int
    drafts: int = 0  # verification steps that carried at least one draft token
    draft_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    output_tokens: int = 0
    seconds: float = 0.0

    def __post_init__(self):
        if not self.accepted_per_position:
            self.accepted_per_position = [0] * self.k

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted_per_position)

    @property
    def acceptance_length(self) -> float | None:
        """Tokens emitted per verification step, bonus token included: 1 + accepted/drafts;
        None when nothing was drafted (e.g. max_new_tokens 1)."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else None

    @property
    def per_position_acceptance(self) -> list[float] | None:
        """Rate per draft position; None when nothing was drafted."""
        if not self.drafts:
            return None
        # Same denominator (all drafts) at every position, so the rates never increase with it.
        return [a / self.drafts for a in self.accepted_per_position]

    def add(self, other: DecodeStats) -> None:
        self.drafts += other.drafts
        self.draft_tokens += other.draft_tokens
        for i, a in enumerate(other.accepted_per_position):
            self.accepted_per_position[i] += a
        self.output_tokens += other.output_tokens
        self.seconds += other.seconds


def acceptance_fields(stats: DecodeStats) -> dict:
    """The acceptance counts of a result row, as both evaluators write them (None, never NaN,
    where nothing was drafted)."""
    rates = stats.per_position_acceptance
    al = stats.acceptance_length
    return {
        "acceptance_length": None if al is None else round(al, 4),
        "per_position_acceptance": None if rates is None else [round(r, 4) for r in rates],
        "drafts": stats.drafts,
        "draft_tokens": stats.draft_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "output_tokens": stats.output_tokens,
    }


def speedup(tokens_per_s: float, baseline_tokens_per_s: float, drafts: int) -> float | None:
    """Drafting's tokens/s over the baseline's; None when nothing was drafted or timed."""
    if not drafts or baseline_tokens_per_s <= 0:
        return None
    return round(tokens_per_s / baseline_tokens_per_s, 3)


def _emit(out: list[int], new: list[int], eos: set[int], limit: int) -> tuple[int, bool]:
    """Append `new` to `out` up to EOS or `limit` tokens; return (#appended, finished)."""
    n = 0
    for t in new:
        if len(out) >= limit:
            return n, True
        out.append(t)
        n += 1
        if t in eos:
            return n, True
    return n, len(out) >= limit


def _sample(probs: torch.Tensor, generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _verify_greedy(draft: list[int], logits: torch.Tensor) -> tuple[int, list[int]]:
    choice = logits.argmax(-1).tolist()
    a = 0
    while a < len(draft) and draft[a] == choice[a]:
        a += 1
    return a, draft[:a] + [choice[a]]


def _verify_sampled(draft, logits, temperature, generator) -> tuple[int, list[int]]:
    """Rejection sampling for a greedy (one-hot) draft: accept x with probability p(x).

    On rejection the replacement is drawn from p without x, renormalised, which is
    norm(max(0, p - q)) for one-hot q; the output then follows the target's distribution.
    """
    probs = torch.softmax(logits / temperature, dim=-1).cpu()  # the generator lives on CPU
    u = torch.rand(len(draft), generator=generator, device="cpu").tolist()
    for i, x in enumerate(draft):
        if u[i] < probs[i, x].item():
            continue
        residual = probs[i].clone()
        residual[x] = 0.0
        return i, draft[:i] + [_sample(residual / residual.sum(), generator)]
    return len(draft), draft + [_sample(probs[len(draft)], generator)]


def greedy_decode(target: Target, prompt: list[int], max_new_tokens: int, eos: set[int]):
    """Plain greedy decoding with a KV cache, one token per forward: the baseline."""
    start = time.perf_counter()
    cache = target.new_cache()
    logits, _ = target.forward(prompt, cache)
    out: list[int] = []
    _, done = _emit(out, [int(logits[-1].argmax())], eos, max_new_tokens)
    while not done:
        logits, _ = target.forward(out[-1:], cache)
        _, done = _emit(out, [int(logits[-1].argmax())], eos, max_new_tokens)
    return out, time.perf_counter() - start


def speculative_decode(
    target: Target,
    proposer: Proposer,
    prompt: list[int],
    k: int,
    max_new_tokens: int,
    eos: set[int],
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
):
    """Decode `prompt` with drafts of length k; return (output ids, DecodeStats).

    The last step drafts fewer tokens when fewer than k+1 remain, so no verified token is
    thrown away for length; tokens accepted after an EOS are not counted.
    """
    stats = DecodeStats(k)
    start = time.perf_counter()
    cache = target.new_cache()
    logits, aux = target.forward(prompt, cache, want_aux=True)
    tokens = list(prompt)
    aux_all = aux
    out: list[int] = []
    first = (
        int(logits[-1].argmax())
        if temperature == 0
        else _first_sample(logits, temperature, generator)
    )
    _, done = _emit(out, [first], eos, max_new_tokens)
    tokens.append(first)
    while not done:
        k_step = min(k, max_new_tokens - len(out) - 1)
        draft = []
        if k_step > 0:
            proposal = proposer.propose(
                torch.tensor([tokens], device=target.device), aux_all.unsqueeze(0), k_step
            )
            draft = [int(t) for t in proposal.reshape(-1)[:k_step].tolist()]
        # Cache holds tokens[:-1]; feed the last emitted token and the draft in one forward.
        n_cached = len(tokens) - 1
        logits, aux = target.forward([tokens[-1]] + draft, cache, want_aux=True)
        if temperature == 0:
            a, emitted = _verify_greedy(draft, logits)
        else:
            a, emitted = _verify_sampled(draft, logits, temperature, generator)
        _crop(cache, n_cached + 1 + a)  # keep the fed token and the accepted drafts
        aux_all = torch.cat([aux_all, aux[: a + 1]], dim=0)
        n, done = _emit(out, emitted, eos, max_new_tokens)
        tokens += emitted[:n]
        if draft:
            stats.drafts += 1
            stats.draft_tokens += len(draft)
            for i in range(min(a, n)):
                stats.accepted_per_position[i] += 1
    stats.output_tokens = len(out)
    stats.seconds = time.perf_counter() - start
    return out, stats


def _first_sample(logits, temperature, generator) -> int:
    return _sample(torch.softmax(logits[-1] / temperature, dim=-1).cpu(), generator)
