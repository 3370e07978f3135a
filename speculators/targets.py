"""What stages read of a target model without loading its weights: its config's dimensions.

Vision-language configs contribute their text model; a missing or unreadable config, or one
without the asked dimensions, is a one-line error naming the target.
"""

from __future__ import annotations

from speculators.errors import SpeculatorsError


def target_dims(target: str, keys=("hidden_size", "vocab_size", "num_hidden_layers")) -> dict:
    """The positive integer `keys` of the target's (text) config, e.g. hidden_size, vocab_size."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(target)
    except (OSError, ValueError) as e:
        raise SpeculatorsError(
            target, f"cannot read the model config ({str(e).splitlines()[0]})"
        ) from None
    text = config.get_text_config()
    dims = {}
    for key in keys:
        value = getattr(text, key, None)
        if not isinstance(value, int) or value < 1:
            raise SpeculatorsError(target, f"model config lacks {key}")
        dims[key] = value
    return dims


def target_parameter_count(target: str) -> int:
    """Parameters of a target: summed from its safetensors headers (no weights are read), else,
    for a target without local safetensors, estimated from its config as a dense decoder:
    L x (4 H^2 + 3 H I) + 2 V H (attention with full-width K/V, gated MLP, untied embeddings),
    an upper bound for GQA and tied embeddings."""
    import json
    import struct
    from pathlib import Path

    files = sorted(Path(target).glob("*.safetensors")) if Path(target).is_dir() else []
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error) as e:
            raise SpeculatorsError(f, f"cannot read the safetensors header ({e})") from None
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= d
                total += n
    if total:
        return total
    dims = target_dims(target)
    h, v, layers = dims["hidden_size"], dims["vocab_size"], dims["num_hidden_layers"]
    try:
        inter = target_dims(target, ("intermediate_size",))["intermediate_size"]
    except SpeculatorsError:
        inter = 4 * h
    return layers * (4 * h * h + 3 * h * inter) + 2 * v * h
