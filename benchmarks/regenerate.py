"""Regeneration speed against its compute floor, on the demo's target and chats.

The floor is 2 x parameters FLOPs per generated token at this machine's measured matmul rate
(512x576 by 576x1536, all threads: a SmolLM2 MLP matmul); prompts (prefill) come on top and are
not counted. Rows are selected as the demo selects them (seed 0, 24 held out) and each is asked
its first user turn, as `regenerate` with max_turns 1 does.

Usage: python benchmarks/regenerate.py --backend transformers|vllm [--rows 128]
       [--max-new-tokens 128] [--model resources/models/smollm2]
       [--chats resources/datasets/chitchat.jsonl]
The vLLM backend reruns this script with the vLLM environment's interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parent.parent
# benchmarks/vllm.py would shadow the vllm package for a script started from this folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def matmul_gflops(dtype) -> float:
    import torch

    a = torch.randn(512, 576).to(dtype)
    b = torch.randn(576, 1536).to(dtype)
    for _ in range(3):
        a @ b
    n, start = 20, time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 512 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9


def parameters(model_dir: Path) -> int:
    from math import prod

    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(prod(st.get_slice(name).get_shape()) for name in st.keys())
    return total


def first_turns(chats: Path, rows: int) -> list[list[dict]]:
    from speculators.data import sources

    selection = sources.select(sources.load_rows(str(chats)), 0, 24, rows)
    prompts = []
    for row in selection.train:
        conv = row["conversations"]
        first = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompts.append(conv[:first])
    return prompts


def measure(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from speculators.devices import default_device, describe, target_compute_dtype

    convs = first_turns(args.chats, args.rows)
    # The floor's matmul rate first, before an engine's worker processes compete for the cores.
    compute = target_compute_dtype(str(args.model))
    fp32 = matmul_gflops(torch.float32)
    policy = fp32 if compute == torch.float32 else matmul_gflops(compute)
    if args.backend == "vllm":
        from speculators.vllm import generate as backend

        def start():
            backend.engine(str(args.model))
    else:
        from speculators.data import regenerate as backend

        def start():
            backend._load_target(str(args.model))

    began = time.perf_counter()
    start()
    start_s = time.perf_counter() - began
    began = time.perf_counter()
    answers = backend.generate_chat_answers(
        str(args.model), convs, args.max_new_tokens, 0.0, 1.0, 0
    )
    seconds = time.perf_counter() - began
    tok = AutoTokenizer.from_pretrained(args.model)
    # Generated tokens: the answer's own tokens plus the end-of-turn token it stopped on.
    tokens = sum(
        len(tok(a.text, add_special_tokens=False)["input_ids"]) + (not a.truncated) for a in answers
    )
    flops_per_token = 2 * parameters(args.model)
    rate = tokens / seconds
    return {
        "backend": args.backend,
        "device": describe(default_device()),
        "compute_dtype": str(compute).removeprefix("torch."),
        "conversations": len(convs),
        "max_new_tokens": args.max_new_tokens,
        "truncated": sum(a.truncated for a in answers),
        "generated_tokens": tokens,
        "start_s": round(start_s, 1),
        "generate_s": round(seconds, 1),
        "tokens_per_s": round(rate, 1),
        "tokens_per_s_with_start": round(tokens / (seconds + start_s), 1),
        "fp32_matmul_gflops": round(fp32, 1),
        "floor_tokens_per_s_fp32": round(fp32 * 1e9 / flops_per_token, 1),
        "fraction_of_fp32_floor": round(rate / (fp32 * 1e9 / flops_per_token), 3),
        "policy_matmul_gflops": round(policy, 1),
        "fraction_of_policy_floor": round(rate / (policy * 1e9 / flops_per_token), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--model", type=Path, default=REPO / "resources" / "models" / "smollm2")
    p.add_argument("--chats", type=Path, default=REPO / "resources" / "datasets" / "chitchat.jsonl")
    args = p.parse_args()
    if args.backend == "vllm":
        from speculators.vllm import find_vllm_python, vllm_importable

        if not vllm_importable():
            python = find_vllm_python()
            if python is None:
                sys.exit("no vLLM environment: bash scripts/install.sh vllm")
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            sys.exit(subprocess.call([str(python), __file__, *sys.argv[1:]], env=env))
    print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
