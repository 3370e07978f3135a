"""Shared pytest fixtures: tiny targets and tokenizers made at test time, offline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))
from fixtures import build_target, build_tokenizer, sample_conversations  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Folder of a random 4-layer Llama (hidden 128, head_dim 32) with the fixture tokenizer."""
    return build_target(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return build_target(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(d)
    return d


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    """A small chat JSONL in the workflow's format: {"conversations": [{role, content}, ...]}."""
    path = tmp_path / "chats.jsonl"
    with open(path, "w") as f:
        for i, conv in enumerate(sample_conversations(12)):
            f.write(json.dumps({"id": str(i), "conversations": conv}) + "\n")
    return path


def snakemake_cmd() -> list[str]:
    exe = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    return [exe]


def run_snakemake(workdir: Path, *args: str, configfile: Path | None = None, check: bool = False):
    """Run the repository's workflow in `workdir` (no workflow profile), capture output."""
    cmd = snakemake_cmd() + [
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--workflow-profile",
        "none",
        "--cores",
        "2",
    ]
    if configfile is not None:
        cmd += [f"--configfile={configfile}"]  # "=" form: the option takes several values
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
