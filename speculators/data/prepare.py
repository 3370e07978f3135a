"""`speculators prepare` (chats -> tokenised Arrow dataset with loss masks, token counts, stats)
and `speculators combine-freq` (add several token_freq.pt files into one).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from speculators.data import masks, sources
from speculators.errors import SpeculatorsError
from speculators.fileio import atomic_path, torch_save

log = logging.getLogger(__name__)

COLUMNS = ("input_ids", "loss_mask", "seq_len", "row_id", "turn")
PRETOKENIZED = "pretokenized"  # template_mode when every training row came tokenised


def _features():
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int64")),
            "loss_mask": datasets.List(datasets.Value("int64")),
            "seq_len": datasets.Value("int64"),
            "row_id": datasets.Value("string"),
            "turn": datasets.Value("int64"),
            # bookkeeping, removed before saving: a row that is only a record of a drop
            "dropped": datasets.Value("string"),
            "dropped_count": datasets.Value("int64"),
        }
    )


def load_tokenizer(target: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(target)
    except Exception as e:  # missing folder, offline hub id, broken files
        raise SpeculatorsError(target, f"cannot load the target's tokenizer ({e})") from None


@functools.lru_cache(maxsize=4)
def _masker(target: str, seq_length: int) -> masks.Masker:
    # Cached per process: datasets.map workers build it once, not once per batch.
    tokenizer = load_tokenizer(target)
    return masks.Masker(tokenizer, seq_length, masks.end_of_turn_ids(tokenizer, target), target)


@functools.lru_cache(maxsize=4)
def vocab_size(target: str) -> int:
    """Rows the target's embedding has (config `vocab_size`); the tokenizer's length when the
    target folder holds only a tokenizer."""
    from speculators.targets import target_dims

    try:
        return target_dims(target, ("vocab_size",))["vocab_size"]
    except SpeculatorsError:
        return len(load_tokenizer(target))


def _pretokenized_row(item: dict, target: str, seq_length: int) -> tuple[list, list, str]:
    """(input_ids, loss_mask, "") of a pretokenised row, unchanged but cut to seq_length, or
    ([], [], why it is dropped)."""
    ids, mask = item["input_ids"], item["loss_mask"]
    if max(ids) >= vocab_size(target):
        return [], [], "pretokenized_token_out_of_vocab"
    ids, mask = ids[:seq_length], mask[:seq_length]
    if not any(mask):
        return [], [], "no_supervised_tokens"
    return ids, mask, ""


def tokenise_batch(batch, target: str, seq_length: int, min_supervised_tokens: int) -> dict:
    """datasets.map function: rows (JSON: a conversation with optional tools, or a pretokenised
    row) -> rows with loss masks, plus one bookkeeping row per drop reason."""
    out = {name: [] for name in _features()}

    def emit(ids, mask, rid, turn, dropped="", count=0):
        out["input_ids"].append(ids)
        out["loss_mask"].append(mask)
        out["seq_len"].append(len(ids))
        out["row_id"].append(rid)
        out["turn"].append(turn)
        out["dropped"].append(dropped)
        out["dropped_count"].append(count)

    for rid, payload in zip(batch["row_id"], batch["payload"]):
        item = json.loads(payload)
        if "input_ids" in item:
            ids, mask, why = _pretokenized_row(item, target, seq_length)
            rows = [masks.Row(ids, mask, -1)] if not why else []
            result = masks.Result(rows=rows, dropped=Counter({why: 1} if why else {}))
        else:
            result = _masker(target, seq_length).rows(item["conversations"], item.get("tools"))
        for row in result.rows:
            if sum(row.loss_mask) < min_supervised_tokens:
                result.dropped["too_few_supervised_tokens"] += 1
            else:
                emit(row.input_ids, row.loss_mask, rid, row.turn)
        for reason, count in result.dropped.items():
            emit([], [], rid, -1, reason, count)
    return out


def token_frequencies(dataset) -> dict[int, int]:
    """Token id -> count over loss-masked positions only."""
    import pyarrow.compute as pc

    counts: Counter = Counter()
    for table in dataset.with_format("arrow").iter(batch_size=1024):
        ids = pc.list_flatten(table["input_ids"]).to_numpy()
        mask = pc.list_flatten(table["loss_mask"]).to_numpy()
        values, freq = np.unique(ids[mask == 1], return_counts=True)
        counts.update(dict(zip(values.tolist(), freq.tolist())))
    return {int(k): int(v) for k, v in sorted(counts.items())}


def _has_chats(selection: sources.Selection) -> bool:
    return any("conversations" in r for r in selection.train)


def read_selection(args) -> sources.Selection:
    rows = sources.load_rows(args.source, args.split, args.local_copy, args.local_copy_path)
    selection = sources.presplit(rows, args.source, pretokenized=True)
    if selection is None:
        selection = sources.select(
            rows, args.seed, args.eval_prompts, args.max_samples, pretokenized=True
        )
    if not selection.train:
        raise SpeculatorsError(
            args.source, f"no usable training conversation (skipped: {dict(selection.dropped)})"
        )
    return selection


def tokenise(selection: sources.Selection, args):
    """The kept rows (Arrow dataset with COLUMNS) and the drop counts by reason."""
    import datasets

    if _has_chats(selection):  # fail early (no chat template) in this process
        _masker(args.target, args.seq_length)
    # Rows travel as JSON text: Arrow would merge the key sets of all messages and tool-call
    # arguments (absent keys become None, which templates render) and cannot hold a lone
    # surrogate. The payload is the selection item without its id.
    table = datasets.Dataset.from_list(
        [
            {"row_id": r["id"], "payload": json.dumps({k: v for k, v in r.items() if k != "id"})}
            for r in selection.train
        ]
    )
    mapped = table.map(
        tokenise_batch,
        batched=True,
        batch_size=64,
        num_proc=args.num_proc if args.num_proc > 1 and len(table) > args.num_proc else None,
        remove_columns=table.column_names,
        features=_features(),
        fn_kwargs={
            "target": args.target,
            "seq_length": args.seq_length,
            "min_supervised_tokens": args.min_supervised_tokens,
        },
        load_from_cache_file=False,
        desc="tokenise + mask",
    )
    dropped: Counter = Counter()
    keep = []
    for index, (reason, count) in enumerate(zip(mapped["dropped"], mapped["dropped_count"])):
        if reason:
            dropped[reason] += count
        else:
            keep.append(index)
    kept = mapped.select(keep).remove_columns(["dropped", "dropped_count"])
    return kept, dropped


def _write_eval_prompts(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def run_prepare(args) -> None:
    started = time.time()
    selection = read_selection(args)
    # Only chat rows need the chat template; pretokenised rows need just the tokenizer.
    masker = _masker(args.target, args.seq_length) if _has_chats(selection) else None
    tokenizer = masker.tokenizer if masker else load_tokenizer(args.target)
    mode = masker.mode if masker else PRETOKENIZED
    log.info("template mode: %s", mode)
    dataset, dropped = tokenise(selection, args)
    if len(dataset) == 0:
        raise SpeculatorsError(
            args.source, f"every conversation was dropped while tokenising ({dict(dropped)})"
        )
    first = dataset[0]
    log.info(
        "first prepared row of %s (row_id %s, supervised tokens in ⟦ ⟧):\n%s",
        args.dataset_name,
        first["row_id"],
        masks.show_row(tokenizer, first["input_ids"], first["loss_mask"]),
    )
    freq = token_frequencies(dataset)
    lengths = np.asarray(dataset["seq_len"])
    turns = np.asarray(dataset["turn"])
    per_turn_ids = set(np.asarray(dataset["row_id"])[turns >= 0].tolist())
    row_drops = {k: v for k, v in sorted(dropped.items()) if not k.startswith("turn_")}
    stats = {
        "dataset": args.dataset_name,
        "source": args.source,
        "target": args.target,
        "selection": selection.summary(),
        "rows_in": len(selection.train),
        "rows_out": len(dataset),
        "conversations_out": len(set(dataset["row_id"])),
        "dropped": row_drops,
        "turns_skipped": {k: v for k, v in sorted(dropped.items()) if k.startswith("turn_")},
        "supervised_tokens": int(sum(freq.values())),
        "tokens": int(lengths.sum()),
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
        "seq_length": args.seq_length,
        "template_mode": mode,
        "per_turn_rows": {
            "used": bool(per_turn_ids),
            "conversations": len(per_turn_ids),
            "reason": masks.PER_TURN_REASON if per_turn_ids else None,
        },
        "end_of_turn_ids": sorted(masker.eos_ids) if masker else [],
        # Answers cut at max_new_tokens by regeneration: kept, with no end-of-turn supervised.
        "truncated_answers": sum(
            bool(m.get("truncated")) for r in selection.train for m in r.get("conversations", [])
        ),
        "eval_prompts": len(selection.eval),
        "seconds": round(time.time() - started, 2),
    }
    with atomic_path(args.output, is_dir=True) as tmp:
        dataset.save_to_disk(str(tmp / "dataset"))
        torch_save(freq, tmp / "token_freq.pt")
        _write_eval_prompts(tmp / "eval_prompts.jsonl", selection.eval)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info(
        "%s: %d conversations -> %d rows, %d supervised tokens, dropped %s, %.1f s",
        args.dataset_name,
        len(selection.train),
        len(dataset),
        stats["supervised_tokens"],
        row_drops or "none",
        time.time() - started,
    )


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="target model folder or Hugging Face id")
    p.add_argument("--source", required=True, help="chat source or a regenerated JSONL")
    p.add_argument("--split", default=None, help="dataset split (default: the source's own)")
    p.add_argument("--dataset-name", required=True, help="name recorded in the statistics")
    sources.add_local_copy_arguments(p)
    p.add_argument("--seq-length", type=int, default=2048, help="truncate rows to N tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and held-out split")
    p.add_argument("--max-samples", type=int, default=None, help="training conversations kept")
    p.add_argument("--min-supervised-tokens", type=int, default=1, help="drop rows with fewer")
    p.add_argument("--eval-prompts", type=int, default=64, help="conversations held out")
    p.add_argument("--num-proc", type=int, default=1, help="tokenisation worker processes")
    p.add_argument("--output", required=True, help="output folder")


def add_combine_freq_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="token_freq.pt files")
    p.add_argument("--output", required=True, help="combined token_freq.pt")


def load_frequencies(path) -> dict[int, int]:
    import torch

    if not os.path.isfile(path):
        raise SpeculatorsError(path, "file not found")
    try:
        freq = torch.load(path, weights_only=True)
    except Exception as e:
        raise SpeculatorsError(path, f"not a token_freq.pt file ({e})") from None
    if not isinstance(freq, dict) or not all(
        isinstance(k, int) and isinstance(v, int) for k, v in freq.items()
    ):
        raise SpeculatorsError(path, "expected a dict[int, int] of token id -> count")
    return freq


def run_combine_freq(args) -> None:
    total: Counter = Counter()
    for path in args.inputs:
        total.update(load_frequencies(path))
    torch_save({k: v for k, v in sorted(total.items())}, args.output)
    log.info(
        "%d files -> %d distinct tokens, %d counted", len(args.inputs), len(total), total.total()
    )
