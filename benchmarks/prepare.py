"""Benchmark of the prepare stage on SmolLM2 and chitchat: tokenising + masking rows/s
(datasets.map, batched, num_proc) and the wall time of CPU regeneration of a few conversations.

Usage: python benchmarks/prepare.py [--rows N] [--num-proc 1 2] [--seq-length 512 2048]
       [--regenerate 32]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def cpu_seconds() -> float:
    """CPU time of this process and its finished workers: on a shared machine the wall
    clock says more about the neighbours than about the code."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


MODEL = REPO / "resources" / "models" / "smollm2"
CHATS = REPO / "resources" / "datasets" / "chitchat.jsonl"


def bench_tokenise(rows: int | None, num_proc: int, seq_length: int) -> dict:
    from speculators.data import prepare, sources

    selection = sources.select(sources.load_rows(str(CHATS)), 0, 0, rows)
    args = argparse.Namespace(
        target=str(MODEL), seq_length=seq_length, min_supervised_tokens=1, num_proc=num_proc
    )
    prepare._masker(args.target, seq_length)  # tokenizer load is not part of the rate
    start, cpu = time.perf_counter(), cpu_seconds()
    dataset, dropped = prepare.tokenise(selection, args)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    n = len(selection.train)
    return {
        "conversations": n,
        "rows": len(dataset),
        "num_proc": num_proc,
        "seq_length": seq_length,
        "seconds": round(seconds, 2),
        "rows_per_s": round(n / seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "rows_per_cpu_s": round(n / cpu, 1),
        "mean_length": round(sum(dataset["seq_len"]) / len(dataset), 1),
        "dropped": dict(dropped),
    }


def bench_regenerate(conversations: int) -> dict:
    import torch

    from speculators.data import regenerate, sources

    selection = sources.select(sources.load_rows(str(CHATS)), 0, 0, conversations)
    settings = {
        "target": str(MODEL),
        "backend": "transformers",
        "seed": 0,
        "max_new_tokens": 64,
        "temperature": 0.0,
        "top_p": 1.0,
        "batch_size": 16,
        "max_turns": 2,
    }
    load = time.perf_counter()
    regenerate._load_target(str(MODEL))
    load = time.perf_counter() - load
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), cpu_seconds()
        counts = regenerate.regenerate_selection(
            selection, regenerate.generate_chat_answers, settings, Path(tmp) / "r.jsonl"
        )
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {
        "conversations": conversations,
        "answers": counts["answers"],
        "torch_threads": torch.get_num_threads(),
        "model_load_s": round(load, 1),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "s_per_conversation": round(seconds / conversations, 2),
        **{k: settings[k] for k in ("max_new_tokens", "batch_size", "max_turns")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="conversations (default: all)")
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-length", type=int, nargs="*", default=[512, 2048])
    p.add_argument("--regenerate", type=int, default=32, help="conversations (0 = skip)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import datasets

    datasets.disable_progress_bars()
    for seq_length in args.seq_length:
        for num_proc in args.num_proc:
            print("tokenise+mask", bench_tokenise(args.rows, num_proc, seq_length), flush=True)
    if args.regenerate:
        print("regenerate", bench_regenerate(args.regenerate), flush=True)


if __name__ == "__main__":
    main()
