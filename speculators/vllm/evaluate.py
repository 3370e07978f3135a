"""vLLM side of `speculators evaluate-vllm`: the target alone, then target + EAGLE-3 draft per K.

Acceptance comes from vLLM's own speculative-decoding counters (`LLM.get_metrics()`), read
before and after the timed batch so warm-up requests and earlier engines never count.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from speculators.devices import dtype_name, target_compute_dtype
from speculators.vllm import shutdown_engine

log = logging.getLogger(__name__)

DRAFTS = "vllm:spec_decode_num_drafts"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


@dataclass
class SpecCounts:
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __sub__(self, other: SpecCounts) -> SpecCounts:
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        mine = self.accepted_per_pos + [0] * (n - len(self.accepted_per_pos))
        theirs = other.accepted_per_pos + [0] * (n - len(other.accepted_per_pos))
        return SpecCounts(
            self.drafts - other.drafts,
            self.draft_tokens - other.draft_tokens,
            self.accepted_tokens - other.accepted_tokens,
            [a - b for a, b in zip(mine, theirs)],
        )


def spec_counts(metrics) -> SpecCounts:
    """Sum vLLM's speculative-decoding counters over every label set (engine, model)."""
    out = SpecCounts()
    for m in metrics:
        if m.name == DRAFTS:
            out.drafts += int(m.value)
        elif m.name == DRAFT_TOKENS:
            out.draft_tokens += int(m.value)
        elif m.name == ACCEPTED:
            out.accepted_tokens += int(m.value)
        elif m.name == ACCEPTED_PER_POS:
            values = [int(v) for v in m.values]
            pad = len(values) - len(out.accepted_per_pos)
            out.accepted_per_pos += [0] * max(pad, 0)
            for i, v in enumerate(values):
                out.accepted_per_pos[i] += v
    return out


def on_cpu() -> bool:
    return not torch.cuda.is_available()


@dataclass
class EngineRun:
    prompts: list[list[int]]  # every prompt decoded, turns after the first included
    outputs: list[list[int]]  # generated token ids per prompt
    seconds: float
    start_seconds: float
    counts: SpecCounts

    @property
    def output_tokens(self) -> int:
        return sum(map(len, self.outputs))


def run_engine(
    target: str,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    max_model_len: int,
    speculative_config: dict | None = None,
    next_round: Callable[[list[list[int]]], list[list[int]]] | None = None,
) -> EngineRun:
    """Start an engine, warm it up, time batched generates over `prompts`, shut it down.

    `next_round(outputs)` gives the prompts of the next round from the answers to the last one
    (MT-Bench follow-up turns); rounds continue until it returns none.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    started = time.perf_counter()
    llm = LLM(
        model=target,
        # The device's precision policy, as the in-process evaluator uses.
        dtype=dtype_name(target_compute_dtype(target)),
        enforce_eager=on_cpu(),
        max_model_len=max_model_len,
        seed=seed,
        disable_log_stats=False,  # get_metrics() needs the stat loggers
        speculative_config=speculative_config,
    )
    start_seconds = time.perf_counter() - started
    try:
        # One-off allocations and kernel selection stay out of the timing.
        llm.generate(
            [TokensPrompt(prompt_token_ids=list(prompts[0]))],
            SamplingParams(max_tokens=2),
            use_tqdm=False,
        )
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
        before = spec_counts(llm.get_metrics())
        all_prompts, outputs, seconds = [], [], 0.0
        batch = [list(p) for p in prompts]
        while batch:
            t0 = time.perf_counter()
            outs = llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False
            )
            seconds += time.perf_counter() - t0
            answers = [list(o.outputs[0].token_ids) for o in outs]
            all_prompts += batch
            outputs += answers
            batch = next_round(answers) if next_round else []
        counts = spec_counts(llm.get_metrics()) - before
    finally:
        shutdown_engine(llm)
    return EngineRun(all_prompts, outputs, seconds, start_seconds, counts)


def result_row(k: int, spec: EngineRun, baseline: EngineRun, temperature: float) -> dict:
    """One entry of `results`, with the same fields as the in-process evaluator's."""
    c = spec.counts
    per_pos = (c.accepted_per_pos + [0] * k)[:k]
    tps = spec.output_tokens / max(spec.seconds, 1e-9)
    base_tps = baseline.output_tokens / max(baseline.seconds, 1e-9)
    mismatches = None
    if temperature == 0:
        mismatches = sum(a != b for a, b in zip(spec.outputs, baseline.outputs))
    return {
        "k": k,
        # Tokens emitted per target forward, the bonus token included (vLLM's convention).
        "acceptance_length": round(1 + c.accepted_tokens / c.drafts, 4) if c.drafts else None,
        "per_position_acceptance": [round(a / c.drafts, 4) if c.drafts else 0.0 for a in per_pos],
        "drafts": c.drafts,
        "draft_tokens": c.draft_tokens,
        "accepted_tokens": c.accepted_tokens,
        "output_tokens": spec.output_tokens,
        "tokens_per_s": round(tps, 2),
        "baseline_tokens_per_s": round(base_tps, 2),
        "speedup": round(tps / base_tps, 3) if base_tps else None,
        "greedy_mismatches": mismatches,
        "engine_start_s": round(spec.start_seconds, 1),
    }


def evaluate(
    target: str,
    draft: str,
    prompts: Sequence[list[int]],
    ks: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    max_model_len: int,
    next_round: Callable[[list[list[int]]], list[list[int]]] | None = None,
) -> tuple[EngineRun, list[dict]]:
    """The target alone once, then one engine per K with the draft; returns (baseline, rows).

    Follow-up turns (`next_round`) are built from the baseline's answers, as the in-process
    evaluator does; the drafting engines then decode every turn's prompt in one batch.
    """
    common = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        max_model_len=max_model_len,
    )
    baseline = run_engine(target, prompts, next_round=next_round, **common)
    log.info(
        "baseline: %d tokens in %.2f s (engine start %.1f s)",
        baseline.output_tokens,
        baseline.seconds,
        baseline.start_seconds,
    )
    rows = []
    for k in ks:
        spec = {"method": "eagle3", "model": str(draft), "num_speculative_tokens": k}
        run = run_engine(target, baseline.prompts, speculative_config=spec, **common)
        row = result_row(k, run, baseline, temperature)
        log.info(
            "k=%d acceptance_length=%s speedup=%s", k, row["acceptance_length"], row["speedup"]
        )
        rows.append(row)
    return baseline, rows


def describe_device() -> str:
    from speculators.devices import describe

    if torch.cuda.is_available():
        return f"{describe('cuda')} (vLLM)"
    return f"vllm-cpu, {describe('cpu')}"
