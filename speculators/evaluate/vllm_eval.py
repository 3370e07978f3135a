"""`speculators evaluate-vllm`: acceptance length and speed-up of a draft served by vLLM.

Runs in the main environment too: there it hands itself to the vLLM interpreter
(`--vllm-python`, $SPECULATORS_VLLM_PYTHON or .venv-vllm), or, with that environment missing,
writes the JSON with `"skipped": "<reason>"` (an error with `--vllm-mode on`).
"""

from __future__ import annotations

import argparse
import json
import logging

from speculators.errors import SpeculatorsError
from speculators.evaluate import add_common_arguments, check_common_arguments
from speculators.evaluate.prompts import follow_up, render_within
from speculators.fileio import write_json

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, output_help="results/<run>/eval/vllm.json")
    p.add_argument(
        "--vllm-python",
        default=None,
        help="interpreter of the vLLM environment (default: $SPECULATORS_VLLM_PYTHON or"
        " .venv-vllm/bin/python); used when this one cannot import vllm",
    )
    p.add_argument(
        "--vllm-mode",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: skip (write a skipped result) without a vLLM environment; on: that is an"
        " error; off: always skip (config evaluate.vllm)",
    )


def _forward_argv(args: argparse.Namespace) -> list[str]:
    """The same command for the vLLM interpreter (which must not delegate again)."""
    argv = ["evaluate-vllm", "--target", str(args.target), "--draft", str(args.draft)]
    benchmarks = [
        {"name": b.name, "paths": b.paths, "num_prompts": b.num_prompts,
         "max_new_tokens": b.max_new_tokens}
        for b in args.benchmark_list
    ]  # fmt: skip
    argv += ["--benchmarks", json.dumps(benchmarks)]
    if args.k:
        argv += ["--k", *map(str, args.k)]
    argv += ["--temperature", *map(str, args.temperature), "--seed", str(args.seed)]
    argv += ["--output", str(args.output), "--vllm-mode", "on"]
    return argv


def skipped_result(args: argparse.Namespace, reason: str) -> dict:
    return {
        "backend": "vllm",
        "target": str(args.target),
        "draft": str(args.draft),
        "num_prompts": sum(b.num_prompts for b in args.benchmark_list),
        "max_new_tokens": max(b.max_new_tokens for b in args.benchmark_list),
        "temperature": args.temperature[0],
        "temperatures": list(args.temperature),
        "device": None,
        "skipped": reason,
        "benchmarks": [{"name": b.name} for b in args.benchmark_list],
        "results": [],
    }


def run(args: argparse.Namespace) -> None:
    from speculators.vllm import find_vllm_python, run_in_vllm_python, vllm_importable

    check_common_arguments(args)
    if args.vllm_mode == "off":
        write_json(args.output, skipped_result(args, "disabled in the config (evaluate.vllm: off)"))
        return None
    if vllm_importable():
        return evaluate_here(args)
    python = find_vllm_python(args.vllm_python)
    if python is None:
        wanted = args.vllm_python or "$SPECULATORS_VLLM_PYTHON or .venv-vllm/bin/python"
        reason = (
            f"vLLM environment not found ({wanted}); run `bash scripts/install.sh vllm`"
            " or set vllm_python in the config"
        )
        if args.vllm_mode == "on":
            raise SpeculatorsError("evaluate.vllm", reason)
        log.warning("skipping the vLLM evaluation: %s", reason)
        write_json(args.output, skipped_result(args, reason))
        return None
    log.info("running the vLLM evaluation with %s", python)
    status = run_in_vllm_python(python, _forward_argv(args))
    if status != 0:
        raise SpeculatorsError(python, f"the vLLM evaluation failed (exit status {status})")
    return None


class Turns:
    """The prompts of each round: first turns, then (MT-Bench) each follow-up question after
    the target's own greedy answer to the previous turn, as the in-process evaluator asks them."""

    def __init__(self, tokenizer, specs, max_prompt: int):
        self.tokenizer, self.specs, self.max_prompt = tokenizer, specs, max_prompt
        self.messages = [list(s.messages) for s in specs]
        self.active = list(range(len(specs)))  # specs asked in the current round
        self.turn, self.truncated = 0, 0
        self.has_followups = any(s.followups for s in specs)

    def _render(self, i: int) -> list[int]:
        ids, cut = render_within(self.tokenizer, self.messages[i], self.max_prompt)
        self.truncated += cut
        return ids

    def first(self) -> list[list[int]]:
        return [self._render(i) for i in self.active]

    def next_round(self, answers: list[list[int]]) -> list[list[int]]:
        self.turn += 1
        asked = []
        for i, answer in zip(self.active, answers, strict=True):
            if self.turn <= len(self.specs[i].followups):
                text = self.tokenizer.decode(answer, skip_special_tokens=True)
                question = self.specs[i].followups[self.turn - 1]
                self.messages[i] = follow_up(self.messages[i], text, question)
                asked.append(i)
        self.active = asked
        return [self._render(i) for i in asked]


def evaluate_here(args: argparse.Namespace) -> None:
    """Inside the vLLM environment: render the prompts, run the engines, write the JSON."""
    from transformers import AutoConfig, AutoTokenizer

    from speculators.evaluate.inprocess import (
        check_draft_matches,
        describe_benchmark,
        read_draft_info,
        summary_fields,
    )
    from speculators.vllm import evaluate as engine

    info = read_draft_info(args.draft)
    try:
        config = AutoConfig.from_pretrained(args.target).get_text_config()
        tokenizer = AutoTokenizer.from_pretrained(args.target)
    except (OSError, ValueError) as e:
        raise SpeculatorsError(args.target, f"cannot load the target ({e})") from None
    check_draft_matches(args.draft, info, config)
    ks = args.k or ([info.ttt_steps] if info.ttt_steps else None)
    if not ks:
        raise SpeculatorsError(args.draft / "config.json", "no speculative_tokens; pass --k")
    context = getattr(config, "max_position_embeddings", None) or 4096
    groups, turns_of, specs_of, longest = [], [], {}, 1
    for bench in args.benchmark_list:
        # Room for the answer and one verification window of the largest K.
        max_prompt = context - bench.max_new_tokens - max(ks) - 1
        if max_prompt < 1:
            raise SpeculatorsError(
                bench.name,
                f"max_new_tokens {bench.max_new_tokens} leaves no room in a {context}-token context",
            )
        specs = specs_of[bench.name] = bench.load(args.seed)
        # One batch per category, so vLLM's counters give each category's acceptance.
        for category in dict.fromkeys(s.category for s in specs):
            # The same token ids as the in-process evaluator: one renderer for both.
            turns = Turns(tokenizer, [s for s in specs if s.category == category], max_prompt)
            prompts = turns.first()
            room = bench.max_new_tokens + max(ks) + 1
            # Follow-up turns grow by an answer and a question each: allow the whole context.
            longest = max(longest, max_prompt + room if turns.has_followups
                          else max(map(len, prompts)) + room)  # fmt: skip
            groups.append(engine.Group(bench.name, category, prompts, bench.max_new_tokens,
                                       turns.next_round))  # fmt: skip
            turns_of.append(turns)
    max_model_len = min(context, longest)
    log.info(
        "vLLM evaluation of %s on %s: benchmarks %s, k=%s, temperatures %s",
        args.draft,
        args.target,
        list(specs_of),
        ks,
        args.temperature,
    )
    base_runs, rows = engine.evaluate(
        str(args.target),
        str(args.draft),
        groups,
        ks,
        temperatures=args.temperature,
        seed=args.seed,
        max_model_len=max_model_len,
    )
    truncated = sum(t.truncated for t in turns_of)
    if truncated:
        log.warning("%d prompts longer than the context keep their last tokens", truncated)
    described = []
    for bench in args.benchmark_list:
        turns = sum(len(r.prompts) for g, r in zip(groups, base_runs) if g.benchmark == bench.name)
        described.append(describe_benchmark(bench, specs_of[bench.name], turns))
    write_json(
        args.output,
        {
            "backend": "vllm",
            "target": str(args.target),
            "draft": str(args.draft),
            **summary_fields(described, args.temperature),
            "device": engine.describe_device(),
            "skipped": None,
            "aux_layer_ids": info.aux_layer_ids,
            "seed": args.seed,
            "truncated_prompts": truncated,
            "baseline_output_tokens": sum(r.output_tokens for r in base_runs),
            "baseline_engine_start_s": round(base_runs[0].start_seconds, 1),
            "benchmarks": described,
            "results": rows,
        },
    )
