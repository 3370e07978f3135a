"""Evaluation prompts: read chat or MT-Bench JSONL files into prompt specs, per benchmark.

A spec is the conversation up to (excluding) its first assistant turn plus, for MT-Bench style
rows, the follow-up user turns that the evaluator asks after the target's own answer, and the
row's `category` when it has one. A `Benchmark` names one prompt set (held-out rows, MT-Bench,
HumanEval or a user's file) with its own prompt count and answer length; `--benchmarks` passes
a list of them to both evaluators as JSON.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from speculators.errors import SpeculatorsError
from speculators.fileio import json_lines

# ShareGPT-style role names, accepted so user files need no conversion.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}


@dataclass
class PromptSpec:
    id: str
    messages: list[dict]  # system/user messages before the first assistant turn
    followups: list[str] = field(default_factory=list)  # later user turns (MT-Bench)
    category: str | None = None  # MT-Bench's writing, coding, ...; None when the data has none


def _message(where: str, m) -> dict:
    if not isinstance(m, dict):
        raise SpeculatorsError(where, "a conversation message is not an object")
    role = m.get("role", m.get("from"))
    content = m.get("content", m.get("value"))
    if not isinstance(role, str) or not isinstance(content, str):
        raise SpeculatorsError(where, "a message lacks a string role/content")
    return {"role": _ROLE_ALIASES.get(role, role), "content": content}


def parse_row(where: str, row) -> PromptSpec | None:
    """One JSONL row -> PromptSpec; None for a conversation with no user turn to answer."""
    if not isinstance(row, dict):
        raise SpeculatorsError(where, "row is not a JSON object")
    rid = str(row.get("id", row.get("question_id", where)))
    category = row.get("category")
    category = str(category) if category not in (None, "") else None
    if "turns" in row:
        turns = row["turns"]
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise SpeculatorsError(where, '"turns" must be a non-empty list of strings')
        return PromptSpec(rid, [{"role": "user", "content": turns[0]}], list(turns[1:]), category)
    conv = row.get("conversations", row.get("messages"))
    if not isinstance(conv, list):
        raise SpeculatorsError(where, 'row has none of "conversations", "messages", "turns"')
    prefix = []
    for m in conv:
        m = _message(where, m)
        if m["role"] == "assistant":
            break
        prefix.append(m)
    if not any(m["role"] == "user" for m in prefix):
        return None
    return PromptSpec(rid, prefix, category=category)


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    path = Path(path)
    if not path.is_file():
        raise SpeculatorsError(path, "prompt file not found")
    specs = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a leading BOM is not a JSON error
            for where, row in json_lines(f, path):
                spec = parse_row(where, row)
                if spec is not None:
                    specs.append(spec)
    except UnicodeDecodeError as e:
        raise SpeculatorsError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return specs


def load_prompts(
    paths: list[str | Path], num_prompts: int, seed: int | None = None
) -> list[PromptSpec]:
    """`num_prompts` specs from the files, taken round-robin across files so each dataset counts.

    `seed` None takes the first ones; an integer draws a seeded sample (kept in file order,
    spread evenly over the rows' categories), so two seeds measure two samples of the same
    prompt set. Fewer rows than asked: all of them.
    """
    per_file = [read_prompt_file(p) for p in paths]
    if not any(per_file):
        raise SpeculatorsError(", ".join(map(str, paths)), "no prompt with a user turn found")
    specs: list[PromptSpec] = []
    for i in range(max(map(len, per_file))):
        specs += [rows[i] for rows in per_file if i < len(rows)]
    if seed is None or num_prompts >= len(specs):
        return specs[:num_prompts]
    return [specs[i] for i in sample_indices([s.category for s in specs], num_prompts, seed)]


def sample_indices(categories: list[str | None], n: int, seed: int) -> list[int]:
    """`n` of the row indices, drawn with `seed`, spread evenly over the categories (rows
    without one form their own), returned in row order."""
    rng = random.Random(seed)
    by_cat: dict = {}
    for i, c in enumerate(categories):
        by_cat.setdefault(c, []).append(i)
    groups = list(by_cat.values())
    for rows in groups:
        rng.shuffle(rows)
    rng.shuffle(groups)  # which categories come first when n is less than their number
    # Round-robin over the categories: the j-th pick of every category before any (j+1)-th.
    order = sorted((j, ci, i) for ci, rows in enumerate(groups) for j, i in enumerate(rows))
    return sorted(i for _, _, i in order[:n])


@dataclass
class Benchmark:
    """One prompt set to measure: its name, files, prompt count and answer length (tokens)."""

    name: str
    paths: list[str]
    num_prompts: int
    max_new_tokens: int

    def load(self, seed: int | None) -> list[PromptSpec]:
        return load_prompts(self.paths, self.num_prompts, seed)


def parse_benchmarks(text: str, where: str = "--benchmarks") -> list[Benchmark]:
    """`[{"name", "paths", "num_prompts", "max_new_tokens"}, ...]` (JSON) -> Benchmarks.

    Errors: `SpeculatorsError` naming `where` for bad JSON, a missing/invalid field, a count
    below 1 or a name given twice.
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpeculatorsError(where, f"not valid JSON ({e.msg})") from None
    if not isinstance(raw, list) or not raw:
        raise SpeculatorsError(where, "must be a non-empty JSON list of benchmarks")
    out: list[Benchmark] = []
    for i, b in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(b, dict) or not isinstance(b.get("name"), str) or not b["name"]:
            raise SpeculatorsError(at, 'needs a "name"')
        paths = b.get("paths")
        if not (isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths)):
            raise SpeculatorsError(at, '"paths" must be a non-empty list of prompt files')
        counts = [b.get("num_prompts"), b.get("max_new_tokens")]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
            raise SpeculatorsError(at, '"num_prompts" and "max_new_tokens" must be integers >= 1')
        if any(o.name == b["name"] for o in out):
            raise SpeculatorsError(at, f"benchmark {b['name']!r} is given twice")
        out.append(Benchmark(b["name"], paths, *counts))
    return out


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` in the target's chat template, ending with the assistant header."""
    if not tokenizer.chat_template:
        raise SpeculatorsError(
            tokenizer.name_or_path, "the target's tokenizer has no chat template"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already holds any BOS it wants; do not let the tokenizer add another.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_within(tokenizer, messages: list[dict], max_prompt: int) -> tuple[list[int], bool]:
    """`render_prompt` cut to its last `max_prompt` tokens (they hold the generation prompt);
    also says whether it was cut."""
    ids = render_prompt(tokenizer, messages)
    return ids[-max_prompt:], len(ids) > max_prompt


def follow_up(messages: list[dict], answer: str, question: str) -> list[dict]:
    """The conversation for an MT-Bench follow-up: the target's answer, then the next question."""
    return [
        *messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": question},
    ]
