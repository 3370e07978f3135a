"""The in-process evaluator: speculative decoding is exact, counts acceptance like vLLM, reuses the cache."""

import json
from collections import Counter

import pytest
import torch
from fixtures import sample_conversations

from speculators import devices
from speculators.cli import main
from speculators.errors import SpeculatorsError
from speculators.evaluate import inprocess
from speculators.evaluate.prompts import load_prompts, parse_row, render_prompt
from speculators.evaluate.spec_decode import (
    Target,
    _verify_sampled,
    greedy_decode,
    speculative_decode,
)

AUX = [0, 2, 3]
MAX_NEW = 13  # 1 + 3 * 4: full drafts of K=3 fit exactly


@pytest.fixture(scope="module")
def llama(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    # The fixture's 0.02-std weights make greedy output loop over one or two tokens, which
    # would hide off-by-one errors; larger weights give varied, well-separated choices.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def prompts(llama):
    _, tok = llama
    return [render_prompt(tok, conv[:1]) for conv in sample_conversations(4)]


class Oracle:
    """Proposes the target's own greedy continuation; checks the aux states it is given."""

    def __init__(self, model, check_aux=True):
        self.model, self.check_aux, self.calls = model, check_aux, 0

    @torch.no_grad()
    def propose(self, tokens, aux, k):
        self.calls += 1
        assert tokens.shape[0] == 1 and aux.shape[:2] == (1, tokens.shape[1] - 1)
        if self.check_aux:
            full = self.model(tokens[:, :-1], output_hidden_states=True).hidden_states
            expect = torch.cat([full[i] for i in AUX], dim=-1)
            torch.testing.assert_close(aux, expect, atol=1e-3, rtol=1e-3)
        ids, out = tokens, []
        for _ in range(k):
            nxt = self.model(ids).logits[0, -1].argmax()
            out.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        return torch.tensor(out)


class RandomDraft:
    def __init__(self, vocab, seed=0):
        self.vocab, self.gen = vocab, torch.Generator().manual_seed(seed)

    def propose(self, tokens, aux, k):
        return torch.randint(0, self.vocab, (k,), generator=self.gen)


class NoisyOracle(Oracle):
    """The oracle's token with probability p per position, else a random one."""

    def __init__(self, model, p, seed=0):
        super().__init__(model, check_aux=False)
        self.p, self.gen = p, torch.Generator().manual_seed(seed)

    def propose(self, tokens, aux, k):
        good = super().propose(tokens, aux, k)
        noise = torch.randint(0, self.model.config.vocab_size, (k,), generator=self.gen)
        keep = torch.rand(k, generator=self.gen) < self.p
        return torch.where(keep, good, noise)


def _baseline(model, prompts, max_new=MAX_NEW):
    target = Target(model, AUX)
    return [greedy_decode(target, p, max_new, eos=set())[0] for p in prompts]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("draft", ["oracle", "random"])
def test_greedy_output_unchanged_by_drafting(llama, prompts, k, draft):
    model, _ = llama
    proposer = Oracle(model) if draft == "oracle" else RandomDraft(model.config.vocab_size)
    expected = _baseline(model, prompts)
    for prompt, want in zip(prompts, expected):
        out, stats = speculative_decode(Target(model, AUX), proposer, prompt, k, MAX_NEW, set())
        assert out == want
        assert stats.output_tokens == MAX_NEW


def test_oracle_draft_reaches_k_plus_one(llama, prompts):
    model, _ = llama
    k = 3
    for prompt in prompts:
        _, stats = speculative_decode(Target(model, AUX), Oracle(model), prompt, k, MAX_NEW, set())
        assert stats.drafts == (MAX_NEW - 1) // (k + 1)
        assert stats.acceptance_length == k + 1
        assert stats.per_position_acceptance == [1.0] * k


def test_oracle_last_draft_shortened_at_end_of_generation(llama, prompts):
    model, _ = llama
    k, max_new = (
        3,
        11,
    )  # after the first token: 2 full drafts (8 tokens), then 2 left: a 1-token draft
    _, stats = speculative_decode(Target(model, AUX), Oracle(model), prompts[0], k, max_new, set())
    assert (stats.drafts, stats.draft_tokens, stats.accepted_tokens) == (3, 7, 7)
    assert stats.acceptance_length == pytest.approx(1 + 7 / 3)
    assert stats.per_position_acceptance == pytest.approx([1.0, 2 / 3, 2 / 3])


def test_random_draft_acceptance_near_one(llama, prompts):
    model, _ = llama
    total_acc, total_drafts = 0, 0
    for prompt in prompts:
        _, stats = speculative_decode(
            Target(model, AUX), RandomDraft(model.config.vocab_size), prompt, 3, 25, set()
        )
        total_acc += stats.accepted_tokens
        total_drafts += stats.drafts
    assert 1.0 <= 1 + total_acc / total_drafts < 1.1


def test_per_position_rates_non_increasing(llama, prompts):
    model, _ = llama
    row = inprocess.measure_k(
        Target(model, AUX),
        NoisyOracle(model, p=0.7),
        [
            inprocess.Job(str(i), p, b, 1.0)
            for i, (p, b) in enumerate(zip(prompts, _baseline(model, prompts, 21)))
        ],
        k=4,
        max_new_tokens=21,
        eos=set(),
        temperature=0.0,
        seed=0,
    )
    rates = row["per_position_acceptance"]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert 0 < rates[-1] < rates[0] < 1
    assert row["acceptance_length"] == pytest.approx(1 + sum(rates), abs=1e-3)
    assert row["greedy_mismatches"] == 0


def test_target_cache_reused_not_reencoded(llama, prompts):
    """Positions the target processes = prompt + output - 1 + rejected drafts, never quadratic."""
    model, _ = llama
    prompt, k, max_new = prompts[1], 4, 31
    target = Target(model, AUX)
    out, stats = speculative_decode(target, NoisyOracle(model, p=0.6), prompt, k, max_new, set())
    rejected = stats.draft_tokens - stats.accepted_tokens
    assert target.positions == len(prompt) + len(out) - 1 + rejected
    # one prefill, then one forward per verification step
    assert target.forwards == 1 + stats.drafts
    assert stats.drafts < len(out)


def test_eos_stops_and_counts_no_token_after_it(llama, prompts):
    model, _ = llama
    k = 4
    want = _baseline(model, prompts[:1])[0]
    last = next(i for i in range(3, len(want)) if want[i] not in want[:i])  # EOS seen first here
    out, stats = speculative_decode(
        Target(model, AUX), Oracle(model, check_aux=False), prompts[0], k, MAX_NEW, {want[last]}
    )
    assert out == want[: last + 1]
    # token 0 comes from the prefill; step s emits tokens 1+(s-1)(k+1) .. s(k+1), bonus last
    step, offset = divmod(last - 1, k + 1)
    assert stats.drafts == step + 1
    assert stats.accepted_tokens == k * step + min(k, offset + 1)


def test_rejection_sampling_follows_target_distribution():
    """With a one-hot draft, the first emitted token is distributed as the target's p."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0 + 1e-9], [0.25, 0.25, 0.25, 0.25]]))
    gen = torch.Generator().manual_seed(0)
    counts = Counter(_verify_sampled([1], logits, 1.0, gen)[1][0] for _ in range(6000))
    freq = [counts[i] / 6000 for i in range(4)]
    assert freq == pytest.approx([0.5, 0.3, 0.2, 0.0], abs=0.03)


def test_sampling_near_zero_temperature_matches_greedy(llama, prompts):
    model, _ = llama
    gen = torch.Generator().manual_seed(0)
    want = _baseline(model, prompts[:1])[0]
    out, stats = speculative_decode(
        Target(model, AUX), Oracle(model, check_aux=False), prompts[0], 3, MAX_NEW, set(), 1e-3, gen
    )
    assert out == want
    assert stats.acceptance_length == 4.0


# ---------------------------------------------------------------- prompts and the CLI


def test_prompt_rows_chat_and_mt_bench():
    chat = parse_row(
        "f:1",
        {
            "id": "a",
            "conversations": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "x"},
                {"role": "user", "content": "later"},
            ],
        },
    )
    assert chat.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    mt = parse_row("f:2", {"question_id": 81, "turns": ["one", "two"]})
    assert (mt.id, mt.messages[0]["content"], mt.followups) == ("81", "one", ["two"])
    assert parse_row("f:3", {"messages": [{"role": "assistant", "content": "x"}]}) is None
    with pytest.raises(SpeculatorsError, match="f:4"):
        parse_row("f:4", {"text": "no chat"})


def test_prompt_files_round_robin_and_bad_json(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"id": f"a{i}", "turns": ["q"]}) + "\n" for i in range(3)))
    b.write_text(json.dumps({"id": "b0", "turns": ["q"]}) + "\n")
    assert [s.id for s in load_prompts([a, b], 3)] == ["a0", "b0", "a1"]
    b.write_text("{oops\n")
    with pytest.raises(SpeculatorsError, match="b.jsonl:1"):
        load_prompts([a, b], 3)
    b.write_bytes('{"turns": ["caf\u00e9"]}\n'.encode("latin-1"))
    with pytest.raises(SpeculatorsError, match="b.jsonl: not UTF-8 text"):
        load_prompts([a, b], 3)
    b.write_text('\ufeff{"id": "b0", "turns": ["q"]}\n', encoding="utf-8")  # a leading BOM
    assert [s.id for s in load_prompts([a, b], 3)] == ["a0", "b0", "a1"]


def test_long_prompts_truncated_and_counted(llama, tmp_path):
    model, tok = llama
    specs = load_prompts(
        [_write(tmp_path / "p.jsonl", [{"turns": ["hello " * 200]}, {"turns": ["hi"]}])], 2
    )
    model.config.max_position_embeddings, old = 64, model.config.max_position_embeddings
    try:
        res = inprocess.evaluate(model, tok, Oracle(model, check_aux=False), AUX, specs, [2], 8)
    finally:
        model.config.max_position_embeddings = old
    assert res["truncated_prompts"] == 1
    assert res["results"][0]["greedy_mismatches"] == 0


def test_mt_bench_second_turn_follows_greedy_answer(llama, tmp_path):
    model, tok = llama
    specs = load_prompts([_write(tmp_path / "mt.jsonl", [{"turns": ["hello", "and then?"]}])], 1)
    res = inprocess.evaluate(
        model, tok, RandomDraft(model.config.vocab_size), AUX, specs, [1, 2], 6
    )
    assert res["num_turns"] == 2
    assert [r["k"] for r in res["results"]] == [1, 2]
    assert all(r["output_tokens"] <= 12 and r["greedy_mismatches"] == 0 for r in res["results"])


def test_vllm_rounds_ask_the_in_process_evaluators_turns(llama, tmp_path):
    """evaluate-vllm batches turns by round; its prompts must be the in-process ones, each
    follow-up after the target's greedy answer to the turn before."""
    from speculators.evaluate.vllm_eval import Turns

    model, tok = llama
    rows = [{"turns": ["hello", "and then?", "why?"]}, {"turns": ["hi"]},
            {"conversations": [{"role": "user", "content": "tell me"}]},
            {"turns": ["one", "two"]}]  # fmt: skip
    specs = load_prompts([_write(tmp_path / "mt.jsonl", rows)], 4)
    target, counts = inprocess.Target(model, AUX), {}
    jobs = list(inprocess.iter_jobs(target, tok, specs, 6, 10_000, set(), counts))
    by_turn = {}
    for job in jobs:  # ids "<spec>#<turn>"
        by_turn.setdefault(int(job.id.rsplit("#", 1)[1]), []).append(job)
    turns = Turns(tok, specs, max_prompt=10_000)
    rounds = [turns.first()]
    answers = {1: [j.baseline for j in by_turn[1]]}
    for r in (1, 2, 3):
        rounds.append(turns.next_round(answers[r]))
        answers[r + 1] = [j.baseline for j in by_turn.get(r + 1, [])]
    assert [len(r) for r in rounds] == [4, 2, 1, 0]
    for r, prompts in enumerate(rounds[:3], start=1):
        assert prompts == [j.prompt for j in by_turn[r]], r
    assert turns.truncated == 0 and turns.has_followups


def _write(path, rows):
    """Rows as a JSONL file; returns its path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _evaluate(target, draft, prompts, out, *options) -> int:
    """`speculators evaluate` on the given files with extra `options`; returns the exit code."""
    from speculators.cli import main

    argv = ["evaluate", "--target", str(target), "--draft", str(draft), "--prompts", str(prompts)]
    return main([*argv, *map(str, options), "--output", str(out)])


def _draft_config(path, hidden=128, vocab=None, aux=AUX):
    path.mkdir(exist_ok=True)
    cfg = {
        "speculators_model_type": "eagle3",
        "transformer_layer_config": {"hidden_size": hidden, "vocab_size": vocab},
        "eagle_aux_hidden_state_layer_ids": aux,
        "speculators_config": {
            "proposal_methods": [{"speculative_tokens": 3}],
            "verifier": {"name_or_path": "some/other-model"},
        },
    }
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_draft_for_another_target_is_rejected(llama, tmp_path):
    model, _ = llama
    vocab = model.config.vocab_size
    ok = _draft_config(tmp_path / "ok", vocab=vocab)
    inprocess.check_draft_matches(ok, inprocess.read_draft_info(ok), model.config)
    for name, kwargs, msg in [
        ("h", {"hidden": 576, "vocab": vocab}, "hidden size 576"),
        ("v", {"vocab": 49152}, "vocab size 49152"),
        ("a", {"vocab": vocab, "aux": [1, 9]}, "aux layer ids"),
    ]:
        d = _draft_config(tmp_path / name, **kwargs)
        with pytest.raises(SpeculatorsError, match=msg):
            inprocess.check_draft_matches(d, inprocess.read_draft_info(d), model.config)


def test_cli_writes_shared_schema(tiny_llama, tmp_path, monkeypatch, chat_jsonl):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    draft = _draft_config(tmp_path / "draft", vocab=model.config.vocab_size)
    monkeypatch.setattr(
        inprocess, "load_proposer", lambda d, dev, target_model: Oracle(model, check_aux=False)
    )

    out = tmp_path / "eval" / "inprocess.json"
    rc = _evaluate(
        tiny_llama, draft, chat_jsonl, out, "--num-prompts", "3", "--max-new-tokens", "9"
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["backend"] == "transformers" and data["skipped"] is None
    assert data["num_prompts"] == 3
    assert data["device"].endswith(devices.cpu_summary())  # the CPU that was measured on
    (row,) = data["results"]  # k defaults to the draft's speculative_tokens
    assert set(row) == {
        "benchmark",
        "temperature",
        "k",
        "acceptance_length",
        "per_position_acceptance",
        "drafts",
        "draft_tokens",
        "accepted_tokens",
        "output_tokens",
        "tokens_per_s",
        "baseline_tokens_per_s",
        "speedup",
        "greedy_mismatches",
    }
    assert row["k"] == 3 and row["acceptance_length"] == 4.0 and row["greedy_mismatches"] == 0


def test_cli_mismatched_draft_fails_cleanly(tiny_llama, tmp_path, chat_jsonl, capsys):

    draft = _draft_config(tmp_path / "draft", hidden=576, vocab=49152)
    out = tmp_path / "inprocess.json"
    rc = _evaluate(tiny_llama, draft, chat_jsonl, out)
    assert rc == 1 and not out.exists()
    assert "hidden size 576" in capsys.readouterr().err


def test_aux_layer_l_is_the_pre_norm_final_state(llama, prompts):
    model, _ = llama
    target = Target(model, [1, 4])
    _, aux = target.forward(prompts[0], target.new_cache(), want_aux=True)
    seen = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        hs = model(torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    torch.testing.assert_close(aux, torch.cat([hs[1][0], seen["x"][0]], dim=-1))


def test_cli_with_an_untrained_draft(tiny_llama, tmp_path, chat_jsonl):
    """The real draft model plugs in: load_draft + propose through the CLI, output unchanged; a
    draft saved without its embedding (verifier not a local folder) shares the loaded target's."""
    import numpy as np

    from speculators.models import Eagle3DraftConfig, Eagle3DraftModel
    from speculators.models.io import save_draft

    cfg = Eagle3DraftConfig.from_target(
        tiny_llama, draft_vocab_size=64, aux_layer_ids=[1, 2, 3], ttt_steps=2
    )
    t2d = np.zeros(cfg.vocab_size, dtype=bool)
    t2d[:64] = True
    torch.manual_seed(0)
    draft = Eagle3DraftModel.from_target(cfg, tiny_llama, np.zeros(64, dtype=np.int64), t2d)
    results = {}
    for name, verifier, embeddings in (("full", str(tiny_llama), True), ("lean", "org/x", False)):
        save_draft(draft, tmp_path / name, verifier_name_or_path=verifier,
                   verifier_architectures=["LlamaForCausalLM"], dtype=torch.float32,
                   include_embeddings=embeddings)  # fmt: skip
        out = tmp_path / f"{name}.json"
        options = ["--num-prompts", 2, "--max-new-tokens", 8, "--k", 1, 2]
        assert _evaluate(tiny_llama, tmp_path / name, chat_jsonl, out, *options) == 0
        data = json.loads(out.read_text())
        assert data["aux_layer_ids"] == [1, 2, 3]
        assert [r["k"] for r in data["results"]] == [1, 2]
        assert all(r["greedy_mismatches"] == 0 and r["drafts"] > 0 for r in data["results"])
        keys = ("drafts", "accepted_tokens", "per_position_acceptance", "output_tokens")
        results[name] = [{k: r[k] for k in keys} for r in data["results"]]
    assert results["lean"] == results["full"]


def test_draft_for_another_verifier_name_warns(llama, tiny_llama, tmp_path, caplog):
    model, _ = llama
    d = _draft_config(tmp_path / "d", vocab=model.config.vocab_size)  # verifier: some/other-model
    with caplog.at_level("WARNING"):
        inprocess.check_draft_matches(
            d, inprocess.read_draft_info(d), model.config, str(tiny_llama)
        )
    assert "trained for verifier some/other-model" in caplog.text
    caplog.clear()
    info = inprocess.read_draft_info(d)
    info.verifier = str(tiny_llama) + "/"
    inprocess.check_draft_matches(d, info, model.config, str(tiny_llama))
    assert caplog.text == ""


def test_sampled_evaluation_reports_no_greedy_mismatch_count(llama, prompts):
    model, _ = llama
    jobs = [inprocess.Job("0", prompts[0], _baseline(model, prompts[:1])[0], 1.0)]
    row = inprocess.measure_k(
        Target(model, AUX), Oracle(model, check_aux=False), jobs, 2, MAX_NEW, set(), 1.0, 0
    )
    assert row["greedy_mismatches"] is None
    assert row["output_tokens"] == MAX_NEW and 1.0 <= row["acceptance_length"] <= 3.0
    rates = row["per_position_acceptance"]
    assert rates[0] >= rates[1]


@pytest.mark.parametrize(
    "option, problem",
    [
        (["--k", "0"], "--k: draft lengths must be at least 1"),
        (["--device", "bogus"], "--device: 'bogus' is not a device"),
        (["--num-prompts", "0"], "--num-prompts: must be at least 1"),
        (["--k", "1", "1"], "--k: a draft length is given twice"),
        (["--temperature", "nan"], "--temperature: must be finite and >= 0"),
        (["--temperature", "inf"], "--temperature: must be finite and >= 0"),
        (["--temperature", "-1"], "--temperature: must be finite and >= 0"),
    ],
)
def test_unusable_options_are_one_line_before_anything_loads(
    tiny_llama, tmp_path, chat_jsonl, capsys, option, problem
):
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text("{}")
    out = tmp_path / "eval.json"
    assert _evaluate(tiny_llama, draft, chat_jsonl, out, *option) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]
    assert not out.exists()


def test_a_missing_prompt_file_stops_before_the_target_loads(tmp_path, capsys, monkeypatch):
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text("{}")
    monkeypatch.setattr(inprocess, "load_target", lambda *a: pytest.fail("target loaded"))
    missing = tmp_path / "missing.jsonl"
    assert _evaluate("no-such-target", draft, missing, tmp_path / "eval.json") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jsonl: prompt file not found" in err[0]


# ---------------------------------------------------------------- benchmarks, sweeps, no NaN


def _oracle_cli(monkeypatch, tiny_llama, tmp_path):
    """A draft folder whose proposer is the target's own greedy continuation (acceptance K+1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    monkeypatch.setattr(
        inprocess, "load_proposer", lambda d, dev, target_model: Oracle(model, check_aux=False)
    )
    return _draft_config(tmp_path / "draft", vocab=model.config.vocab_size)


def test_benchmarks_sweep_k_and_temperatures_with_categories(
    tiny_llama, tmp_path, monkeypatch, chat_jsonl
):
    """Each benchmark gets its own prompt count and answer length; every (temperature, K) is
    measured on each; MT-Bench-style rows keep their categories, asked turn by turn."""
    draft = _oracle_cli(monkeypatch, tiny_llama, tmp_path)
    mt = _write(tmp_path / "mt.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["Write a poem", "Shorter"]},
        {"question_id": 2, "category": "coding", "turns": ["Sort a list", "In C"]},
        {"question_id": 3, "category": "writing", "turns": ["A haiku", "Another"]},
    ])  # fmt: skip
    benchmarks = [
        {"name": "heldout", "paths": [str(chat_jsonl)], "num_prompts": 2, "max_new_tokens": 7},
        {"name": "mt_bench", "paths": [str(mt)], "num_prompts": 2, "max_new_tokens": 9},
    ]
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--target", str(tiny_llama), "--draft", str(draft),
                 "--benchmarks", json.dumps(benchmarks), "--k", "1", "2",
                 "--temperature", "0", "1.0", "--output", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert [(b["name"], b["num_prompts"], b["num_turns"], b["max_new_tokens"]) for b in
            data["benchmarks"]] == [("heldout", 2, 2, 7), ("mt_bench", 2, 4, 9)]  # fmt: skip
    # Two prompts from three, spread over the categories: one writing, one coding.
    assert data["benchmarks"][1]["categories"] == ["coding", "writing"]
    points = [(r["benchmark"], r["temperature"], r["k"]) for r in data["results"]]
    assert points == [
        (b, t, k) for b in ("heldout", "mt_bench") for t in (0.0, 1.0) for k in (1, 2)
    ]
    for r in data["results"]:
        assert r["output_tokens"] <= (2 * 7 if r["benchmark"] == "heldout" else 4 * 9)
        assert len(r["per_position_acceptance"]) == r["k"]
        if r["temperature"] == 0:  # the oracle is the target's greedy choice
            assert r["acceptance_length"] == pytest.approx(r["k"] + 1, abs=0.5)
            assert r["greedy_mismatches"] == 0
        else:
            assert r["greedy_mismatches"] is None
        if r["benchmark"] == "mt_bench":
            cats = r["per_category"]
            assert set(cats) == {"coding", "writing"}
            assert sum(c["drafts"] for c in cats.values()) == r["drafts"]
        else:
            assert "per_category" not in r


def test_a_setting_that_drafts_nothing_gives_null_not_nan(
    tiny_llama, tmp_path, monkeypatch, chat_jsonl
):
    """max_new_tokens 1: the first token comes from the prompt's forward, nothing is drafted;
    acceptance and speed-up are null in the JSON."""
    draft = _oracle_cli(monkeypatch, tiny_llama, tmp_path)
    out = tmp_path / "eval.json"
    rc = _evaluate(tiny_llama, draft, chat_jsonl, out, "--num-prompts", "2",
                   "--max-new-tokens", "1", "--k", "2")  # fmt: skip
    assert rc == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    (row,) = json.loads(text)["results"]
    assert row["drafts"] == 0 and row["output_tokens"] == 2
    assert row["acceptance_length"] is None and row["per_position_acceptance"] is None
    assert row["speedup"] is None


def test_json_writer_refuses_nan(tmp_path):
    from speculators.fileio import write_json

    out = tmp_path / "x.json"
    with pytest.raises(ValueError):
        write_json(out, {"acceptance_length": float("nan")})
    assert not out.exists() and not list(tmp_path.iterdir())


def test_seeded_prompt_sample_spreads_over_categories_and_moves_with_the_seed(tmp_path):
    rows = [{"id": f"{c}{i}", "category": c, "turns": ["q"]} for c in "abcd" for i in range(5)]
    path = _write(tmp_path / "p.jsonl", rows)
    first = load_prompts([path], 4)  # no seed: the first rows, as before
    assert [s.id for s in first] == ["a0", "a1", "a2", "a3"]
    one, two = load_prompts([path], 4, seed=1), load_prompts([path], 4, seed=2)
    assert sorted(s.category for s in one) == ["a", "b", "c", "d"]
    assert [s.id for s in one] != [s.id for s in two]
    assert [s.id for s in load_prompts([path], 4, seed=1)] == [s.id for s in one]
    assert len(load_prompts([path], 99, seed=1)) == 20
    # Fewer prompts than categories: the seed also chooses which categories.
    picks = {tuple(sorted(s.category for s in load_prompts([path], 2, seed=i))) for i in range(8)}
    assert len(picks) > 1 and all(len(set(p)) == 2 for p in picks)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{", "not valid JSON"),
        ("[]", "non-empty JSON list"),
        ('[{"paths": ["a"], "num_prompts": 1, "max_new_tokens": 1}]', 'needs a "name"'),
        ('[{"name": "x", "paths": [], "num_prompts": 1, "max_new_tokens": 1}]', '"paths"'),
        ('[{"name": "x", "paths": ["a"], "num_prompts": 0, "max_new_tokens": 1}]', ">= 1"),
        (
            '[{"name": "x", "paths": ["a"], "num_prompts": 1, "max_new_tokens": 1},'
            ' {"name": "x", "paths": ["b"], "num_prompts": 1, "max_new_tokens": 1}]',
            "given twice",
        ),
    ],
)
def test_bad_benchmark_lists_are_one_line(text, problem):
    from speculators.evaluate.prompts import parse_benchmarks

    with pytest.raises(SpeculatorsError, match=problem):
        parse_benchmarks(text)
