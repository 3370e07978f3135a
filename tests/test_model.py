"""The EAGLE-3 draft model: config from the target, alignment, TTT loss and metrics, greedy drafting."""

import json

import pytest
import torch
from model_fixtures import packed_batch, tiny_draft

from speculators.errors import SpeculatorsError
from speculators.models import Eagle3DraftConfig, align_sample, step_metrics
from speculators.models.loss import shifted_tokens, step_valid_mask


def test_config_copies_target_dims_and_rope(tiny_llama):
    cfg = Eagle3DraftConfig.from_target(tiny_llama, draft_vocab_size=64, aux_layer_ids=[1, 2, 3])
    target = json.loads((tiny_llama / "config.json").read_text())
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (128, 256, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == target["vocab_size"] and cfg.aux_width == 3 * 128
    assert cfg.rope_parameters["rope_theta"] == target["rope_parameters"]["rope_theta"]
    assert Eagle3DraftConfig.from_dict(cfg.to_dict()) == cfg


def test_config_moe_target_without_dense_width_falls_back_to_3h(tmp_path):
    cfg = {"hidden_size": 64, "num_attention_heads": 2, "vocab_size": 100, "num_hidden_layers": 4}
    cfg |= {
        "moe_intermediate_size": 32,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    draft = Eagle3DraftConfig.from_target(tmp_path, draft_vocab_size=10, aux_layer_ids=[1, 2, 4])
    assert draft.intermediate_size == 3 * 64 and draft.head_dim == 32
    assert draft.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}


@pytest.mark.parametrize("ids", [[1, 1, 2], [0, 9, 2], []])
def test_config_rejects_bad_aux_layer_ids(tiny_llama, ids):
    with pytest.raises(SpeculatorsError, match="aux_layer_ids"):
        Eagle3DraftConfig.from_target(tiny_llama, draft_vocab_size=64, aux_layer_ids=ids)


def test_align_sample_pairs_next_token_with_previous_states():
    s, h, layers = 7, 4, [2, 5, 8, 12]  # three aux layers + the last layer
    # state of layer l at position t holds 100*t + l in every channel
    states = [torch.full((s, h), 0.0) + 100 * torch.arange(s)[:, None] + layer for layer in layers]
    ids = torch.arange(10, 10 + s)
    mask = torch.tensor([0, 0, 1, 1, 0, 1, 1])
    out = align_sample(ids, states, mask)
    assert out["input_ids"].tolist() == list(range(11, 10 + s))
    assert out["position_ids"].tolist() == list(range(1, s))
    assert out["loss_mask"].tolist() == mask[1:].tolist()
    for t in range(s - 1):
        assert out["aux"][t].tolist() == [
            100.0 * t + layer for layer in layers[:3] for _ in range(h)
        ]
        assert out["last"][t].tolist() == [100.0 * (t + 1) + 12] * h


def _oracle(model, monkeypatch, noise=0.0, seed=0):
    """Make the draft's step-k state at t equal the target's last state at t+k (plus noise)."""
    model.norm.load_state_dict(model.verifier_norm.state_dict())
    model.lm_head.load_state_dict(model.verifier_lm_head.state_dict())

    def unroll(input_ids, aux, position_ids, document_ids, ttt_steps, attention="auto"):
        g = torch.Generator().manual_seed(seed)  # same noise on every call
        last = aux_last["last"]
        for k in range(ttt_steps):
            h = torch.zeros_like(last)
            h[:, : last.shape[1] - k] = last[:, k:]
            yield h + noise * torch.randn(h.shape, generator=g)

    aux_last = {}
    monkeypatch.setattr(model, "unroll", unroll)
    return aux_last


def test_oracle_draft_has_zero_kl_and_full_accuracy(tiny_llama, monkeypatch):
    model = tiny_draft(tiny_llama)
    batch = packed_batch(model, [9, 5, 12], pad=4)
    _oracle(model, monkeypatch)["last"] = batch["last"]
    loss, stats = model(**batch, ttt_steps=4)
    metrics = step_metrics(stats, 4)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    for k in range(4):
        assert stats[f"count_{k}"] > 0
        assert stats[f"full_{k}"] == stats[f"count_{k}"] == stats[f"prev_{k}"]
        assert metrics[f"full_acc_{k}"] == metrics[f"cond_acc_{k}"] == 1.0
    assert metrics["acceptance_length"] == 5.0


def _brute_force_stats(model, batch, ttt_steps):
    """Independent per-position recount of count/full/prev from logits computed one position at a time."""
    last, mask, docs = batch["last"][0], batch["loss_mask"][0], batch["document_ids"][0]
    hidden = list(
        model.unroll(
            *(batch[k] for k in ("input_ids", "aux", "position_ids", "document_ids")), ttt_steps
        )
    )
    t = mask.shape[0]
    out = {}
    for k in range(ttt_steps):
        for key in ("count", "full", "prev"):
            out[f"{key}_{k}"] = 0
        for i in range(t - k):
            if not (mask[i + k] and docs[i] == docs[i + k] and docs[i] >= 0):
                continue
            ok = [
                model.draft_logits(hidden[j][0, i]).argmax()
                == model.target_logits(last[i + j]).argmax()
                for j in range(k + 1)
            ]
            out[f"count_{k}"] += 1
            out[f"prev_{k}"] += all(ok[:k])
            out[f"full_{k}"] += all(ok)
    return out


def test_stats_match_a_per_position_recount_and_accuracies_are_ordered(tiny_llama, monkeypatch):
    model = tiny_draft(tiny_llama)
    batch = packed_batch(model, [11, 7, 14], pad=3, seed=1)
    _oracle(model, monkeypatch, noise=2.0)["last"] = batch["last"]  # partly right drafts
    with torch.no_grad():
        _, stats = model(**batch, ttt_steps=4)
        expected = _brute_force_stats(model, batch, 4)
    assert {k: int(v) for k, v in stats.items() if not k.startswith("kl")} == expected
    assert 0 < expected["full_0"] < expected["count_0"], "noise should make some drafts wrong"
    metrics = step_metrics(stats, 4)
    accs = [metrics[f"full_acc_{k}"] for k in range(4)]
    assert accs == sorted(accs, reverse=True)
    assert all(0.0 <= metrics[f"cond_acc_{k}"] <= 1.0 for k in range(4))
    assert metrics["acceptance_length"] == pytest.approx(1 + sum(accs))


def test_loss_is_decay_weighted_sum_of_masked_mean_kl(tiny_llama):
    model = tiny_draft(tiny_llama)
    batch = packed_batch(model, [10, 10], pad=2)
    with torch.no_grad():
        loss, stats = model(**batch, ttt_steps=3, loss_decay=0.5)
    expected = sum(0.5**k * stats[f"kl_{k}"] / stats[f"count_{k}"] for k in range(3))
    assert loss.item() == pytest.approx(float(expected), rel=1e-6)
    assert all(stats[f"kl_{k}"] > 0 for k in range(3))
    normalizer = torch.tensor([40.0, 30.0, 20.0])  # e.g. counts summed over ranks / world size
    with torch.no_grad():
        global_loss, _ = model(**batch, ttt_steps=3, loss_decay=0.5, count_normalizer=normalizer)
    expected = sum(0.5**k * stats[f"kl_{k}"] / normalizer[k] for k in range(3))
    assert global_loss.item() == pytest.approx(float(expected), rel=1e-6)


def test_targets_are_the_target_models_logits_over_the_draft_vocab(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = tiny_draft(tiny_llama)
    target = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    captured = {}
    # The final norm's input is the pre-norm last-layer state the hidden-states stage stores.
    target.model.norm.register_forward_pre_hook(lambda m, args: captured.update(last=args[0]))
    ids = torch.randint(
        0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        logits = target(ids).logits[0]
        ours = model.target_logits(captured["last"][0])
    torch.testing.assert_close(ours, logits[:, model.t2d], rtol=1e-5, atol=1e-5)
    # the draft head starts as exactly those rows, and d2t maps draft ids back to the target ids
    assert torch.equal(model.lm_head.weight, model.verifier_lm_head.weight)
    assert torch.equal(
        torch.arange(model.config.draft_vocab_size) + model.d2t, model.t2d.nonzero()[:, 0]
    )


def test_two_layer_draft_trains_without_nan(tiny_llama):
    model = tiny_draft(tiny_llama, num_layers=2)
    batch = packed_batch(model, [13, 9, 6], pad=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(5):
        loss, _ = model(**batch, ttt_steps=3)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
                assert p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_incremental_proposals_equal_fresh_ones_on_a_growing_sequence(tiny_llama):
    """A DraftState encodes only appended positions, and drafts what a fresh propose drafts."""
    from speculators.models.eagle3 import DraftState

    model = tiny_draft(tiny_llama, num_layers=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.ndim == 2:
                p.normal_(0.0, 0.2)
    g = torch.Generator().manual_seed(5)
    cfg, k = model.config, 3
    tokens = torch.randint(0, cfg.vocab_size, (1, 41), generator=g)
    aux = torch.randn(1, 40, cfg.aux_width, generator=g)
    state = DraftState()
    encoded, fuse = [], model._fuse  # positions step 0 runs over, per stateful call

    def counting_fuse(a):
        encoded.append(a.shape[1])
        return fuse(a)

    for n in (6, 7, 10, 11, 15, 40):  # accepted 0..3 tokens between proposals, then a long jump
        model._fuse = counting_fuse
        drafted = model.propose(tokens[:, : n + 1], aux[:, :n], k, state=state)
        del model._fuse
        assert drafted.tolist() == model.propose(tokens[:, : n + 1], aux[:, :n], k).tolist(), n
        for cache in state.caches:  # the drafted positions are forgotten, the prefix is one entry
            assert len(cache) == 1 and cache.entries[0][0].shape[2] == n
    assert encoded == [6, 1, 3, 1, 4, 25]  # only what was appended since the last call
    # Another sequence (a new prompt) starts the state afresh instead of reusing stale keys.
    other = torch.randint(0, cfg.vocab_size, (1, 9), generator=g)
    other_aux = torch.randn(1, 8, cfg.aux_width, generator=g)
    drafted = model.propose(other, other_aux, k, state=state)
    assert drafted.tolist() == model.propose(other, other_aux, k).tolist()
    assert state.caches[0].entries[0][0].shape[2] == 8

    # A call that fails half-way (layer 1 out of memory) leaves nothing the next call reuses.
    def failing(*a, **kw):
        raise RuntimeError("out of memory")

    model.layers[1].forward = failing
    with pytest.raises(RuntimeError):
        model.propose(tokens[:, :12], aux[:, :11], k, state=state)
    del model.layers[1].forward
    drafted = model.propose(tokens[:, :12], aux[:, :11], k, state=state)
    assert drafted.tolist() == model.propose(tokens[:, :12], aux[:, :11], k).tolist()


def test_propose_equals_the_teacher_forced_unroll_on_its_own_tokens(tiny_llama):
    """Drafting k tokens = training's TTT unroll at the last position, fed the drafted tokens."""
    model = tiny_draft(tiny_llama, num_layers=2)
    with torch.no_grad():  # larger random weights, so drafts depend on positions and tokens
        for p in model.parameters():
            if p.requires_grad and p.ndim == 2:
                p.normal_(0.0, 0.2)
    g = torch.Generator().manual_seed(3)
    n, k, cfg = 9, 4, model.config
    tokens = torch.randint(0, cfg.vocab_size, (1, n + 1), generator=g)
    aux = torch.randn(1, n, cfg.aux_width, generator=g)
    drafted = model.propose(tokens, aux, k)
    assert drafted.shape == (k,) and bool(model.t2d[drafted].all())

    reference = []
    with torch.no_grad():
        for j in range(k):
            # positions past n-1 carry the tokens drafted so far; position n-1 never sees their states
            ids = torch.cat(
                [tokens[:, 1:], torch.tensor([reference], dtype=torch.long).view(1, -1)], 1
            )
            t = ids.shape[1]
            extra = torch.zeros(1, t - n, cfg.aux_width)
            states = list(
                model.unroll(
                    ids,
                    torch.cat([aux, extra], 1),
                    torch.arange(1, t + 1)[None],
                    torch.zeros(1, t).long(),
                    j + 1,
                )
            )
            best = model.draft_logits(states[j][0, n - 1]).argmax()
            reference.append(int(best + model.d2t[best]))
    assert drafted.tolist() == reference
    assert len(set(reference)) > 1, "a constant draft would not test the chain"


def test_step_valid_mask_stops_at_document_ends_and_padding():
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 0])
    docs = torch.tensor([0, 0, 0, 1, 1, 1, -1])
    assert step_valid_mask(mask, docs, 0).tolist() == [1, 1, 1, 0, 1, 1, 0]
    assert step_valid_mask(mask, docs, 1).tolist() == [1, 1, 0, 1, 1, 0]
    assert step_valid_mask(mask, docs, 2).tolist() == [1, 0, 0, 1, 0]
    # padding never has a target, even under a (bad) loss mask of 1
    assert not step_valid_mask(torch.ones(7).long(), docs, 0)[6]


def test_teacher_forced_tokens_shift_within_documents_and_pad_with_zero():
    ids = torch.tensor([11, 12, 13, 14, 15, 16, 17])
    docs = torch.tensor([0, 0, 0, 1, 1, 1, -1])
    assert shifted_tokens(ids, docs, 0).tolist() == ids.tolist()
    assert shifted_tokens(ids, docs, 1).tolist() == [12, 13, 0, 15, 16, 0, 0]
    assert shifted_tokens(ids, docs, 2).tolist() == [13, 0, 0, 16, 0, 0, 0]


def _transformers_reference_step0(model, ids, aux, positions):
    """Step 0 of the draft rebuilt from transformers' own Llama attention and decoder layers."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

    cfg = model.config
    llama = LlamaConfig(**cfg.transformer_layer_config())
    llama._attn_implementation = "eager"
    t = ids.shape[1]
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
    cos, sin = model.rotary_emb(aux, positions)

    first = model.layers[0]
    wide = LlamaConfig(**{**cfg.transformer_layer_config(), "hidden_size": 2 * cfg.hidden_size})
    wide._attn_implementation = "eager"
    attn = LlamaAttention(wide, layer_idx=0)
    attn.o_proj = torch.nn.Linear(
        cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False
    )
    attn.load_state_dict(first.self_attn.state_dict())

    def rms(x, norm):
        return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    h = model.fc(aux)
    normed = rms(h, first.hidden_norm)
    x = torch.cat([rms(model.embed_tokens(ids), first.input_layernorm), normed], -1)
    residual = normed if cfg.norm_before_residual else h
    h = residual + attn(x, (cos, sin), causal)[0]
    h = h + first.mlp(rms(h, first.post_attention_layernorm))
    for i, layer in enumerate(model.layers[1:], start=1):
        ref = LlamaDecoderLayer(llama, layer_idx=i)
        ref.load_state_dict(layer.state_dict())
        h = ref(h, attention_mask=causal, position_embeddings=(cos, sin))
    return h


@pytest.mark.parametrize("norm_before_residual", [True, False])
def test_step0_equals_a_transformers_llama_reference(tiny_llama, norm_before_residual):
    model = tiny_draft(tiny_llama, num_layers=3, norm_before_residual=norm_before_residual)
    batch = packed_batch(model, [15], seed=4)
    keys = ("input_ids", "aux", "position_ids", "document_ids")
    with torch.no_grad():
        (ours,) = model.unroll(*(batch[k] for k in keys), 1)
        ref = _transformers_reference_step0(
            model, batch["input_ids"], batch["aux"], batch["position_ids"]
        )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_forward_names_a_batch_of_the_wrong_width(tiny_llama):
    model = tiny_draft(tiny_llama)
    batch = packed_batch(model, [6])
    batch["aux"] = batch["aux"][..., :-1]
    with pytest.raises(ValueError, match=r"aux must have shape \(1, 6, 384\)"):
        model(**batch, ttt_steps=1)


def test_llama3_rope_scaling_reaches_the_draft_rotary_embedding(tmp_path):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from speculators.models import Eagle3DraftModel

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    scaling |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = {"hidden_size": 64, "num_attention_heads": 2, "vocab_size": 100, "num_hidden_layers": 4}
    cfg |= {"rope_theta": 5e5, "rope_scaling": scaling, "max_position_embeddings": 131072}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    draft = Eagle3DraftModel(
        Eagle3DraftConfig.from_target(tmp_path, draft_vocab_size=10, aux_layer_ids=[1, 2, 3])
    )
    # LlamaConfig writes rope_theta into the rope_scaling dict it is given: pass a copy
    target_rope = LlamaRotaryEmbedding(LlamaConfig(**json.loads(json.dumps(cfg))))
    assert draft.rotary_emb.rope_type == "llama3"
    assert torch.equal(draft.rotary_emb.inv_freq, target_rope.inv_freq)
    assert draft.config.transformer_layer_config()["rope_scaling"] == scaling


def test_bf16_autocast_step_stays_close_to_fp32_with_fp32_gradients(tiny_llama):
    model = tiny_draft(tiny_llama, num_layers=2)
    batch = packed_batch(model, [20, 30], pad=5)
    with torch.no_grad():
        reference, _ = model(**batch, ttt_steps=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(**batch, ttt_steps=3)
    loss.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
