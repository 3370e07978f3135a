"""Training metrics: per-step sums turned into losses/accuracies, and where they are logged
(the JSONL file the report reads, TensorBoard, and wandb/trackio when asked for and installed).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STAT_KINDS = ("kl", "count", "full", "prev")


def stats_vector(stats: dict, ttt_steps: int, tokens: int) -> torch.Tensor:
    """The model's per-step sums as one float64 vector (one all-reduce), then the token count."""
    values = [float(stats[f"{kind}_{k}"]) for k in range(ttt_steps) for kind in STAT_KINDS]
    return torch.tensor([*values, float(tokens)], dtype=torch.float64)


def summarize(sums: torch.Tensor, ttt_steps: int, loss_decay: float) -> dict:
    """Losses and accuracies per step from summed stats (see `stats_vector`)."""
    per = sums[:-1].view(ttt_steps, len(STAT_KINDS))
    kl, count, full, prev = (per[:, i] for i in range(len(STAT_KINDS)))
    loss_k = (kl / count.clamp(min=1)).tolist()
    cond = full / prev.clamp(min=1)
    cond_acc = cond.tolist()
    # Chained conditionals (as models.loss.step_metrics): the chance that the first k+1 drafts
    # are all accepted. full/count could rise with k, because fewer positions have a step-k
    # target near document ends.
    full_acc = torch.cumprod(cond, 0).tolist()
    return {
        "loss": sum(loss_decay**k * v for k, v in enumerate(loss_k)),
        "loss_k": loss_k,
        "full_acc": full_acc,
        "cond_acc": cond_acc,
        "acceptance_length_estimate": 1.0 + sum(full_acc),
        "supervised_tokens": int(count[0]),
        "tokens": int(sums[-1]),
    }


class MetricsLog:
    """Writes metric records on rank 0: JSONL always, plus the requested loggers."""

    def __init__(
        self,
        work_dir: Path,
        loggers: list[str],
        enabled: bool,
        run_config: dict,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(work_dir) / "metrics.jsonl"
        self.writers = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for name in loggers:
            writer = _open_logger(name, Path(work_dir), run_config, resume_step)
            if writer is not None:
                self.writers.append(writer)

    def truncate(self, keep) -> None:
        """Keep only the records `keep(record)` accepts (a resumed run redoes the rest)."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and keep(json.loads(ln))]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = finite_or_none(record)  # NaN is not JSON; a skipped step logs null
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        scalars = _scalars(record)
        for writer in self.writers:
            writer(record["split"], record["step"], scalars)

    def close(self) -> None:
        for writer in self.writers:
            close = getattr(writer, "close", None)
            if close:
                close()


def finite_or_none(value):
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scalars(record: dict) -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if isinstance(value, list):
            out.update({f"{key}/{k}": v for k, v in enumerate(value) if v is not None})
        elif isinstance(value, (int, float)) and key not in ("step", "epoch"):
            out[key] = value
    return out


class _TensorBoard:
    def __init__(self, log_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a crashed run logged after its last checkpoint.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(log_dir), purge_step=purge)

    def __call__(self, split, step, scalars):
        for key, value in scalars.items():
            self.writer.add_scalar(f"{split}/{key}", value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class _WandbLike:
    """wandb and trackio share `init(project, config)` / `log(dict, step)` / `finish()`."""

    def __init__(self, module, run_config: dict, log_dir: Path):
        self.module = module
        kwargs = {"dir": str(log_dir)} if module.__name__ == "wandb" else {}
        module.init(project="speculators", config=run_config, **kwargs)

    def __call__(self, split, step, scalars):
        self.module.log({f"{split}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self):
        self.module.finish()


def _open_logger(name: str, work_dir: Path, run_config: dict, resume_step: int | None):
    if name == "tensorboard":
        return _TensorBoard(work_dir / "tensorboard", resume_step)
    try:
        module = __import__(name)
    except ImportError:
        log.warning("logger %r requested but the package is not installed; skipping it", name)
        return None
    return _WandbLike(module, run_config, work_dir)
