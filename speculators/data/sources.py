"""Chat sources (built-in names, Hugging Face ids, local files) and the one seeded selection.

`load_rows` reads raw rows; `select` normalises roles, shuffles with the seed, holds out the
evaluation conversations and keeps `max_samples` training ones. Bad rows are skipped and counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speculators.errors import SpeculatorsError

log = logging.getLogger(__name__)

# name -> (Hugging Face dataset id, default split, extra load_dataset kwargs)
BUILTIN_SOURCES = {
    # The repository holds several JSON files with different schemas; this is the cleaned one.
    "sharegpt": (
        "Aeala/ShareGPT_Vicuna_unfiltered",
        "train",
        {"data_files": "ShareGPT_V4.3_unfiltered_cleaned_split.json"},
    ),
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", "train_sft", {}),
}
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
SPLITS = ("train", "eval")


@dataclass
class Selection:
    """Selected conversations, each `{"id", "conversations"}`, plus what was skipped and why."""

    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    source_rows: int = 0
    rows_examined: int = 0
    presplit: bool = False  # the rows carried a split (regenerated file): nothing was reshuffled

    def summary(self) -> dict:
        return {
            "source_rows": self.source_rows,
            "rows_examined": self.rows_examined,
            "dropped": dict(sorted(self.dropped.items())),
            "train": len(self.train),
            "eval": len(self.eval),
            "presplit": self.presplit,
        }


def _is_local(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or Path(source).exists()


def _read_jsonl(path: Path, text: str) -> list:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SpeculatorsError(f"{path} line {lineno}", f"not valid JSON ({e.msg})") from None
    return rows


def _read_local(path: Path) -> list:
    if not path.is_file():
        raise SpeculatorsError(path, "file not found (expected a .json, .jsonl or .parquet file)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise SpeculatorsError(path, f"not a readable Parquet file ({e})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpeculatorsError(path, "not valid JSON (not UTF-8 text)") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" = JSON Lines saved as .json
                raise SpeculatorsError(path, f"not valid JSON ({e})") from None
            return _read_jsonl(path, text)
        if isinstance(data, dict) and ("conversations" in data or "messages" in data):
            return [data]
        if not isinstance(data, list):
            raise SpeculatorsError(path, "expected a JSON list of conversation objects")
        return data
    return _read_jsonl(path, text)


def _load_hub(source: str, split: str | None) -> Sequence:
    import datasets

    name, default_split, kwargs = BUILTIN_SOURCES.get(source, (source, "train", {}))
    split = split or default_split
    try:
        return datasets.load_dataset(name, split=split, **kwargs)
    except Exception as e:  # offline, unknown id, unknown split: all end here
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SpeculatorsError(
            source,
            f"cannot load Hugging Face dataset {name} split {split}: {type(e).__name__} {detail}",
        ) from None


def load_rows(source: str, split: str | None = None) -> Sequence:
    """Raw rows of a source in source order: a list (local files) or a `datasets.Dataset`."""
    if _is_local(source):
        path = Path(source)
        if path.is_dir():
            raise SpeculatorsError(path, "is a folder; expected a .json, .jsonl or .parquet file")
        return _read_local(path)
    return _load_hub(source, split)


def _field(message: dict, *keys):
    for key in keys:  # Arrow fills absent keys with None when schemas are merged
        if message.get(key) is not None:
            return message[key]
    return None


def normalise(row) -> tuple[list[dict] | None, str | None]:
    """(messages with roles user/assistant/system, None) or (None, why the row is skipped)."""
    if not isinstance(row, dict):
        return None, "not_an_object"
    messages = _field(row, "conversations", "messages")
    if not isinstance(messages, list) or not messages:
        return None, "no_conversation"
    out = []
    for m in messages:
        if not isinstance(m, dict):
            return None, "bad_message"
        role = _field(m, "role", "from")
        role = ROLES.get(role.lower()) if isinstance(role, str) else None
        if role is None:
            return None, "unknown_role"
        content = _field(m, "content", "value")
        if not isinstance(content, str):
            return None, "non_string_content"
        if not content.strip():
            return None, "empty_content"
        message = {"role": role, "content": content}
        if role == "assistant" and _field(m, "truncated") is True:
            message["truncated"] = True  # a regenerated answer cut at max_new_tokens
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        return None, "no_assistant_turn"
    return out, None


def row_id(row, index: int) -> str:
    for key in ("id", "prompt_id"):
        value = row.get(key) if isinstance(row, dict) else None
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return str(index)


def select(
    rows: Sequence, seed: int, eval_prompts: int, max_samples: int | None = None
) -> Selection:
    """Seeded shuffle, then the first `eval_prompts` valid rows are held out for evaluation and
    the next `max_samples` (all when None) are the training rows. Rows are read lazily in the
    shuffled order, so a small selection from a large hub dataset touches few rows."""
    sel = Selection(source_rows=len(rows))
    order = np.random.default_rng(seed).permutation(len(rows))
    for index in order:
        full = max_samples is not None and len(sel.train) >= max_samples
        if full and len(sel.eval) >= eval_prompts:
            break
        index = int(index)
        row = rows[index]
        sel.rows_examined += 1
        conversation, why = normalise(row)
        if why:
            sel.dropped[why] += 1
            continue
        item = {"id": row_id(row, index), "conversations": conversation}
        (sel.eval if len(sel.eval) < eval_prompts else sel.train).append(item)
    log.info(
        "selected %d train + %d eval of %d rows (seed %d, examined %d, skipped %s)",
        len(sel.train),
        len(sel.eval),
        len(rows),
        seed,
        sel.rows_examined,
        dict(sel.dropped) or "none",
    )
    return sel


def presplit(rows: Sequence, where) -> Selection | None:
    """The selection stored in rows that carry `split` (a regenerated file), else None."""
    if not len(rows) or not isinstance(rows[0], dict) or "split" not in rows[0]:
        return None
    sel = Selection(source_rows=len(rows), rows_examined=len(rows), presplit=True)
    for index, row in enumerate(rows):
        split = row.get("split") if isinstance(row, dict) else None
        if split not in SPLITS:
            raise SpeculatorsError(
                f"{where} row {index + 1}", f"split must be one of {SPLITS}, got {split!r}"
            )
        conversation, why = normalise(row)
        if why:
            sel.dropped[why] += 1
            continue
        item = {"id": row_id(row, index), "conversations": conversation}
        (sel.train if split == "train" else sel.eval).append(item)
    log.info(
        "%s carries its split: %d train + %d eval rows, not reshuffled or reselected",
        where,
        len(sel.train),
        len(sel.eval),
    )
    return sel
