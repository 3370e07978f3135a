#!/usr/bin/env python
"""Reference-compatible draft training: hidden states + d2t/t2d -> an EAGLE-3 draft in
--save-path, on one process (`python scripts/train.py ...`) or several FSDP2 ranks
(`torchrun --standalone --nproc_per_node=N scripts/train.py ...`).

Takes the flags of vllm-project/speculators' `scripts/train.py` and runs

    speculators train --target VERIFIER --data FOLDER... --d2t D2T --t2d T2D
        --output SAVE/checkpoint_best --work-dir SAVE/work --epochs E --lr LR
        --total-seq-len T --num-layers N --ttt-steps K --ttt-step-loss-decay D
        --select-best-by loss --loggers ...

FOLDER... are the folders under --data-path that hold a `data_config.json` (one per
`data_generation_offline.py` output). Under torchrun every rank runs that same command in
its own process (nothing is re-launched). The draft with the best validation loss is
(as the reference's `checkpoint_best`, hence `--select-best-by loss`, not the workflow's default)
published in `SAVE/checkpoint_best/` (config.json, model.safetensors, metrics.jsonl);
`SAVE/work/` holds the resumable state, metrics and logger files. No per-epoch draft folders.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from speculators.reference_scripts import ReferenceParser, fail, run_stages

PROG = "train.py"
LOGGERS = ("trackio", "wandb", "tensorboard")


def build_parser() -> ReferenceParser:
    p = ReferenceParser(prog=PROG, description=__doc__)
    p.add_argument("--verifier-name-or-path", required=True, help="target: folder or HF id")
    p.add_argument("--data-path", default="./data", help="folder searched for hidden states")
    p.add_argument("--save-path", default="./checkpoints", help="draft and training state")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--no-resume-from-checkpoint", action="store_true",
        help="start at epoch 0, deleting SAVE/work (default: resume from it)",
    )  # fmt: skip
    p.add_argument("--logger", default="", help=f"comma list of {', '.join(LOGGERS)}")
    p.add_argument("--total-seq-len", type=int, default=8192, help="tokens per batch per rank")
    p.add_argument("--num-layers", type=int, default=1, help="draft decoder layers")
    p.add_argument("--d2t-path", default="d2t.npy")
    p.add_argument("--t2d-path", default="t2d.npy")
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--ttt-step-loss-decay", type=float, default=1.0)
    p.add_unsupported(
        "--data-format-version", "only format 1 (a list of per-layer states) is read",
        type=int, accepted=1,
    )  # fmt: skip
    p.add_unsupported(
        "--log-dir", "metrics.jsonl and the loggers' files go to SAVE/work and the published draft"
    )
    p.add_unsupported("--run-name", "logger runs are named by the loggers' defaults")
    return p


def data_folders(data_path: Path) -> list[Path]:
    """Every folder at or under `data_path` holding a data_config.json, in path order."""
    return sorted(
        Path(root) for root, _, files in os.walk(data_path) if "data_config.json" in files
    )


def foreign_data(data_config: Path) -> str | None:
    """Why a data_config.json written by the reference toolkit cannot be trained on, else None
    (everything else is checked by `speculators train`)."""
    try:
        config = json.loads(data_config.read_text())
    except (OSError, ValueError):
        return None  # `speculators train` names the problem
    if isinstance(config, dict) and "format_version" not in config and "version" in config:
        return (
            f"written by the reference toolkit (version {config['version']}): no sample lengths"
            " and (seed era) aux layer ids one off vLLM's; regenerate it with this project's"
            " scripts/data_generation_offline.py"
        )
    return None


def commands(args, folders: list[Path]) -> list[list[str]]:
    """The `speculators` command line this script runs."""
    save = Path(args.save_path)
    loggers = [name.strip() for name in args.logger.split(",") if name.strip()]
    train = [
        "train", "--target", args.verifier_name_or_path, "--data", *map(str, folders),
        "--d2t", args.d2t_path, "--t2d", args.t2d_path,
        "--output", str(save / "checkpoint_best"), "--work-dir", str(save / "work"),
        "--epochs", str(args.epochs), "--lr", str(args.lr),
        "--total-seq-len", str(args.total_seq_len), "--num-layers", str(args.num_layers),
        "--ttt-steps", str(args.ttt_steps), "--ttt-step-loss-decay", str(args.ttt_step_loss_decay),
        "--select-best-by", "loss", "--loggers", *loggers,
    ]  # fmt: skip
    return [train]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_reference_args(argv)
    unknown = [n.strip() for n in args.logger.split(",") if n.strip() not in ("", *LOGGERS)]
    if unknown:
        parser.error(f"--logger {args.logger}: unknown {unknown}; choose from {list(LOGGERS)}")
    data_path = Path(args.data_path)
    if not data_path.is_dir():
        return fail(PROG, data_path, "--data-path is not a folder")
    folders = data_folders(data_path)
    if not folders:
        return fail(PROG, data_path, "no folder with a data_config.json (hidden states) in it")
    for folder in folders:
        problem = foreign_data(folder / "data_config.json")
        if problem:
            return fail(PROG, folder / "data_config.json", problem)
    if args.no_resume_from_checkpoint:
        # Every rank deletes (a rank on another node may not share rank 0's view), and all do
        # so before the process group exists: no rank can have saved anything yet.
        shutil.rmtree(Path(args.save_path) / "work", ignore_errors=True)
    return run_stages(PROG, commands(args, folders))


if __name__ == "__main__":
    sys.exit(main())
