"""The resumable training state, saved and loaded in one place: model, optimizer, scheduler,
RNG states, data position and the settings fingerprint, in the trainer's work folder.

Model and optimizer go through `torch.distributed.checkpoint` (each rank writes its own shards,
so nothing is gathered; also works in a single process). Frozen target weights (embedding,
target norm and LM head) are left out: they are reloaded from the target. The folder is
written under a temporary name and swapped in whole, so a crash leaves the previous one.
"""

from __future__ import annotations

import logging
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from speculators.fileio import torch_save
from speculators.train.distributed import DistEnv, barrier, broadcast_object

log = logging.getLogger(__name__)

# DCP warns on every call that it runs without a process group; that is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


def trainable_state_dict(model: torch.nn.Module, full: bool = False) -> dict:
    """The model's state without frozen parameters; `full` gathers it onto rank 0 (CPU)."""
    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    state = get_model_state_dict(model, options=options)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}


def load_trainable_state_dict(model: torch.nn.Module, state: dict, full: bool = False) -> None:
    """Inverse of `trainable_state_dict`; anything missing other than frozen weights is an error."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    options = StateDictOptions(full_state_dict=full, strict=False)
    result = set_model_state_dict(model, state, options=options)
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"state dict mismatch: missing {missing}, unexpected {result.unexpected_keys}"
        )


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


class Checkpointer:
    """Saves and restores the whole training state under `work_dir/checkpoint/`."""

    def __init__(self, work_dir: str | Path, env: DistEnv, fingerprint: dict):
        self.work_dir = Path(work_dir)
        self.path = self.work_dir / "checkpoint"
        self.env = env
        self.fingerprint = fingerprint

    def _existing(self) -> Path | None:
        # `.old` survives only if a crash hit between the two renames of `save`.
        for p in (self.path, self.work_dir / "checkpoint.old"):
            if (p / "train_state.pt").is_file():
                return p
        return None

    def save(self, model, optimizer, scheduler, progress: dict) -> None:
        tmp = self.work_dir / "checkpoint.tmp"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.env)
        state = {
            "model": trainable_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_{self.env.rank}.pt")
        if self.env.is_main:
            torch.save(
                {
                    "fingerprint": self.fingerprint,
                    "world_size": self.env.world_size,
                    "scheduler": scheduler.state_dict(),
                    "progress": progress,
                },
                tmp / "train_state.pt",
            )
        barrier(self.env)
        if self.env.is_main:
            old = self.work_dir / "checkpoint.old"
            shutil.rmtree(old, ignore_errors=True)
            if self.path.exists():
                self.path.rename(old)
            tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        barrier(self.env)
        log.info("checkpoint saved at step %d: %s", progress["global_step"], self.path)

    def load(self, model, optimizer, scheduler) -> dict | None:
        """Restore the state if a checkpoint exists; returns its progress (None: start fresh).

        A checkpoint of other settings, data or process count cannot continue this run: it is
        moved aside to `checkpoint.stale/` (replacing an older one) with a warning naming the
        differences, and training starts over. A changed config thus retrains under Snakemake
        without manual cleanup, and nothing is deleted unannounced.
        """
        path = self._existing()
        if path is None:
            return None
        meta = torch.load(path / "train_state.pt", weights_only=False)
        diff = fingerprint_diff(meta["fingerprint"], self.fingerprint)
        if meta["world_size"] != self.env.world_size:
            diff.append(f"processes: {meta['world_size']} -> {self.env.world_size}")
        # Rank 0 decides for all: a rank that saw other settings would otherwise take the other
        # branch, and the ranks' collectives would no longer match (a hang, not an error).
        diff = broadcast_object(diff, self.env)
        if diff:
            barrier(self.env)  # every rank has read the metadata before it moves
            if self.env.is_main:
                stale = self.work_dir / "checkpoint.stale"
                shutil.rmtree(stale, ignore_errors=True)
                path.rename(stale)
                for best in self.work_dir.glob("best_*.pt"):
                    best.unlink()
            barrier(self.env)
            log.warning(
                "%s: not resuming, made with other settings or data (%s); moved to %s,"
                " starting over",
                path, "; ".join(diff), self.work_dir / "checkpoint.stale",
            )  # fmt: skip
            return None
        state = {
            "model": trainable_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        dcp.load(state, checkpoint_id=str(path))
        load_trainable_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        scheduler.load_state_dict(meta["scheduler"])
        rng_file = path / f"rng_{self.env.rank}.pt"
        set_rng_state(torch.load(rng_file, weights_only=False))
        log.info("resumed from %s at step %d", path, meta["progress"]["global_step"])
        return meta["progress"]

    def save_best(self, model, names: list[str]) -> None:
        """Full (gathered) trainable weights of the model, on rank 0, as `work_dir/<name>` for
        each name (the best weights by each criterion that this epoch is the best of)."""
        state = trainable_state_dict(model, full=True)
        if self.env.is_main:
            for name in names:
                torch_save(state, self.work_dir / name)
        barrier(self.env)
