"""`speculators regenerate`: replace each assistant turn by the target's own answer, turn by turn
(self-distillation), resumable through an append-only `<output>.partial` file.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from speculators.data import sources
from speculators.devices import (
    add_gpus_argument,
    check_job_gpus,
    default_device,
    dtype_name,
    target_compute_dtype,
)
from speculators.errors import SpeculatorsError
from speculators.fileio import atomic_path, write_json

log = logging.getLogger(__name__)


class Answer(NamedTuple):
    """One generated answer; `truncated` when it stopped at max_new_tokens rather than at an
    end-of-turn token of the target's own choosing."""

    text: str
    truncated: bool


GenerateFn = Callable[[str, list, int, float, float, int], list[Answer]]
# Conversations per forward batch of the transformers backend: prompts are sorted by length
# first, so padding stays small; 32-64 rows keep a 2-core CPU's matmuls efficient.
MICRO_BATCH = 32


@functools.lru_cache(maxsize=1)
def _load_target(target: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        device = default_device()
        dtype = target_compute_dtype(target, device)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(device).eval()
    except Exception as e:
        raise SpeculatorsError(target, f"cannot load the target model ({e})") from None
    tokenizer.padding_side = "left"  # decoder-only batches must end on the real tokens
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def generate_chat_answers(
    target: str,
    conversations: list[list[dict]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list[Answer]:
    """Transformers backend: the target's answer to each conversation (each ends with a user
    turn), in the order given. Prompts are sorted by length and generated in left-padded
    batches of `MICRO_BATCH`, so little compute goes to padding; greedy answers are those of
    one-at-a-time generation. Same signature as the vLLM backend."""
    import torch

    tokenizer, model = _load_target(target)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    eos_ids.add(tokenizer.eos_token_id)
    prompts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    sampling = temperature > 0
    options = dict(do_sample=sampling, temperature=None, top_p=None, top_k=None)
    if sampling:
        torch.manual_seed(seed)
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    answers: list[Answer | None] = [None] * len(prompts)
    for start in range(0, len(order), MICRO_BATCH):
        chunk = order[start : start + MICRO_BATCH]
        batch = tokenizer(
            [prompts[i] for i in chunk], add_special_tokens=False, padding=True, return_tensors="pt"
        ).to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **options,
            )
        for i, tokens in zip(chunk, out[:, batch["input_ids"].shape[1] :].tolist()):
            ended = any(t in eos_ids for t in tokens)
            answers[i] = Answer(tokenizer.decode(tokens, skip_special_tokens=True), not ended)
    return answers


def backend(name: str) -> GenerateFn:
    if name == "transformers":
        return generate_chat_answers
    try:
        from speculators.vllm.generate import generate_chat_answers as vllm_generate
    except ImportError as e:
        raise SpeculatorsError(
            "--backend vllm", f"the vLLM backend is not available ({e})"
        ) from None
    return vllm_generate


def cut_turns(conversation: list[dict], max_turns: int | None) -> list[dict]:
    """The conversation up to and including its `max_turns`-th assistant turn."""
    if max_turns is None:
        return conversation
    seen = 0
    for i, m in enumerate(conversation):
        seen += m["role"] == "assistant"
        if seen == max_turns:
            return conversation[: i + 1]
    return conversation


def regenerate_batch(
    conversations: list[list[dict]], generate, settings: dict, seed: int, counts: dict
) -> list[list[dict]]:
    """Replace the assistant turns of a batch, one turn index at a time: every answer sees
    the regenerated answers before it. A conversation stops at an assistant turn that does
    not follow a user turn, at an empty answer (prepare skips what has no answer left), or
    after an answer cut at max_new_tokens: that answer is kept with `"truncated": true` (prepare
    then supervises no end-of-turn token after it: the target never chose to stop there), and
    no later turn is built on a reply the target never finished."""
    sources_ = [cut_turns(c, settings["max_turns"]) for c in conversations]
    done: list[list[dict]] = [[] for _ in sources_]
    position = [0] * len(sources_)
    active = set(range(len(sources_)))
    step = 0
    while active:
        pending = []
        for i in sorted(active):
            src, out = sources_[i], done[i]
            while position[i] < len(src) and src[position[i]]["role"] != "assistant":
                out.append(src[position[i]])
                position[i] += 1
            if position[i] == len(src):
                active.discard(i)
            elif out and out[-1]["role"] == "user":
                pending.append(i)
            else:
                counts["stopped_no_user_turn"] += 1
                active.discard(i)
        if not pending:
            break
        answers = generate(
            settings["target"],
            [done[i] for i in pending],
            settings["max_new_tokens"],
            settings["temperature"],
            settings["top_p"],
            seed + step,
        )
        step += 1
        if len(answers) != len(pending):
            raise SpeculatorsError(
                settings["backend"], f"returned {len(answers)} answers for {len(pending)} prompts"
            )
        for i, (text, truncated) in zip(pending, answers):
            counts["answers"] += 1
            if not text.strip():
                counts["empty_answers"] += 1
                active.discard(i)
                continue
            message = {"role": "assistant", "content": text}
            if truncated:
                # A cut inside a multi-byte character decodes to U+FFFD: not the target's text.
                message.update(content=text.rstrip("\ufffd"), truncated=True)
                counts["truncated_answers"] += 1
                active.discard(i)
            done[i].append(message)
            position[i] += 1
    # Trailing user turns have no answer to learn from.
    for out in done:
        while out and out[-1]["role"] != "assistant":
            out.pop()
    return done


class Partial:
    """Append-only record of finished training rows, keyed by their position in the selection.
    The first line holds the settings; a file made with other settings is discarded."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.rows: dict[int, dict] = {}
        header = {"settings": settings}
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        valid = []
        if lines and _loads(lines[0]) == header:
            for line in lines[1:]:
                record = _loads(line)
                if not isinstance(record, dict) or "pos" not in record:
                    break  # a line cut short by the kill: everything after it is redone
                self.rows[record["pos"]] = record["row"]
                valid.append(line)
        elif lines:
            log.info("%s was made with other settings: starting over", self.path)
        # Rewrite without a torn last line, so appending continues a valid file.
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(x + "\n" for x in [json.dumps(header)] + valid))
        if self.rows:
            log.info("resuming: %d conversations already regenerated", len(self.rows))

    def append(self, records: list[tuple[int, dict]]) -> None:
        with open(self.path, "a") as f:
            for pos, row in records:
                f.write(json.dumps({"pos": pos, "row": row}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.update(records)


def _loads(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def regenerate_selection(
    selection: sources.Selection, generate, settings: dict, output: str | os.PathLike
) -> dict:
    """Regenerate the training rows batch by batch into the partial file, then write all rows
    (eval rows unchanged) to `output` in selected order; returns the counts."""
    output = Path(output)
    partial = Partial(Path(f"{output}.partial"), settings)
    counts = {"answers": 0, "empty_answers": 0, "truncated_answers": 0, "stopped_no_user_turn": 0}
    resumed = len(partial.rows)
    size = settings["batch_size"]
    for start in range(0, len(selection.train), size):
        positions = [
            p
            for p in range(start, min(start + size, len(selection.train)))
            if p not in partial.rows
        ]
        if not positions:
            continue
        batch = [selection.train[p] for p in positions]
        # Seeded per batch, so a resumed run samples exactly what an uninterrupted one would.
        seed = settings["seed"] + 1000 * (start // size)
        new = regenerate_batch(
            [r["conversations"] for r in batch], generate, settings, seed, counts
        )
        partial.append(
            [
                (p, {"id": r["id"], "split": "train", "conversations": c})
                for p, r, c in zip(positions, batch, new)
            ]
        )
        log.info("regenerated %d / %d conversations", len(partial.rows), len(selection.train))
    rows = [
        {"id": r["id"], "split": "eval", "conversations": r["conversations"]}
        for r in selection.eval
    ]
    rows += [partial.rows[p] for p in range(len(selection.train))]
    # From the rows, not the loop: a resumed run's earlier batches count too.
    counts["truncated_answers"] = sum(
        bool(m.get("truncated")) for r in rows for m in r["conversations"]
    )
    counts.update(train=len(selection.train), eval=len(selection.eval), resumed=resumed)
    with atomic_path(output) as tmp:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    partial.path.unlink(missing_ok=True)
    return counts


def meta_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(f"{stem}.meta.json")


def _run_in_vllm_env(args) -> None:
    """vLLM pins its own torch, so it lives in another environment: rerun this command there
    (same output and partial file, so a resumed run continues either way)."""
    from speculators.vllm import rerun_with_vllm

    argv = ["regenerate", "--backend", "vllm"]
    for name in OPTIONS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    log.info("running the vLLM backend")
    rerun_with_vllm(args.vllm_python, argv, "regeneration")


# Options passed on unchanged when the command reruns itself in the vLLM environment.
OPTIONS = (
    "target",
    "source",
    "split",
    "local_copy",
    "local_copy_path",
    "dataset_name",
    "seed",
    "max_samples",
    "eval_prompts",
    "max_new_tokens",
    "temperature",
    "top_p",
    "batch_size",
    "max_turns",
    "output",
)


def check_arguments(args) -> None:
    """One line for a value no generation can use, before anything is loaded or written."""
    if not args.output.endswith(".jsonl"):
        raise SpeculatorsError(args.output, "the output must be a .jsonl file")
    at_least = {"max_new_tokens": 1, "batch_size": 1, "max_turns": 1, "eval_prompts": 0}
    at_least["max_samples"] = 1
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise SpeculatorsError(f"--{name.replace('_', '-')}", f"must be >= {low}, got {value}")
    if args.temperature < 0:
        raise SpeculatorsError(
            "--temperature", f"must be >= 0 (0 = greedy), got {args.temperature}"
        )
    if not 0 < args.top_p <= 1:
        raise SpeculatorsError("--top-p", f"must be in (0, 1], got {args.top_p}")


def input_stamps(source: str, target: str) -> dict:
    """What a resumed regeneration must find unchanged besides its settings: the source file's
    content hash and the size and mtime of the target folder's files (names for hub ids)."""
    import hashlib

    stamps: dict = {"source": source, "target": target}
    path = Path(source)
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        stamps["source"] = digest.hexdigest()
    folder = Path(target)
    if folder.is_dir():
        stamps["target"] = {
            f.name: [f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(folder.iterdir())
            if f.is_file()
        }
    return stamps


def run(args) -> None:
    check_job_gpus(args.gpus, "regenerate.gpus")
    started = time.time()
    check_arguments(args)
    from speculators.vllm import find_vllm_python, vllm_importable  # no vLLM import

    if args.backend == "auto" and args.vllm_python and find_vllm_python(args.vllm_python) is None:
        raise SpeculatorsError("--vllm-python", f"{args.vllm_python} is not an executable")
    if args.backend == "auto":
        # vLLM's continuous batching generates 2.2x the tokens/s of transformers on CPU
        # (docs/benchmarks.md); without its environment the transformers backend does the work.
        found = vllm_importable() or find_vllm_python(args.vllm_python) is not None
        args.backend = "vllm" if found else "transformers"
        log.info("backend auto: %s", args.backend)
    if args.backend == "vllm" and not vllm_importable():
        return _run_in_vllm_env(args)
    generate = backend(args.backend)
    rows = sources.load_rows(args.source, args.split, args.local_copy, args.local_copy_path)
    selection = sources.select(rows, args.seed, args.eval_prompts, args.max_samples)
    if not selection.train:
        held = (
            f"; all {len(selection.eval)} usable rows were held out as eval prompts"
            if selection.eval
            else ""
        )
        raise SpeculatorsError(args.source, f"no usable training conversation to regenerate{held}")
    settings = {
        "target": args.target,
        "source": args.source,
        "split": args.split,
        "backend": args.backend,
        "seed": args.seed,
        "max_samples": args.max_samples,
        "eval_prompts": args.eval_prompts,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "batch_size": args.batch_size,
        "max_turns": args.max_turns,
        # A source or target changed since a killed run: its finished rows are not reused.
        "inputs": input_stamps(args.source, args.target),
    }
    counts = regenerate_selection(selection, generate, settings, args.output)
    meta = {
        "dataset": args.dataset_name,
        "settings": settings,
        "greedy": args.temperature == 0,
        "compute_dtype": dtype_name(target_compute_dtype(args.target)),
        "counts": counts,
        "selection": selection.summary(),
        "seconds": round(time.time() - started, 1),
    }
    write_json(meta_path(args.output), meta)
    log.info("%s: %s in %.1f s", args.output, counts, time.time() - started)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="target model folder or Hugging Face id")
    p.add_argument("--source", required=True, help="chat source (name, HF id or local file)")
    p.add_argument("--split", default=None, help="dataset split (default: the source's own)")
    p.add_argument("--dataset-name", required=True, help="name recorded in the metadata")
    sources.add_local_copy_arguments(p)
    add_gpus_argument(p)
    p.add_argument("--seed", type=int, default=0, help="selection and sampling seed")
    p.add_argument("--max-samples", type=int, default=None, help="training conversations kept")
    p.add_argument("--eval-prompts", type=int, default=64, help="conversations held out")
    p.add_argument(
        "--backend",
        choices=["auto", "transformers", "vllm"],
        default="transformers",
        help="auto = vllm when its environment is found (see --vllm-python), else transformers",
    )
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when sampling")
    p.add_argument("--batch-size", type=int, default=16, help="conversations per batch")
    p.add_argument("--max-turns", type=int, default=None, help="assistant turns kept per row")
    p.add_argument("--output", required=True, help="regenerated .jsonl (+ .meta.json beside it)")
    p.add_argument(
        "--vllm-python",
        default=None,
        help="interpreter of the vLLM environment (default: $SPECULATORS_VLLM_PYTHON, .venv-vllm)",
    )
