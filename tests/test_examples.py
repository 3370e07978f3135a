"""Real-model example configs: each validates against the schema and dry-runs the whole pipeline
with its target's config.json read from a local stand-in (no downloads)."""

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, snakemake_cmd
from examples_support import EXAMPLES, STANDINS, planned_example

from speculators.config import validate_config

ASSET_RULES = {"assets_export_model", "assets_export_chats", "assets_sharegpt_copy"}
# Stages whose rule resources carry the stage's `gpus` key.
GPU_STAGE_OF_RULE = {
    "prepare_regenerate": "regenerate",
    "hidden_states_capture": "hidden_states",
    "train_draft": "train",
    "evaluate_inprocess": "evaluate",
    "evaluate_vllm": "evaluate",
}


def workflow_rules() -> set[str]:
    proc = subprocess.run(
        snakemake_cmd()
        + ["-s", str(REPO / "Snakefile"), "--workflow-profile", "none", "--list-rules"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}


def test_the_six_documented_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert names == {
        "llama-3.1-8b-instruct",
        "llama-3.1-8b-instruct-online",
        "qwen3-8b",
        "qwen3-30b-a3b",
        "gpt-oss-20b",
        "llama-3.3-70b-instruct",
    }


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates_and_uses_realistic_settings(example):
    cfg = yaml.safe_load(example.read_text())
    written = {name: set(run["hidden_states"]) for name, run in cfg["runs"].items()}
    validate_config(cfg, REPO / "config" / "schema.yaml")  # fills in the defaults
    for name, run in cfg["runs"].items():
        assert run["vocab"]["draft_vocab_size"] == 32000
        assert run["train"]["gpus"] >= 8  # a full node
        hs = run["hidden_states"]
        if hs["mode"] == "online":  # no capture job: only what the train job applies is set
            assert written[name] <= {"mode", "dtype", "layer_ids", "batch_tokens"}, hs
        else:
            tp, dp = hs["tensor_parallel_size"], hs["data_parallel_size"]
            assert hs["gpus"] == tp * dp
        target = Path(cfg["models"][run["target"]]["path"]).name
        tv = yaml.safe_load((STANDINS / target / "config.json").read_text())["vocab_size"]
        assert run["vocab"]["draft_vocab_size"] < tv


@pytest.mark.parametrize(
    "standin", sorted(p for p in STANDINS.iterdir() if p.is_dir()), ids=lambda p: p.name
)
def test_standin_is_a_config_transformers_reads(standin):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(standin)
    assert cfg.num_hidden_layers >= 24 and cfg.hidden_size >= 2048


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_dry_run_plans_every_stage_with_its_gpus(example):
    cfg = yaml.safe_load(example.read_text())
    jobs = planned_example(example)
    planned = {j["rule"] for j in jobs} - {"all"}
    # Targets are Hugging Face models and datasets: every rule but the demo asset exports runs.
    (run,) = cfg["runs"].values()
    expected = workflow_rules() - ASSET_RULES - {"all"}
    if run["hidden_states"].get("mode") == "online":  # nothing captured, nothing to clean up
        expected -= {"hidden_states_capture", "hidden_states_cleanup"}
    assert planned == expected
    for job in jobs:
        stage = GPU_STAGE_OF_RULE.get(job["rule"])
        if stage:
            assert job["resources"].get("gpu") == run[stage]["gpus"], job
            # host memory grows with the GPUs: each GPU process holds the target's embedding
            assert job["resources"]["mem_mb"] >= 12000 * run[stage]["gpus"], job
