#!/usr/bin/env python
"""Reference-compatible data generation: chats -> `data_{idx}.pt` files, `data_config.json`
(in --output-dir) and `token_freq.pt` (at --token-freq-path).

Takes the flags of vllm-project/speculators' `scripts/data_generation_offline.py` and runs
these stages, each printed before it starts:

    speculators prepare --target T --source DATA --dataset-name NAME --seq-length L --seed S
        --eval-prompts 0 --num-proc W [--max-samples N] --output OUT/prepared
    speculators hidden-states --target T --prepared OUT/prepared/dataset --output OUT
        --batch-tokens B*L [--layer-ids ...] [--backend vllm --tensor-parallel-size TP]
    speculators combine-freq OUT/prepared/token_freq.pt --output TOKEN_FREQ

Differences from the reference: `--layer-ids` use vLLM's convention (id i = the residual
stream entering decoder layer i, the last id = L, the final pre-norm output; default
`2 L//2 L-3 L`); the capture runs on transformers unless `--backend vllm`; a rerun checks
and keeps every valid sample (no `--start-idx`) and always rewrites token_freq.pt. Run
`python scripts/data_generation_offline.py --help` for every flag.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from speculators.reference_scripts import ReferenceParser, run_stages

PROG = "data_generation_offline.py"


def build_parser() -> ReferenceParser:
    p = ReferenceParser(prog=PROG, description=__doc__)
    p.add_argument("--target-model-path", required=True, help="target: folder or HF id")
    p.add_argument(
        "--tensor-parallel-size", type=int, default=None,
        help="vLLM tensor parallelism (--backend vllm; default: the visible GPUs)",
    )  # fmt: skip
    p.add_argument(
        "--train-data-path", required=True,
        help="sharegpt, ultrachat, a Hugging Face dataset id or a .json/.jsonl/.parquet file",
    )  # fmt: skip
    p.add_argument("--seq-length", type=int, default=2048, help="truncate rows to N tokens")
    p.add_argument("--max-samples", type=int, default=None, help="rows kept after the shuffle")
    p.add_argument("--token-freq-path", default="./token_freq.pt", help="token_freq.pt written")
    p.add_argument("--hf-cache-dir", default=None, help="cache folder of Hugging Face datasets")
    p.add_argument("--output-dir", required=True, help="folder for data_*.pt, data_config.json")
    p.add_argument(
        "--layer-ids", type=int, nargs="+", default=None,
        help="aux layer ids then L, vLLM convention (default 2 L//2 L-3 L)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset shuffle")
    p.add_argument("--num-preprocessing-workers", type=int, default=8, help="tokenising processes")
    own = p.add_argument_group("this project's options")
    own.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    own.add_argument(
        "--dataset-name", default=None,
        help="name in the statistics (default: sharegpt/ultrachat or the file's stem)",
    )  # fmt: skip
    p.add_unsupported(
        "--gpu-memory-utilization", "the vLLM backend keeps vLLM's own default", type=float
    )
    p.add_unsupported(
        "--assistant-pattern",
        "loss masks come from the target's chat template (generation markers or render"
        " boundaries), not from a regex",
    )
    p.add_unsupported(
        "--turn-dropout",
        "every assistant turn is supervised; thinking templates get one row per answer",
        takes_value=False,
    )
    p.add_unsupported(
        "--start-idx", "a rerun checks every data_{idx}.pt and recomputes only missing or"
        " broken ones", type=int, accepted=0,
    )  # fmt: skip
    return p


def dataset_name(source: str) -> str:
    if source in ("sharegpt", "ultrachat") or not Path(source).suffix:
        return source.rstrip("/").split("/")[-1]
    return Path(source).stem


def commands(args) -> list[list[str]]:
    """The `speculators` command lines this script runs, in order."""
    out = Path(args.output_dir)
    prepared = out / "prepared"
    prepare = [
        "prepare", "--target", args.target_model_path, "--source", args.train_data_path,
        "--dataset-name", args.dataset_name or dataset_name(args.train_data_path),
        "--seq-length", str(args.seq_length), "--seed", str(args.seed), "--eval-prompts", "0",
        "--num-proc", str(args.num_preprocessing_workers), "--output", str(prepared),
    ]  # fmt: skip
    if args.max_samples is not None:
        prepare += ["--max-samples", str(args.max_samples)]
    capture = [
        "hidden-states", "--target", args.target_model_path,
        "--prepared", str(prepared / "dataset"), "--output", str(out),
        "--batch-tokens", str(args.batch_size * args.seq_length), "--backend", args.backend,
    ]  # fmt: skip
    if args.layer_ids is not None:
        capture += ["--layer-ids", *map(str, args.layer_ids)]
    if args.backend == "vllm":
        tp = args.tensor_parallel_size
        if tp is None:  # the reference's default: every visible GPU
            import torch

            tp = max(1, torch.cuda.device_count())
        capture += ["--tensor-parallel-size", str(tp)]
    freq = ["combine-freq", str(prepared / "token_freq.pt"), "--output", args.token_freq_path]
    return [prepare, capture, freq]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_reference_args(argv)
    if args.backend != "vllm" and (args.tensor_parallel_size or 1) > 1:
        parser.error(
            "--tensor-parallel-size needs --backend vllm (the transformers backend spreads a"
            " large target over the visible GPUs by itself)"
        )
    for flag in ("seq_length", "batch_size", "num_preprocessing_workers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.hf_cache_dir is not None:  # read by `datasets` when `prepare` first imports it
        os.environ["HF_DATASETS_CACHE"] = str(Path(args.hf_cache_dir).resolve())
    return run_stages(PROG, commands(args))


if __name__ == "__main__":
    sys.exit(main())
