"""Held-out evaluation prompts: read chat or MT-Bench JSONL files into prompt specs.

A spec is the conversation up to (excluding) its first assistant turn plus, for MT-Bench style
rows, the follow-up user turns that the evaluator asks after the target's own answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from speculators.errors import SpeculatorsError

# ShareGPT-style role names, accepted so user files need no conversion.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}


@dataclass
class PromptSpec:
    id: str
    messages: list[dict]  # system/user messages before the first assistant turn
    followups: list[str] = field(default_factory=list)  # later user turns (MT-Bench)


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
    if "turns" in row:
        turns = row["turns"]
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise SpeculatorsError(where, '"turns" must be a non-empty list of strings')
        return PromptSpec(rid, [{"role": "user", "content": turns[0]}], list(turns[1:]))
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
    return PromptSpec(rid, prefix)


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    path = Path(path)
    if not path.is_file():
        raise SpeculatorsError(path, "prompt file not found")
    specs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpeculatorsError(f"{path}:{lineno}", f"not valid JSON ({e.msg})") from None
            spec = parse_row(f"{path}:{lineno}", row)
            if spec is not None:
                specs.append(spec)
    return specs


def load_prompts(paths: list[str | Path], num_prompts: int) -> list[PromptSpec]:
    """The first `num_prompts` specs, taken round-robin across files so each dataset counts."""
    per_file = [read_prompt_file(p) for p in paths]
    if not any(per_file):
        raise SpeculatorsError(", ".join(map(str, paths)), "no prompt with a user turn found")
    specs: list[PromptSpec] = []
    for i in range(max(map(len, per_file))):
        specs += [rows[i] for rows in per_file if i < len(rows)]
    return specs[:num_prompts]


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
