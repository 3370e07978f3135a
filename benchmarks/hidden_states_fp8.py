"""Benchmark of fp8 hidden-state storage and the integrity checks (issue 12).

1. `store`: bytes per token of `SampleStore.write` for bf16 and fp8 at an 8B target's width
   (4 layers x H 4096, synthetic states, 512-token samples) and the writer's cost per sample
   (cast or quantise, per-layer checks, sha256, write).
2. `capture`: `speculators hidden-states` on SmolLM2 and chitchat rows, bf16 and fp8
   alternated `--repeats` times (the machine is shared: CPU seconds are the fairer clock), then
   `speculators verify` on each folder: its cost against the capture's.

Usage: python benchmarks/hidden_states_fp8.py [--model DIR] [--chats JSONL] [--rows 40]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hidden_states as hs_bench  # noqa: E402
from hidden_states import make_prepared as _make_prepared  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def store_bench(tmp: Path, hidden: int = 4096, layers: int = 4, seq: int = 512, n: int = 6):
    from speculators.hidden_states.store import SampleStore

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (seq,), generator=g)
    mask = torch.ones(seq, dtype=torch.long)
    # bf16 states as a GPU capture hands them over; a few outlier features like real targets.
    states = [torch.randn(seq, hidden, generator=g).bfloat16() for _ in range(layers)]
    for s in states:
        s[:, :4] *= 50
    out = {}
    floor = layers * hidden * 2
    for name, dtype in (("bfloat16", torch.bfloat16), ("float8_e4m3fn", torch.float8_e4m3fn)):
        store = SampleStore(tmp / name, hidden_size=hidden, layer_ids=list(range(layers)),
                            dtype=dtype)  # fmt: skip
        store.write(0, ids, states, mask)  # warm-up
        times = []
        for i in range(n):
            t = time.perf_counter()
            store.write(i, ids, states, mask)
            times.append(time.perf_counter() - t)
        size = store.path(0).stat().st_size
        out[name] = {
            "bytes_per_token": round(size / seq, 1),
            "x_bf16_floor": round(size / seq / floor, 4),
            "write_ms_per_sample_median": round(1000 * sorted(times)[n // 2], 1),
        }
        print(name, out[name], flush=True)
    return {"store": {"hidden_size": hidden, "layers": layers, "seq": seq,
                      "bf16_floor_bytes_per_token": floor, **out}}  # fmt: skip


def run_cli(argv: list[str], pythonpath: str | None = None) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, stderr) of `speculators <argv>` in a fresh process
    (importing the package from `pythonpath` when given: another checkout as a baseline)."""
    code = (
        "import resource, subprocess, sys, time;"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:]);"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print(time.perf_counter() - t, r.ru_utime + r.ru_stime, p.returncode)"
    )
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "speculators.cli", *argv]
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, cpu, rc = res.stdout.split()[-3:]
    if rc != "0":
        sys.exit(res.stderr[-3000:])
    return float(wall), float(cpu), res.stderr


def capture_bench(args, tmp: Path) -> dict:
    hs_bench.MODEL, hs_bench.CHATS = args.model, args.chats
    tokens = _make_prepared(tmp / "prep", args.rows, args.seq_length)
    cfg = json.loads((args.model / "config.json").read_text())
    floor = 4 * cfg["hidden_size"] * 2
    print(f"{args.rows} rows, {tokens} tokens", flush=True)
    runs = {"bfloat16": [], "float8_e4m3fn": []}
    for rep in range(args.repeats):
        for dtype in runs:
            out = tmp / f"{dtype}_{rep}"
            argv = ["hidden-states", "--target", str(args.model), "--prepared", str(tmp / "prep"),
                    "--output", str(out), "--dtype", dtype, "--probe-rows", str(args.probe_rows)]  # fmt: skip
            wall, cpu, err = run_cli(argv)
            loop = float(re.search(r"tokens in ([0-9.]+) s", err).group(1))
            probe = re.search(r"probe on \d+ rows \(([0-9.]+) s\)", err)
            vwall, vcpu, _ = run_cli(["verify", str(out), "--output", str(tmp / "verify.json")])
            verify_s = json.loads((tmp / "verify.json").read_text())["seconds"]
            dc = json.loads((out / "data_config.json").read_text())
            size = dc["manifest"]["total_bytes"]
            rec = {
                "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "loop_s": round(loop, 2),
                "probe_s": float(probe.group(1)) if probe else None,
                "verify_s": verify_s,  # the check itself, without interpreter start-up
                "verify_wall_s": round(vwall, 2), "verify_cpu_s": round(vcpu, 2),
                "bytes_per_token": round(size / tokens, 1),
                "next_token_agreement": dc["integrity"]["probe"]["next_token_agreement"],
                "reference_next_token_agreement":
                    dc["integrity"]["probe"]["reference_next_token_agreement"],
                "max_relative_error": max(
                    v["relative_error"] for v in dc["integrity"]["probe"]["layers"].values()),
            }  # fmt: skip
            runs[dtype].append(rec)
            print(dtype, rep, rec, flush=True)
    if args.baseline:
        # The same bf16 capture by another checkout (before integrity checks and the probe),
        # and by this one without the probe: what the checks cost.
        for rep in range(args.repeats):
            for name, extra, path in (("baseline", [], args.baseline),
                                      ("no_probe", ["--probe-rows", "0"], None)):  # fmt: skip
                argv = ["hidden-states", "--target", str(args.model), "--prepared",
                        str(tmp / "prep"), "--output", str(tmp / f"{name}_{rep}"), *extra]  # fmt: skip
                wall, cpu, err = run_cli(argv, path)
                loop = float(re.search(r"tokens in ([0-9.]+) s", err).group(1))
                rec = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "loop_s": round(loop, 2)}
                runs.setdefault(f"bfloat16_{name}", []).append(rec)
                print(name, rep, rec, flush=True)
    summary = {}
    for dtype, recs in runs.items():
        if "_" in dtype and dtype != "float8_e4m3fn":
            cpu = sorted(r["cpu_s"] for r in recs)[len(recs) // 2]
            loop = sorted(r["loop_s"] for r in recs)[len(recs) // 2]
            summary[dtype] = {"tokens_per_cpu_s": round(tokens / cpu),
                              "tokens_per_s_loop": round(tokens / loop)}  # fmt: skip
            continue
        cpu = sorted(r["cpu_s"] for r in recs)[len(recs) // 2]
        loop = sorted(r["loop_s"] for r in recs)[len(recs) // 2]
        verify = sorted(r["verify_s"] for r in recs)[len(recs) // 2]
        verify_wall = sorted(r["verify_wall_s"] for r in recs)[len(recs) // 2]
        summary[dtype] = {
            "tokens_per_cpu_s": round(tokens / cpu),
            "tokens_per_s_loop": round(tokens / loop),
            "bytes_per_token": recs[0]["bytes_per_token"],
            "x_bf16_floor": round(recs[0]["bytes_per_token"] / floor, 4),
            "verify_s": verify,
            "verify_wall_s_with_startup": verify_wall,
            "verify_pct_of_capture_wall": round(
                100 * verify / sorted(r["wall_s"] for r in recs)[len(recs) // 2], 2),
            "probe_s": sorted(r["probe_s"] for r in recs)[len(recs) // 2],
            "next_token_agreement": recs[0]["next_token_agreement"],
            "max_relative_error": recs[0]["max_relative_error"],
        }  # fmt: skip
    return {"capture": {"rows": args.rows, "tokens": tokens, "bf16_floor_bytes_per_token": floor,
                        "summary": summary, "runs": runs}}  # fmt: skip


def compress_bench(args, tmp: Path) -> dict:
    """Would a general-purpose compressor shrink the samples further? zlib and lzma on real
    SmolLM2 samples, bf16 and fp8 (issue 12's stretch item: measured, not adopted)."""
    import lzma
    import zlib

    hs_bench.MODEL, hs_bench.CHATS = args.model, args.chats
    tokens = _make_prepared(tmp / "cprep", args.rows, args.seq_length)
    out = {"tokens": tokens}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        folder = tmp / f"c_{dtype}"
        run_cli(["hidden-states", "--target", str(args.model), "--prepared", str(tmp / "cprep"),
                 "--output", str(folder), "--dtype", dtype, "--probe-rows", "0"])  # fmt: skip
        raw = b"".join(p.read_bytes() for p in sorted(folder.glob("data_*.pt")))
        rec = {"bytes_per_token": round(len(raw) / tokens, 1)}
        for name, fn in (("zlib1", lambda b: zlib.compress(b, 1)),
                         ("zlib9", lambda b: zlib.compress(b, 9)),
                         ("lzma1", lambda b: lzma.compress(b, preset=1))):  # fmt: skip
            t = time.perf_counter()
            size = len(fn(raw))
            rec[name] = {"ratio": round(size / len(raw), 3),
                         "MB_per_s": round(len(raw) / 1e6 / (time.perf_counter() - t), 1)}  # fmt: skip
        out[dtype] = rec
        print(dtype, rec, flush=True)
    return {"compress": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO / "resources" / "models" / "smollm2")
    p.add_argument("--chats", type=Path, default=REPO / "resources" / "datasets" / "chitchat.jsonl")
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--probe-rows", type=int, default=8)
    p.add_argument("--only", choices=["store", "capture", "compress"], default=None)
    p.add_argument(
        "--baseline", default=None, help="PYTHONPATH of another checkout: its bf16 capture too"
    )
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "store"):
            result.update(store_bench(Path(tmp)))
        if args.only in (None, "capture"):
            result.update(capture_bench(args, Path(tmp)))
        if args.only in (None, "compress"):
            result.update(compress_bench(args, Path(tmp)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
