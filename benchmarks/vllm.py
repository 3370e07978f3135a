"""Speed of the vLLM backends on SmolLM2 and chitchat: capture (tokens/s) and evaluate-vllm.

Runs from the main environment; the CLIs hand the work to the vLLM interpreter, as in the
workflow. The draft is untrained, so the evaluation measures vLLM's drafting overhead.
Usage: python benchmarks/vllm.py [--rows 64] [--prompts 16] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from speculators.vllm import find_vllm_python

REPO = Path(__file__).resolve().parent.parent


def prepared_rows(target: Path, chats: Path, rows: int, out: Path) -> int:
    """The first `rows` chitchat conversations in the target's template (mask: all ones)."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    data = {"input_ids": [], "loss_mask": [], "seq_len": []}
    with open(chats) as f:
        for line in f:
            conv = json.loads(line)["conversations"]
            ids = list(tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
            ids = ids[:1024]
            data["input_ids"].append(ids)
            data["loss_mask"].append([1] * len(ids))
            data["seq_len"].append(len(ids))
            if len(data["seq_len"]) == rows:
                break
    datasets.Dataset.from_dict(data).save_to_disk(str(out))
    return sum(data["seq_len"])


def random_draft(target: Path, out: Path) -> None:
    from speculators.models import Eagle3DraftConfig, Eagle3DraftModel
    from speculators.models.io import save_draft

    n = json.loads((target / "config.json").read_text())["num_hidden_layers"]
    aux = [2, n // 2, n - 3]
    cfg = Eagle3DraftConfig.from_target(target, draft_vocab_size=8192, aux_layer_ids=aux)
    t2d = np.zeros(cfg.vocab_size, dtype=bool)
    t2d[:8192] = True
    torch.manual_seed(0)
    model = Eagle3DraftModel.from_target(cfg, target, np.zeros(8192, dtype=np.int64), t2d)
    save_draft(
        model, out, verifier_name_or_path=str(target), verifier_architectures=["LlamaForCausalLM"]
    )


def speculators(*argv: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "speculators.cli", *argv], capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"speculators {argv[0]} failed:\n{proc.stderr[-4000:]}")
    return wall, proc.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=Path, default=REPO / "resources/models/smollm2")
    p.add_argument("--chats", type=Path, default=REPO / "resources/datasets/chitchat.jsonl")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    python = find_vllm_python()
    if python is None:
        sys.exit("no vLLM environment (bash scripts/install.sh vllm)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = prepared_rows(args.target, args.chats, args.rows, tmp / "prepared")
        wall, log = speculators(
            "hidden-states", "--backend", "vllm", "--target", str(args.target),
            "--prepared", str(tmp / "prepared"), "--output", str(tmp / "hs"),
            "--dtype", args.dtype, "--vllm-python", str(python),
        )  # fmt: skip
        m = re.search(r"captured \d+ samples, (\d+) tokens in ([\d.]+) s", log)
        capture_s = float(m.group(2)) if m else float("nan")
        print(f"capture: {args.rows} rows, {tokens} tokens, {args.dtype}: wall {wall:.1f} s,"
              f" capture loop {capture_s:.1f} s = {tokens / capture_s:.0f} tokens/s"
              f" (wall includes engine start and interpreter hand-over)")  # fmt: skip
        random_draft(args.target, tmp / "draft")
        wall, _ = speculators(
            "evaluate-vllm", "--target", str(args.target), "--draft", str(tmp / "draft"),
            "--prompts", str(args.chats), "--num-prompts", str(args.prompts),
            "--max-new-tokens", str(args.max_new_tokens), "--k", "3",
            "--output", str(tmp / "vllm.json"), "--vllm-mode", "on", "--vllm-python", str(python),
        )  # fmt: skip
        data = json.loads((tmp / "vllm.json").read_text())
        (row,) = data["results"]
        print(f"evaluate-vllm: {args.prompts} prompts x <= {args.max_new_tokens} tokens, k=3:"
              f" wall {wall:.1f} s; engine start {data['baseline_engine_start_s']} s (target),"
              f" {row['engine_start_s']} s (target+draft); baseline"
              f" {row['baseline_tokens_per_s']} tok/s, with draft {row['tokens_per_s']} tok/s,"
              f" acceptance_length {row['acceptance_length']}")  # fmt: skip


if __name__ == "__main__":
    main()
