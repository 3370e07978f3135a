"""Draft checkpoints in the speculators EAGLE-3 format that `vllm serve <draft_dir>` loads, and
reading just the embedding, final norm and LM head out of a target's (possibly sharded) safetensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from speculators import __version__
from speculators.errors import SpeculatorsError
from speculators.fileio import atomic_path, read_json, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # of a sharded target

# Checkpoint tensor names (what vLLM's Eagle3 Llama draft loads) -> the model's state_dict names.
# They coincide today; if vLLM ever wants another name, change the left column only.
EMBEDDINGS = "embed_tokens.weight"  # optional in a checkpoint: a copy of the target's
TOP_LEVEL_NAMES = {
    "embed_tokens.weight": "embed_tokens.weight",
    "fc.weight": "fc.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Only for a reduced draft vocabulary: vLLM creates no d2t parameter for a full-vocabulary draft
# and refuses a checkpoint that has one.
VOCAB_MAPPING_NAMES = {"d2t": "d2t", "t2d": "t2d"}
NORM_BEFORE_FC_NAMES = {"input_norm.weight": "input_norm.weight"}
LAYER_NAMES = (  # per layer i, checkpoint "layers.{i}.<name>" <- model "layers.{i}.<name>"
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
FIRST_LAYER_EXTRA = ("hidden_norm.weight",)

# Where targets keep the tensors the draft copies (first match wins; multimodal prefixes included).
TARGET_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")
TARGET_HEADS = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")


def checkpoint_names(config) -> dict[str, str]:
    """Checkpoint name -> model state_dict name, for exactly the tensors a draft file holds."""
    names = dict(TOP_LEVEL_NAMES)
    if config.draft_vocab_size != config.vocab_size:
        names.update(VOCAB_MAPPING_NAMES)
    if config.norm_before_fc:
        names.update(NORM_BEFORE_FC_NAMES)
    for i in range(config.num_layers):
        extra = FIRST_LAYER_EXTRA if i == 0 else ()
        for n in LAYER_NAMES + extra:
            names[f"layers.{i}.{n}"] = f"layers.{i}.{n}"
    return names


# ---- target weights ------------------------------------------------------------------------------
def _target_tensor_files(target: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index when sharded (no tensor data is read)."""
    index = target / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map") or {}
        return {name: target / fname for name, fname in weight_map.items()}
    single = target / "model.safetensors"
    if not single.is_file():
        raise SpeculatorsError(target, "no model.safetensors or model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def read_target_tensors(target: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read only `names` from the target's safetensors, opening just the shards that hold them."""
    target = Path(target)
    files = _target_tensor_files(target)
    missing = [n for n in names if n not in files]
    if missing:
        raise SpeculatorsError(target, f"tensors not found in the safetensors files: {missing}")
    out = {}
    for path in sorted({files[n] for n in names}):
        with safe_open(path, framework="pt") as f:
            for n in names:
                if files[n] == path:
                    out[n] = f.get_tensor(n)
    return out


def _ties_embeddings(target: Path) -> bool:
    """The config's tie_word_embeddings (top level or text part); transformers' default is true."""
    try:
        cfg = read_json(target / "config.json")
    except SpeculatorsError:
        return True  # no readable config: the shapes are still checked below
    flags = [
        cfg.get("tie_word_embeddings"),
        (cfg.get("text_config") or {}).get("tie_word_embeddings"),
    ]
    return all(f is not False for f in flags)


def _draft_tensor_names(files) -> tuple[str | None, str | None, str | None]:
    """Names of the target's embedding, final norm and LM head among `files` (None: absent)."""

    def find(candidates):
        return next((c for c in candidates if c in files), None)

    return (
        find(p + "embed_tokens.weight" for p in TARGET_PREFIXES),
        find(p + "norm.weight" for p in TARGET_PREFIXES),
        find(TARGET_HEADS),
    )


def target_weight_shards(target: str | Path) -> list[str]:
    """The safetensors files (names in the target folder) holding the tensors the draft copies:
    from the index of a sharded target (only its JSON files needed), else the single file."""
    index = Path(target) / INDEX_FILE
    if not index.is_file():
        return ["model.safetensors"]
    weight_map = read_json(index).get("weight_map") or {}
    return sorted({weight_map[n] for n in _draft_tensor_names(weight_map) if n})


def read_target_weights(target: str | Path, vocab_size: int, hidden_size: int) -> dict:
    """The target's embedding [V,H], final norm [H] and LM head [V,H] (the embedding when tied)."""
    target = Path(target)
    files = _target_tensor_files(target)
    embed, norm, head = _draft_tensor_names(files)
    if embed is None or norm is None:
        raise SpeculatorsError(target, "no embed_tokens.weight / final norm.weight in safetensors")
    if head is None and not _ties_embeddings(target):
        raise SpeculatorsError(
            target, f"no LM head ({' / '.join(TARGET_HEADS)}) in safetensors, and the config"
            " says tie_word_embeddings: false"
        )  # fmt: skip
    tensors = read_target_tensors(target, [n for n in (embed, norm, head) if n])
    w = {"embed": tensors[embed], "norm": tensors[norm]}
    w["lm_head"] = (
        tensors[head] if head else w["embed"]
    )  # tied embeddings: the head is the embedding
    for key, shape in (
        ("embed", (vocab_size, hidden_size)),
        ("lm_head", (vocab_size, hidden_size)),
    ):
        if tuple(w[key].shape) != shape:
            raise SpeculatorsError(
                target, f"{key} has shape {tuple(w[key].shape)}, expected {shape}"
            )
    if tuple(w["norm"].shape) != (hidden_size,):
        raise SpeculatorsError(target, f"final norm has shape {tuple(w['norm'].shape)}")
    return w


def check_vocab_mapping(d2t, t2d, vocab_size: int, draft_vocab_size: int):
    """Validate d2t (int offsets [Vd]) and t2d (bool [V]) against each other; return tensors.

    A full-vocabulary draft (Vd = V) may pass None for both: the identity mapping.
    """
    if d2t is None and t2d is None and draft_vocab_size == vocab_size:
        return torch.zeros(vocab_size, dtype=torch.long), torch.ones(vocab_size, dtype=torch.bool)
    d2t = torch.as_tensor(np.asarray(d2t), dtype=torch.long)
    t2d = torch.as_tensor(np.asarray(t2d)).bool()
    if d2t.shape != (draft_vocab_size,):
        raise SpeculatorsError("d2t", f"shape {tuple(d2t.shape)}, expected ({draft_vocab_size},)")
    if t2d.shape != (vocab_size,):
        raise SpeculatorsError("t2d", f"shape {tuple(t2d.shape)}, expected ({vocab_size},)")
    ids = torch.arange(draft_vocab_size) + d2t
    if int(t2d.sum()) != draft_vocab_size or not torch.equal(ids, t2d.nonzero().flatten()):
        raise SpeculatorsError("d2t/t2d", "d2t does not map onto exactly the ids selected by t2d")
    return d2t, t2d


# ---- draft checkpoints ---------------------------------------------------------------------------
def speculators_config(
    config, *, verifier_name_or_path: str, verifier_architectures: list[str], dtype
) -> dict:
    """config.json of a draft: the speculators EAGLE-3 schema vLLM reads."""
    return {
        "speculators_model_type": "eagle3",
        "architectures": ["Eagle3DraftModel"],
        "transformer_layer_config": config.transformer_layer_config(),
        "draft_vocab_size": config.draft_vocab_size,
        "norm_before_residual": config.norm_before_residual,
        "norm_before_fc": config.norm_before_fc,
        "target_hidden_size": config.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(config.aux_layer_ids),
        "speculators_version": __version__,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": config.ttt_steps,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {
                "name_or_path": str(verifier_name_or_path),
                "architectures": list(verifier_architectures),
            },
        },
    }


def save_draft(
    model,
    out_dir: str | Path,
    *,
    verifier_name_or_path: str,
    verifier_architectures: list[str],
    dtype: torch.dtype = torch.bfloat16,
    include_embeddings: bool = True,
) -> None:
    """Write config.json + model.safetensors (floats in `dtype`) as one atomic folder.

    Without `include_embeddings` the frozen target embedding is left out: vLLM then shares
    the target's, and `load_draft` reads it from the target.
    """
    state = model.state_dict()
    tensors = {}
    for saved, own in checkpoint_names(model.config).items():
        if saved == EMBEDDINGS and not include_embeddings:
            continue
        t = state[own].detach().cpu()
        tensors[saved] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    cfg = speculators_config(
        model.config,
        verifier_name_or_path=verifier_name_or_path,
        verifier_architectures=verifier_architectures,
        dtype=dtype,
    )
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, cfg)


def config_from_speculators(cfg: dict, where) -> object:
    """Rebuild an Eagle3DraftConfig from a draft's config.json."""
    from speculators.models.eagle3 import Eagle3DraftConfig, _rope_parameters

    try:
        layer = cfg["transformer_layer_config"]
        methods = cfg["speculators_config"]["proposal_methods"]
        return Eagle3DraftConfig(
            hidden_size=layer["hidden_size"],
            intermediate_size=layer["intermediate_size"],
            num_attention_heads=layer["num_attention_heads"],
            num_key_value_heads=layer.get("num_key_value_heads") or layer["num_attention_heads"],
            head_dim=layer.get("head_dim") or layer["hidden_size"] // layer["num_attention_heads"],
            vocab_size=layer["vocab_size"],
            draft_vocab_size=cfg["draft_vocab_size"],
            aux_layer_ids=list(cfg["eagle_aux_hidden_state_layer_ids"]),
            num_layers=layer["num_hidden_layers"],
            ttt_steps=methods[0]["speculative_tokens"],
            norm_before_residual=cfg.get("norm_before_residual", True),
            norm_before_fc=cfg.get("norm_before_fc", False),
            hidden_act=layer.get("hidden_act", "silu"),
            max_position_embeddings=layer.get("max_position_embeddings", 4096),
            rms_norm_eps=layer.get("rms_norm_eps", 1e-6),
            rope_parameters=_rope_parameters(layer),
            target_hidden_size=cfg.get("target_hidden_size"),
        )
    except (KeyError, TypeError, IndexError) as e:
        raise SpeculatorsError(where, f"not an EAGLE-3 draft config (missing {e})") from None


def _verifier_embedding(cfg: dict, weights: Path) -> torch.Tensor:
    """The embedding a draft saved without one shares with its verifier (a local folder)."""
    verifier = (cfg.get("speculators_config") or {}).get("verifier") or {}
    source = verifier.get("name_or_path")
    if not source or not Path(source).is_dir():
        raise SpeculatorsError(
            weights, f"no {EMBEDDINGS}, and the verifier {source!r} is not a local folder to"
            " take it from"
        )  # fmt: skip
    name = _draft_tensor_names(_target_tensor_files(Path(source)))[0]
    if name is None:
        raise SpeculatorsError(source, "no embed_tokens.weight in the target's safetensors")
    return read_target_tensors(source, [name])[name]


def load_draft(
    draft_dir: str | Path,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    embedding: torch.Tensor | None = None,
):
    """A draft saved by `save_draft`, in `dtype` on `device` (verifier_norm/lm_head stay zero;
    a full-vocabulary draft, saved without d2t/t2d, gets the identity mapping). A draft saved
    without its embedding takes `embedding` (the loaded target's), else its verifier's."""
    from speculators.models.eagle3 import Eagle3DraftModel

    draft_dir = Path(draft_dir)
    cfg_path, weights = draft_dir / CONFIG_FILE, draft_dir / WEIGHTS_FILE
    cfg = read_json(cfg_path)
    if cfg.get("speculators_model_type") != "eagle3":
        raise SpeculatorsError(cfg_path, "speculators_model_type is not 'eagle3'")
    config = config_from_speculators(cfg, cfg_path)
    if not weights.is_file():
        raise SpeculatorsError(weights, "file not found")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise SpeculatorsError(weights, f"unreadable safetensors ({e})") from None
    names = checkpoint_names(config)
    if EMBEDDINGS not in tensors and set(tensors) == set(names) - {EMBEDDINGS}:
        tensors[EMBEDDINGS] = (
            embedding.detach().cpu() if embedding is not None else _verifier_embedding(cfg, weights)
        )
    if set(tensors) != set(names):
        diff = sorted(set(tensors) ^ set(names))
        raise SpeculatorsError(weights, f"tensor names differ from an EAGLE-3 draft: {diff}")
    model = Eagle3DraftModel(config)
    state = {own: tensors[saved] for saved, own in names.items()}
    expected = model.state_dict()
    for own, t in state.items():
        if t.shape != expected[own].shape:
            raise SpeculatorsError(weights, f"{own} has shape {tuple(t.shape)}")
    model.load_state_dict(state, strict=False)
    return model.to(device=device, dtype=dtype)
