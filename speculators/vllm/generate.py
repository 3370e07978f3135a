"""vLLM regeneration backend: the target's own answers to conversations, with `LLM.chat`.

`speculators regenerate --backend vllm` calls `generate_chat_answers` once per batch and turn;
the engine is started on the first call and kept for the rest of the process.
"""

from __future__ import annotations

import functools
import os

import torch
import vllm  # noqa: F401  (fails at import, so `regenerate` reports a missing vLLM clearly)

from speculators.data.regenerate import Answer
from speculators.devices import dtype_name, target_compute_dtype
from speculators.errors import SpeculatorsError


def on_cpu() -> bool:
    return not torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def engine(target: str):
    """One vLLM engine per process: a start costs ~20 s on CPU, far more than a batch."""
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    try:
        return LLM(
            model=target,
            # The device's precision policy: fp32 on CPUs without native bf16.
            dtype=dtype_name(target_compute_dtype(target)),
            enforce_eager=on_cpu(),
        )
    except (OSError, ValueError) as e:
        raise SpeculatorsError(target, f"vLLM cannot load the target ({e})") from None


def generate_chat_answers(
    target: str,
    conversations: list[list[dict]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list:
    """The target's answer to each conversation (each ends with a user turn), batched, as
    `regenerate.Answer(text, truncated)`; truncated = stopped at max_new_tokens.

    Temperature 0 is greedy; otherwise nucleus sampling with `top_p`, seeded per call so a
    resumed regeneration draws the same answers.
    """
    from vllm import SamplingParams

    for i, conv in enumerate(conversations):
        if not conv or conv[-1].get("role") != "user":
            raise SpeculatorsError(f"conversation {i}", "must end with a user turn")
    params = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p if temperature > 0 else 1.0,
        seed=seed,
    )
    # The target's own chat template, with the assistant header appended.
    outputs = engine(target).chat(conversations, params, use_tqdm=False, add_generation_prompt=True)
    return [
        Answer(out.outputs[0].text, out.outputs[0].finish_reason == "length") for out in outputs
    ]
