"""Draft checkpoints (speculators EAGLE-3 format) and reading single tensors out of a target."""

import json

import pytest
import torch
from model_fixtures import packed_batch, tiny_draft, vocab_mapping
from safetensors import safe_open
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from speculators.errors import SpeculatorsError
from speculators.models import Eagle3DraftModel, load_draft, save_draft
from speculators.models import io as model_io

VERIFIER = dict(verifier_name_or_path="org/tiny-llama", verifier_architectures=["LlamaForCausalLM"])


def _expected_names(num_layers, norm_before_fc):
    layer = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ]
    names = {"embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"}
    names |= {"layers.0.hidden_norm.weight"} | ({"input_norm.weight"} if norm_before_fc else set())
    return names | {f"layers.{i}.{n}" for i in range(num_layers) for n in layer}


def _outputs(model, batch):
    with torch.no_grad():
        keys = ("input_ids", "aux", "position_ids", "document_ids")
        states = list(model.unroll(*(batch[k] for k in keys), 3))
        n = 8
        drafted = model.propose(batch["input_ids"][:, : n + 1], batch["aux"][:, :n], 3)
    return [model.draft_logits(s) for s in states], drafted


@pytest.mark.parametrize("num_layers,norm_before_fc", [(1, False), (2, True)])
def test_saved_draft_holds_exactly_the_vllm_tensors(
    tiny_llama, tmp_path, num_layers, norm_before_fc
):
    model = tiny_draft(tiny_llama, num_layers=num_layers, norm_before_fc=norm_before_fc)
    save_draft(model, tmp_path / "draft", **VERIFIER)
    assert sorted(p.name for p in (tmp_path / "draft").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    cfg = model.config
    h, v, vd = cfg.hidden_size, cfg.vocab_size, cfg.draft_vocab_size
    with safe_open(tmp_path / "draft" / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == _expected_names(num_layers, norm_before_fc)
        t = {n: f.get_tensor(n) for n in f.keys()}
    assert t["embed_tokens.weight"].shape == (v, h) and t["fc.weight"].shape == (h, 3 * h)
    assert t["layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 2 * h)
    assert t["layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 2 * h)
    assert t["lm_head.weight"].shape == (vd, h)
    assert (t["d2t"].dtype, t["d2t"].shape) == (torch.int64, (vd,))
    assert (t["t2d"].dtype, t["t2d"].shape) == (torch.bool, (v,))
    assert all(x.dtype == torch.bfloat16 for n, x in t.items() if n not in ("d2t", "t2d"))
    if num_layers > 1:
        assert t["layers.1.self_attn.q_proj.weight"].shape == (4 * 32, h)

    conf = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert conf["speculators_model_type"] == "eagle3"
    assert conf["architectures"] == ["Eagle3DraftModel"]
    assert conf["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert (conf["draft_vocab_size"], conf["norm_before_fc"]) == (vd, norm_before_fc)
    assert conf["norm_before_residual"] is True and conf["torch_dtype"] == "bfloat16"
    layer = conf["transformer_layer_config"]
    assert (layer["model_type"], layer["vocab_size"], layer["num_hidden_layers"]) == (
        "llama",
        v,
        num_layers,
    )
    spec = conf["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == cfg.ttt_steps
    assert spec["verifier"] == {
        "name_or_path": "org/tiny-llama",
        "architectures": ["LlamaForCausalLM"],
    }


def test_layer_config_rebuilds_the_same_rotary_embedding(tiny_llama):
    model = tiny_draft(tiny_llama)
    rebuilt = LlamaRotaryEmbedding(LlamaConfig(**model.config.transformer_layer_config()))
    assert torch.equal(rebuilt.inv_freq, model.rotary_emb.inv_freq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_reproduces_outputs(tiny_llama, tmp_path, dtype):
    model = tiny_draft(tiny_llama, num_layers=2)
    with torch.no_grad():  # train a little away from the target's LM head so the test has teeth
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_draft(model, tmp_path / "d", dtype=dtype, **VERIFIER)
    loaded = load_draft(tmp_path / "d")
    assert loaded.config == model.config
    # what the file holds is the model rounded to `dtype`
    expected = tiny_draft(tiny_llama, num_layers=2)
    expected.load_state_dict(model.state_dict())
    for p in expected.parameters():
        p.data = p.data.to(dtype).float()
    batch = packed_batch(model, [12], seed=2)
    logits, drafted = _outputs(loaded, batch)
    ref_logits, ref_drafted = _outputs(expected, batch)
    for a, b in zip(logits, ref_logits, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(drafted, ref_drafted)
    assert torch.equal(loaded.d2t, model.d2t) and torch.equal(loaded.t2d, model.t2d)


def test_draft_saved_without_embeddings_shares_the_targets(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_draft(tiny_llama, num_layers=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_draft(model, tmp_path / "full", dtype=torch.float32, **VERIFIER)
    local = dict(VERIFIER, verifier_name_or_path=str(tiny_llama))
    save_draft(model, tmp_path / "lean", dtype=torch.float32, include_embeddings=False, **local)
    with safe_open(tmp_path / "lean" / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == _expected_names(2, False) - {"embed_tokens.weight"}
    size = (tmp_path / "full" / "model.safetensors").stat().st_size
    v, h = model.config.vocab_size, model.config.hidden_size
    assert size - (tmp_path / "lean" / "model.safetensors").stat().st_size >= v * h * 4

    batch = packed_batch(model, [12], seed=4)
    reference = _outputs(load_draft(tmp_path / "full"), batch)
    # from the loaded target model (what `evaluate` passes), or from the verifier's folder
    target = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for loaded in (
        load_draft(tmp_path / "lean", embedding=target.get_input_embeddings().weight),
        load_draft(tmp_path / "lean"),
    ):
        logits, drafted = _outputs(loaded, batch)
        assert all(torch.equal(a, b) for a, b in zip(logits, reference[0], strict=True))
        assert torch.equal(drafted, reference[1])

    # A hub-id verifier and no embedding given: a one-line error naming the file.
    save_draft(model, tmp_path / "hub", include_embeddings=False, **VERIFIER)
    with pytest.raises(SpeculatorsError, match="no embed_tokens.weight, and the verifier") as e:
        load_draft(tmp_path / "hub")
    assert str(tmp_path / "hub" / "model.safetensors") in str(e.value)


def test_failed_save_leaves_no_draft_folder(tiny_llama, tmp_path, monkeypatch):
    model = tiny_draft(tiny_llama)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_io, "write_json", boom)
    with pytest.raises(OSError):
        save_draft(model, tmp_path / "draft", **VERIFIER)
    assert list(tmp_path.iterdir()) == []


def test_load_draft_names_a_file_with_missing_tensors(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    save_draft(tiny_draft(tiny_llama), tmp_path / "d", **VERIFIER)
    weights = tmp_path / "d" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["layers.0.hidden_norm.weight"]
    save_file(tensors, weights)
    with pytest.raises(SpeculatorsError, match="hidden_norm") as e:
        load_draft(tmp_path / "d")
    assert str(weights) in str(e.value)


def test_target_tensors_come_from_their_shards_only(tiny_llama, tmp_path, monkeypatch):
    """Reading the embedding, final norm and LM head opens only their shards and reads no other tensor."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    target = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    target.save_pretrained(sharded, max_shard_size="100KB")
    (sharded / "config.json").write_text((tiny_llama / "config.json").read_text())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert len(set(index.values())) > 3

    opened, read = [], []
    real_safe_open = model_io.safe_open

    class Recording:
        def __init__(self, path, framework):
            opened.append(str(path))
            self.f = real_safe_open(path, framework=framework)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(model_io, "safe_open", Recording)
    w = model_io.read_target_weights(sharded, target.config.vocab_size, target.config.hidden_size)
    assert sorted(read) == sorted(wanted)
    assert sorted(set(opened)) == sorted({str(sharded / index[n]) for n in wanted})
    assert torch.equal(w["embed"], target.model.embed_tokens.weight.detach())
    assert torch.equal(w["norm"], target.model.norm.weight.detach())
    assert torch.equal(w["lm_head"], target.lm_head.weight.detach())


def test_tied_target_uses_its_embedding_as_lm_head(tmp_path):
    from fixtures import build_target

    target = build_target(tmp_path / "tied", "llama", tie_word_embeddings=True)
    with safe_open(target / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
        embed = f.get_tensor("model.embed_tokens.weight")
    model = tiny_draft(target, draft_vocab_size=32)
    assert torch.equal(model.lm_head.weight, embed[model.t2d])
    assert torch.equal(model.verifier_lm_head.weight, embed[model.t2d])


def test_untied_target_without_an_lm_head_is_refused_not_tied_silently(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "headless"
    target.mkdir()
    (target / "config.json").write_text((tiny_llama / "config.json").read_text())
    cfg = json.loads((target / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    tensors = load_file(tiny_llama / "model.safetensors")
    tensors["output.weight"] = tensors.pop("lm_head.weight")  # a head under an unknown name
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(SpeculatorsError, match="no LM head .* tie_word_embeddings: false") as e:
        model_io.read_target_weights(target, cfg["vocab_size"], cfg["hidden_size"])
    assert str(target) in str(e.value)


def test_target_without_safetensors_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(SpeculatorsError, match="model.safetensors"):
        model_io.read_target_weights(tmp_path, 10, 8)


@pytest.mark.parametrize("which", ["d2t", "t2d", "both"])
def test_vocab_mapping_of_another_size_is_rejected(tiny_llama, which):
    model = tiny_draft(tiny_llama)
    cfg = model.config
    d2t, t2d = vocab_mapping(cfg.vocab_size, cfg.draft_vocab_size)
    if which == "d2t":
        d2t = d2t[:-1]
    elif which == "t2d":
        t2d = t2d[:-1]
    else:
        d2t = d2t + 1  # offsets that point next to the selected ids
    with pytest.raises(SpeculatorsError, match="d2t|t2d"):
        Eagle3DraftModel.from_target(cfg, tiny_llama, d2t, t2d)


def test_full_vocabulary_draft_is_saved_without_a_mapping_and_reloads(tiny_llama, tmp_path):
    """vLLM makes no d2t parameter when Vd = V and rejects a checkpoint holding one."""
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    model = tiny_draft(tiny_llama, draft_vocab_size=vocab)
    assert torch.equal(model.d2t, torch.zeros(vocab).long()) and bool(model.t2d.all())
    save_draft(model, tmp_path / "d", **VERIFIER)
    with safe_open(tmp_path / "d" / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == _expected_names(1, False) - {"d2t", "t2d"}
    loaded = load_draft(tmp_path / "d")
    assert torch.equal(loaded.d2t, model.d2t) and torch.equal(loaded.t2d, model.t2d)
    none_mapping = Eagle3DraftModel.from_target(model.config, tiny_llama, None, None)
    assert torch.equal(none_mapping.lm_head.weight, model.lm_head.weight)
