"""require_gpus: a GPU job stops at once, with one line, when it sees other than what it asked."""

import os
import subprocess
import sys

import pytest

from speculators import devices
from speculators.errors import SpeculatorsError


def _require_in_subprocess(expected: int, **env: str) -> subprocess.CompletedProcess:
    """Call require_gpus in a fresh interpreter, so CUDA_VISIBLE_DEVICES really applies."""
    code = (
        "import sys\n"
        "from speculators.devices import require_gpus\n"
        "from speculators.errors import SpeculatorsError\n"
        "try:\n"
        f"    print(require_gpus({expected}, 'train.gpus'))\n"
        "except SpeculatorsError as e:\n"
        "    print(e, file=sys.stderr); sys.exit(1)\n"
    )
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120
    )


def test_hidden_gpus_fail_with_one_line_naming_key_and_slurm_hint():
    # CUDA_VISIBLE_DEVICES="" hides every GPU on any machine: what a broken allocation looks like.
    proc = _require_in_subprocess(2, CUDA_VISIBLE_DEVICES="", SLURM_JOB_ID="42")
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line
    assert line.startswith("train.gpus: the job asked for 2 GPU(s) but sees 0")
    assert "CUDA_VISIBLE_DEVICES=" in line
    assert "tasks_per_gpu: 0" in line


def test_cpu_job_passes_and_reports_visible_count():
    proc = _require_in_subprocess(0, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"


def test_outside_slurm_hint_points_at_config(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(devices, "visible_gpus", lambda: 0)
    with pytest.raises(SpeculatorsError, match="set CUDA_VISIBLE_DEVICES or the config's gpus"):
        devices.require_gpus(1)


@pytest.mark.parametrize(
    ("seen", "expected", "ok"), [(2, 2, True), (8, 8, True), (4, 2, False), (1, 2, False)]
)
def test_exact_match_required(monkeypatch, seen, expected, ok):
    # More GPUs than asked is also wrong: torchrun would start the wrong number of ranks.
    monkeypatch.setattr(devices, "visible_gpus", lambda: seen)
    if ok:
        assert devices.require_gpus(expected) == seen
    else:
        with pytest.raises(
            SpeculatorsError, match=f"asked for {expected} GPU\\(s\\) but sees {seen}"
        ):
            devices.require_gpus(expected)


def test_negative_count_is_an_error():
    with pytest.raises(SpeculatorsError, match="must be >= 0"):
        devices.require_gpus(-1, "hidden_states.gpus")


@pytest.mark.parametrize(
    "argv, key",
    [
        (["train", "--target", "t", "--data", "d", "--d2t", "a", "--t2d", "b", "--output", "o",
          "--work-dir", "w"], "train.gpus"),
        (["evaluate", "--target", "t", "--draft", "d", "--prompts", "p", "--output", "o.json"],
         "evaluate.gpus"),
        (["regenerate", "--target", "t", "--source", "s", "--dataset-name", "n", "--output",
          "o.jsonl"], "regenerate.gpus"),
    ],
)  # fmt: skip
def test_gpu_stages_stop_when_the_job_lacks_its_gpus(argv, key, tmp_path, capsys, monkeypatch):
    from speculators import devices
    from speculators.cli import main

    monkeypatch.setattr(devices, "visible_gpus", lambda: 0)
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--gpus", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err
    assert list(tmp_path.iterdir()) == []  # stopped before writing anything
