"""The `train` stage on tiny fixtures: it learns, publishes a draft that reloads, resumes
exactly after a crash, and refuses bad input with a clear error."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import (
    kill_once_exists,
    write_hidden_states,
    write_random_states,
    write_vocab,
)

from speculators.cli import build_parser
from speculators.errors import SpeculatorsError
from speculators.train import launch, trainer
from speculators.train.data import HiddenStatesData

DRAFT_VOCAB = 128
# DCP says it runs without a process group: intended for single-process runs.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="session")
def chat_states(tiny_llama, tmp_path_factory):
    """The tiny target's real hidden states on the fixture chats, and a vocab from them."""
    root = tmp_path_factory.mktemp("chat-states")
    data = write_hidden_states(root / "hs", tiny_llama, n=12)
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    d2t, t2d = write_vocab(root / "vocab", vocab, DRAFT_VOCAB, data)
    return data, d2t, t2d


def train_parser():
    import argparse

    parser = argparse.ArgumentParser()
    trainer.add_arguments(parser)
    return parser


def parse(*argv):
    argv = ["train", *map(str, argv)]
    parser, _ = build_parser(argv)
    return parser.parse_args(argv)


def train_args(target, data, d2t, t2d, out, *extra):
    return parse(
        "--target", target, "--data", *([data] if not isinstance(data, list) else data),
        "--d2t", d2t, "--t2d", t2d, "--output", out / "draft", "--work-dir", out / "work",
        "--total-seq-len", 256, "--lr", 1e-3, "--epochs", 3, "--loggers", *extra,
    )  # fmt: skip


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loss_falls_and_published_draft_reloads(tiny_llama, chat_states, tmp_path):
    from speculators.models.io import load_draft

    data, d2t, t2d = chat_states
    args = train_args(tiny_llama, data, d2t, t2d, tmp_path, "tensorboard", "--epochs", 6)
    trainer.run(args)
    draft = tmp_path / "draft"
    recs = records(draft / "metrics.jsonl")
    train = [r for r in recs if r["split"] == "train"]
    val = [r for r in recs if r["split"] == "val"]
    assert len(val) == 6 and [r["epoch"] for r in val] == list(range(6))
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    for r in recs:
        assert len(r["loss_k"]) == len(r["full_acc"]) == len(r["cond_acc"]) == 3
        assert all(math.isfinite(x) for x in r["loss_k"])
        assert r["acceptance_length_estimate"] == pytest.approx(1 + sum(r["full_acc"]))
    # Learns: validation loss at the end well under the first epoch's, train loss too.
    assert val[-1]["loss"] < 0.8 * val[0]["loss"]
    assert sum(r["loss"] for r in train[-3:]) < 0.5 * sum(r["loss"] for r in train[:3])
    summary = json.loads((draft / "train_summary.json").read_text())
    assert summary["steps"] == len(train) and summary["skipped_steps"] == 0
    assert summary["samples"] == {"train": 11, "val": 1} and summary["dropped_samples"] == 0
    # The default criterion: the highest validation acceptance estimate (ties: lower loss).
    best = min(val, key=lambda r: (-r["acceptance_length_estimate"], r["loss"]))
    assert summary["select_best_by"] == "acceptance" and summary["best_epoch"] == best["epoch"]
    assert summary["best_val_acceptance_length_estimate"] == best["acceptance_length_estimate"]
    assert [h["loss"] for h in summary["val_history"]] == [r["loss"] for r in val]
    assert (tmp_path / "work" / "tensorboard").is_dir()

    # The published weights are the best epoch's, and load back through load_draft.
    model = load_draft(draft)
    best_state = torch.load(tmp_path / "work" / "best_acceptance.pt", weights_only=True)
    own = model.state_dict()
    for name in ("fc.weight", "layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert torch.equal(own[name], best_state[name].to(torch.bfloat16).float()), name
    cfg = json.loads((draft / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert cfg["draft_vocab_size"] == DRAFT_VOCAB
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == str(tiny_llama)
    assert not list(tmp_path.glob(".draft.*"))  # no temporary folder left behind


def test_best_epoch_by_acceptance_and_by_loss_on_a_history_where_they_disagree():
    history = [
        {"epoch": 0, "loss": 3.0, "acceptance_length_estimate": 1.50},
        {"epoch": 1, "loss": 2.0, "acceptance_length_estimate": 1.90},  # acceptance peaks
        {"epoch": 2, "loss": 1.5, "acceptance_length_estimate": 1.80},  # loss keeps falling
        {"epoch": 3, "loss": math.nan, "acceptance_length_estimate": None},  # diverged
        {"epoch": 4, "loss": 1.4, "acceptance_length_estimate": 1.70},
    ]
    assert trainer.best_epoch(history, "acceptance") == 1
    assert trainer.best_epoch(history, "loss") == 4
    # Ties: the lower loss, then the earlier epoch.
    tied = [*history, {"epoch": 5, "loss": 1.9, "acceptance_length_estimate": 1.90}]
    assert trainer.best_epoch(tied, "acceptance") == 5
    again = [*history, {"epoch": 5, "loss": 2.0, "acceptance_length_estimate": 1.90}]
    assert trainer.best_epoch(again, "acceptance") == 1
    # Nothing finite (no validation split, or every epoch diverged): no best epoch.
    assert trainer.best_epoch([history[3], {"epoch": 5, "loss": None}], "acceptance") is None
    with pytest.raises(SpeculatorsError, match="select-best-by"):
        trainer.best_epoch(history, "perplexity")


def _disagreeing_validation(monkeypatch, figures):
    """Validation that reports `figures[epoch]` = (loss, acceptance estimate) instead of the
    measured ones, so that the two criteria pick different epochs."""
    real, calls = trainer.evaluate, []

    def evaluate(model, loader, bins, a, env):
        val = real(model, loader, bins, a, env)
        loss, acceptance = figures[len(calls)]
        calls.append(1)
        return val | {"loss": loss, "acceptance_length_estimate": acceptance}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    return calls


def test_criteria_that_disagree_publish_their_own_epoch_and_switching_only_republishes(
    tiny_llama, chat_states, tmp_path, monkeypatch, caplog
):
    from safetensors.torch import load_file

    data, d2t, t2d = chat_states
    _disagreeing_validation(monkeypatch, [(3.0, 1.4), (2.5, 1.9), (2.0, 1.6)])
    args = train_args(tiny_llama, data, d2t, t2d, tmp_path)
    trainer.run(args)
    summary = json.loads((tmp_path / "draft" / "train_summary.json").read_text())
    assert summary["select_best_by"] == "acceptance" and summary["best_epoch"] == 1
    assert summary["best_epoch_by"] == {"acceptance": 1, "loss": 2}
    assert summary["best_val_loss"] == 2.5
    assert summary["best_val_acceptance_length_estimate"] == 1.9
    assert [(h["epoch"], h["loss"], h["acceptance_length_estimate"])
            for h in summary["val_history"]] == [(0, 3.0, 1.4), (1, 2.5, 1.9), (2, 2.0, 1.6)]  # fmt: skip
    work = tmp_path / "work"
    by_acceptance = torch.load(work / "best_acceptance.pt", weights_only=True)
    by_loss = torch.load(work / "best_model.pt", weights_only=True)
    assert not torch.equal(by_acceptance["fc.weight"], by_loss["fc.weight"])
    published = load_file(tmp_path / "draft" / "model.safetensors")
    assert torch.equal(published["fc.weight"], by_acceptance["fc.weight"].to(torch.bfloat16))

    # The criterion is no trajectory setting: asking for loss republishes without a step.
    monkeypatch.setattr(trainer, "train_step", lambda *a, **kw: pytest.fail("retrained"))
    caplog.set_level("INFO")
    trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path, "--select-best-by", "loss"))
    assert "resumed from" in caplog.text and "not resuming" not in caplog.text
    summary = json.loads((tmp_path / "draft" / "train_summary.json").read_text())
    assert summary["select_best_by"] == "loss" and summary["best_epoch"] == 2
    published = load_file(tmp_path / "draft" / "model.safetensors")
    assert torch.equal(published["fc.weight"], by_loss["fc.weight"].to(torch.bfloat16))


def test_work_folder_of_an_older_version_publishes_its_lowest_loss_epoch(
    tiny_llama, chat_states, tmp_path, monkeypatch, caplog
):
    data, d2t, t2d = chat_states
    _disagreeing_validation(monkeypatch, [(3.0, 1.9), (2.0, 1.5)])
    args = train_args(tiny_llama, data, d2t, t2d, tmp_path, "--epochs", 2)
    trainer.run(args)
    # What an older version left: progress without history, only best_model.pt.
    state_file = tmp_path / "work" / "checkpoint" / "train_state.pt"
    state = torch.load(state_file, weights_only=False)
    for key in ("val_history", "saved_best"):
        del state["progress"][key]
    state["progress"].update(best_epoch=1, best_val_loss=2.0)
    torch.save(state, state_file)
    (tmp_path / "work" / "best_acceptance.pt").unlink()
    caplog.set_level("WARNING")
    trainer.run(args)
    assert "older version" in caplog.text
    summary = json.loads((tmp_path / "draft" / "train_summary.json").read_text())
    assert summary["select_best_by"] == "loss" and summary["best_epoch"] == 1
    assert summary["best_epoch_by"] == {"acceptance": 0, "loss": 1}  # history from the log


def test_without_a_validation_split_both_criteria_publish_the_last_epoch(
    tiny_llama, chat_states, tmp_path
):
    data, d2t, t2d = chat_states
    trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path, "--val-fraction", 0,
                           "--epochs", 2))  # fmt: skip
    summary = json.loads((tmp_path / "draft" / "train_summary.json").read_text())
    assert summary["samples"]["val"] == 0
    assert summary["select_best_by"] == "acceptance" and summary["best_epoch"] == 1
    assert summary["best_epoch_by"] == {"acceptance": None, "loss": None}
    assert [h["loss"] for h in summary["val_history"]] == [None, None]
    a = torch.load(tmp_path / "work" / "best_acceptance.pt", weights_only=True)
    b = torch.load(tmp_path / "work" / "best_model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same, latest weights


def test_two_layer_draft_trains_without_nan(tiny_llama, chat_states, tmp_path):
    data, d2t, t2d = chat_states
    trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path, "--num-layers", 2,
                           "--ttt-steps", 4, "--epochs", 2, "--norm-before-fc"))  # fmt: skip
    recs = records(tmp_path / "draft" / "metrics.jsonl")
    assert all(math.isfinite(v) for r in recs for v in r["loss_k"])
    assert all(len(r["loss_k"]) == 4 for r in recs)
    cfg = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert cfg["transformer_layer_config"]["num_hidden_layers"] == 2


class Crash(RuntimeError):
    pass


def test_resume_mid_epoch_reproduces_uninterrupted_run(tiny_llama, chat_states, tmp_path,
                                                       monkeypatch):  # fmt: skip
    data, d2t, t2d = chat_states
    extra = ("--checkpoint-every", 3, "--noise", 0.05)
    trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path / "full", *extra))

    # 4 + 4 + 5 steps; checkpoints after steps 3, 4 (epoch end) and 6 (mid epoch 1). A crash
    # in step 8 leaves step 7 logged but not checkpointed; the rerun resumes after step 6.
    real_step, calls = trainer.train_step, []

    def crashing_step(*a, **kw):
        calls.append(1)
        if len(calls) == 8:
            raise Crash("killed")
        return real_step(*a, **kw)

    def counting_step(*a, **kw):
        calls.append(1)
        return real_step(*a, **kw)

    monkeypatch.setattr(trainer, "train_step", crashing_step)
    args = train_args(tiny_llama, data, d2t, t2d, tmp_path / "resumed", *extra)
    with pytest.raises(Crash):
        trainer.run(args)
    assert not (tmp_path / "resumed" / "draft").exists()  # nothing published on a crash
    calls.clear()
    monkeypatch.setattr(trainer, "train_step", counting_step)
    trainer.run(args)

    full = records(tmp_path / "full" / "draft" / "metrics.jsonl")
    resumed = records(tmp_path / "resumed" / "draft" / "metrics.jsonl")
    assert sum(r["split"] == "train" for r in full) == 13
    assert len(calls) == 13 - 6  # it continued mid-epoch rather than starting over
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in full
    ]
    a = torch.load(tmp_path / "full" / "work" / "best_model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "work" / "best_model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_process_fsdp_run_equals_single_process_run(tiny_llama, chat_states, tmp_path, caplog):
    import subprocess

    _, d2t, t2d = chat_states
    # Equal lengths: 2 ranks x 40 tokens take the same samples per step as 1 rank x 80;
    # random loss masks make the ranks' token counts differ (the loss is a global mean).
    data = write_random_states(tmp_path / "hs", tiny_llama, [41] * 16, random_masks=True)
    # A NaN in one training sample: both runs skip that step (all ranks together).
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    opened = HiddenStatesData.open([data], hidden_size=128, vocab_size=vocab, num_layers=4)
    _poison(data, opened.split(0.25, 0)[0][0])
    # fp32: bf16 autocast rounds differently when the batch is split over two processes.
    common = ["--noise", 0, "--val-fraction", 0.25, "--epochs", 2, "--checkpoint-every", 4]
    common += ["--precision", "fp32"]

    def args_for(name, seq, *extra):
        return train_args(tiny_llama, data, d2t, t2d, tmp_path / name, "--total-seq-len", seq,
                          *common, *extra)  # fmt: skip

    trainer.run(args_for("one", 80))
    worker_args = launch.to_argv(train_parser(), args_for("two", 40))
    cmd = [sys.executable, "-m", "speculators.cli", "train", *worker_args]
    proc = subprocess.run([*cmd, "--nproc-per-node", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    one = records(tmp_path / "one" / "draft" / "metrics.jsonl")
    two = records(tmp_path / "two" / "draft" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in one] == [(r["split"], r["step"]) for r in two]
    assert sum(r["loss"] is None for r in one) == 2  # the skipped steps, logged as null
    for a, b in zip(one, two):
        if a["loss"] is None:
            assert b["loss"] is None
            continue
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["loss_k"] == pytest.approx(a["loss_k"], rel=1e-4, abs=1e-6)
        assert b["full_acc"] == pytest.approx(a["full_acc"], abs=1e-6)
    summary = json.loads((tmp_path / "two" / "draft" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["skipped_steps"] == 2  # once per epoch
    wa = torch.load(tmp_path / "one" / "work" / "best_model.pt", weights_only=True)
    wb = torch.load(tmp_path / "two" / "work" / "best_model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)

    # Its checkpoint belongs to 2 processes: a single-process rerun does not resume from it.
    caplog.set_level("WARNING")
    trainer.run(args_for("two", 40))
    assert "not resuming" in caplog.text and "processes: 2 -> 1" in caplog.text


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_uninterrupted_result(
    tiny_llama, chat_states, tmp_path
):
    import subprocess

    _, d2t, t2d = chat_states
    data = write_random_states(tmp_path / "hs", tiny_llama, [41] * 24, random_masks=True)
    common = ["--total-seq-len", 40, "--noise", 0.05, "--val-fraction", 0.25, "--epochs", 2]
    common += ["--checkpoint-every", 2, "--precision", "fp32", "--nproc-per-node", 2]

    def command(name):
        args = train_args(tiny_llama, data, d2t, t2d, tmp_path / name, *common)
        return [
            sys.executable,
            "-m",
            "speculators.cli",
            "train",
            *launch.to_argv(train_parser(), args),
        ]

    full = subprocess.run(command("full"), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-5000:]

    # SIGKILL torchrun and both workers as soon as the first checkpoint is in place.
    state = tmp_path / "killed" / "work" / "checkpoint" / "train_state.pt"
    kill_once_exists(command("killed"), state)
    assert state.exists() and not (tmp_path / "killed" / "draft").exists()

    rerun = subprocess.run(command("killed"), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    resumed_at = [ln for ln in rerun.stderr.splitlines() if "resumed from" in ln]
    assert resumed_at and not resumed_at[0].endswith("at step 0"), rerun.stderr[-3000:]

    drop = ("tokens_per_s",)
    a = records(tmp_path / "full" / "draft" / "metrics.jsonl")
    b = records(tmp_path / "killed" / "draft" / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k not in drop} for r in b] == [
        {k: v for k, v in r.items() if k not in drop} for r in a
    ]
    wa = torch.load(tmp_path / "full" / "work" / "best_model.pt", weights_only=True)
    wb = torch.load(tmp_path / "killed" / "work" / "best_model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ranks_that_see_other_input_stamps_still_take_rank_0s_resume_decision(tmp_path):
    import socket

    import torch.multiprocessing as mp
    from train_fixtures import checkpoint_resume_worker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Rank 1's node sees another mtime of the same target file: its fingerprint differs.
    fingerprints = [{"input_files": "aaaa"}, {"input_files": "bbbb"}]
    mp.spawn(checkpoint_resume_worker, nprocs=2, join=True,
             args=(2, str(tmp_path / "work"), port, fingerprints, str(tmp_path)))  # fmt: skip
    progress = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert progress == [{"global_step": 5}] * 2  # both resumed, as rank 0 decided


def test_checkpoint_of_other_settings_is_set_aside_not_resumed(
    tiny_llama, chat_states, tmp_path, caplog
):
    data, d2t, t2d = chat_states
    trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path, "--epochs", 1))
    first = records(tmp_path / "draft" / "metrics.jsonl")
    caplog.set_level("WARNING")
    trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path, "--epochs", 1, "--lr", 2e-3))
    # Not resumed: the warning names the checkpoint and the difference, the old one is kept.
    assert "not resuming" in caplog.text and "lr: 0.001 -> 0.002" in caplog.text
    assert (tmp_path / "work" / "checkpoint.stale" / "train_state.pt").is_file()
    second = records(tmp_path / "draft" / "metrics.jsonl")
    assert [r["step"] for r in second] == [r["step"] for r in first]  # started from step 1
    assert second[0]["lr"] == pytest.approx(2e-3)


def test_recaptured_states_of_the_same_lengths_retrain_not_republish(
    tiny_llama, chat_states, tmp_path, caplog
):
    _, d2t, t2d = chat_states
    data = write_random_states(tmp_path / "hs", tiny_llama, [30] * 6, seed=0)
    args = train_args(tiny_llama, data, d2t, t2d, tmp_path, "--epochs", 1)
    trainer.run(args)
    first = (tmp_path / "draft" / "model.safetensors").read_bytes()
    # Captured again into the same folder (e.g. another dtype): new values, the same lengths.
    shutil.rmtree(data)
    write_random_states(tmp_path / "hs", tiny_llama, [30] * 6, seed=1)
    caplog.set_level("INFO")
    trainer.run(args)
    assert "not resuming" in caplog.text and "input_files:" in caplog.text
    assert "resumed from" not in caplog.text
    assert (tmp_path / "draft" / "model.safetensors").read_bytes() != first


def test_published_verifier_is_an_absolute_path_with_the_top_level_architectures(
    tiny_llama, chat_states, tmp_path, monkeypatch
):
    data, d2t, t2d = chat_states
    target = tmp_path / "models" / "mm"
    shutil.copytree(tiny_llama, target)
    cfg = json.loads((target / "config.json").read_text())
    # A multimodal-style config: the text part nested, the architectures only at the top.
    nested = {"architectures": ["TinyVisionForConditionalGeneration"], "text_config": cfg}
    nested["text_config"].pop("architectures")
    (target / "config.json").write_text(json.dumps(nested))
    monkeypatch.chdir(tmp_path)
    trainer.run(train_args(Path("models/mm"), data, d2t, t2d, tmp_path, "--epochs", 1))
    verifier = json.loads((tmp_path / "draft" / "config.json").read_text())["speculators_config"][
        "verifier"
    ]
    assert verifier["name_or_path"] == str(target.resolve())
    assert verifier["architectures"] == ["TinyVisionForConditionalGeneration"]


def test_hub_target_downloads_only_the_shards_the_draft_reads(tiny_llama, tmp_path, monkeypatch):
    import fnmatch

    import huggingface_hub
    from transformers import AutoModelForCausalLM

    from speculators.models.io import read_target_weights

    hub = tmp_path / "hub"  # what the Hub serves for "org/tiny"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(hub, max_shard_size="100KB")
    weight_map = json.loads((hub / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 3
    fetched = set()

    def snapshot_download(repo_id, allow_patterns):
        assert repo_id == "org/tiny"
        local = tmp_path / "cache"
        for f in hub.iterdir():
            if any(fnmatch.fnmatch(f.name, pat) for pat in allow_patterns):
                local.mkdir(exist_ok=True)
                shutil.copy(f, local / f.name)
                fetched.add(f.name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder = trainer.resolve_target("org/tiny")
    wanted = {weight_map[n] for n in ("model.embed_tokens.weight", "model.norm.weight",
                                      "lm_head.weight")}  # fmt: skip
    assert {f for f in fetched if f.endswith(".safetensors")} == wanted
    cfg = json.loads((hub / "config.json").read_text())
    w = read_target_weights(folder, cfg["vocab_size"], cfg["hidden_size"])
    assert w["lm_head"].shape == (cfg["vocab_size"], cfg["hidden_size"])


def test_input_stamps_cover_only_the_files_the_draft_reads(tiny_llama, chat_states, tmp_path):
    import os

    from transformers import AutoModelForCausalLM

    data = chat_states[0]
    target = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(target, max_shard_size="100KB")
    weight_map = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    read = {weight_map[n] for n in ("model.embed_tokens.weight", "model.norm.weight",
                                    "lm_head.weight")}  # fmt: skip
    other = sorted(set(weight_map.values()) - read)[0]
    stamps = trainer.input_file_stamps(target, [data])
    names = {s[0] for s in stamps}
    assert names == {"data[0]/data_config.json", "target/config.json",
                     "target/model.safetensors.index.json"} | {f"target/{f}" for f in read}  # fmt: skip
    os.utime(target / other, ns=(1, 1))  # a layer shard the draft never reads: no change
    assert trainer.input_file_stamps(target, [data]) == stamps
    os.utime(target / sorted(read)[0], ns=(1, 1))  # the embedding's or head's shard: a change
    assert trainer.input_file_stamps(target, [data]) != stamps


def test_hidden_states_of_another_width_are_refused(tiny_llama, chat_states, tmp_path):
    _, d2t, t2d = chat_states
    data = write_random_states(tmp_path / "hs", tiny_llama, [20, 30], hidden_size=64)
    with pytest.raises(SpeculatorsError, match=r"data_config.json: hidden_size 64 != .* 128"):
        trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path))


def test_sample_file_that_disagrees_with_data_config_is_named(tiny_llama, chat_states, tmp_path):
    _, d2t, t2d = chat_states
    data = write_random_states(tmp_path / "hs", tiny_llama, [20, 30, 25, 22])
    bad = write_random_states(tmp_path / "other", tiny_llama, [20], layer_ids=(2, 4))
    (bad / "data_0.pt").replace(data / "data_2.pt")  # 2 states where 4 are expected
    # Opening the data already sees the size differ from manifest.json ...
    with pytest.raises(SpeculatorsError, match=r"data_2.pt: \d+ bytes but manifest.json says"):
        trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path, "--val-fraction", 0))
    # ... and loading it (a folder captured before manifests) names what is wrong inside.
    from speculators.train.data import SampleRef, load_sample

    with pytest.raises(SpeculatorsError, match=r"data_2.pt: 2 hidden-state tensors"):
        load_sample(SampleRef(data / "data_2.pt", 24), num_states=4, hidden_size=128)


def test_a_folder_given_twice_is_refused(tiny_llama, chat_states, tmp_path):
    """`--data hs ./hs/` would put copies of training samples into validation."""
    _, d2t, t2d = chat_states
    data = write_random_states(tmp_path / "hs", tiny_llama, [20, 30])
    (tmp_path / "link").symlink_to(data)
    for again in (Path(f"{data}/"), data / ".." / "hs", tmp_path / "link"):
        with pytest.raises(SpeculatorsError, match="given twice in --data") as e:
            trainer.run(train_args(tiny_llama, [data, again], d2t, t2d, tmp_path))
        assert str(e.value).startswith(str(again))


def test_missing_manifest_is_an_error_unless_the_folder_predates_manifests(
    tiny_llama, chat_states, tmp_path, caplog
):
    from speculators.hidden_states.store import SampleStore

    cfg = json.loads((tiny_llama / "config.json").read_text())
    fp8 = SampleStore(tmp_path / "fp8", hidden_size=cfg["hidden_size"], layer_ids=[1, 2, 3, 4],
                      dtype=torch.float8_e4m3fn)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    fp8.write(0, torch.arange(9), [torch.randn(9, cfg["hidden_size"], generator=g)] * 4,
              torch.ones(9, dtype=torch.long))  # fmt: skip
    fp8.finish(1, target=str(tiny_llama), vocab_size=cfg["vocab_size"],
               num_hidden_layers=cfg["num_hidden_layers"], prepared="fixture", sample_lengths=[9],
               num_loss_tokens=9, backend="transformers", device="cpu")  # fmt: skip
    bf16 = write_random_states(tmp_path / "bf16", tiny_llama, [20, 30])
    for folder in (fp8.output_dir, bf16):
        (folder / "manifest.json").unlink()
    dims = {k: cfg[k] for k in ("hidden_size", "vocab_size")} | {"num_layers": 4}
    for hashes in (False, True):
        with pytest.raises(
            SpeculatorsError, match=r"fp8: no manifest.json, but this format_version 2"
        ):
            HiddenStatesData.open([fp8.output_dir], verify_hashes=hashes, **dims)
    # A format-1 folder whose data_config.json records a manifest lost it: an error too ...
    with pytest.raises(SpeculatorsError, match=r"bf16: no manifest.json, but data_config.json"):
        HiddenStatesData.open([bf16], **dims)
    # ... one captured before manifests existed (no record) is trained on with a warning.
    data_config = json.loads((bf16 / "data_config.json").read_text())
    data_config.pop("manifest")
    (bf16 / "data_config.json").write_text(json.dumps(data_config))
    caplog.clear()
    HiddenStatesData.open([bf16], verify_hashes=True, **dims)
    assert (
        "bf16: no manifest.json (captured by an older version): sizes and sha256 not checked"
        in caplog.text
    )


def test_vocab_mapping_of_another_vocab_size_is_refused(tiny_llama, chat_states, tmp_path):
    data, _, _ = chat_states
    d2t, t2d = write_vocab(tmp_path / "vocab", 500, DRAFT_VOCAB)
    with pytest.raises(SpeculatorsError, match=r"t2d.npy: 500 entries != the target's vocab"):
        trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path))


def test_all_masked_dataset_is_refused(tiny_llama, chat_states, tmp_path):
    _, d2t, t2d = chat_states
    data = write_random_states(tmp_path / "hs", tiny_llama, [20, 30], masked=False)
    with pytest.raises(SpeculatorsError, match="no supervised tokens"):
        trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path))


def test_empty_dataset_is_refused(tiny_llama, chat_states, tmp_path):
    _, d2t, t2d = chat_states
    data = write_random_states(tmp_path / "hs", tiny_llama, [])
    with pytest.raises(SpeculatorsError, match="no samples"):
        trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path))


def _poison(folder, idx):
    """A NaN in sample `idx`, file size unchanged (the capture itself refuses NaN; this is a
    file damaged afterwards, which only the sha256 in manifest.json would notice)."""
    path = folder / f"data_{idx}.pt"
    sample = torch.load(path, weights_only=True)
    sample["hidden_states"][0][3, 5] = float("nan")
    with open(path, "wb") as f:  # a file object, as the store writes: same archive name
        torch.save(sample, f)


def test_nan_batch_is_skipped_counted_and_its_file_named(tiny_llama, chat_states, tmp_path, caplog):
    _, d2t, t2d = chat_states
    data = write_random_states(tmp_path / "hs", tiny_llama, [40] * 8)
    _poison(data, 0)
    # One sample per step (budget 40), no validation: the poisoned step is skipped each epoch.
    args = train_args(tiny_llama, data, d2t, t2d, tmp_path, "--val-fraction", 0,
                      "--total-seq-len", 40, "--epochs", 2)  # fmt: skip
    caplog.set_level("WARNING")
    trainer.run(args)
    summary = json.loads((tmp_path / "draft" / "train_summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["steps"] == 16
    named = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(named) == 2 and all(str(data / "data_0.pt") in m for m in named), named
    assert "data_1.pt" not in caplog.text


def test_nan_validation_is_never_the_best_epoch(tiny_llama, chat_states, tmp_path, caplog,
                                                monkeypatch):  # fmt: skip
    _, d2t, t2d = chat_states
    data = write_random_states(tmp_path / "hs", tiny_llama, [40] * 8)
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    opened = HiddenStatesData.open([data], hidden_size=128, vocab_size=vocab, num_layers=4)
    for i in opened.split(0.25, 0)[1]:  # every validation sample
        _poison(data, i)
    args = train_args(tiny_llama, data, d2t, t2d, tmp_path / "a", "--val-fraction", 0.25,
                      "--epochs", 2)  # fmt: skip
    caplog.set_level("WARNING")
    trainer.run(args)
    assert caplog.text.count("cannot be the best") == 2
    assert str(opened.samples[opened.split(0.25, 0)[1][0]].path) in caplog.text  # named
    summary = json.loads((tmp_path / "a" / "draft" / "train_summary.json").read_text())
    assert summary["best_epoch"] is None and summary["best_val_loss"] is None  # the last, said so
    assert "publishing the last weights" in caplog.text

    # A later epoch that diverges (NaN validation) must not replace an earlier good best.
    real = trainer.evaluate
    clean = write_random_states(tmp_path / "hs2", tiny_llama, [40] * 8)
    calls = []

    def evaluate(model, loader, bins, a, env):
        calls.append(1)
        if len(calls) == 1:
            return real(model, loader, bins, a, env)
        return {"loss": math.nan, "left_out_batches": 1}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    trainer.run(train_args(tiny_llama, clean, d2t, t2d, tmp_path / "b", "--val-fraction", 0.25,
                           "--epochs", 2))  # fmt: skip
    summary = json.loads((tmp_path / "b" / "draft" / "train_summary.json").read_text())
    assert len(calls) == 2 and summary["best_epoch"] == 0
    assert math.isfinite(summary["best_val_loss"])


def test_training_stops_when_every_step_is_nan(tiny_llama, chat_states, tmp_path):
    _, d2t, t2d = chat_states
    data = write_random_states(tmp_path / "hs", tiny_llama, [40] * 6)
    for i in range(6):
        _poison(data, i)
    args = train_args(tiny_llama, data, d2t, t2d, tmp_path, "--val-fraction", 0,
                      "--total-seq-len", 40, "--epochs", 3)  # fmt: skip
    with pytest.raises(SpeculatorsError, match="10 steps in a row had NaN/inf"):
        trainer.run(args)
    assert not (tmp_path / "draft").exists()


def test_cli_defaults_match_the_config_schema():
    from speculators.config import load_schema

    schema = load_schema()["$defs"]["run"]["properties"]["train"]["properties"]
    args = parse("--target", "t", "--data", "d", "--d2t", "a", "--t2d", "b", "--output", "o",
                 "--work-dir", "w")  # fmt: skip
    for key, spec in schema.items():
        if key in ("gpus", "nodes", "mem_gb"):  # --nproc-per-node / --nnodes; a job resource
            continue
        assert getattr(args, key) == spec["default"], key


def test_train_rule_passes_every_train_key_to_the_command(tmp_path):
    import shlex

    import yaml
    from conftest import run_snakemake

    train = {
        "num_layers": 2, "ttt_steps": 4, "ttt_step_loss_decay": 0.8, "epochs": 7, "lr": 5e-4,
        "weight_decay": 0.1, "scheduler": "cosine", "warmup_fraction": 0.05, "grad_clip": 0.5,
        "total_seq_len": 4096, "noise": 0.1, "val_fraction": 0.2, "norm_before_residual": False,
        "norm_before_fc": True, "intermediate_size": 1024, "checkpoint_every": 50, "seed": 3,
        "loggers": ["tensorboard", "wandb"], "gpus": 2, "nodes": 1, "mem_gb": 40,
        "save_embeddings": False, "select_best_by": "loss",
    }  # fmt: skip
    cfg = {
        "models": {"m": {"path": "org/some-model"}},
        "datasets": {"a": {"source": "sharegpt"}, "b": {"source": "ultrachat"}},
        "runs": {"r": {"target": "m", "datasets": {"a": {}, "b": {}}, "train": train,
                       "vocab": {"draft_vocab_size": 500}}},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(tmp_path, "-n", "-p", "results/r/draft", configfile=tmp_path / "c.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = (proc.stdout + proc.stderr).splitlines()
    line = next(ln for ln in out if "speculators train" in ln)
    line = line[line.index("speculators train") :]
    command, log = line.split(" > ")
    assert log.startswith("logs/train/draft/r.log")
    args = parse(*shlex.split(command)[2:])
    for key, value in train.items():
        if key == "gpus":
            assert args.nproc_per_node == 2
        elif key == "nodes":
            assert args.nnodes == 1
        elif key == "mem_gb":  # the job's memory, not an option of the command
            assert any("mem_mb=40000" in ln for ln in out), out
        else:
            assert getattr(args, key) == value, key
    assert args.data == ["results/r/hidden_states/a", "results/r/hidden_states/b"]
    assert str(args.d2t) == "results/r/vocab/500/d2t.npy"
    assert str(args.output) == "results/r/draft"
    assert str(args.work_dir) == "results/r/train_work"


def test_relaunch_argv_parses_back_to_the_same_options():
    args = parse("--target", "t", "--data", "a", "b", "--d2t", "x", "--t2d", "y", "--output", "o",
                 "--work-dir", "w", "--no-norm-before-residual", "--loggers",
                 "--intermediate-size", 99, "--nproc-per-node", 4)  # fmt: skip
    again = train_parser().parse_args(launch.to_argv(train_parser(), args))
    assert vars(again) == {k: v for k, v in vars(args).items() if k not in ("stage", "verbose")}
    assert again.loggers == [] and again.norm_before_residual is False


def test_launch_command_single_node_and_slurm_multi_node(monkeypatch):
    args = parse("--target", "t", "--data", "a", "--d2t", "x", "--t2d", "y", "--output", "o",
                 "--work-dir", "w", "--nproc-per-node", 8)  # fmt: skip
    cmd = launch.launch_command(args, ["--epochs", "1"])
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert cmd[4:6] == ["--nproc-per-node", "8"]
    assert cmd[-5:] == ["-m", "speculators.cli", "train", "--epochs", "1"]

    args.nnodes = 2
    monkeypatch.setattr(launch, "slurm_nodes", lambda: ["node01"])  # one node only
    with pytest.raises(SpeculatorsError, match="--nnodes"):
        launch.launch_command(args, [])
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setattr(launch, "slurm_nodes", lambda: ["node01", "node02"])
    cmd = launch.launch_command(args, [])
    assert cmd[:2] == ["srun", "--ntasks-per-node=1"]
    i = cmd.index("--rdzv-endpoint")
    assert cmd[i + 1] == "node01:29500" and "--standalone" not in cmd
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--rdzv-id") + 1] == "77"


def test_offline_layer_ids_other_than_the_captured_ones_are_refused(
    tiny_llama, chat_states, tmp_path
):
    """--layer-ids applies online; offline the folders' ids are the draft's, so other ids are
    one line rather than silently ignored (the same ids pass)."""
    data, d2t, t2d = chat_states
    with pytest.raises(
        SpeculatorsError, match=r"--layer-ids.*\[0, 1, 2, 4\] differ from .*\[1, 2, 3, 4\]"
    ):
        trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path, "--layer-ids", 0, 1, 2, 4))
    assert not (tmp_path / "draft").exists()
    trainer.run(train_args(tiny_llama, data, d2t, t2d, tmp_path, "--layer-ids", 1, 2, 3, 4,
                           "--epochs", 1))  # fmt: skip
    assert (tmp_path / "draft" / "config.json").is_file()
