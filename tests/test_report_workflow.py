"""The evaluate and report rules on a finished fixture run: real jobs, then `snakemake --report`.

Upstream stages are fabricated (a tiny untrained draft, held-out prompts, stats) and only the
rules under test may run (`--allowed-rules`), so the test takes seconds.
"""

import json
import zipfile

import numpy as np
import pytest
import torch
import yaml
from conftest import run_snakemake

RUN = "tiny-run"


@pytest.fixture
def finished_run(tmp_path, tiny_llama, chat_jsonl):
    from speculators.models import Eagle3DraftConfig, Eagle3DraftModel
    from speculators.models.io import save_draft

    work = tmp_path / "work"
    res = work / "results" / RUN
    cfg = {
        "models": {"tiny": {"path": str(tiny_llama)}},
        "datasets": {"chats": {"source": str(chat_jsonl)}},
        "runs": {RUN: {"target": "tiny", "datasets": {"chats": {}}, "train": {"ttt_steps": 2},
                       "evaluate": {"num_prompts": 2, "max_new_tokens": 6, "k": [1, 2], "vllm": "off"}}},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    prep = res / "prepared" / "chats"
    prep.mkdir(parents=True)
    (prep / "eval_prompts.jsonl").write_text(chat_jsonl.read_text())
    (prep / "stats.json").write_text(json.dumps({"dataset": "chats", "rows_out": 12}))
    hs = res / "hidden_states" / "chats"
    hs.mkdir(parents=True)
    (hs / "data_config.json").write_text(json.dumps({"layer_ids": [1, 2, 3, 4], "device": "cpu"}))
    dcfg = Eagle3DraftConfig.from_target(
        tiny_llama, draft_vocab_size=64, aux_layer_ids=[1, 2, 3], ttt_steps=2
    )
    t2d = np.zeros(dcfg.vocab_size, dtype=bool)
    t2d[:64] = True
    torch.manual_seed(0)
    draft = Eagle3DraftModel.from_target(dcfg, tiny_llama, np.zeros(64, dtype=np.int64), t2d)
    save_draft(draft, res / "draft", verifier_name_or_path=str(tiny_llama),
               verifier_architectures=["LlamaForCausalLM"], dtype=torch.float32)  # fmt: skip
    return work, tmp_path / "config.yaml"


@pytest.mark.slow
def test_evaluate_and_report_rules_then_snakemake_report(finished_run):
    work, cfg = finished_run
    allowed = [
        "--allowed-rules",
        "evaluate_inprocess",
        "evaluate_vllm",
        "report_run",
        "report_compare",
    ]
    targets = [f"results/{RUN}/report/report.html", "results/comparison.html"]
    run_snakemake(work, *targets, *allowed, configfile=cfg, check=True)
    ev = json.loads((work / "results" / RUN / "eval" / "inprocess.json").read_text())
    # K 1 and 2 at the default temperatures, greedy and sampled, on the held-out prompts
    assert [(r["temperature"], r["k"]) for r in ev["results"]] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert ev["num_prompts"] == 2 and {r["benchmark"] for r in ev["results"]} == {"heldout"}
    assert all(r["greedy_mismatches"] == 0 for r in ev["results"] if r["temperature"] == 0)
    html = (work / "results" / RUN / "report" / "report.html").read_text()
    assert "Acceptance" in html and "vllm evaluator skipped: disabled in the config" in html
    # every job logged and benchmarked; the report read the evaluate job's benchmark
    assert (work / "logs/evaluate/inprocess" / f"{RUN}.log").is_file()
    assert (work / "benchmarks/evaluate/inprocess" / f"{RUN}.tsv").is_file()
    assert f"<td>evaluate</td><td>inprocess</td><td>{RUN}</td>" in html
    assert RUN in (work / "results" / "comparison.html").read_text()
    # a second run has nothing to do
    again = run_snakemake(work, *targets, *allowed, "-n", configfile=cfg, check=True)
    assert "Nothing to be done" in again.stdout + again.stderr
    # Snakemake's own report bundles the run report and the comparison page
    bundle = work / "report.zip"
    run_snakemake(work, *targets, *allowed, "--report", str(bundle), configfile=cfg, check=True)
    names = [n.split("/")[-1] for n in zipfile.ZipFile(bundle).namelist() if "/data/raw/" in n]
    assert sorted(names) == ["comparison.html", "report.html", "report.md"]


def test_default_run_ends_with_its_report_and_the_comparison(tmp_path):
    from conftest import REPO

    proc = run_snakemake(tmp_path, "-n", configfile=REPO / "config" / "config.yaml", check=True)
    out = proc.stdout + proc.stderr
    for rule in ("evaluate_inprocess", "evaluate_vllm", "report_run", "report_compare"):
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, rule
    assert "results/smollm2-chitchat/report/report.html" in out
    assert "results/comparison.html" in out
