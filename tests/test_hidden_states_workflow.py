"""The hidden_states and vocab rules: planned from the config, run end to end, resumable."""

from __future__ import annotations

import json

import numpy as np
import torch
import yaml
from conftest import run_snakemake

OUTPUTS = [
    "results/r/hidden_states/chats/data_config.json",
    "results/r/vocab/64/d2t.npy",
    "results/r/vocab/64/t2d.npy",
]


def write_config(tmp_path, target, source, **hidden_states) -> str:
    config = {
        "models": {"tiny": {"path": str(target)}},
        "datasets": {"chats": {"source": str(source)}, "more": {"source": "sharegpt"}},
        "runs": {
            "r": {
                "target": "tiny",
                "datasets": {"chats": {}},
                "prepare": {"seq_length": 64, "eval_prompts": 2},
                "hidden_states": {"layer_ids": [1, 2, 3, 4], "batch_tokens": 256, **hidden_states},
                "vocab": {"draft_vocab_size": 64},
            }
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dry_run_plans_capture_and_vocab_with_config_values(tiny_llama, chat_jsonl, tmp_path):
    config = write_config(
        tmp_path,
        tiny_llama,
        chat_jsonl,
        dtype="float32",
        backend="vllm",
        tensor_parallel_size=2,
        gpus=2,
    )
    proc = run_snakemake(tmp_path / "wd", "-n", "-p", configfile=config)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "--layer-ids 1 2 3 4 --dtype float32 --batch-tokens 256 --backend vllm" in out
    assert "--gpus 2 --tensor-parallel-size 2 --data-parallel-size 1" in out
    assert "--output results/r/hidden_states/chats " in out
    assert "--draft-vocab-size 64 --output-dir results/r/vocab/64 " in out
    assert "gpu=2" in out
    # The default target builds them: both stages are part of `all`.
    for rule in ("hidden_states_capture", "vocab_mapping"):
        assert f"rule {rule}:" in out


def test_workflow_captures_states_and_vocab_from_prepared_chats(tiny_llama, chat_jsonl, tmp_path):
    config = write_config(tmp_path, tiny_llama, chat_jsonl)
    wd = tmp_path / "wd"
    run_snakemake(wd, *OUTPUTS, configfile=config, check=True)
    data_config = json.loads((wd / OUTPUTS[0]).read_text())
    lengths = data_config["data"]["sample_lengths"]
    assert (
        data_config["layer_ids"] == [1, 2, 3, 4]
        and len(lengths) == data_config["data"]["num_samples"]
    )
    assert data_config["command"].startswith("speculators hidden-states --target ")
    assert "threads on" in data_config["device"]  # the CPU it ran on, named (devices.describe)
    for idx, n in enumerate(lengths):
        sample = torch.load(wd / f"results/r/hidden_states/chats/data_{idx}.pt", weights_only=True)
        assert sample["input_ids"].shape == (n,)
        assert [h.shape for h in sample["hidden_states"]] == [(n, 128)] * 4
    d2t = np.load(wd / OUTPUTS[1])
    t2d = np.load(wd / OUTPUTS[2])
    assert d2t.shape == (64,) and t2d.sum() == 64
    assert (wd / "logs/hidden_states/capture/r/chats.log").is_file()
    assert (wd / "benchmarks/vocab/mapping/r/64.tsv").is_file()

    # Finished outputs are not rebuilt; a lost data_config.json only re-verifies the samples.
    again = run_snakemake(wd, *OUTPUTS, "-n", configfile=config, check=True)
    assert "Nothing to be done" in again.stdout + again.stderr
    (wd / OUTPUTS[0]).unlink()
    run_snakemake(wd, *OUTPUTS, configfile=config, check=True)
    log = (wd / "logs/hidden_states/capture/r/chats.log").read_text()
    assert f"{len(lengths)} of {len(lengths)} samples already valid, 0 to capture" in log
