"""Tiny targets and tokenizers built at test time, with no network.

Targets are random Llama / Qwen3 models sized so vLLM's CPU attention accepts them
(head_dim 32, 4 layers); the tokenizer is a byte-level BPE trained on local text and wrapped
with a chat template. Later stages reuse these through the fixtures in conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

# ChatML with {% generation %} around assistant content and its closing token, so
# `return_assistant_tokens_mask` marks exactly the supervised tokens.
CHATML_GENERATION = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<think>",
    "</think>",
]

CORPUS = [
    "Hello, how are you doing today?",
    "I am fine, thank you. How about you?",
    "What is the capital of France? The capital of France is Paris.",
    "Name three colors: red, green and blue.",
    "The quick brown fox jumps over the lazy dog.",
    "Can you tell me a story about a dragon who learned to fly?",
    "Once upon a time there was a small dragon that lived in the mountains.",
    "Speculative decoding lets a small draft model propose tokens that a large model verifies.",
    "I like to read books, walk in the park and cook dinner with my friends.",
    "What time is it? It is half past three in the afternoon.",
    "Numbers: one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9",
    "You are a helpful assistant. Answer briefly and politely.",
    "system user assistant tool answer question think reason because therefore",
]


def sample_conversations(n: int = 12) -> list[list[dict]]:
    """Small multi-turn chats built from CORPUS, deterministic."""
    convs = []
    for i in range(n):
        turns = 2 + 2 * (i % 3)  # 2, 4 or 6 messages
        conv = []
        for t in range(turns):
            role = "user" if t % 2 == 0 else "assistant"
            conv.append({"role": role, "content": CORPUS[(i * 3 + t) % len(CORPUS)]})
        convs.append(conv)
    return convs


def build_tokenizer(out_dir: Path, chat_template: str = CHATML_GENERATION, vocab_size: int = 1024):
    """Train a byte-level BPE on CORPUS and save it with `chat_template` to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        chat_template=chat_template,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf


TINY_DIMS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)


def build_target(out_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random tiny causal LM plus the fixture tokenizer, saved to `out_dir` (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir)
    dims = {**TINY_DIMS, **overrides}
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**dims, **ids))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**dims, **ids))
    else:
        raise ValueError(f"unknown fixture arch {arch}")
    model.to(torch.float32).eval()
    model.save_pretrained(out_dir)
    return out_dir
