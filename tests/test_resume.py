"""Natural resume of the whole workflow on a tiny target: the same command again does nothing,
a changed setting reruns exactly the stages after it, and a run interrupted during training
finishes with the same command, without redoing earlier stages, with the same draft; with
cleanup_hidden_states the samples go and the run stays done."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml
from conftest import REPO, snakemake_cmd
from examples_support import planned_jobs
from fixtures import sample_conversations

pytestmark = pytest.mark.slow
RUN = "r"
# Rule names start with their stage (rules/<stage>.smk): what a change may rerun is named by stage.
AFTER_TRAINING = ("train", "evaluate", "report")


def of_stages(rules: set[str], *stages: str) -> set[str]:
    return {r for r in rules if r.split("_")[0] in stages}


def tiny_config(tiny_llama, chats) -> dict:
    return {
        "models": {"tiny": {"path": str(tiny_llama)}},
        "datasets": {"chats": {"source": str(chats)}},
        "runs": {
            RUN: {
                "target": "tiny",
                "datasets": {"chats": {}},
                "prepare": {"seq_length": 64, "eval_prompts": 4},
                "hidden_states": {"dtype": "float32", "layer_ids": [1, 2, 3, 4]},
                "vocab": {"draft_vocab_size": 128},
                # Enough steps that an interrupt lands mid-training; a checkpoint every 5.
                "train": {"epochs": 25, "ttt_steps": 2, "total_seq_len": 256, "lr": 0.001,
                          "checkpoint_every": 5, "loggers": []},
                "evaluate": {"num_prompts": 2, "max_new_tokens": 8, "vllm": "off"},
            }
        },
    }  # fmt: skip


def user_command(workdir, cfgfile) -> list[str]:
    """What a user types: the auto-loaded profiles/default (rerun-incomplete), fewer cores."""
    return snakemake_cmd() + [
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        f"--configfile={cfgfile}",
        "--cores",
        "2",
    ]


def run(workdir, cfgfile, *args) -> str:
    proc = subprocess.run(
        user_command(workdir, cfgfile) + list(args), capture_output=True, text=True, timeout=900
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def finished_rules(out: str) -> set[str]:
    return {
        line.split("(Rule: ")[1].rstrip(")")
        for line in out.splitlines()
        if line.startswith("Finished jobid") and "(Rule: " in line
    } - {"all"}


def write_config(path, cfg) -> object:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("resume")
    chats = root / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps({"id": str(i), "conversations": c}) + "\n"
            for i, c in enumerate(sample_conversations(24))
        )
    )
    cfg = tiny_config(tiny_llama, chats)
    cfgfile = write_config(root / "config.yaml", cfg)
    work = root / "work"
    ran = finished_rules(run(work, cfgfile))
    assert {"prepare_dataset", "hidden_states_capture", "train_draft", "report_run"} <= ran
    return root, work, cfg, cfgfile, ran


def test_second_run_has_nothing_to_do(finished):
    _, work, _, cfgfile, _ = finished
    assert "Nothing to be done" in run(work, cfgfile, "-n")


def _planned_after_change(finished, tmp_path, stage, key, value) -> set[str]:
    _, work, cfg, _, _ = finished
    changed = json.loads(json.dumps(cfg))
    changed["runs"][RUN][stage][key] = value
    cfgfile = write_config(tmp_path / "changed.yaml", changed)
    return {j["rule"] for j in planned_jobs(work, cfgfile)} - {"all"}


def test_training_setting_reruns_training_evaluation_report_only(finished, tmp_path):
    ran = finished[-1]
    planned = _planned_after_change(finished, tmp_path, "train", "lr", 0.002)
    assert planned == of_stages(ran, *AFTER_TRAINING)


def test_hidden_states_setting_reruns_from_capture_on(finished, tmp_path):
    ran = finished[-1]
    planned = _planned_after_change(finished, tmp_path, "hidden_states", "dtype", "bfloat16")
    assert planned == of_stages(ran, "hidden", *AFTER_TRAINING)  # vocab and prepare kept


def test_data_setting_reruns_from_prepare_on(finished, tmp_path):
    ran = finished[-1]
    planned = _planned_after_change(finished, tmp_path, "prepare", "seq_length", 48)
    assert planned == of_stages(ran, "prepare", "hidden", "vocab", *AFTER_TRAINING) == ran


def test_interrupted_training_finishes_with_the_same_command(finished, tmp_path):
    root, work, _, cfgfile, ran = finished
    # A copy of the finished run whose training (and everything after it) never happened.
    resumed = tmp_path / "work"
    shutil.copytree(work, resumed, symlinks=True)
    for p in ("draft", "eval", "report", "train_work"):
        shutil.rmtree(resumed / "results" / RUN / p, ignore_errors=True)
    (resumed / "results" / "comparison.html").unlink()
    log = resumed / "logs" / "train" / "draft" / f"{RUN}.log"
    log.unlink()  # the finished run's log already tells of checkpoints

    # The trainer holds after its first checkpoint (tests/hold_after_checkpoint): the interrupt
    # always lands mid-training, however slow or loaded the machine.
    marker = tmp_path / "checkpoint-saved"
    hook = str(REPO / "tests" / "hold_after_checkpoint")
    env = {
        **os.environ,
        "SPECULATORS_TEST_HOLD_MARKER": str(marker),
        "PYTHONPATH": os.pathsep.join(filter(None, [hook, os.environ.get("PYTHONPATH")])),
    }
    # Ctrl-C as at a terminal, even when the tests run from a background job of a
    # non-interactive shell (`cmd &`), whose children inherit SIGINT ignored.
    proc = subprocess.Popen(user_command(resumed, cfgfile), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.2)
    assert marker.exists() and proc.poll() is None, "training never reached its first checkpoint"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: snakemake and its running job
    first = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, first
    assert not (resumed / "results" / RUN / "draft").exists()  # nothing that looks finished
    assert (resumed / "results" / RUN / "train_work" / "checkpoint").is_dir()

    out = run(resumed, cfgfile)
    assert finished_rules(out) == of_stages(ran, *AFTER_TRAINING)  # nothing earlier redone
    assert "resum" in log.read_text().lower()  # the trainer picked up its checkpoint
    assert "Nothing to be done" in run(resumed, cfgfile, "-n")

    from safetensors.torch import load_file

    a = load_file(work / "results" / RUN / "draft" / "model.safetensors")
    b = load_file(resumed / "results" / RUN / "draft" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), f"{k} differs after resume"


def test_cleanup_deletes_hidden_states_and_stays_done(finished, tmp_path):
    _, work, cfg, _, ran = finished
    cleaned = tmp_path / "work"
    shutil.copytree(work, cleaned, symlinks=True)
    hs = cleaned / "results" / RUN / "hidden_states" / "chats"
    size = sum(p.stat().st_size for p in hs.glob("data_*.pt"))
    assert size > 0
    cfgfile = write_config(tmp_path / "cleanup.yaml", {**cfg, "cleanup_hidden_states": True})

    assert finished_rules(run(cleaned, cfgfile)) == {"hidden_states_cleanup"}
    assert not list(hs.glob("data_*.pt")) and not (hs / "data_config.json").exists()
    summary = json.loads((hs.parent / "cleanup.json").read_text())
    assert summary["bytes_freed"] == size
    # The report, written before the cleanup, recorded their size on disk.
    assert (
        "hidden-states folder" in (cleaned / "results" / RUN / "report" / "report.md").read_text()
    )
    assert "Nothing to be done" in run(cleaned, cfgfile, "-n")
    # A new training setting needs the samples again: capture reruns, prepare and vocab do not.
    changed = json.loads(json.dumps({**cfg, "cleanup_hidden_states": True}))
    changed["runs"][RUN]["train"]["lr"] = 0.002
    planned = {
        j["rule"] for j in planned_jobs(cleaned, write_config(tmp_path / "c2.yaml", changed))
    }
    assert planned - {"all"} == of_stages(ran, "hidden", *AFTER_TRAINING) | {
        "hidden_states_cleanup"
    }
