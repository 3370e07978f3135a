"""Helpers for the trainer tests: hidden-states folders and vocab files made at test time.

`write_hidden_states` captures the tiny target's real states for the fixture chats (a small
learnable dataset); `write_random_states` writes random states of the right shapes (fast).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from fixtures import sample_conversations

from speculators.hidden_states.store import SampleStore


def chat_tokens(target: Path, n: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) of `n` fixture chats with the target's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    rows = []
    for conv in sample_conversations(n):
        out = tok.apply_chat_template(
            conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        rows.append((list(out["input_ids"]), list(out["assistant_masks"])))
    return rows


def _target_dims(target: Path) -> dict:
    return json.loads((Path(target) / "config.json").read_text())


def write_hidden_states(
    out: Path, target: Path, n: int = 12, layer_ids=(1, 2, 3, 4), repeat: int = 1
) -> Path:
    """Capture the target's states for `n` chats (each stored `repeat` times) into `out`."""
    from transformers import AutoModelForCausalLM

    from speculators.hidden_states.capture import LayerCapture

    cfg = _target_dims(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    capture = LayerCapture(model, list(layer_ids))
    store = SampleStore(out, hidden_size=cfg["hidden_size"], layer_ids=list(layer_ids))
    rows = chat_tokens(target, n) * repeat
    for idx, (ids, mask) in enumerate(rows):
        ids_t = torch.tensor([ids])
        with torch.inference_mode():
            states = capture(ids_t, torch.ones_like(ids_t))
        store.write(idx, ids_t[0], [s[0] for s in states], torch.tensor(mask))
    capture.remove()
    return _finish(store, target, cfg, rows)


def write_random_states(
    out: Path,
    target: Path,
    lengths,
    layer_ids=(1, 2, 3, 4),
    hidden_size: int | None = None,
    seed: int = 0,
    masked: bool = True,
    random_masks: bool = False,
) -> Path:
    """Random states and tokens with the given sample lengths (hidden_size may be made wrong).

    Loss masks cover the last two thirds of each sample, nothing (`masked=False`), or random
    positions (`random_masks`, so samples of equal length differ in supervised tokens).
    """
    cfg = _target_dims(target)
    h = hidden_size or cfg["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    store = SampleStore(out, hidden_size=h, layer_ids=list(layer_ids))
    rows = []
    for idx, n in enumerate(lengths):
        ids = torch.randint(0, cfg["vocab_size"], (n,), generator=g)
        mask = (torch.arange(n) >= n // 3).long() if masked else torch.zeros(n, dtype=torch.long)
        if random_masks:
            mask = (torch.rand(n, generator=g) < 0.2 + 0.6 * torch.rand(1, generator=g)).long()
        states = [torch.randn(n, h, generator=g) for _ in layer_ids]
        store.write(idx, ids, states, mask)
        rows.append((ids.tolist(), mask.tolist()))
    return _finish(store, target, {**cfg, "hidden_size": h}, rows)


def _finish(store: SampleStore, target: Path, cfg: dict, rows) -> Path:
    store.finish(
        len(rows),
        target=str(target),
        vocab_size=cfg["vocab_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        prepared="fixture",
        sample_lengths=[len(ids) for ids, _ in rows],
        num_loss_tokens=sum(sum(m) for _, m in rows),
        backend="transformers",
        device="cpu",
    )
    return store.output_dir


def write_vocab(out: Path, vocab_size: int, draft_vocab_size: int, data: Path | None = None):
    """d2t.npy / t2d.npy: the most frequent supervised tokens of `data`, padded with low ids."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    if data is not None:
        for f in sorted(Path(data).glob("data_*.pt")):
            s = torch.load(f, weights_only=True)
            np.add.at(counts, s["input_ids"][s["loss_mask"].bool()].numpy(), 1)
    order = np.lexsort((np.arange(vocab_size), -counts))  # count desc, then id asc
    selected = np.sort(order[:draft_vocab_size])
    t2d = np.zeros(vocab_size, dtype=bool)
    t2d[selected] = True
    d2t = selected - np.arange(draft_vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "d2t.npy", d2t.astype(np.int64))
    np.save(out / "t2d.npy", t2d)
    return out / "d2t.npy", out / "t2d.npy"


def checkpoint_resume_worker(rank: int, world: int, work: str, port: int, fingerprints, out: str):
    """One gloo rank: save a checkpoint with fingerprints[0], load it with its own fingerprint
    (ranks on other nodes may see other file stamps), then meet the others at a barrier."""
    import datetime
    import json
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from speculators.train.checkpoint import Checkpointer
    from speculators.train.distributed import DistEnv

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=30)  # a mismatched collective fails, it does not hang
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    env = DistEnv(rank=rank, world_size=world)
    model = fully_shard(torch.nn.Linear(4, 4))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    Checkpointer(work, env, fingerprints[0]).save(model, opt, sched, {"global_step": 5})
    progress = Checkpointer(work, env, fingerprints[rank]).load(model, opt, sched)
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(progress))
    dist.destroy_process_group()


def kill_once_exists(cmd: list[str], ready: Path, env: dict | None = None, poll: float = 0.02):
    """Run `cmd` in its own session and SIGKILL it with all its children (torchrun's workers)
    as soon as `ready` exists (or it ended, or 300 s passed)."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(poll)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
