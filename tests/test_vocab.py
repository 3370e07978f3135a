"""Draft vocabulary mapping: d2t/t2d invariants, ties, padding, and the `vocab` command."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speculators.cli import main
from speculators.vocab import build_mapping


@st.composite
def counts_and_size(draw):
    vocab_size = draw(st.integers(1, 300))
    # Few distinct counts, so ties are common; zeros are unseen tokens.
    counts = draw(st.lists(st.integers(0, 4), min_size=vocab_size, max_size=vocab_size))
    draft_vocab_size = draw(st.integers(1, vocab_size))
    return np.array(counts, dtype=np.int64), draft_vocab_size


@settings(max_examples=300, deadline=None)
@given(counts_and_size())
def test_mapping_invariants(case):
    counts, vd = case
    d2t, t2d = build_mapping(counts, vd)
    assert d2t.dtype == np.int64 and d2t.shape == (vd,)
    assert t2d.dtype == np.bool_ and t2d.shape == (len(counts),)
    assert t2d.sum() == vd
    target_ids = np.arange(vd) + d2t
    assert np.all(np.diff(target_ids) > 0)
    assert np.array_equal(target_ids, np.nonzero(t2d)[0])
    # Most frequent first, ties (and unseen tokens, count 0) to the lower id: every kept id
    # beats every dropped id on (count desc, id asc).
    kept, dropped = np.nonzero(t2d)[0], np.nonzero(~t2d)[0]
    if len(dropped):
        worst_kept = max(kept, key=lambda i: (-counts[i], i))
        best_dropped = min(dropped, key=lambda i: (-counts[i], i))
        assert (-counts[worst_kept], worst_kept) < (-counts[best_dropped], best_dropped)


def test_ties_go_to_the_lower_id():
    counts = np.zeros(10, dtype=np.int64)
    counts[[7, 5, 9]] = [3, 3, 1]
    d2t, t2d = build_mapping(counts, 1)
    assert np.nonzero(t2d)[0].tolist() == [5] and d2t.tolist() == [5]
    d2t, t2d = build_mapping(counts, 2)
    assert np.nonzero(t2d)[0].tolist() == [5, 7] and d2t.tolist() == [5, 6]


def test_few_distinct_tokens_are_padded_with_the_lowest_unused_ids():
    counts = np.zeros(20, dtype=np.int64)
    counts[[10, 1, 15]] = [4, 1, 2]
    d2t, t2d = build_mapping(counts, 6)
    assert np.nonzero(t2d)[0].tolist() == [0, 1, 2, 3, 10, 15]
    assert d2t.tolist() == [0, 0, 0, 0, 6, 10]


# -- the command ---------------------------------------------------------------------------------


def vocab_size_of(target) -> int:
    return json.loads((target / "config.json").read_text())["vocab_size"]


def run_vocab(tmp_path, target, freq, vd):
    path = tmp_path / "token_freq.pt"
    torch.save(freq, path)
    out = tmp_path / "vocab" / str(vd)
    argv = ["vocab", "--token-freq", str(path), "--target", str(target)]
    return main(argv + ["--draft-vocab-size", str(vd), "--output-dir", str(out)]), out


def test_vocab_command_writes_npy_files(tiny_llama, tmp_path):
    freq = {12: 50, 40: 7, 3: 7, 300: 1}
    rc, out = run_vocab(tmp_path, tiny_llama, freq, 3)
    assert rc == 0
    d2t, t2d = np.load(out / "d2t.npy"), np.load(out / "t2d.npy")
    assert d2t.dtype == np.int64 and t2d.dtype == np.bool_
    assert t2d.shape == (vocab_size_of(tiny_llama),)
    assert (np.arange(3) + d2t).tolist() == [3, 12, 40]
    assert sorted(p.name for p in out.iterdir()) == ["d2t.npy", "t2d.npy", "vocab.json"]
    record = json.loads((out / "vocab.json").read_text())
    digest = hashlib.sha256((tmp_path / "token_freq.pt").read_bytes()).hexdigest()
    assert record["token_freq_sha256"] == digest and record["draft_vocab_size"] == 3


def test_count_tensor_is_accepted(tiny_llama, tmp_path):
    counts = torch.zeros(vocab_size_of(tiny_llama), dtype=torch.long)
    counts[[9, 4]] = torch.tensor([2, 5])
    rc, out = run_vocab(tmp_path, tiny_llama, counts, 2)
    assert rc == 0 and np.nonzero(np.load(out / "t2d.npy"))[0].tolist() == [4, 9]


def test_full_size_draft_vocab_is_the_identity(tiny_llama, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    v = vocab_size_of(tiny_llama)
    rc, out = run_vocab(tmp_path, tiny_llama, {5: 1}, v)
    assert rc == 0
    assert not np.load(out / "d2t.npy").any() and np.load(out / "t2d.npy").all()
    assert "identity mapping" in caplog.text


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_draft_vocab_larger_than_target_is_an_error(tiny_llama, tmp_path, capsys):
    v = vocab_size_of(tiny_llama)
    rc, out = run_vocab(tmp_path, tiny_llama, {5: 1}, v + 1)
    assert rc == 1
    assert f"{v + 1} exceeds the target's vocab size {v}" in _one_error(capsys)
    assert not out.exists()


def test_token_ids_beyond_the_target_vocab_are_an_error(tiny_llama, tmp_path, capsys):
    v = vocab_size_of(tiny_llama)
    rc, out = run_vocab(tmp_path, tiny_llama, {5: 1, v + 10: 3}, 4)
    assert rc == 1
    assert f"token id {v + 10} outside the target's vocabulary" in _one_error(capsys)
    assert not out.exists()


def test_missing_or_foreign_freq_file_is_an_error(tiny_llama, tmp_path, capsys):
    rc, _ = run_vocab(tmp_path, tiny_llama, ["not", "a", "dict"], 4)
    assert rc == 1 and "expected a {token id: count} dict" in _one_error(capsys)
    argv = ["vocab", "--token-freq", str(tmp_path / "nope.pt"), "--target", str(tiny_llama)]
    assert main(argv + ["--draft-vocab-size", "4", "--output-dir", str(tmp_path / "o")]) == 1
    assert "nope.pt: file not found" in _one_error(capsys)


def test_vision_language_config_uses_the_text_vocab(tmp_path):
    from transformers import LlamaConfig, LlavaConfig

    from speculators.vocab import target_vocab_size

    LlavaConfig(text_config=LlamaConfig(vocab_size=777).to_dict()).save_pretrained(tmp_path)
    assert target_vocab_size(str(tmp_path)) == 777


@pytest.mark.parametrize("vd", [0, -3])
def test_non_positive_draft_vocab_is_an_error(vd):
    from speculators.errors import SpeculatorsError

    with pytest.raises(SpeculatorsError, match="must be between 1"):
        build_mapping(np.ones(8, dtype=np.int64), vd)
