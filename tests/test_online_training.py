"""Online training (`train --hidden-states-mode online`): the target runs on each packed bin
while the draft trains. On a tiny target it gives the same per-step losses and final weights as
capturing first and training offline (1 process, and 2 gloo processes under FSDP2), a killed
online run resumes to the uninterrupted result, an online checkpoint never resumes an offline
run, and a target that cannot fit stops with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import parse, train_parser
from train_fixtures import chat_tokens, kill_once_exists, write_vocab

from speculators.cli import main
from speculators.errors import SpeculatorsError
from speculators.train import launch, online, trainer
from speculators.train.distributed import DistEnv

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
LAYER_IDS = ["1", "2", "4"]
DRAFT_VOCAB = 128
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def prepared(tiny_llama, tmp_path_factory):
    """A prepared dataset of 16 fixture chats (the tiny target's template), its offline
    capture in float32 and in fp8, and a vocab built from its supervised tokens."""
    import datasets

    root = tmp_path_factory.mktemp("online")
    rows = chat_tokens(tiny_llama, 16)
    cols = {"input_ids": [r[0] for r in rows], "loss_mask": [r[1] for r in rows]}
    folder = root / "prepared" / "dataset"
    datasets.Dataset.from_dict(cols).save_to_disk(str(folder))
    captures = {}
    for dtype in ("float32", "float8_e4m3fn"):
        out = root / f"hs-{dtype}"
        argv = ["hidden-states", "--target", str(tiny_llama), "--prepared", str(folder)]
        argv += ["--output", str(out), "--layer-ids", *LAYER_IDS, "--dtype", dtype]
        assert main(argv + ["--batch-tokens", "300", "--probe-rows", "0"]) == 0
        captures[dtype] = out
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    d2t, t2d = write_vocab(root / "vocab", vocab, DRAFT_VOCAB, captures["float32"])
    return folder, captures, d2t, t2d


def args_for(target, data, d2t, t2d, out, *extra):
    return parse(
        "--target", target, "--data", data, "--d2t", d2t, "--t2d", t2d,
        "--output", out / "draft", "--work-dir", out / "work", "--lr", 1e-3, "--epochs", 2,
        "--total-seq-len", 160, "--precision", "fp32", "--loggers", *extra,
    )  # fmt: skip


def online_flags(dtype="float32"):
    return ("--hidden-states-mode", "online", "--layer-ids", *LAYER_IDS,
            "--hidden-states-dtype", dtype, "--batch-tokens", 300)  # fmt: skip


def records(folder: Path) -> list[dict]:
    lines = (folder / "draft" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"} for ln in lines]


def weights(folder: Path) -> dict:
    return torch.load(folder / "work" / "best_model.pt", weights_only=True)


def assert_same_run(a: Path, b: Path, rel=1e-4, atol=1e-5) -> None:
    ra, rb = records(a), records(b)
    assert [(r["split"], r["step"]) for r in ra] == [(r["split"], r["step"]) for r in rb]
    assert len(ra) > 4
    for x, y in zip(ra, rb):
        assert y["loss"] == pytest.approx(x["loss"], rel=rel, abs=1e-6)
        assert y["loss_k"] == pytest.approx(x["loss_k"], rel=rel, abs=1e-6)
        assert y["full_acc"] == pytest.approx(x["full_acc"], abs=1e-6)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=atol)


@pytest.mark.parametrize("dtype", ["float32", "float8_e4m3fn"])
def test_online_equals_capture_then_train(tiny_llama, prepared, tmp_path, dtype):
    folder, captures, d2t, t2d = prepared
    trainer.run(args_for(tiny_llama, captures[dtype], d2t, t2d, tmp_path / "off"))
    trainer.run(args_for(tiny_llama, folder, d2t, t2d, tmp_path / "on", *online_flags(dtype)))
    assert_same_run(tmp_path / "off", tmp_path / "on")
    off = json.loads((tmp_path / "off" / "draft" / "train_summary.json").read_text())
    on = json.loads((tmp_path / "on" / "draft" / "train_summary.json").read_text())
    assert off["samples"] == on["samples"] and off["steps"] == on["steps"]
    assert on["hidden_states"]["mode"] == "online" and on["hidden_states"]["bytes_written"] == 0
    assert 0 < on["hidden_states"]["target_forward_share"] < 1
    assert on["hidden_states"]["target_forward_s"] > 0
    hs_bytes = sum(f.stat().st_size for f in captures[dtype].glob("data_*.pt"))
    assert off["hidden_states"] == {
        "mode": "offline", "target_forward_s": 0.0, "bytes_written": hs_bytes,
        "target_forward_share": 0.0,
    }  # fmt: skip
    assert not list((tmp_path / "on").rglob("data_*.pt"))  # nothing written online


def test_online_checkpoint_never_resumes_an_offline_run(tiny_llama, prepared, tmp_path, caplog):
    folder, captures, d2t, t2d = prepared
    trainer.run(args_for(tiny_llama, folder, d2t, t2d, tmp_path, *online_flags()))
    caplog.set_level("WARNING")
    trainer.run(args_for(tiny_llama, captures["float32"], d2t, t2d, tmp_path))
    assert "not resuming" in caplog.text and "online" in caplog.text


def test_killed_online_run_resumes_to_the_uninterrupted_result(tiny_llama, prepared, tmp_path):
    """Killed (SIGKILL) right after its first mid-epoch checkpoint, then run again."""
    folder, _, d2t, t2d = prepared

    def command(name):
        args = args_for(tiny_llama, folder, d2t, t2d, tmp_path / name, *online_flags(),
                        "--checkpoint-every", 3, "--noise", 0.05)  # fmt: skip
        argv = launch.to_argv(train_parser(), args)
        return [sys.executable, "-m", "speculators.cli", "train", *argv]

    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    full = subprocess.run(command("full"), capture_output=True, text=True, env=env)
    assert full.returncode == 0, full.stderr[-4000:]

    marker = tmp_path / "held"
    hold = env | {"SPECULATORS_TEST_HOLD_MARKER": str(marker),
                  "PYTHONPATH": os.pathsep.join([str(TESTS / "hold_after_checkpoint"),
                                                 env["PYTHONPATH"]])}  # fmt: skip
    kill_once_exists(command("killed"), marker, env=hold)
    assert marker.exists() and not (tmp_path / "killed" / "draft").exists()

    rerun = subprocess.run(command("killed"), capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    resumed = [ln for ln in rerun.stderr.splitlines() if "resumed from" in ln]
    assert resumed and not resumed[0].endswith("at step 0"), rerun.stderr[-3000:]
    assert records(tmp_path / "killed") == records(tmp_path / "full")
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_gloo_processes_online_equal_capture_then_train(tiny_llama, prepared, tmp_path):
    """2 processes under FSDP2, each running the target on its own bins only, equal one
    offline process on the same batches (the loss is a global token mean)."""
    folder, captures, d2t, t2d = prepared
    parser = train_parser()

    def run_two(data, name, *extra):
        args = args_for(tiny_llama, data, d2t, t2d, tmp_path / name, *extra,
                        "--total-seq-len", 80, "--noise", 0.05, "--nproc-per-node", 2)  # fmt: skip
        cmd = [sys.executable, "-m", "speculators.cli", "train", *launch.to_argv(parser, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    run_two(captures["float32"], "off-two")
    run_two(folder, "on", *online_flags())
    summary = json.loads((tmp_path / "on" / "draft" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["hidden_states"]["mode"] == "online"
    assert_same_run(tmp_path / "off-two", tmp_path / "on")


def test_a_target_that_cannot_fit_stops_with_one_line(tiny_llama, monkeypatch):
    monkeypatch.setattr(
        os, "sysconf", lambda name: 64 if name == "SC_PHYS_PAGES" else 4096
    )  # 256 KiB
    env = DistEnv(rank=0, world_size=1)
    with pytest.raises(SpeculatorsError) as e:
        online.check_fit(str(tiny_llama), torch.float32, 1000, env)
    msg = str(e.value)
    assert "hidden_states.mode" in msg and "GiB" in msg and "parameters" in msg
    assert "\n" not in msg


def test_parameter_count_is_read_from_safetensors_headers(tiny_llama):
    from transformers import AutoModelForCausalLM

    from speculators.targets import target_parameter_count

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert target_parameter_count(str(tiny_llama)) == sum(p.numel() for p in model.parameters())


def test_online_data_refuses_a_folder_that_is_not_prepared(tiny_llama, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpeculatorsError, match="not a prepared dataset"):
        online.OnlineData([tmp_path / "empty"], tiny_llama, hidden_size=128, vocab_size=512,
                          num_layers=4, layer_ids=[1, 2, 4])  # fmt: skip


@pytest.mark.slow
def test_online_workflow_runs_end_to_end_without_a_capture(tiny_llama, chat_jsonl, tmp_path):
    """`snakemake` on a tiny target with hidden_states.mode: online: no capture job, nothing
    under hidden_states/, a draft, its report saying online and 0 bytes written."""
    import yaml
    from conftest import run_snakemake

    cfg = {
        "models": {"tiny": {"path": str(tiny_llama)}},
        "datasets": {"chats": {"source": str(chat_jsonl)}},
        "runs": {"r": {
            "target": "tiny", "datasets": {"chats": {}},
            "prepare": {"seq_length": 64, "eval_prompts": 2},
            "hidden_states": {"mode": "online", "dtype": "float32", "layer_ids": [1, 2, 4]},
            "vocab": {"draft_vocab_size": 64},
            "train": {"epochs": 2, "ttt_steps": 2, "total_seq_len": 128, "loggers": []},
            "evaluate": {"num_prompts": 2, "max_new_tokens": 6, "vllm": "off"},
        }},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    dry = run_snakemake(work, "-n", configfile=tmp_path / "config.yaml")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "hidden_states_capture" not in dry.stdout and "train_draft" in dry.stdout
    proc = run_snakemake(work, configfile=tmp_path / "config.yaml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = work / "results" / "r"
    assert not (res / "hidden_states").exists()
    log = (work / "logs/train/draft/r.log").read_text()
    assert "online: target" in log
    summary = json.loads((res / "draft" / "train_summary.json").read_text())
    assert summary["hidden_states"]["mode"] == "online"
    assert summary["hidden_states"]["bytes_written"] == 0
    report = (res / "report" / "report.md").read_text()
    assert "Hidden-states source" in report and "online" in report
    again = run_snakemake(work, configfile=tmp_path / "config.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
