"""Online vs offline training: measured per-layer target cost and storage cost, and the epochs
beyond which capturing once (offline) takes less time than recomputing the target every epoch
(online), extrapolated to larger targets. An ESTIMATE: the per-layer costs are measured here at
small widths and scaled by FLOPs per layer; storage by bytes per token.

    python benchmarks/online_breakeven.py --out breakeven.json

Model (per training token; F = target forward of all L layers, w/r = writing/reading the
stored states of one token, S = bytes stored per token = layers x H x 2 for bf16):
    online  = E x F
    offline = F + S x w + E x S x r          (capture once, read every epoch)
Offline takes less time once E x F > F + S w + E S r, i.e. E* = (F + S w) / (F - S r).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

# (name, layers, hidden, intermediate, heads, kv heads, aux layers + last stored)
TARGETS = {
    "demo SmolLM2-135M": (30, 576, 1536, 9, 3, 4),
    "Llama-3.1-8B": (32, 4096, 14336, 32, 8, 4),
    "Llama-3.3-70B": (80, 8192, 28672, 64, 8, 4),
}


def layer_flops(h: int, inter: int, heads: int, kv: int, seq: int) -> float:
    """Forward FLOPs per token of one Llama decoder layer at sequence length `seq`."""
    head = h // heads
    proj = 2 * h * (h + 2 * kv * head + h)  # q, k, v, o
    mlp = 2 * 3 * h * inter
    attn = 2 * 2 * seq * h / 2  # causal: QK^T and PV over half the keys on average
    return proj + mlp + attn


def time_layer(h: int, inter: int, heads: int, kv: int, seq: int, dtype, reps: int) -> float:
    """Seconds per token of one decoder layer forward (transformers Llama, inference_mode)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=1)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).to(dtype).eval()
    rope = LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, seq, h, dtype=dtype)
    pos = torch.arange(seq)[None]
    emb = rope(x, pos)
    mask = torch.full((seq, seq), float("-inf"), dtype=dtype).triu(1)[None, None]
    with torch.inference_mode():
        layer(x, attention_mask=mask, position_ids=pos, position_embeddings=emb)  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            layer(x, attention_mask=mask, position_ids=pos, position_embeddings=emb)
            best = min(best, time.perf_counter() - t)
    return best / seq


def storage_costs(h: int, states: int, seq: int, reps: int) -> tuple[float, float]:
    """(write, read) seconds per stored byte of a bf16 sample through SampleStore / torch.load,
    to a real file (the OS page cache: a best case for the offline path)."""
    from speculators.hidden_states.store import SampleStore, read_sample, sample_states

    with tempfile.TemporaryDirectory() as tmp:
        store = SampleStore(tmp, hidden_size=h, layer_ids=list(range(1, states + 1)))
        ids = torch.randint(0, 1000, (seq,))
        layers = [torch.randn(seq, h) for _ in range(states)]
        mask = torch.ones(seq, dtype=torch.long)
        w = r = float("inf")
        for i in range(reps):
            t = time.perf_counter()
            path = store.write(i, ids, layers, mask)
            w = min(w, time.perf_counter() - t)
            t = time.perf_counter()
            sample_states(read_sample(path), torch.float32)
            r = min(r, time.perf_counter() - t)
        size = path.stat().st_size
    return w / size, r / size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq", type=int, default=512, help="tokens per sample")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    # Measured at the demo's width (and one wider layer, to check the FLOPs scaling).
    measured = {}
    for name, (h, inter, heads, kv) in {"H576": (576, 1536, 9, 3),
                                         "H2048": (2048, 5632, 16, 8)}.items():  # fmt: skip
        s = time_layer(h, inter, heads, kv, args.seq, dtype, args.reps)
        f = layer_flops(h, inter, heads, kv, args.seq)
        measured[name] = {"s_per_token": s, "flops_per_token": f, "flops_per_s": f / s}
    rate = measured["H2048"]["flops_per_s"]  # the wider layer: closer to the large targets
    w, r = storage_costs(576, 4, args.seq, args.reps)
    out = {"measured_layers": measured, "write_s_per_byte": w, "read_s_per_byte": r,
           "dtype": args.dtype, "seq": args.seq, "targets": {}}  # fmt: skip
    for name, (layers, h, inter, heads, kv, states) in TARGETS.items():
        f = layers * layer_flops(h, inter, heads, kv, args.seq) / rate  # s per token
        s_bytes = states * h * 2
        denom = f - s_bytes * r
        e_star = (f + s_bytes * w) / denom if denom > 0 else float("inf")
        out["targets"][name] = {
            "forward_s_per_token": f, "bytes_per_token": s_bytes,
            "write_s_per_token": s_bytes * w, "read_s_per_token": s_bytes * r,
            "break_even_epochs": e_star,
        }  # fmt: skip
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
