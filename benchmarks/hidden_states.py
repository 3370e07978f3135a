"""Benchmark of `speculators hidden-states` (transformers backend) on SmolLM2 and chitchat.

Measures tokens/s against a naive loop (batch 1, `output_hidden_states=True`, every layer
kept, one `torch.save` per sample), bytes on disk per token against the floor, and peak RSS
for the same rows repeated 2x and 8x. Usage: python benchmarks/hidden_states.py [--rows 200]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "resources" / "models" / "smollm2"
CHATS = REPO / "resources" / "datasets" / "chitchat.jsonl"


def make_prepared(path: Path, rows: int, seq_length: int, repeat: int = 1) -> int:
    """Tokenise the first `rows` chats with the model's chat template, `repeat` times over
    (same lengths, more rows: isolates dataset size for the memory figure); returns tokens."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    cols = {"input_ids": [], "loss_mask": [], "seq_len": [], "row_id": [], "turn": []}
    with open(CHATS) as f:
        for line, _ in zip(f, range(rows)):
            chat = json.loads(line)
            ids = tok.apply_chat_template(chat["conversations"], tokenize=True, return_dict=False)
            ids = list(ids)[:seq_length]
            cols["input_ids"].append(ids)
            cols["loss_mask"].append([1] * len(ids))  # the mask does not change the cost
            cols["seq_len"].append(len(ids))
            cols["row_id"].append(chat["id"])
            cols["turn"].append(0)
    cols = {k: v * repeat for k, v in cols.items()}
    datasets.Dataset.from_dict(cols).save_to_disk(str(path))
    return sum(cols["seq_len"])


def naive(prepared: Path, out: Path, layer_ids: list[int]) -> tuple[float, float, float]:
    """The baseline: one row at a time, all hidden states materialised.

    Returns (wall seconds with model loading, wall seconds of the loop, CPU seconds in all)."""
    import datasets
    from transformers import AutoModelForCausalLM

    start, cpu_start = time.perf_counter(), time.process_time()
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).eval()
    out.mkdir(parents=True, exist_ok=True)
    ds = datasets.load_from_disk(str(prepared))
    loop_start = time.perf_counter()
    for idx, row in enumerate(ds):
        ids = torch.tensor(row["input_ids"])[None]
        with torch.inference_mode():
            hs = model(ids, output_hidden_states=True).hidden_states
            # transformers' last entry is post-norm (not what training needs), but it costs
            # the same time and bytes as the pre-norm state, which is all this loop measures.
            states = [hs[i][0] for i in layer_ids]
        torch.save(
            {
                "input_ids": ids[0],
                "hidden_states": states,
                "loss_mask": torch.tensor(row["loss_mask"]),
            },
            out / f"data_{idx}.pt",
        )
    end = time.perf_counter()
    return end - start, end - loop_start, time.process_time() - cpu_start


def ours(prepared: Path, out: Path, batch_tokens: int) -> tuple[float, float, float, int]:
    """`speculators hidden-states` in a fresh process.

    Returns (wall seconds of the command, wall seconds of its capture loop, CPU seconds of the
    command, peak RSS in KiB)."""
    code = (
        "import resource, subprocess, sys, time;"
        "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode;"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print(time.perf_counter() - t, r.ru_utime + r.ru_stime, r.ru_maxrss, rc)"
    )
    cmd = [sys.executable, "-c", code, str(Path(sys.executable).parent / "speculators")]
    cmd += ["hidden-states", "--target", str(MODEL), "--prepared", str(prepared)]
    cmd += ["--output", str(out), "--batch-tokens", str(batch_tokens)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    seconds, cpu, rss, rc = res.stdout.split()
    if rc != "0":
        sys.exit(res.stderr)
    loop = re.search(r"tokens in ([0-9.]+) s", res.stderr)
    return float(seconds), float(loop.group(1)), float(cpu), int(rss)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("data_*.pt"))


def throughput(args, tmp: Path, layer_ids: list[int], hidden: int) -> dict:
    tokens = make_prepared(tmp / "prep", args.rows, args.seq_length)
    print(f"{args.rows} rows, {tokens} tokens (mean {tokens / args.rows:.0f})", flush=True)
    t_ours, loop_ours, cpu_ours, _ = ours(tmp / "prep", tmp / "ours", args.batch_tokens)
    print(f"ours: {t_ours:.1f} s wall, {loop_ours:.1f} s loop, {cpu_ours:.1f} CPU s", flush=True)
    t_naive, loop_naive, cpu_naive = naive(tmp / "prep", tmp / "naive", layer_ids)
    print(
        f"naive: {t_naive:.1f} s wall, {loop_naive:.1f} s loop, {cpu_naive:.1f} CPU s", flush=True
    )
    floor = len(layer_ids) * hidden * 2 + 2 * 8  # bf16 states + int64 ids and mask
    per_token = disk_bytes(tmp / "ours") / tokens
    return {
        "rows": args.rows,
        "tokens": tokens,
        "tokens_per_s_with_load": {
            "ours": round(tokens / t_ours),
            "naive": round(tokens / t_naive),
            "speedup": round(t_naive / t_ours, 2),
        },
        # On a shared machine CPU time is the fairer clock: wall time depends on the load.
        "tokens_per_cpu_s": {
            "ours": round(tokens / cpu_ours),
            "naive": round(tokens / cpu_naive),
            "speedup": round(cpu_naive / cpu_ours, 2),
        },
        "tokens_per_s_loop": {
            "ours": round(tokens / loop_ours),
            "naive": round(tokens / loop_naive),
            "speedup": round(loop_naive / loop_ours, 2),
        },
        "bytes_per_token": round(per_token, 1),
        "floor_bytes_per_token": floor,
        "overhead_pct": round(100 * (per_token / floor - 1), 2),
        "naive_bytes_per_token": round(disk_bytes(tmp / "naive") / tokens, 1),
        "naive_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def memory(args, tmp: Path) -> dict:
    """Peak RSS for the same rows repeated a few and many times (same lengths, more data)."""
    out = {}
    for repeat in args.memory_repeats:
        name = f"mem{repeat}"
        tokens = make_prepared(tmp / name, args.memory_rows, args.seq_length, repeat=repeat)
        *_, rss = ours(tmp / name, tmp / f"{name}_out", args.batch_tokens)
        key = f"{args.memory_rows}x{repeat}_rows_{tokens}_tokens"
        out[key] = round(rss / 1024)
        print(f"peak RSS {key}: {out[key]} MiB", flush=True)
    return {"ours_peak_rss_mib": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--memory-rows", type=int, default=15)
    p.add_argument("--memory-repeats", type=int, nargs="+", default=[2, 8])
    p.add_argument("--only", choices=["throughput", "memory"], default=None)
    args = p.parse_args()
    config = json.loads((MODEL / "config.json").read_text())
    n_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    layer_ids = [2, n_layers // 2, n_layers - 3, n_layers]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "memory":
            result.update(throughput(args, Path(tmp), layer_ids, hidden))
        if args.only != "throughput":
            result.update(memory(args, Path(tmp)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
