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
