"""The benchmark report renders every section from fabricated run files, and notes what is missing."""

import json

import pytest

from speculators.cli import main
from speculators.errors import SpeculatorsError

RUN = "tiny-run"


def _eval(backend, als, skipped=None, device="cpu", drafts=1000):
    results = [
        {"k": k, "acceptance_length": al, "per_position_acceptance": [round(al - 1, 3)] + [0.1] * (k - 1),
         "drafts": drafts, "draft_tokens": drafts * k, "accepted_tokens": int(drafts * (al - 1)), "output_tokens": 100,
         "tokens_per_s": 50.0 * al, "baseline_tokens_per_s": 60.0, "speedup": round(al * 50 / 60, 3),
         "greedy_mismatches": 0}
        for k, al in als.items()
    ]  # fmt: skip
    return {"backend": backend, "target": "t", "draft": "d", "num_prompts": 4, "max_new_tokens": 16,
            "temperature": 0.0, "device": device, "skipped": skipped, "results": [] if skipped else results}  # fmt: skip


@pytest.fixture
def run_files(tmp_path):
    """A finished run's files as the earlier stages write them, small and made up."""
    res = tmp_path / "results" / RUN
    prep = res / "prepared" / "chats"
    prep.mkdir(parents=True)
    (prep / "stats.json").write_text(json.dumps({
        "dataset": "chats", "rows_in": 40, "rows_out": 38, "conversations_out": 20, "tokens": 5000,
        "supervised_tokens": 2100, "mean_length": 131.6, "max_length": 400, "seq_length": 512,
        "eval_prompts": 8, "template_mode": "generation", "dropped": {"too_short": 2}}))  # fmt: skip
    hs = res / "hidden_states" / "chats"
    hs.mkdir(parents=True)
    (hs / "data_0.pt").write_bytes(b"x" * 4096)
    (hs / "data_config.json").write_text(json.dumps({
        "backend": "transformers", "device": "cpu", "dtype": "bfloat16",
        "package_versions": {"torch": "2.13.0", "transformers": "5.24.0", "vllm": None},
        "target": {"path": "resources/models/tiny", "hidden_size": 128, "vocab_size": 577, "num_hidden_layers": 4},
        "data": {"num_samples": 38, "total_tokens": 5000, "num_loss_tokens": 2100},
        "manifest": {"total_bytes": 2_736_000},
        "integrity": {"checked_samples": 38, "non_finite_samples": 0, "degenerate_layers": 0,
                      "rms_outliers": 0, "probe": {"next_token_agreement": 0.9934,
                      "reference_next_token_agreement": 0.9967, "argmax_agreement_with_target": 0.981,
                      "layers": {"4": {"relative_error": 0.0312}}}},
        "layer_ids": [1, 2, 3, 4]}))  # fmt: skip
    draft = res / "draft"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps({
        "speculators_model_type": "eagle3", "draft_vocab_size": 96,
        "transformer_layer_config": {"hidden_size": 128, "vocab_size": 577, "num_hidden_layers": 1},
        "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
        "speculators_config": {"proposal_methods": [{"speculative_tokens": 3}],
                               "verifier": {"name_or_path": "resources/models/tiny"}}}))  # fmt: skip
    (draft / "train_summary.json").write_text(json.dumps({"steps": 20, "epochs": 2, "wall_time_s": 12.5,
                                                          "samples": {"train": 34, "val": 4}}))  # fmt: skip
    with open(draft / "metrics.jsonl", "w") as f:
        for step in range(1, 21):
            f.write(json.dumps({"split": "train", "epoch": step // 11, "step": step, "lr": 1e-4, "loss": 5 - step / 10,
                                "loss_k": [1, 2, 3], "full_acc": [step / 40, step / 80, step / 160],
                                "cond_acc": [0.5, 0.5, 0.5], "acceptance_length_estimate": 1.2,
                                "tokens_per_s": 900.0}) + "\n")  # fmt: skip
            if step % 10 == 0:
                f.write(json.dumps({"split": "val", "epoch": step // 10 - 1, "step": step, "lr": 1e-4, "loss": 4.5,
                                    "loss_k": [1, 2, 3], "full_acc": [0.3, 0.1, 0.05], "cond_acc": [0.3, 0.33, 0.5],
                                    "acceptance_length_estimate": 1.45, "tokens_per_s": None}) + "\n")  # fmt: skip
    ev = res / "eval"
    ev.mkdir()
    (ev / "inprocess.json").write_text(json.dumps(_eval("transformers", {1: 1.3, 3: 1.45})))
    bench = tmp_path / "benchmarks"
    for rel in [f"prepare/prepare/{RUN}/chats.tsv", f"train/train/{RUN}.tsv", "assets/export_model/tiny.tsv",
                "train/train/other-run.tsv", f"evaluate/evaluate_inprocess/{RUN}.tsv"]:  # fmt: skip
        p = bench / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                     "12.5\t0:00:12\t812.3\t900\t800\t805\t1\t2\t95.0\t11.8\n")  # fmt: skip
    return tmp_path


def _report(root, *extra, evals=("inprocess.json",)):
    res = root / "results" / RUN
    out = res / "report"
    argv = ["report", "--run-name", RUN, "--run-config", json.dumps({"target": "tiny", "datasets": {"chats": {}},
            "train": {"num_layers": 1}}),  # fmt: skip
            "--prepared-stats", str(res / "prepared/chats/stats.json"),
            "--data-config", str(res / "hidden_states/chats/data_config.json"),
            "--draft", str(res / "draft"), "--eval", *[str(res / "eval" / e) for e in evals],
            "--benchmarks-dir", str(root / "benchmarks"), "--hidden-states", str(res / "hidden_states/chats"),
            "--output-html", str(out / "report.html"), "--output-md", str(out / "report.md"),
            "--output-summary", str(out / "summary.json"), *extra]  # fmt: skip
    assert main(argv) == 0
    return (
        (out / "report.html").read_text(),
        (out / "report.md").read_text(),
        json.loads((out / "summary.json").read_text()),
    )


SECTIONS = [
    "Summary",
    "Settings and provenance",
    "Wall time and memory",
    "Data",
    "Training",
    "Acceptance",
]


def test_report_renders_every_section(run_files):
    html, md, summary = _report(run_files)
    for title in SECTIONS:
        assert f">{title}</h2>" in html
        assert f"## {title}" in md
    # provenance: target, datasets with rows, layer ids, vocab sizes, versions, device
    for text in [
        "resources/models/tiny",
        "chats (38 rows",
        "1, 2, 3, 4",
        "577",
        "96",
        "torch 2.13.0",
        "cpu",
    ]:
        assert text in html, text
    # timings: this run's jobs and its target's asset job, not another run's
    assert html.count("812.3") == 4 and "other-run" not in html
    # training curves and acceptance plots are embedded, nothing is linked
    assert html.count("data:image/png;base64,") == 4
    assert 'src="http' not in html
    assert "1.45" in md and "2100" in md  # acceptance length, supervised tokens
    # storage per token vs the bf16 floor (4 x 128 x 2), the probe, the integrity counts
    assert (
        "| chats | bfloat16 | 547.2 | 1024 | 0.534 | 99.34% | 99.67% | 98.10% | 3.12% | 38 |" in md
    )
    assert summary["acceptance_length"] == {"transformers": {"1": 1.3, "3": 1.45}}
    assert summary["num_layers"] == 1 and summary["datasets"] == {"chats": 38}


def test_missing_vllm_and_benchmarks_render_as_notes(run_files):
    import shutil

    shutil.rmtree(run_files / "benchmarks")
    html, md, _ = _report(run_files)
    assert "No vLLM measurement" in html and "No vLLM measurement" in md
    assert "no benchmark TSVs" in html


def test_skipped_vllm_shows_its_reason(run_files):
    ev = run_files / "results" / RUN / "eval"
    (ev / "vllm.json").write_text(
        json.dumps(_eval("vllm", {}, skipped="no vLLM environment (.venv-vllm missing)"))
    )
    html, md, summary = _report(run_files, evals=("inprocess.json", "vllm.json"))
    assert "vllm evaluator skipped: no vLLM environment (.venv-vllm missing)" in md
    assert summary["skipped"] == {"vllm": "no vLLM environment (.venv-vllm missing)"}


def test_large_evaluator_disagreement_is_flagged(run_files):
    ev = run_files / "results" / RUN / "eval"
    (ev / "vllm.json").write_text(json.dumps(_eval("vllm", {1: 1.28, 3: 2.1})))
    html, md, _ = _report(run_files, evals=("inprocess.json", "vllm.json"))
    assert "K=3: transformers 1.450 vs vLLM 2.100" in md
    assert "K=1" not in md.split("disagree")[1].split("\n")[0]  # 1.30 vs 1.28 is within 10%
    assert 'class="flag"' in html


def test_disagreement_within_sampling_noise_is_a_note_not_a_flag(run_files):
    # 1.45 vs 1.70 at K=3 is 15% apart, but on 12 drafts that is within 3 standard errors.
    ev = run_files / "results" / RUN / "eval"
    (ev / "inprocess.json").write_text(json.dumps(_eval("transformers", {3: 1.45}, drafts=12)))
    (ev / "vllm.json").write_text(json.dumps(_eval("vllm", {3: 1.70}, drafts=12)))
    html, md, _ = _report(run_files, evals=("inprocess.json", "vllm.json"))
    assert "too few drafts to tell: K=3: transformers 1.450 vs vLLM 1.700" in md
    assert 'class="flag"' not in html
    # The same gap on 2,000 drafts each is beyond the noise: flagged.
    (ev / "inprocess.json").write_text(json.dumps(_eval("transformers", {3: 1.45}, drafts=2000)))
    (ev / "vllm.json").write_text(json.dumps(_eval("vllm", {3: 1.70}, drafts=2000)))
    html, md, _ = _report(run_files, evals=("inprocess.json", "vllm.json"))
    assert "disagree by more than 10%: K=3: transformers 1.450 vs vLLM 1.700" in md
    assert 'class="flag"' in html


def test_standard_error_from_per_position_counts():
    from speculators.report.render import standard_error

    # n in {0, 1, 2} with P(n>=1) = 0.5, P(n>=2) = 0.25: E n = 0.75, E n^2 = 0.5 + 3 * 0.25
    point = {"per_position_acceptance": [0.5, 0.25], "drafts": 100}
    assert standard_error(point) == pytest.approx(((1.25 - 0.75**2) / 100) ** 0.5)
    assert standard_error({"per_position_acceptance": None, "drafts": 0}) is None


def test_published_epoch_and_its_criterion_are_plotted_and_named(run_files):
    summary_file = run_files / "results" / RUN / "draft" / "train_summary.json"
    summary = json.loads(summary_file.read_text())
    history = [{"epoch": 0, "loss": 4.5, "acceptance_length_estimate": 1.45},
               {"epoch": 1, "loss": 4.2, "acceptance_length_estimate": 1.61},
               {"epoch": 2, "loss": 4.1, "acceptance_length_estimate": 1.52}]  # fmt: skip
    summary.update(select_best_by="acceptance", best_epoch=1, val_history=history,
                   best_epoch_by={"acceptance": 1, "loss": 2})  # fmt: skip
    summary_file.write_text(json.dumps(summary))
    html, md, _ = _report(run_files)
    assert html.count("data:image/png;base64,") == 5  # the epoch-selection plot besides the four
    assert "Published: epoch 1, chosen by acceptance (train.select_best_by)" in md
    assert "by validation loss: epoch 2" in md
    assert "val_history" not in md  # the history is plotted, not dumped into the summary table
    assert "| best_epoch_by.loss | 2 |" in md


def test_missing_training_files_do_not_crash(run_files):
    draft = run_files / "results" / RUN / "draft"
    (draft / "metrics.jsonl").unlink()
    (draft / "train_summary.json").unlink()
    (run_files / "results" / RUN / "eval" / "inprocess.json").unlink()
    html, md, _ = _report(run_files)
    assert "training metrics not found" in md and "evaluation result not found" in md
    assert "No acceptance measurement available yet" in md


def test_malformed_input_is_an_error(run_files, capsys):
    (run_files / "results" / RUN / "draft" / "metrics.jsonl").write_text("{bad\n")
    with pytest.raises(AssertionError):
        _report(run_files)
    assert "metrics.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert not (run_files / "results" / RUN / "report" / "report.html").exists()


def _compare(run_files, tmp_path, second: dict):
    """`speculators compare` on the fixture run's summary and `second`; (html, output path)."""
    p2 = tmp_path / "s2.json"
    p2.write_text(json.dumps(second))
    out = run_files / "results" / "comparison.html"
    assert main(["compare", "--summary", str(run_files / "results" / RUN / "report" / "summary.json"), str(p2),
                 "--output", str(out)]) == 0  # fmt: skip
    return out.read_text(), out


def test_comparison_page_lists_every_run(run_files, tmp_path):
    _, _, first = _report(run_files)
    second = dict(
        first, run="two-layer", num_layers=2, acceptance_length={"transformers": {"3": 1.9}}
    )
    html, out = _compare(run_files, tmp_path, second)
    assert RUN in html and "two-layer" in html and "K=3: 1.900" in html and "K=3: 1.450" in html
    assert '<a href="tiny-run/report/report.html">' in html
    assert "data:image/png;base64," in html
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(SpeculatorsError):
        from speculators.report import compare

        compare.run(type("A", (), {"summary": [bad], "output": out})())


# -- the results table (one row per run, benchmark, K, temperature) ----------------------------


def _bench_eval(backend, device, scale=1.0):
    """An eval JSON with two benchmarks, K 1 and 3, greedy and sampled, categories on one."""
    rows = []
    for bench in ("heldout", "mt_bench"):
        for t in (0.0, 1.0):
            for k in (1, 3):
                al = round(
                    scale * (1.2 + 0.1 * k + (0.05 if bench == "mt_bench" else 0) - 0.1 * t), 4
                )
                row = {"benchmark": bench, "temperature": t, "k": k, "acceptance_length": al,
                       "per_position_acceptance": [0.3] + [0.1] * (k - 1), "drafts": 10,
                       "draft_tokens": 10 * k, "accepted_tokens": 3, "output_tokens": 40,
                       "tokens_per_s": 10.0, "baseline_tokens_per_s": 8.0, "speedup": 1.25,
                       "greedy_mismatches": 0 if t == 0 else None}  # fmt: skip
                if bench == "mt_bench":
                    row["per_category"] = {"coding": {"acceptance_length": 1.9, "drafts": 4},
                                           "writing": {"acceptance_length": 1.1, "drafts": 6}}  # fmt: skip
                rows.append(row)
    return {"backend": backend, "target": "t", "draft": "d", "num_prompts": 6, "max_new_tokens": 16,
            "temperature": 0.0, "temperatures": [0.0, 1.0], "device": device, "skipped": None,
            "benchmarks": [{"name": "heldout", "num_prompts": 4, "num_turns": 4},
                           {"name": "mt_bench", "num_prompts": 2, "num_turns": 4, "categories": ["coding", "writing"]}],
            "results": rows}  # fmt: skip


def test_report_opens_with_the_results_table(run_files):
    ev = run_files / "results" / RUN / "eval"
    (ev / "inprocess.json").write_text(json.dumps(_bench_eval("transformers", "2 threads on Xeon")))
    (ev / "vllm.json").write_text(json.dumps(_bench_eval("vllm", "1x NVIDIA H100", scale=1.01)))
    summary_path = run_files / "results" / RUN / "draft" / "train_summary.json"
    summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()), "best_epoch": 1}))
    html, md, summary = _report(run_files, evals=("inprocess.json", "vllm.json"))
    assert html.index('<h2 id="results">Results</h2>') < html.index(">Summary</h2>")
    table = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith(
        "| target | draft (layers, vocab) | training data | benchmark | K | temperature |"
    )
    assert len(lines) == 1 + 8  # 2 benchmarks x 2 temperatures x 2 K
    first = lines[1]
    assert "| tiny | 1 layer(s), vocab 96 |" in first
    assert "chats (20 conversations, original answers); 2 epochs, chosen epoch 2" in first
    assert "| heldout (4 prompts) | 1 | 0 | 1.313 | 1.3 |" in first  # vLLM, in-process
    assert "vLLM 1.25x" in first and "in-process" not in first.split("|")[-2]  # CPU: no speed-up
    assert any("| mt_bench (2 prompts, 4 turns) | 3 | 1 |" in ln for ln in lines)
    # Acceptance per category, and the summary's rows for the comparison page.
    cats = md.split("## Acceptance per category", 1)[1].split("\n## ", 1)[0]
    assert "| mt_bench | coding | 1 | 0 | 1.9 | 1.9 |" in cats
    assert len(summary["results_table"]) == 8
    # The summary's K sweep and the plots stay on the first benchmark, greedy.
    assert summary["acceptance_length"]["transformers"] == {"1": 1.3, "3": 1.5}


def test_results_table_reads_an_eval_of_earlier_versions_as_heldout(run_files):
    html, md, summary = _report(run_files)
    (rec_1, rec_3) = summary["results_table"]
    assert (rec_1["benchmark"], rec_1["k"], rec_1["temperature"]) == ("heldout", 1, 0.0)
    assert rec_3["acceptance_length"] == {"transformers": 1.45}
    assert "| heldout | 3 | 0 | - | 1.45 |" in md


def test_comparison_page_stacks_every_runs_results_rows(run_files, tmp_path):
    _, _, first = _report(run_files)
    second = dict(first, run="two-layer", results_table=[dict(r, run="two-layer", draft="2 layer(s), vocab 96")
                                                         for r in first["results_table"]])  # fmt: skip
    html, out = _compare(run_files, tmp_path, second)
    results = html.split("Results per run, benchmark and K", 1)[1].split("<h2", 1)[0]
    assert results.count("<tr>") == 1 + 4 and "2 layer(s), vocab 96" in results
    assert "<td>tiny-run</td>" in results and "<td>two-layer</td>" in results
