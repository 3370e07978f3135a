"""Speed and peak memory of one EAGLE-3 draft training step, and of the chunked vs a naive TTT loss.

Random weights at a target's dimensions (no target files needed); each measurement runs in its own
process so peak memory is its own (CUDA: max_memory_allocated; CPU: sampled RSS above the baseline):

    python benchmarks/train_step.py step --dims cpu-small          # SmolLM2-like, 2048 tokens
    python benchmarks/train_step.py step --dims llama8b            # needs a GPU (flex attention)
    python benchmarks/train_step.py loss --tokens 2048 --hidden 576 --draft-vocab 32000
    python benchmarks/train_step.py all                            # what this machine can run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

# Spinning OpenMP workers waste most of a step on a shared CPU; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DIMS = {
    # SmolLM2-135M-like target, CPU-sized batch
    "cpu-small": dict(H=576, heads=9, kv=3, head_dim=64, inter=1536, V=49152, Vd=4096, T=2048, K=3),
    # Llama-3.1-8B target, the GPU configuration
    "llama8b": dict(
        H=4096, heads=32, kv=8, head_dim=128, inter=14336, V=128256, Vd=32000, T=8192, K=3
    ),
}


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or RSS sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self._rss()
        self.stop = threading.Event()

        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, self._rss() - self.base)
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self._rss() - self.base)


def _model(d: dict, device, num_layers=1):
    from speculators.models import Eagle3DraftConfig, Eagle3DraftModel

    cfg = Eagle3DraftConfig(
        hidden_size=d["H"], intermediate_size=d["inter"], num_attention_heads=d["heads"],
        num_key_value_heads=d["kv"], head_dim=d["head_dim"], vocab_size=d["V"],
        draft_vocab_size=d["Vd"], aux_layer_ids=[2, 10, 20], num_layers=num_layers,
        ttt_steps=d["K"], max_position_embeddings=max(8192, d["T"] + d["K"]),
    )  # fmt: skip
    torch.manual_seed(0)
    model = Eagle3DraftModel(cfg)
    with torch.no_grad():  # stand-ins for the target's frozen weights
        model.embed_tokens.weight.normal_(0, 0.02)
        model.verifier_norm.weight.fill_(1.0)
        model.verifier_lm_head.weight.normal_(0, 0.02)
        model.d2t.copy_(torch.arange(d["Vd"]) * (d["V"] // d["Vd"]) - torch.arange(d["Vd"]))
    return model.to(device)


def _batch(d: dict, device, seed=0):
    """A packed batch: documents of random lengths, 10% padding, a loss mask on ~70% of tokens."""
    g = torch.Generator().manual_seed(seed)
    t = d["T"]
    used = int(t * 0.9)
    cuts = sorted(torch.randint(1, used, (max(1, t // 512),), generator=g).tolist())
    docs = torch.full((t,), -1, dtype=torch.long)
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, used], strict=True)):
        docs[a:b] = i
    pos = torch.zeros(t, dtype=torch.long)
    for i in docs.unique():
        idx = (docs == i).nonzero()[:, 0]
        pos[idx] = torch.arange(1, len(idx) + 1) if i >= 0 else 0
    batch = {
        "input_ids": torch.randint(0, d["V"], (1, t), generator=g),
        "aux": torch.randn(1, t, 3 * d["H"], generator=g),
        "last": torch.randn(1, t, d["H"], generator=g),
        "loss_mask": ((torch.rand(t, generator=g) < 0.7) & (docs >= 0)).long()[None],
        "position_ids": pos[None],
        "document_ids": docs[None],
    }
    return {k: v.to(device) for k, v in batch.items()}


def bench_step(d: dict, device, steps: int, num_layers: int, attention: str = "auto") -> dict:
    model = _model(d, device, num_layers)
    batch = _batch(d, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def one():
        with autocast:
            loss, _ = model(**batch, ttt_steps=d["K"], attention=attention)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()  # warm-up: optimizer state, flex compilation
    times, cpu_times = [], []
    with PeakMemory(device) as mem:
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            one()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    best = min(times)
    # cpu_s (process CPU time) tells how much of a slow wall time was other processes' load
    return {
        "step_s": best,
        "tokens_per_s": d["T"] / best,
        "cpu_s": min(cpu_times),
        "peak_mib": mem.peak / 2**20,
        "attention": attention,
        "load_avg_1m": os.getloadavg()[0],
    }


def naive_loss(model, states, last, valid):
    """All K steps' fp32 logits and targets alive at once (what chunking avoids)."""
    target_logp = F.log_softmax(model.target_logits(last).float(), -1)
    loss = 0.0
    for k, h in enumerate(states):
        n = h.shape[0] - k
        logp = F.log_softmax(model.draft_logits(h[:n]).float(), -1)
        kl = (target_logp[k:].exp() * (target_logp[k:] - logp)).sum(-1)
        loss = loss + (kl * valid[k]).sum() / valid[k].sum()
    return loss


def chunked_loss(model, states, last, valid):
    """The model's own loss path: fused chunked KL per step."""
    from speculators.models.loss import step_kl

    with torch.no_grad():
        target_x = model.verifier_norm(last)
    loss = 0.0
    for k, h in enumerate(states):
        n = h.shape[0] - k
        x = model.norm(h[:n])
        kl, _ = step_kl(
            x, model.lm_head.weight, target_x[k:], model.verifier_lm_head.weight, valid[k]
        )
        loss = loss + kl / valid[k].sum()
    return loss


def bench_loss(d: dict, device, naive: bool) -> dict:
    model = _model(d, device)
    g = torch.Generator().manual_seed(1)
    t = d["T"]
    states = [
        torch.randn(t, d["H"], generator=g).to(device).requires_grad_() for _ in range(d["K"])
    ]
    last = torch.randn(t, d["H"], generator=g).to(device)
    valid = [torch.ones(t - k, device=device) for k in range(d["K"])]
    fn = naive_loss if naive else chunked_loss
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        fn(model, states, last, valid).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return {"loss": "naive" if naive else "chunked", "peak_mib": mem.peak / 2**20, "s": elapsed}


def _dims(args) -> dict:
    d = dict(DIMS[args.dims])
    for key, name in (("T", "tokens"), ("H", "hidden"), ("Vd", "draft_vocab"), ("K", "ttt_steps")):
        if getattr(args, name, None):
            d[key] = getattr(args, name)
    return d


def _in_subprocess(argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--json"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["step", "loss", "loss-naive", "all"])
    p.add_argument("--dims", choices=sorted(DIMS), default="cpu-small")
    p.add_argument("--tokens", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--draft-vocab", type=int)
    p.add_argument("--ttt-steps", type=int)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--attention", choices=["auto", "dense", "documents", "flex"], default="auto",
        help="TTT attention path (auto: flex on CUDA, per-document SDPA on CPU)",
    )  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print one JSON line (used by 'all')")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    d = _dims(args)
    if args.what == "all":
        gpu = device.type == "cuda"
        runs = [
            ["step", "--dims", "cpu-small"],
            ["step", "--dims", "cpu-small", "--num-layers", "2"],
            ["step", "--dims", "cpu-small", "--attention", "dense"],
        ]
        if gpu:
            runs += [["step", "--dims", "llama8b"]]
        loss_dims = (
            ["--dims", "llama8b"]
            if gpu
            else ["--tokens", "2048", "--hidden", "576", "--draft-vocab", "32000"]
        )
        runs += [["loss", *loss_dims], ["loss-naive", *loss_dims]]
        for run in runs:
            print(
                " ".join(run),
                "->",
                json.dumps(_in_subprocess([*run, "--device", args.device])),
                flush=True,
            )
        return
    if args.what == "step":
        result = bench_step(d, device, args.steps, args.num_layers, args.attention)
    else:
        result = bench_loss(d, device, naive=args.what == "loss-naive")
    result |= {"device": str(device), "threads": torch.get_num_threads(), "dims": d}
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
