"""The `train` subcommand: trains an EAGLE-3 draft on captured hidden states (offline) or on
states the target computes batch by batch (online, `--hidden-states-mode online`), and
publishes it.

`train()` is the whole loop, top to bottom; data, packing, sharding, checkpoints and metrics
live in the sibling modules. Several processes: the command re-launches itself under torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from speculators.devices import add_gpus_argument, check_job_gpus
from speculators.errors import SpeculatorsError
from speculators.fileio import atomic_path, write_json
from speculators.train import distributed, launch
from speculators.train.checkpoint import Checkpointer, load_trainable_state_dict
from speculators.train.data import (
    BatchLoader,
    HiddenStatesData,
    TrainingData,
    load_vocab_mapping,
)
from speculators.train.metrics import (
    STAT_KINDS,
    MetricsLog,
    finite_or_none,
    stats_vector,
    summarize,
)
from speculators.train.optim import SCHEDULERS, build_optimizer, build_scheduler
from speculators.train.packing import plan_epoch
from speculators.vocab import check_vocab_source

log = logging.getLogger(__name__)

# Non-finite steps in a row before training stops: one bad batch is skipped, a diverged run is not.
MAX_NONFINITE_IN_A_ROW = 10
# Settings that change the trajectory; a checkpoint made with other values is refused.
TRAJECTORY_KEYS = (
    "num_layers", "ttt_steps", "ttt_step_loss_decay", "epochs", "lr", "weight_decay",
    "scheduler", "warmup_fraction", "grad_clip", "total_seq_len", "noise", "val_fraction",
    "norm_before_residual", "norm_before_fc", "intermediate_size", "seed", "precision",
)  # fmt: skip
# The published epoch's criterion (`--select-best-by`) and the file in the work folder holding
# each criterion's best weights. Both are kept during training, so a changed criterion only
# republishes: it is no trajectory key and never retrains.
BEST_FILES = {"acceptance": "best_acceptance.pt", "loss": "best_model.pt"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--target", required=True, help="target model folder or Hugging Face id")
    io.add_argument(
        "--data", required=True, nargs="+",
        help="hidden-states folder(s); online: prepared dataset folder(s) (prepare's dataset/)",
    )  # fmt: skip
    io.add_argument("--d2t", required=True, type=Path, help="d2t.npy of the draft vocabulary")
    io.add_argument("--t2d", required=True, type=Path, help="t2d.npy of the draft vocabulary")
    io.add_argument("--output", required=True, type=Path, help="draft folder to publish")
    io.add_argument(
        "--token-freq",
        type=Path,
        default=None,
        help="token_freq.pt of this data: the vocab folder must have been built from it",
    )
    io.add_argument(
        "--verify-hashes",
        action="store_true",
        help="read every sample once before training and compare its sha256 with manifest.json",
    )
    io.add_argument(
        "--work-dir", required=True, type=Path, help="checkpoints and logs (resumed if present)"
    )
    hs = p.add_argument_group("hidden states (hidden_states.* of config/schema.yaml)")
    hs.add_argument(
        "--hidden-states-mode", choices=["offline", "online"], default="offline",
        help="offline: --data are captured folders; online: the target runs on each batch",
    )  # fmt: skip
    hs.add_argument(
        "--layer-ids", type=int, nargs="+", default=None,
        help="online: aux layer ids then L (default 2 L//2 L-3 L)",
    )  # fmt: skip
    hs.add_argument(
        "--hidden-states-dtype", choices=["bfloat16", "float32", "float8_e4m3fn"],
        default="bfloat16", help="online: states rounded as a capture would store them",
    )  # fmt: skip
    hs.add_argument(
        "--batch-tokens", type=int, default=8192,
        help="online: padded tokens per target forward",
    )  # fmt: skip
    m = p.add_argument_group("draft model (defaults as in config/schema.yaml)")
    m.add_argument("--num-layers", type=int, default=1)
    m.add_argument("--ttt-steps", type=int, default=3)
    m.add_argument("--norm-before-residual", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--norm-before-fc", action=argparse.BooleanOptionalAction, default=False)
    m.add_argument("--intermediate-size", type=int, default=None)
    m.add_argument(
        "--save-embeddings", action=argparse.BooleanOptionalAction, default=True,
        help="keep the target's embedding in the published draft (else vLLM shares the target's)",
    )  # fmt: skip
    t = p.add_argument_group("training")
    t.add_argument("--ttt-step-loss-decay", type=float, default=1.0)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--scheduler", choices=SCHEDULERS, default="linear")
    t.add_argument("--warmup-fraction", type=float, default=0.01)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--total-seq-len", type=int, default=8192, help="tokens per batch per rank")
    t.add_argument("--noise", type=float, default=0.05, help="uniform noise on the aux states")
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--checkpoint-every", type=int, default=500, help="optimizer steps")
    t.add_argument(
        "--select-best-by", choices=list(BEST_FILES), default="acceptance",
        help="published epoch: highest validation acceptance-length estimate, or lowest loss",
    )  # fmt: skip
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--precision", choices=["auto", "bf16", "fp32"], default="auto",
        help="autocast dtype; auto = bf16 where bf16 matmuls are native (GPU, AMX CPU)",
    )  # fmt: skip
    t.add_argument(
        "--loggers", nargs="*", default=["tensorboard"], choices=["tensorboard", "wandb", "trackio"]
    )
    d = p.add_argument_group("processes")
    d.add_argument("--nproc-per-node", type=int, default=1, help=">1: re-launch under torchrun")
    d.add_argument("--nnodes", type=int, default=1, help=">1: one torchrun per SLURM node")
    add_gpus_argument(d)


def run(args: argparse.Namespace) -> None:
    if "LOCAL_RANK" not in os.environ:
        check_job_gpus(args.gpus, "train.gpus")  # once, before any worker starts
    if torch.cuda.is_available() and args.nproc_per_node > torch.cuda.device_count():
        raise SpeculatorsError(
            "--nproc-per-node",
            f"{args.nproc_per_node} processes (one per GPU) but {torch.cuda.device_count()}"
            " GPU(s) visible",
        )
    if launch.needs_launch(args):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        launch.relaunch(parser, args)
        return
    env = distributed.init()
    if not env.is_main:  # one rank reports progress; the others only warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    try:
        train(args, env)
    finally:
        distributed.shutdown()


def resolve_target(target: str, full: bool = False) -> Path:
    """A local folder, or a Hugging Face id resolved to its (cached) snapshot: the JSON files and
    only the safetensors shards that hold the embedding, final norm and LM head (a sharded 70B
    target is ~140 GB; the draft needs ~3 GB of it); with `full` (online training runs the
    target) every shard."""
    if Path(target).is_dir():
        return Path(target)
    from speculators.models.io import target_weight_shards

    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(target, allow_patterns=["*.json"]))
        shards = ["*.safetensors"] if full else target_weight_shards(folder)
        return Path(snapshot_download(target, allow_patterns=["*.json", *shards]))
    except SpeculatorsError:
        raise
    except Exception as e:
        raise SpeculatorsError(target, f"not a local folder, and not downloadable ({e})") from None


def input_file_stamps(target: Path, folders, data_files=None) -> list:
    """(name, size, mtime) of the files whose rewrite means new inputs of the same shapes: each
    hidden-states folder's data_config.json (written last by every capture) and the target's
    config, index and the shards the draft reads. Re-captured states or a replaced target thus
    never resume (or publish) a checkpoint trained on the old ones; a resume after preemption
    sees the same stamps. Names are relative and symlinks (Hugging Face snapshots) are followed
    to their blobs, so a new snapshot revision with the same files stamps the same.
    `data_files` [(name, path)] replaces the data_config.json files (online: the prepared
    datasets' files and the target's weights, `OnlineData.input_files`)."""
    from speculators.models.io import INDEX_FILE, target_weight_shards

    files = [(f"data[{i}]/data_config.json", Path(f) / "data_config.json")
             for i, f in enumerate(folders)]  # fmt: skip
    if data_files is not None:
        files = list(data_files)
    names = ("config.json", INDEX_FILE, *target_weight_shards(target))
    files += [(f"target/{name}", target / name) for name in names]
    stamps = []
    for name, f in files:
        with contextlib.suppress(OSError):
            st = f.stat()
            stamps.append([name, st.st_size, st.st_mtime_ns])
    return stamps


def fingerprint(args, target: Path, data: TrainingData, d2t, t2d) -> dict:
    """What a checkpoint must match to be resumed. An online run adds `online` (layer ids,
    storage rounding, compute dtype, batch tokens) and stamps the prepared datasets and the
    target's weights instead of data_config.json files, so an online checkpoint never resumes
    an offline run or the other way round."""

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]

    lengths = [s.length for s in data.samples]
    online = data.mode == "online"
    data_files = data.input_files() if online else None
    out = {
        "target": str(args.target),
        "data": digest([data.layer_ids, data.hidden_size, lengths]),
        "input_files": digest(input_file_stamps(target, data.folders, data_files)),
        "vocab": digest([d2t.tolist(), t2d.nonzero().flatten().tolist()]),
        **{k: getattr(args, k) for k in TRAJECTORY_KEYS},
    }
    if online:
        out["online"] = data.settings()
    return out


def open_data(args, target: Path, tcfg: dict) -> TrainingData:
    """The run's data source: captured folders (offline) or prepared datasets + the target."""
    dims = {
        "hidden_size": tcfg["hidden_size"],
        "vocab_size": tcfg["vocab_size"],
        "num_layers": tcfg["num_hidden_layers"],
    }
    if args.hidden_states_mode == "online":
        from speculators.train.online import OnlineData

        if args.batch_tokens < 1:
            raise SpeculatorsError("--batch-tokens", "must be at least 1")
        return OnlineData(
            args.data, target, layer_ids=args.layer_ids, dtype=args.hidden_states_dtype,
            batch_tokens=args.batch_tokens, **dims,
        )  # fmt: skip
    data = HiddenStatesData.open(args.data, verify_hashes=args.verify_hashes, **dims)
    if args.layer_ids is not None and list(args.layer_ids) != list(data.layer_ids):
        # Offline the folders' captured layers are the draft's; other ids would be ignored.
        raise SpeculatorsError(
            "--layer-ids",
            f"{list(args.layer_ids)} differ from the layer ids {list(data.layer_ids)} captured"
            " in --data; offline training uses the captured ones (drop --layer-ids, or train"
            " with --hidden-states-mode online)",
        )
    return data


def autocast(env, precision: str = "auto"):
    """bf16 autocast where the precision policy computes in bf16 (GPUs; CPUs with native bf16:
    1.6x the tokens/s of fp32 on the demo draft); weights and optimizer state stay fp32 either
    way. `precision` bf16/fp32 overrides the policy."""
    from speculators.devices import compute_dtype

    native = compute_dtype(env.device) == torch.bfloat16
    if precision == "fp32" or (precision == "auto" and not native):
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=torch.bfloat16)


def global_counts(batch: dict, ttt_steps: int, env) -> torch.Tensor:
    """Supervised positions per TTT step summed over ranks: every rank divides by the same."""
    from speculators.models.loss import step_valid_mask

    mask, docs = batch["loss_mask"][0], batch["document_ids"][0]
    counts = torch.stack([step_valid_mask(mask, docs, k).sum() for k in range(ttt_steps)])
    return distributed.all_reduce_sum(counts.double(), env).float()


def nonfinite_documents(batch: dict) -> list[int]:
    """Positions in the batch's bin of the samples whose hidden states hold NaN or inf."""
    ok = torch.isfinite(batch["aux"][0]).all(-1) & torch.isfinite(batch["last"][0]).all(-1)
    return sorted(set(batch["document_ids"][0][~ok].tolist()) - {-1})


def train_step(model, batch, optimizer, scheduler, args, env) -> dict:
    """One optimizer step on this rank's packed batch; returns summed stats and whether skipped."""
    batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
    kwargs = {}
    if env.world_size > 1:
        # Loss = token mean over all ranks: step k's KL sum over the global count. FSDP
        # averages gradients over ranks, so each rank's share is scaled up by the world size.
        normalizer = global_counts(batch, args.ttt_steps, env).clamp(min=1) / env.world_size
        # Python floats: FSDP's mixed-precision policy would cast a tensor argument to bf16.
        kwargs["count_normalizer"] = normalizer.tolist()
    bad_documents = nonfinite_documents(batch)
    with autocast(env, args.precision):
        loss, stats = model(
            **batch, ttt_steps=args.ttt_steps, loss_decay=args.ttt_step_loss_decay, **kwargs
        )
    bad = torch.tensor([float(bool(bad_documents)), float(not torch.isfinite(loss.detach()))])
    bad = distributed.all_reduce_sum(bad.to(env.device), env).cpu()
    if bad.sum().item() == 0:  # every rank skips, or none
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], args.grad_clip
        )
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
    else:
        grad_norm = math.nan
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    with warnings.catch_warnings():  # torch warns when the very first step was skipped
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()  # the schedule advances even on a skipped step, so resumes line up
    tokens = int((batch["document_ids"] >= 0).sum())
    sums = distributed.all_reduce_sum(stats_vector(stats, args.ttt_steps, tokens), env)
    return {
        "sums": sums, "skipped": skipped, "grad_norm": grad_norm, "lr": lr,
        "bad_documents": bad_documents, "bad_input_anywhere": bad[0].item() > 0,
    }  # fmt: skip


@torch.no_grad()
def evaluate(model, loader: BatchLoader, bins, args, env) -> dict | None:
    """Validation metrics (no noise, no gradient) over this rank's share of the held-out set."""
    if not bins:
        return None
    model.eval()
    total, left_out = None, 0
    for step, batch in loader.iterate(bins, epoch=0, rank=env.rank):
        bad_documents = nonfinite_documents(batch)
        batch = {k: v.to(env.device) for k, v in batch.items()}
        with autocast(env, args.precision):
            _, stats = model(**batch, ttt_steps=args.ttt_steps, loss_decay=args.ttt_step_loss_decay)
        tokens = int((batch["document_ids"] >= 0).sum())
        vec = stats_vector(stats, args.ttt_steps, tokens)
        if bad_documents or not torch.isfinite(vec).all():  # a corrupt sample must not poison
            left_out += 1  # the whole metric
            log.warning("validation batch left out: NaN/inf in %s",
                        _sample_files(loader, bins[step], bad_documents) or "the loss")  # fmt: skip
            continue
        total = vec if total is None else total + vec
    model.train()
    if total is None:
        total = torch.zeros(args.ttt_steps * len(STAT_KINDS) + 1, dtype=torch.float64)
    val = summarize(
        distributed.all_reduce_sum(total, env), args.ttt_steps, args.ttt_step_loss_decay
    )
    left_out = int(distributed.all_reduce_sum(torch.tensor([float(left_out)]), env).item())
    val["left_out_batches"] = left_out
    if val["supervised_tokens"] == 0 and left_out:  # e.g. a diverged model: not a best epoch
        log.warning("validation: %d batches left out for NaN/inf and no supervised tokens in"
                    " the rest; this epoch cannot be the best", left_out)  # fmt: skip
        return {"loss": math.nan, "left_out_batches": left_out}
    if val["supervised_tokens"] == 0:
        log.warning("validation split has no supervised tokens; the last epoch counts as best")
        return None
    return val


def best_epoch(history: list[dict], by: str) -> int | None:
    """The epoch `--select-best-by` publishes, from the per-epoch validation records
    `{"epoch", "loss", "acceptance_length_estimate"}` (None where validation gave no finite
    figure). `acceptance`: highest teacher-forced acceptance-length estimate, ties to the lower
    loss, then the earlier epoch; `loss`: lowest validation loss, ties to the earlier epoch.
    None when no epoch has a finite figure (no validation split, or every epoch diverged)."""
    key = "acceptance_length_estimate" if by == "acceptance" else "loss"
    if by not in BEST_FILES:
        raise SpeculatorsError("--select-best-by", f"{by!r} is not one of {list(BEST_FILES)}")

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    rows = [r for r in history if finite(r.get(key)) and finite(r.get("loss"))]
    if not rows:
        return None
    if by == "acceptance":
        return min(rows, key=lambda r: (-r[key], r["loss"], r["epoch"]))["epoch"]
    return min(rows, key=lambda r: (r["loss"], r["epoch"]))["epoch"]


def _sample_files(loader: BatchLoader, bin_, documents) -> list[str]:
    return [str(loader.ref(bin_[d]).path) for d in documents]


def build_model(args, target: Path, data: HiddenStatesData, d2t, t2d):
    from speculators.models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

    config = Eagle3DraftConfig.from_target(
        target,
        draft_vocab_size=d2t.numel(),
        aux_layer_ids=data.aux_layer_ids,
        num_layers=args.num_layers,
        ttt_steps=args.ttt_steps,
        norm_before_residual=args.norm_before_residual,
        norm_before_fc=args.norm_before_fc,
        intermediate_size=args.intermediate_size,
    )
    torch.manual_seed(args.seed)  # same initial weights on every rank and every resume
    return Eagle3DraftModel.from_target(config, target, d2t, t2d)


def train(args: argparse.Namespace, env: distributed.DistEnv) -> None:
    from speculators.models.eagle3 import target_text_config

    # -- data, vocabulary, batches of every epoch (from lengths alone) -----------------------
    target = resolve_target(args.target, full=args.hidden_states_mode == "online")
    tcfg = target_text_config(target)
    data = open_data(args, target, tcfg)
    d2t, t2d = load_vocab_mapping(args.d2t, args.t2d, tcfg["vocab_size"])
    if args.token_freq is not None:
        check_vocab_source(args.d2t.parent, args.token_freq)
    train_idx, val_idx = data.split(args.val_fraction, args.seed)
    lengths = [s.length for s in data.samples]
    T, world = args.total_seq_len, env.world_size
    plans = [
        plan_epoch([lengths[i] for i in train_idx], T, world, args.seed, e)
        for e in range(args.epochs)
    ]
    val_plan = plan_epoch([lengths[i] for i in val_idx], T, world, args.seed, 0, shuffle=False)
    total_steps = sum(len(p) for p in plans)
    fill = sum(plans[0].lengths) / max(1, len(plans[0]) * world * T)
    log.info(
        "%d samples (%d train, %d val) in %d folder(s); %d steps/epoch x %d epochs on %d rank(s),"
        " batches %.0f%% full; %d samples longer than %d tokens truncated; %d padding-only bins",
        len(lengths), len(train_idx), len(val_idx), len(data.folders), len(plans[0]),
        args.epochs, world, 100 * fill, plans[0].truncated, T, plans[0].empty_bins,
    )  # fmt: skip

    # -- model, optimizer, schedule; resume if a checkpoint exists ---------------------------
    model = build_model(args, target, data, d2t, t2d).to(env.device)
    data.attach(env, sum(p.numel() for p in model.parameters()))  # online: loads the target
    model = distributed.parallelize(model, env)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, args.warmup_fraction, args.scheduler)
    ckpt = Checkpointer(args.work_dir, env, fingerprint(args, target, data, d2t, t2d))
    progress = ckpt.load(model, optimizer, scheduler)
    progress = progress or {
        "epoch": 0, "step_in_epoch": 0, "global_step": 0, "skipped_steps": 0,
        "best_val_loss": math.inf, "best_epoch": None, "wall_time_s": 0.0,
        "nonfinite_in_a_row": 0, "val_history": [], "saved_best": {},
    }  # fmt: skip
    progress.setdefault("nonfinite_in_a_row", 0)  # checkpoints of older versions
    if "val_history" not in progress:  # a checkpoint of an older version: lowest-loss weights
        progress["saved_best"] = {"loss": progress["best_epoch"]}  # only, history in the log
        progress["val_history"] = distributed.broadcast_object(
            val_history_from_log(args.work_dir / "metrics.jsonl", progress["epoch"]), env
        )
    forward_before = progress.get("target_forward_s", 0.0)  # online: of the runs before a resume

    def save_checkpoint():
        progress["wall_time_s"] = time.perf_counter() - started
        progress["target_forward_s"] = forward_before + getattr(data, "forward_s", 0.0)
        ckpt.save(model, optimizer, scheduler, progress)

    metrics = MetricsLog(
        args.work_dir, args.loggers, env.is_main, vars(args) | {"world_size": world},
        resume_step=progress["global_step"],
    )  # fmt: skip
    metrics.truncate(
        lambda r: (
            (r["split"] == "train" and r["step"] <= progress["global_step"])
            or (r["split"] == "val" and r["epoch"] < progress["epoch"])
        )
    )
    train_loader = BatchLoader(data, train_idx, T, noise=args.noise, seed=args.seed)
    val_loader = BatchLoader(data, val_idx, T)
    val_bins = val_plan.rank_steps(env.rank)
    started = time.perf_counter() - progress["wall_time_s"]

    # -- the loop -----------------------------------------------------------------------------
    for epoch in range(progress["epoch"], args.epochs):
        bins = plans[epoch].rank_steps(env.rank)
        bar = tqdm(
            total=len(bins), initial=progress["step_in_epoch"], desc=f"epoch {epoch}",
            disable=not env.is_main, mininterval=2.0,
        )  # fmt: skip
        epoch_supervised, epoch_started_at = 0, progress["step_in_epoch"]
        tick = time.perf_counter()
        for step, batch in train_loader.iterate(bins, epoch, env.rank, progress["step_in_epoch"]):
            result = train_step(model, batch, optimizer, scheduler, args, env)
            now = time.perf_counter()
            m = summarize(result["sums"], args.ttt_steps, args.ttt_step_loss_decay)
            tokens_per_s, tick = m["tokens"] / max(now - tick, 1e-9), now
            epoch_supervised += m["supervised_tokens"]
            progress.update(step_in_epoch=step + 1, global_step=progress["global_step"] + 1)
            if result["skipped"]:
                progress["skipped_steps"] += 1
                progress["nonfinite_in_a_row"] += 1
                if result["bad_documents"]:  # named by the rank that holds them
                    log.warning("step %d skipped: NaN/inf in the hidden states of %s",
                                progress["global_step"],
                                _sample_files(train_loader, bins[step], result["bad_documents"]))  # fmt: skip
                elif not result["bad_input_anywhere"] and env.is_main:
                    log.warning("step %d skipped: NaN/inf loss or gradient from finite inputs"
                                " (diverging? lower --lr)", progress["global_step"])  # fmt: skip
                if progress["nonfinite_in_a_row"] >= MAX_NONFINITE_IN_A_ROW:
                    raise SpeculatorsError(
                        args.work_dir,
                        f"{progress['nonfinite_in_a_row']} steps in a row had NaN/inf loss or"
                        " gradients (diverged or corrupt hidden states); lower --lr or check"
                        " the data",
                    )
            else:
                progress["nonfinite_in_a_row"] = 0
            metrics.write({
                "split": "train", "epoch": epoch, "step": progress["global_step"],
                "lr": result["lr"], "loss": m["loss"], "loss_k": m["loss_k"],
                "full_acc": m["full_acc"], "cond_acc": m["cond_acc"],
                "acceptance_length_estimate": m["acceptance_length_estimate"],
                "tokens_per_s": tokens_per_s, "grad_norm": result["grad_norm"],
            })  # fmt: skip
            bar.set_postfix_str(
                f"loss {m['loss']:.3f} acc {' '.join(f'{a:.2f}' for a in m['full_acc'])}"
                f" {tokens_per_s:,.0f} tok/s"
            )
            bar.update(1)
            last_of_epoch = step + 1 == len(bins)
            if progress["global_step"] % args.checkpoint_every == 0 and not last_of_epoch:
                save_checkpoint()
        bar.close()
        if epoch_supervised == 0 and epoch_started_at == 0:  # sums are global: same on all ranks
            raise SpeculatorsError(
                args.data[0], "no supervised tokens in the training split (all loss masks 0)"
            )

        # -- end of epoch: validate, keep the best, checkpoint --------------------------------
        val = evaluate(model, val_loader, val_bins, args, env)
        if val is not None and math.isfinite(val["loss"]):
            metrics.write({"split": "val", "epoch": epoch, "step": progress["global_step"],
                           "lr": scheduler.get_last_lr()[0], **val, "tokens_per_s": None})  # fmt: skip
            log.info("epoch %d validation: loss %.4f, full_acc %s, acceptance length ~%.2f",
                     epoch, val["loss"], [round(a, 3) for a in val["full_acc"]],
                     val["acceptance_length_estimate"])  # fmt: skip
        progress["val_history"].append({
            "epoch": epoch,
            "loss": val["loss"] if val else None,
            "acceptance_length_estimate": (val or {}).get("acceptance_length_estimate"),
        })  # fmt: skip
        # Each criterion keeps its own best weights; with nothing to validate on, the latest.
        improved = [by for by in BEST_FILES
                    if val is None or best_epoch(progress["val_history"], by) == epoch]  # fmt: skip
        if improved:
            ckpt.save_best(model, [BEST_FILES[by] for by in improved])
            progress["saved_best"].update(dict.fromkeys(improved, epoch))
        progress.update(epoch=epoch + 1, step_in_epoch=0)
        save_checkpoint()

    # -- publish the best weights, last and atomically ----------------------------------------
    metrics.close()
    selected_by, chosen = published_epoch(progress, args.select_best_by)
    if chosen is None:  # validation never gave a finite loss: publish the last
        log.warning("no finite validation loss in any epoch; publishing the last weights")
        ckpt.save_best(model, [BEST_FILES[selected_by]])
    if env.is_main:
        history = progress["val_history"]
        record = next((r for r in history if r["epoch"] == chosen), {})
        summary = {
            "steps": progress["global_step"],
            "epochs": args.epochs,
            "samples": {"train": len(train_idx), "val": len(val_idx)},
            "world_size": world,
            "truncated_samples_per_epoch": plans[0].truncated,
            "padding_only_bins": sum(p.empty_bins for p in plans),
            "skipped_steps": progress["skipped_steps"],
            "dropped_samples": data.dropped,
            "select_best_by": selected_by,
            "best_epoch": chosen,
            "best_val_loss": record.get("loss"),
            "best_val_acceptance_length_estimate": record.get("acceptance_length_estimate"),
            "best_epoch_by": {by: best_epoch(history, by) for by in BEST_FILES},
            "val_history": history,
            "wall_time_s": round(progress["wall_time_s"], 1),
            "hidden_states": source_summary(data, progress),
        }
        publish(args, target, data, d2t, t2d, tcfg, finite_or_none(summary))
    distributed.barrier(env)


def val_history_from_log(path: Path, epochs: int) -> list[dict]:
    """Per-epoch validation records of the first `epochs` epochs from a metrics.jsonl."""
    history = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            r = json.loads(line) if line.strip() else {}
            if r.get("split") == "val" and r["epoch"] < epochs:
                history[r["epoch"]] = {k: r.get(k) for k in ("epoch", "loss",
                                                             "acceptance_length_estimate")}  # fmt: skip
    return [history[e] for e in sorted(history)]


def published_epoch(progress: dict, select_best_by: str) -> tuple[str, int | None]:
    """(criterion, epoch) of the weights to publish. A work folder of an older version holds
    only the lowest-loss weights: asked for `acceptance`, it publishes those and says so."""
    history, saved = progress["val_history"], progress["saved_best"]
    chosen = best_epoch(history, select_best_by)
    if chosen is None and any(r["loss"] is None for r in history):  # no validation split
        return select_best_by, saved.get(select_best_by)
    if chosen is not None and saved.get(select_best_by) != chosen:
        log.warning("the work folder holds no weights of epoch %s (best by %s; made by an older"
                    " version); publishing the lowest-loss epoch instead", chosen, select_best_by)  # fmt: skip
        return "loss", best_epoch(history, "loss")
    return select_best_by, chosen


def source_summary(data: TrainingData, progress: dict) -> dict:
    """train_summary.json's `hidden_states`: the mode, the target's forward seconds (rank 0,
    all attempts) and their share of the training wall time, the bytes of hidden states written
    (online 0; offline what the capture wrote for this run's samples)."""
    out = data.report()
    forward = progress.get("target_forward_s", 0.0)
    out["target_forward_s"] = round(forward, 2)
    wall = progress["wall_time_s"]
    out["target_forward_share"] = round(forward / wall, 4) if wall > 0 else None
    return out


def publish(args, target: Path, data, d2t, t2d, tcfg: dict, summary: dict) -> None:
    """`--output`: the best weights in the speculators format, metrics.jsonl, train_summary.json."""
    from speculators.models.io import save_draft

    model = build_model(args, target, data, d2t, t2d)
    best = torch.load(args.work_dir / BEST_FILES[summary["select_best_by"]], weights_only=True)
    load_trainable_state_dict(model, best, full=True)
    with atomic_path(args.output, is_dir=True) as tmp:
        # A local target by absolute path: `vllm serve <draft>` reads it from any directory.
        local = Path(args.target).is_dir()
        top_config = json.loads((target / "config.json").read_text())  # multimodal: not tcfg
        save_draft(
            model,
            tmp,
            verifier_name_or_path=str(Path(args.target).resolve()) if local else args.target,
            verifier_architectures=top_config.get("architectures")
            or tcfg.get("architectures")
            or [],
            include_embeddings=args.save_embeddings,
        )
        (tmp / "metrics.jsonl").write_text((args.work_dir / "metrics.jsonl").read_text())
        write_json(tmp / "train_summary.json", summary)
        for f in tmp.iterdir():  # some writers create private (0600) files
            f.chmod(0o644)
    log.info(
        "published %s (best epoch %s by %s)",
        args.output,
        summary["best_epoch"],
        summary["select_best_by"],
    )
