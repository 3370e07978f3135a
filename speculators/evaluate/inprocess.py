"""`speculators evaluate`: acceptance length and speed-up of a draft, measured with transformers.

Decodes held-out prompts once without drafting (the baseline, plain greedy with a KV cache) and
once per draft length K with speculative decoding, then writes the JSON shared with vLLM's evaluator.
Prompts run one at a time: acceptance differs per prompt, so batched rows would need ragged
per-row cache crops; batched serving is what the vLLM evaluator measures.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from speculators.devices import (
    add_gpus_argument,
    check_job_gpus,
    compute_dtype,
    default_device,
    describe,
)
from speculators.errors import SpeculatorsError
from speculators.evaluate import add_common_arguments, check_common_arguments
from speculators.evaluate.prompts import PromptSpec, follow_up, render_within
from speculators.evaluate.spec_decode import (
    DecodeStats,
    Target,
    acceptance_fields,
    greedy_decode,
    speculative_decode,
    speedup,
)
from speculators.fileio import read_json, write_json

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, output_help="results/<run>/eval/inprocess.json")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    add_gpus_argument(p)


# ---------------------------------------------------------------- draft config checks


def _dig(cfg: dict, *paths: str):
    """First non-null value among dotted key paths of a nested dict."""
    for path in paths:
        node = cfg
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


@dataclass
class DraftInfo:
    hidden_size: int | None
    vocab_size: int | None
    aux_layer_ids: list[int]
    ttt_steps: int | None
    verifier: str | None


def read_draft_info(draft_dir: Path) -> DraftInfo:
    cfg = read_json(Path(draft_dir) / "config.json")
    aux = _dig(
        cfg,
        "eagle_aux_hidden_state_layer_ids",
        "aux_layer_ids",
        "eagle_config.eagle_aux_hidden_state_layer_ids",
    )
    methods = _dig(cfg, "speculators_config.proposal_methods") or [{}]
    return DraftInfo(
        hidden_size=_dig(
            cfg, "target_hidden_size", "transformer_layer_config.hidden_size", "hidden_size"
        ),
        vocab_size=_dig(cfg, "transformer_layer_config.vocab_size", "vocab_size"),
        aux_layer_ids=list(aux or []),
        ttt_steps=methods[0].get("speculative_tokens") or cfg.get("ttt_steps"),
        verifier=_dig(cfg, "speculators_config.verifier.name_or_path", "verifier"),
    )


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def check_draft_matches(draft_dir: Path, info: DraftInfo, target_config, target: str = "") -> None:
    """A draft trained for another target fails here, before any decoding."""
    where = Path(draft_dir) / "config.json"
    if info.verifier and target and not _same_model(info.verifier, target):
        # Only a warning: the same model may live under another path or hub id.
        log.warning(
            "%s: draft was trained for verifier %s, evaluating with %s",
            where,
            info.verifier,
            target,
        )
    if info.hidden_size is not None and info.hidden_size != target_config.hidden_size:
        raise SpeculatorsError(
            where,
            f"draft expects target hidden size {info.hidden_size}, the target has "
            f"{target_config.hidden_size} (draft trained for another target: {info.verifier})",
        )
    if info.vocab_size is not None and info.vocab_size != target_config.vocab_size:
        raise SpeculatorsError(
            where,
            f"draft expects target vocab size {info.vocab_size}, the target has "
            f"{target_config.vocab_size} (draft trained for another target: {info.verifier})",
        )
    if not info.aux_layer_ids:
        raise SpeculatorsError(where, "no aux layer ids (eagle_aux_hidden_state_layer_ids)")
    n = target_config.num_hidden_layers
    bad = [i for i in info.aux_layer_ids if not 0 <= i <= n]
    if bad:
        raise SpeculatorsError(where, f"aux layer ids {bad} do not fit a {n}-layer target")


class DraftProposer:
    """Adapts a loaded draft model to the Proposer protocol (dtype of the aux states). It keeps
    the draft's keys of the sequence being decoded, so each proposal encodes only the tokens
    accepted since the last one (a new prompt starts afresh)."""

    def __init__(self, model):
        from speculators.models.eagle3 import DraftState

        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.state = DraftState()

    def propose(self, tokens, aux, k):
        return self.model.propose(tokens, aux.to(self.dtype), k, state=self.state)


# ---------------------------------------------------------------- evaluation


@dataclass
class Job:
    """One prompt turn to decode, with the baseline's output and time."""

    id: str
    prompt: list[int]
    baseline: list[int]
    seconds: float
    category: str | None = None


def eos_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return {i for i in ids if i is not None}


def iter_jobs(
    target: Target,
    tokenizer,
    specs: list[PromptSpec],
    max_new_tokens: int,
    max_prompt: int,
    eos,
    counts: dict,
):
    """Render each turn and decode it without drafting, one at a time (MT-Bench turns after
    the first follow the target's greedy answer); `counts["truncated"]` counts cut prompts."""
    for spec in specs:
        messages, answer = list(spec.messages), ""
        for turn in range(1 + len(spec.followups)):
            if turn:
                messages = follow_up(messages, answer, spec.followups[turn - 1])
            ids, cut = render_within(tokenizer, messages, max_prompt)
            counts["truncated"] = counts.get("truncated", 0) + cut
            out, seconds = greedy_decode(target, ids, max_new_tokens, eos)
            answer = tokenizer.decode(out, skip_special_tokens=True)
            yield Job(f"{spec.id}#{turn + 1}", ids, out, seconds, spec.category)


class Sweep:
    """Totals per (temperature, draft length K), and per category, fed one job at a time.

    Each job is decoded with every point right after its baseline, so a machine whose load
    changes during the evaluation slows baseline and drafting alike instead of skewing the
    speed-up. The greedy baseline serves every K and temperature.
    """

    def __init__(self, ks: list[int], temperature: float | list[float], seed: int):
        temps = temperature if isinstance(temperature, (list, tuple)) else [temperature]
        self.points = [(float(t), k) for t in temps for k in ks]
        self.totals = {p: DecodeStats(p[1]) for p in self.points}
        self.categories: dict[tuple, dict[str, DecodeStats]] = {p: {} for p in self.points}
        self.mismatches = dict.fromkeys(self.points, 0)
        self.generators = {p: torch.Generator().manual_seed(seed) for p in self.points}
        self.base_tokens, self.base_seconds, self.jobs = 0, 0.0, 0

    def run(self, target: Target, proposer, job: Job, max_new_tokens: int, eos) -> None:
        self.jobs += 1
        self.base_tokens += len(job.baseline)
        self.base_seconds += job.seconds
        for point, total in self.totals.items():
            temperature, k = point
            out, stats = speculative_decode(
                target,
                proposer,
                job.prompt,
                k,
                max_new_tokens,
                eos,
                temperature,
                self.generators[point],
            )
            total.add(stats)
            if job.category is not None:
                self.categories[point].setdefault(job.category, DecodeStats(k)).add(stats)
            self.mismatches[point] += out != job.baseline

    def rows(self) -> list[dict]:
        base_tps = self.base_tokens / max(self.base_seconds, 1e-9)
        rows = []
        for point, total in self.totals.items():
            temperature, k = point
            tps = total.output_tokens / max(total.seconds, 1e-9)
            row = {
                "k": k,
                "temperature": temperature,
                **acceptance_fields(total),
                "tokens_per_s": round(tps, 2),
                "baseline_tokens_per_s": round(base_tps, 2),
                "speedup": speedup(tps, base_tps, total.drafts),
                # Sampling has no single right output; only greedy decoding must match.
                "greedy_mismatches": self.mismatches[point] if temperature == 0 else None,
            }
            if self.categories[point]:
                row["per_category"] = {
                    c: acceptance_fields(st) for c, st in sorted(self.categories[point].items())
                }
            rows.append(row)
        return rows


def measure_k(target, proposer, jobs, k, max_new_tokens, eos, temperature, seed) -> dict:
    """One K over already-decoded jobs (their baselines known): one result row."""
    sweep = Sweep([k], temperature, seed)
    for job in jobs:
        sweep.run(target, proposer, job, max_new_tokens, eos)
    return sweep.rows()[0]


def evaluate(
    target_model,
    tokenizer,
    proposer,
    aux_layer_ids,
    specs,
    ks,
    max_new_tokens,
    temperature: float | list[float] = 0.0,
    seed=0,
) -> dict:
    """Baseline and speculative decoding for each temperature and K, prompt by prompt; the
    JSON's measurements for one prompt set."""
    torch.manual_seed(seed)
    target = Target(target_model, aux_layer_ids)
    eos = eos_ids(tokenizer, target_model)
    context = getattr(target_model.config, "max_position_embeddings", None) or 10**9
    max_prompt = context - max_new_tokens - max(ks) - 1
    if max_prompt < 1:
        raise SpeculatorsError(
            "max_new_tokens",
            f"{max_new_tokens} leaves no room for a prompt in a {context}-token context",
        )
    # Warm-up, so one-off allocation and kernel selection do not land in the first timing.
    greedy_decode(target, render_within(tokenizer, specs[0].messages, max_prompt)[0], 2, eos)
    counts: dict = {}
    sweep = Sweep(list(ks), temperature, seed)
    for job in iter_jobs(target, tokenizer, specs, max_new_tokens, max_prompt, eos, counts):
        sweep.run(target, proposer, job, max_new_tokens, eos)
        log.debug("%s: %d baseline tokens", job.id, len(job.baseline))
    truncated = counts.get("truncated", 0)
    if truncated:
        log.warning("%d prompts longer than %d tokens were truncated", truncated, max_prompt)
    rows = sweep.rows()
    log.info("%d turns, baseline %.1f tokens/s", sweep.jobs, rows[0]["baseline_tokens_per_s"])
    for row in rows:
        log.info(
            "temperature=%g k=%d acceptance_length=%s speedup=%s",
            row["temperature"],
            row["k"],
            row["acceptance_length"],
            row["speedup"],
        )
    return {"num_turns": sweep.jobs, "truncated_prompts": truncated, "results": rows}


def evaluate_benchmarks(
    target_model, tokenizer, proposer, aux_layer_ids, benchmarks, ks, temperatures, seed=0
) -> dict:
    """`evaluate` for each benchmark in turn (its own prompt sample, drawn with `seed`, and
    answer length); rows carry the benchmark's name. Returns `benchmarks` (name, prompts,
    turns, max_new_tokens, categories, files) and the flat `results`."""
    described, results, truncated = [], [], 0
    for bench in benchmarks:
        specs = bench.load(seed)
        log.info("benchmark %s: %d prompts, %d new tokens", bench.name, len(specs),
                 bench.max_new_tokens)  # fmt: skip
        measured = evaluate(target_model, tokenizer, proposer, aux_layer_ids, specs, ks,
                            bench.max_new_tokens, list(temperatures), seed)  # fmt: skip
        described.append(describe_benchmark(bench, specs, measured["num_turns"]))
        truncated += measured["truncated_prompts"]
        results += [{"benchmark": bench.name, **r} for r in measured["results"]]
    return {"benchmarks": described, "truncated_prompts": truncated, "results": results}


def describe_benchmark(bench, specs, num_turns: int) -> dict:
    """A benchmark's entry in the eval JSON (both evaluators write the same)."""
    cats = sorted({s.category for s in specs if s.category is not None})
    return {
        "name": bench.name,
        "num_prompts": len(specs),
        "num_turns": num_turns,
        "max_new_tokens": bench.max_new_tokens,
        "categories": cats,
        "prompts": list(bench.paths),
    }


# ---------------------------------------------------------------- CLI


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device(default_device())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpeculatorsError(
            "--device", f"{name!r} is not a device (cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpeculatorsError("--device", f"{name} requested but no GPU is visible")
    return device


def _dtype(name: str, device: torch.device, config) -> torch.dtype:
    if name == "auto":
        return compute_dtype(device, getattr(config, "dtype", None) or torch.float32)
    return getattr(torch, name)


def load_target(path: str, device, dtype_name: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SpeculatorsError(path, f"cannot load the target ({e})") from None
    dtype = _dtype(dtype_name, device, config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


def load_proposer(draft_dir: Path, device, target_model=None):
    """The draft as a proposer; one saved without its embedding shares the target model's."""
    from speculators.models.io import load_draft

    embedding = target_model.get_input_embeddings().weight if target_model is not None else None
    # The draft is stored in bf16: it computes in what the precision policy makes of that.
    dtype = compute_dtype(device, torch.bfloat16)
    draft = load_draft(draft_dir, dtype=dtype, device=device, embedding=embedding)
    return DraftProposer(draft.eval())


def run(args: argparse.Namespace) -> None:
    check_job_gpus(args.gpus, "evaluate.gpus")
    check_common_arguments(args)
    device = _device(args.device)
    for bench in args.benchmark_list:
        bench.load(args.seed)  # a bad prompt file fails before the target loads
    info = read_draft_info(args.draft)
    model, tokenizer = load_target(args.target, device, args.dtype)
    check_draft_matches(args.draft, info, model.config, str(args.target))
    ks = args.k or ([info.ttt_steps] if info.ttt_steps else None)
    if not ks:
        raise SpeculatorsError(args.draft / "config.json", "no speculative_tokens; pass --k")
    proposer = load_proposer(args.draft, device, model)
    log.info(
        "evaluating %s on %s: benchmarks %s, k=%s, temperatures %s, device %s",
        args.draft,
        args.target,
        [b.name for b in args.benchmark_list],
        ks,
        args.temperature,
        device,
    )
    measured = evaluate_benchmarks(
        model,
        tokenizer,
        proposer,
        info.aux_layer_ids,
        args.benchmark_list,
        ks,
        args.temperature,
        args.seed,
    )
    write_json(
        args.output,
        {
            "backend": "transformers",
            "target": str(args.target),
            "draft": str(args.draft),
            **summary_fields(measured["benchmarks"], args.temperature),
            "device": describe(device),
            "skipped": None,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "aux_layer_ids": info.aux_layer_ids,
            "seed": args.seed,
            **measured,
        },
    )


def summary_fields(benchmarks: list[dict], temperatures: list[float]) -> dict:
    """Top-level fields of the eval JSON that readers of the one-benchmark format know."""
    return {
        "num_prompts": sum(b["num_prompts"] for b in benchmarks),
        "num_turns": sum(b["num_turns"] for b in benchmarks),
        "max_new_tokens": max(b["max_new_tokens"] for b in benchmarks),
        "temperature": temperatures[0],
        "temperatures": list(temperatures),
        "prompts": [p for b in benchmarks for p in b["prompts"]],
    }
