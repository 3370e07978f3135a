"""Wall time of one training epoch on synthetic hidden states shaped like a real target's.

Writes N random samples (lengths around --mean-len) for the target's hidden size and a random
draft vocabulary, then times `speculators train --epochs 1` on them, e.g. for the demo:

    python benchmarks/train_epoch.py --target resources/models/smollm2 --samples 400
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from speculators.cli import main
from speculators.hidden_states.store import SampleStore


def synthetic_data(out: Path, target: Path, samples: int, mean_len: int, vd: int, seed: int):
    cfg = json.loads((target / "config.json").read_text())
    h, v, n_layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    layer_ids = [2, n_layers // 2, n_layers - 3, n_layers]
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.normal(mean_len, mean_len / 3, samples).astype(int), 16, 4 * mean_len)
    store = SampleStore(out / "hs", hidden_size=h, layer_ids=layer_ids)
    g = torch.Generator().manual_seed(seed)
    for idx, n in enumerate(lengths.tolist()):
        ids = torch.randint(0, v, (n,), generator=g)
        mask = (torch.arange(n) >= n // 4).long()
        store.write(idx, ids, [torch.randn(n, h, generator=g) for _ in layer_ids], mask)
    store.finish(
        samples, target=str(target), vocab_size=v, num_hidden_layers=n_layers,
        prepared="synthetic", sample_lengths=lengths.tolist(),
        num_loss_tokens=int(sum(n - n // 4 for n in lengths)), backend="synthetic", device="cpu",
    )  # fmt: skip
    selected = np.sort(rng.choice(v, vd, replace=False))
    t2d = np.zeros(v, dtype=bool)
    t2d[selected] = True
    np.save(out / "d2t.npy", (selected - np.arange(vd)).astype(np.int64))
    np.save(out / "t2d.npy", t2d)
    return int(lengths.sum())


def _cpu_seconds() -> float:
    """CPU time of this process: on a shared machine, CPU s / threads estimates idle wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main_(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=Path, required=True)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--mean-len", type=int, default=300)
    p.add_argument("--draft-vocab-size", type=int, default=4096)
    p.add_argument("--total-seq-len", type=int, default=2048)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="train-epoch-"))
    t0 = time.perf_counter()
    tokens = synthetic_data(root, args.target, args.samples, args.mean_len,
                            args.draft_vocab_size, seed=0)  # fmt: skip
    made = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    rc = main([
        "train", "--target", str(args.target), "--data", str(root / "hs"),
        "--d2t", str(root / "d2t.npy"), "--t2d", str(root / "t2d.npy"),
        "--output", str(root / "draft"), "--work-dir", str(root / "work"), "--epochs", "1",
        "--total-seq-len", str(args.total_seq_len), "--ttt-steps", str(args.ttt_steps),
        "--num-layers", str(args.num_layers), "--loggers",
    ])  # fmt: skip
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    summary = json.loads((root / "draft" / "train_summary.json").read_text())
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({
        "rc": rc, "samples": args.samples, "tokens": tokens, "data_s": round(made, 1),
        "train_cli_s": round(wall, 1), "train_cli_cpu_s": round(cpu, 1),
        "train_loop_s": summary["wall_time_s"], "load_avg_1m": os.getloadavg()[0],
        "steps": summary["steps"], "tokens_per_s": round(tokens / summary["wall_time_s"]),
        "peak_rss_gib": round(peak_gib, 2), "threads": torch.get_num_threads(), "dir": str(root),
    }))  # fmt: skip


if __name__ == "__main__":
    main_()
