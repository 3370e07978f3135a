"""The prepare rules end to end: Snakemake in a temporary folder on a tiny target and chats."""

import json

import datasets
import pytest
import torch
import yaml
from conftest import run_snakemake


@pytest.mark.slow
def test_snakemake_prepares_regenerated_and_plain_datasets(tiny_llama, chat_jsonl, tmp_path):
    config = {
        "models": {"tiny": {"path": str(tiny_llama)}},
        "datasets": {"chats": {"source": str(chat_jsonl)}, "again": {"source": str(chat_jsonl)}},
        "runs": {
            "r1": {
                "target": "tiny",
                "datasets": {"chats": {"regenerate": True, "max_samples": 4}, "again": {}},
                "prepare": {"seq_length": 128, "eval_prompts": 2},
                "regenerate": {
                    "max_new_tokens": 4,
                    "batch_size": 4,
                    "max_turns": 1,
                    "backend": "transformers",
                },
            }
        },
    }
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    work.mkdir()
    target = "results/r1/prepared/token_freq.pt"
    proc = run_snakemake(work, target, configfile=configfile, check=True)
    assert "prepare_regenerate" in proc.stderr

    regenerated = work / "results/r1/regenerated/chats.jsonl"
    assert (work / "results/r1/regenerated/chats.meta.json").is_file()
    assert not (work / "results/r1/regenerated/again.jsonl").exists()  # regenerate: false
    assert len(regenerated.read_text().splitlines()) == 6  # 2 eval + 4 train
    per_dataset = {}
    for name, rows in (("chats", 4), ("again", 10)):
        folder = work / "results/r1/prepared" / name
        ds = datasets.load_from_disk(str(folder / "dataset"))
        stats = json.loads((folder / "stats.json").read_text())
        assert stats["rows_in"] == rows and len(ds) == stats["rows_out"]
        assert len((folder / "eval_prompts.jsonl").read_text().splitlines()) == 2
        per_dataset[name] = torch.load(folder / "token_freq.pt", weights_only=True)
        log = (work / "logs/prepare/dataset/r1" / f"{name}.log").read_text()
        assert "first prepared row" in log and "⟦" in log
    combined = torch.load(work / target, weights_only=True)
    keys = set(per_dataset["chats"]) | set(per_dataset["again"])
    assert combined == {
        k: per_dataset["chats"].get(k, 0) + per_dataset["again"].get(k, 0) for k in keys
    }
    assert (work / "benchmarks/prepare/dataset/r1/chats.tsv").is_file()

    # A second run has nothing to do; a changed prepare value reruns prepare, not regenerate.
    again = run_snakemake(work, target, "-n", configfile=configfile, check=True)
    assert "Nothing to be done" in again.stdout + again.stderr
    config["runs"]["r1"]["prepare"]["seq_length"] = 64
    configfile.write_text(yaml.safe_dump(config))
    plan = run_snakemake(work, target, "-n", configfile=configfile, check=True)
    out = plan.stdout + plan.stderr
    assert "prepare_dataset" in out and "prepare_regenerate" not in out
