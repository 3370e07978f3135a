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
