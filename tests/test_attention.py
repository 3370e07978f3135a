"""TTT attention masks: the dense pattern, and flex and per-document attention agreeing with dense SDPA."""

import warnings

import pytest
import torch
from model_fixtures import packed_batch, tiny_draft

from speculators.models.attention import (
    TTTAttention,
    dense_ttt_mask,
    document_runs,
    ttt_mask_mod,
)


def test_dense_mask_matches_the_worked_example():
    # documents of lengths [1, 2] after one extension: causal prefix in-document + own copy
    mask = dense_ttt_mask(torch.tensor([0, 1, 1]), step=1).int().tolist()
    assert mask == [[1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 1]]


def test_dense_mask_equals_mask_mod_with_padding_on_its_diagonal():
    docs = torch.tensor([0, 0, 0, 1, 1, 2, -1, -1])
    t = docs.shape[0]
    mod = ttt_mask_mod(docs)
    for step in range(4):
        q = torch.arange(t)[:, None]
        kv = torch.arange((step + 1) * t)[None, :]
        dense = dense_ttt_mask(docs, step)
        assert torch.equal(dense, mod(0, 0, q, kv))
        assert dense.sum(1).min() >= 1  # no empty softmax row
        assert dense[6].nonzero()[:, 0].tolist() == [6 + j * t for j in range(step + 1)]
        assert dense[4].nonzero()[:, 0].tolist() == [3, 4] + [4 + j * t for j in range(1, step + 1)]


@pytest.mark.parametrize(
    "lengths,pad,steps", [([17], 0, 1), ([5, 9, 3], 4, 2), ([1, 1, 12], 7, 3), ([6, 2, 8], 3, 4)]
)
def test_flex_and_dense_give_the_same_draft(tiny_llama, lengths, pad, steps):
    model = tiny_draft(tiny_llama, num_layers=2)
    batch = packed_batch(model, lengths, pad=pad, seed=steps)
    keys = ("input_ids", "aux", "position_ids", "document_ids")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex attention warns that it runs un-compiled on CPU
        dense = list(model.unroll(*(batch[k] for k in keys), steps, attention="dense"))
        flex = list(model.unroll(*(batch[k] for k in keys), steps, attention="flex"))
        loss_d, stats_d = model(**batch, ttt_steps=steps, attention="dense")
        loss_f, stats_f = model(**batch, ttt_steps=steps, attention="flex")
    for a, b in zip(dense, flex, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss_d, loss_f, rtol=1e-4, atol=1e-5)
    assert {k: v for k, v in stats_d.items() if not k.startswith("kl")} == {
        k: v for k, v in stats_f.items() if not k.startswith("kl")
    }


def test_padding_query_attends_only_to_itself():
    docs = torch.tensor([0, 0, -1])
    attend = TTTAttention(docs, "dense").for_step(0)
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 1, 3, 8)
    v = torch.randn(1, 1, 3, 8)
    out = attend(q, k, v)
    torch.testing.assert_close(out[0, :, 2], v[0, :, 2].expand(2, 8))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "lengths,pad,steps", [([17], 0, 1), ([5, 9, 3], 4, 2), ([1, 1, 12], 7, 3), ([6, 2, 8], 3, 4)]
)
def test_per_document_and_dense_give_the_same_outputs_and_gradients(
    tiny_llama, lengths, pad, steps
):
    model = tiny_draft(tiny_llama, num_layers=2)
    batch = packed_batch(model, lengths, pad=pad, seed=steps)
    results = {}
    for kind in ("dense", "documents"):
        model.zero_grad()
        with pytest.MonkeyPatch.context() as mp:
            if kind == "documents":  # the per-document path itself, never the dense fallback
                mp.setattr(TTTAttention, "_dense", lambda *a: pytest.fail("dense fallback"))
            loss, stats = model(**batch, ttt_steps=steps, attention=kind)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[kind] = (loss.detach(), stats, grads)
    (loss_d, stats_d, grads_d), (loss_s, stats_s, grads_s) = results["dense"], results["documents"]
    assert torch.isfinite(loss_d)
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-5, atol=1e-6)
    assert {k: v for k, v in stats_d.items() if not k.startswith("kl")} == {
        k: v for k, v in stats_s.items() if not k.startswith("kl")
    }
    assert grads_d.keys() == grads_s.keys() and "fc.weight" in grads_d
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-6)


def test_per_document_attention_sees_the_same_keys_as_the_dense_mask():
    # random q/k/v straight into attend (no model): documents, a split-free packing, padding between
    docs = torch.tensor([0, 0, 0, -1, 1, 1, 1, 1, 2, -1, -1])
    t, g = docs.shape[0], torch.Generator().manual_seed(0)
    for step in range(4):
        q = torch.randn(1, 4, t, 8, generator=g)
        k = torch.randn(1, 2, (step + 1) * t, 8, generator=g)
        v = torch.randn(1, 2, (step + 1) * t, 8, generator=g)
        dense = TTTAttention(docs, "dense").for_step(step)(q, k, v)
        attention = TTTAttention(docs, "documents")
        per_doc = attention.for_step(step)(q, k, v)
        assert attention._runs == document_runs(docs) and len(attention._runs) == 5
        torch.testing.assert_close(per_doc, dense, rtol=1e-5, atol=1e-6)


def test_document_runs_and_the_dense_fallback_for_a_split_document():
    assert document_runs(torch.tensor([0, 0, 1, -1, -1])) == [
        (0, 2, False),
        (2, 3, False),
        (3, 5, True),
    ]
    split = torch.tensor(
        [0, 0, 1, 0, -1]
    )  # document 0 in two pieces: its later piece sees the first
    assert document_runs(split) is None
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    fallback = TTTAttention(split, "documents").for_step(0)(q, k, v)
    torch.testing.assert_close(fallback, TTTAttention(split, "dense").for_step(0)(q, k, v))


def test_auto_is_per_document_on_cpu_and_unknown_kind_fails():
    assert TTTAttention(torch.zeros(4).long(), "auto").kind == "documents"
    with pytest.raises(ValueError, match="attention"):
        TTTAttention(torch.zeros(4).long(), "eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex attention needs CUDA")
def test_compiled_flex_on_cuda_matches_dense_with_gradients(tiny_llama):
    model = tiny_draft(tiny_llama, num_layers=2).cuda()
    batch = {k: v.cuda() for k, v in packed_batch(model, [100, 60, 90], pad=6).items()}
    grads = {}
    for kind in ("dense", "flex"):
        model.zero_grad()
        loss, stats = model(**batch, ttt_steps=3, attention=kind)
        loss.backward()
        grads[kind] = (loss.detach(), model.fc.weight.grad.clone(), stats["full_0"])
    torch.testing.assert_close(grads["dense"][0], grads["flex"][0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(grads["dense"][1], grads["flex"][1], rtol=1e-2, atol=1e-5)
    assert grads["dense"][2] == grads["flex"][2]
