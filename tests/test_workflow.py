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
