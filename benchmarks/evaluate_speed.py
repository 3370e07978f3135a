"""Speed of the in-process evaluator on a real target with an untrained draft.

An untrained draft is almost never accepted, so this measures the evaluator's own cost: plain
greedy tokens/s (the baseline) and tokens/s with drafting (draft + verification overhead).
Usage: python benchmarks/evaluate_speed.py resources/models/smollm2 resources/datasets/chitchat.jsonl
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from speculators.cli import main
from speculators.models import Eagle3DraftConfig, Eagle3DraftModel
from speculators.models.io import save_draft


def untrained_draft(target: str, out: Path, draft_vocab_size: int, ttt_steps: int) -> None:
    n_layers = json.loads((Path(target) / "config.json").read_text())["num_hidden_layers"]
    cfg = Eagle3DraftConfig.from_target(
        target,
        draft_vocab_size=draft_vocab_size,
        aux_layer_ids=[2, n_layers // 2, n_layers - 3],
        ttt_steps=ttt_steps,
    )
    t2d = np.zeros(cfg.vocab_size, dtype=bool)
    t2d[:draft_vocab_size] = True  # the first ids; which ones does not matter untrained
    torch.manual_seed(0)
    model = Eagle3DraftModel.from_target(
        cfg, target, np.zeros(draft_vocab_size, dtype=np.int64), t2d
    )
    save_draft(model, out, verifier_name_or_path=target, verifier_architectures=[])


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target")
    p.add_argument("prompts")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--k", type=int, nargs="+", default=[3])
    p.add_argument("--draft-vocab-size", type=int, default=4096)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        draft, out = Path(tmp) / "draft", Path(tmp) / "inprocess.json"
        untrained_draft(args.target, draft, args.draft_vocab_size, max(args.k))
        start = time.perf_counter()
        rc = main(["evaluate", "--target", args.target, "--draft", str(draft), "--prompts", args.prompts,
                   "--num-prompts", str(args.num_prompts), "--max-new-tokens", str(args.max_new_tokens),
                   "--k", *map(str, args.k), "--output", str(out)])  # fmt: skip
        if rc:
            raise SystemExit(rc)
        result = json.loads(out.read_text())
    print(f"wall {time.perf_counter() - start:.1f} s (load, baseline, every K)")
    for r in result["results"]:
        print(json.dumps({k: r[k] for k in ("k", "acceptance_length", "tokens_per_s", "baseline_tokens_per_s",
                                             "speedup", "greedy_mismatches", "output_tokens")}))  # fmt: skip


if __name__ == "__main__":
    cli()
