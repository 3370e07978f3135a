"""Hidden-state capture (transformers backend): the states are the right ones, stored compactly.

References come from transformers' own `output_hidden_states` and the model's logits, on tiny
random targets whose norm weights are randomised so that pre- and post-norm states differ.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from fixtures import build_target
from hypothesis import given, settings
from hypothesis import strategies as st

from speculators.cli import main
from speculators.hidden_states import store as store_mod
from speculators.hidden_states.capture import plan_batches
from speculators.vllm import vllm_importable

LAYER_IDS = [1, 2, 3, 4]  # the fixture targets have 4 layers; the default ids collide there


def _randomise_norms(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def target(request, tmp_path_factory) -> Path:
    return _randomise_norms(build_target(tmp_path_factory.mktemp(request.param), request.param))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _randomise_norms(build_target(tmp_path_factory.mktemp("llama"), "llama"))


def make_prepared(path: Path, lengths, vocab_size: int = 500, seed: int = 0) -> Path:
    """A prepared dataset folder with the prepare stage's columns and random rows."""
    import datasets

    rng = random.Random(seed)
    rows = {"input_ids": [], "loss_mask": [], "seq_len": [], "row_id": [], "turn": []}
    for i, n in enumerate(lengths):
        rows["input_ids"].append([rng.randrange(10, vocab_size) for _ in range(n)])
        rows["loss_mask"].append([rng.randint(0, 1) for _ in range(n)])
        rows["seq_len"].append(n)
        rows["row_id"].append(str(i))
        rows["turn"].append(0)
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


LENGTHS = [17, 5, 33, 17, 9, 40, 2, 25]


def capture(target, prepared, out, *extra) -> int:
    return main(
        [
            "hidden-states",
            "--target",
            str(target),
            "--prepared",
            str(prepared),
            "--output",
            str(out),
        ]
        + ["--layer-ids", *map(str, LAYER_IDS), *extra]
    )


def load(out: Path, idx: int) -> dict:
    return torch.load(out / f"data_{idx}.pt", weights_only=True)


def prepared_rows(prepared: Path):
    import datasets

    return datasets.load_from_disk(str(prepared))


def test_states_equal_transformers_reference(target, tmp_path):
    from transformers import AutoModelForCausalLM

    prepared = make_prepared(tmp_path / "prep", LENGTHS)
    out = tmp_path / "hs"
    assert capture(target, prepared, out, "--dtype", "float32", "--batch-tokens", "100") == 0
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    rows = prepared_rows(prepared)
    for idx in range(len(LENGTHS)):
        sample = load(out, idx)
        ids = torch.tensor(rows[idx]["input_ids"])
        with torch.no_grad():
            ref = model(ids[None], output_hidden_states=True)
        # transformers' hidden_states[i] (i < L) is the input of layer i; [L] is after the norm.
        for pos, layer_id in enumerate(LAYER_IDS[:-1]):
            torch.testing.assert_close(sample["hidden_states"][pos], ref.hidden_states[layer_id][0])
        last = sample["hidden_states"][-1]
        assert not torch.allclose(last, ref.hidden_states[-1][0], atol=1e-3), (
            "stored after the norm"
        )
        with torch.no_grad():
            torch.testing.assert_close(model.model.norm(last), ref.hidden_states[-1][0])
            # The trainer's targets: final norm + LM head on the stored last layer.
            torch.testing.assert_close(model.lm_head(model.model.norm(last)), ref.logits[0])


def test_batched_equals_one_at_a_time_and_padding_is_never_stored(llama, tmp_path):
    prepared = make_prepared(tmp_path / "prep", LENGTHS)
    assert plan_batches(LENGTHS, 1000) == [[5, 2, 7, 0, 3, 4, 1, 6]]  # one padded batch
    batched, single = tmp_path / "batched", tmp_path / "single"
    assert capture(llama, prepared, batched, "--dtype", "float32", "--batch-tokens", "1000") == 0
    assert capture(llama, prepared, single, "--dtype", "float32", "--batch-tokens", "1") == 0
    rows = prepared_rows(prepared)
    for idx, n in enumerate(LENGTHS):
        a, b = load(batched, idx), load(single, idx)
        assert a["input_ids"].tolist() == rows[idx]["input_ids"]
        assert a["loss_mask"].tolist() == rows[idx]["loss_mask"]
        assert [tuple(h.shape) for h in a["hidden_states"]] == [(n, 128)] * len(LAYER_IDS)
        for x, y in zip(a["hidden_states"], b["hidden_states"]):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    config = json.loads((batched / "data_config.json").read_text())
    assert config["data"]["sample_lengths"] == LENGTHS
    assert config["data"]["total_tokens"] == sum(LENGTHS)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=60), st.integers(1, 1000))
def test_batch_plan_covers_every_row_once_within_the_token_budget(lengths, batch_tokens):
    plan = plan_batches(lengths, batch_tokens)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    order = [i for batch in plan for i in batch]
    assert order == sorted(order, key=lambda i: (-lengths[i], i))  # longest first, then by index
    for batch in plan:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= batch_tokens or len(batch) == 1  # a row longer than the budget runs alone


def test_files_hold_no_wasted_bytes_and_default_dtype_is_bfloat16(llama, tmp_path):
    prepared = make_prepared(tmp_path / "prep", LENGTHS)
    out = tmp_path / "hs"
    assert capture(llama, prepared, out, "--batch-tokens", "1000") == 0
    for idx, n in enumerate(LENGTHS):
        sample = load(out, idx)
        tensors = [sample["input_ids"], sample["loss_mask"], *sample["hidden_states"]]
        assert all(h.dtype == torch.bfloat16 for h in sample["hidden_states"])
        for t in tensors:
            assert t.is_contiguous()
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        floor = len(LAYER_IDS) * n * 128 * 2 + 2 * n * 8
        # A fixed few KiB of zip/pickle framing per file, nothing proportional to padding.
        assert floor <= (out / f"data_{idx}.pt").stat().st_size <= floor + 3000
    config = json.loads((out / "data_config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["layer_ids"] == LAYER_IDS and config["aux_layer_ids"] == LAYER_IDS[:-1]
    assert config["target"] == {
        "path": str(llama),
        "hidden_size": 128,
        "vocab_size": config["target"]["vocab_size"],
        "num_hidden_layers": 4,
    }
    assert config["format"]["file_pattern"] == "data_{idx}.pt"


class Killed(Exception):
    pass


def test_killed_run_resumes_to_byte_identical_files(llama, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    prepared = make_prepared(tmp_path / "prep", LENGTHS)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = ("--batch-tokens", "60")  # several batches: the kill lands mid-run
    assert capture(llama, prepared, whole, *args) == 0

    real_write = store_mod.SampleStore.write
    calls = []

    def dying_write(self, idx, *a, **k):
        if len(calls) == 4:
            raise Killed
        calls.append(idx)
        return real_write(self, idx, *a, **k)

    monkeypatch.setattr(store_mod.SampleStore, "write", dying_write)
    with pytest.raises(Killed):
        capture(llama, prepared, resumed, *args)
    monkeypatch.undo()
    assert not (resumed / "data_config.json").exists()
    written = sorted(int(p.stem[5:]) for p in resumed.glob("data_*.pt"))
    assert written == sorted(calls) and len(written) == 4
    assert not list(resumed.glob(".*tmp"))  # no half-written file left behind
    # A corrupt survivor (truncated, as by a crash outside the atomic rename) is regenerated.
    broken = resumed / f"data_{written[0]}.pt"
    broken.write_bytes(broken.read_bytes()[:100])

    assert capture(llama, prepared, resumed, *args) == 0
    assert f"data_{written[0]}.pt: unreadable" in caplog.text
    assert f"{len(written) - 1} of {len(LENGTHS)} samples already valid" in caplog.text
    for idx in range(len(LENGTHS)):
        name = f"data_{idx}.pt"
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
    a = json.loads((whole / "data_config.json").read_text())
    b = json.loads((resumed / "data_config.json").read_text())
    for key in ("created_at", "command"):
        a.pop(key), b.pop(key)
    a["data"].pop("prepared"), b["data"].pop("prepared")
    # The truncated survivor is counted; everything else is the same.
    assert (a["integrity"].pop("broken_on_resume"), b["integrity"].pop("broken_on_resume")) == (
        0,
        1,
    )
    assert a == b


def test_rerun_with_other_layer_ids_regenerates_everything(llama, tmp_path, caplog):
    prepared = make_prepared(tmp_path / "prep", LENGTHS[:3])
    out = tmp_path / "hs"
    assert capture(llama, prepared, out) == 0
    before = load(out, 0)["hidden_states"][0]
    assert (
        main(
            [
                "hidden-states",
                "--target",
                str(llama),
                "--prepared",
                str(prepared),
                "--output",
                str(out),
            ]
            + ["--layer-ids", "0", "3", "4"]
        )
        == 0
    )
    assert "regenerating all" in caplog.text
    after = load(out, 0)["hidden_states"]
    assert len(after) == 3 and not torch.equal(after[0], before)


def test_changed_prepared_row_and_extra_samples_are_handled(llama, tmp_path, caplog):
    out = tmp_path / "hs"
    assert capture(llama, make_prepared(tmp_path / "a", LENGTHS[:4]), out) == 0
    # Same lengths, other tokens for every row, and one row fewer.
    assert capture(llama, make_prepared(tmp_path / "b", LENGTHS[:3], seed=7), out) == 0
    assert "input_ids differ from the prepared row" in caplog.text
    assert sorted(p.name for p in out.glob("data_*.pt")) == ["data_0.pt", "data_1.pt", "data_2.pt"]
    assert load(out, 0)["input_ids"].tolist() == prepared_rows(tmp_path / "b")[0]["input_ids"]


# -- bad input: one line, exit status 1, nothing that looks complete ----------------------------


def _error(capsys, run) -> str:
    """Run `run()`: it must fail with exit status 1 and one error line (no traceback)."""
    capsys.readouterr()
    assert run() == 1
    err = capsys.readouterr().err
    errors = [
        line for line in err.splitlines() if line.startswith("speculators hidden-states: error:")
    ]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_missing_prepared_dir_is_one_line_error(llama, tmp_path, capsys):
    error = _error(capsys, lambda: capture(llama, tmp_path / "nope", tmp_path / "hs"))
    assert "nope: not a prepared dataset folder" in error
    assert not (tmp_path / "hs").exists()


@pytest.mark.parametrize(
    "layer_ids, problem",
    [
        (["1", "5"], "[5] out of range"),
        (["2", "2", "4"], "not distinct"),
        (["1", "2", "3"], "the last id must be 4"),
        (["3", "1", "4"], "in ascending order"),
        (None, "[2, 2, 1, 4] (the default for a 4-layer target) are not distinct"),
    ],
)
def test_bad_layer_ids(llama, tmp_path, capsys, layer_ids, problem):
    prepared = make_prepared(tmp_path / "prep", [4])
    argv = ["hidden-states", "--target", str(llama), "--prepared", str(prepared)]
    argv += ["--output", str(tmp_path / "hs")] + (["--layer-ids", *layer_ids] if layer_ids else [])
    assert problem in _error(capsys, lambda: main(argv))


@pytest.mark.skipif(vllm_importable(), reason="this interpreter runs vLLM itself")
def test_vllm_backend_without_a_vllm_environment_is_one_line_error(llama, tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prep", [4])
    args = ("--backend", "vllm", "--vllm-python", str(tmp_path / "no-python"))
    error = _error(capsys, lambda: capture(llama, prepared, tmp_path / "hs", *args))
    assert "no vLLM environment was found" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU machine")
def test_gpu_request_not_met_is_one_line_error(llama, tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prep", [4])
    error = _error(capsys, lambda: capture(llama, prepared, tmp_path / "hs", "--gpus", "1"))
    assert "hidden_states.gpus: the job asked for 1 GPU(s) but sees 0" in error


def test_prepared_with_another_tokenizer_is_rejected(llama, tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prep", [30, 30], vocab_size=5000)
    error = _error(capsys, lambda: capture(llama, prepared, tmp_path / "hs"))
    assert "outside the target's vocabulary" in error


def test_writer_rejects_wrong_hidden_width(tmp_path):
    from speculators.errors import SpeculatorsError

    store = store_mod.SampleStore(tmp_path, hidden_size=128, layer_ids=[1, 4])
    ids, mask = torch.arange(3), torch.ones(3, dtype=torch.long)
    with pytest.raises(SpeculatorsError, match=r"\(3, 64\) != \(3, 128\)"):
        store.write(0, ids, [torch.zeros(3, 64)] * 2, mask)
    with pytest.raises(SpeculatorsError, match="1 hidden-state tensors"):
        store.write(0, ids, [torch.zeros(3, 128)], mask)
    assert not list(tmp_path.iterdir())


def test_wrong_width_file_on_resume_is_regenerated(llama, tmp_path, caplog):
    prepared = make_prepared(tmp_path / "prep", LENGTHS[:2])
    out = tmp_path / "hs"
    assert capture(llama, prepared, out) == 0
    sample = load(out, 1)
    sample["hidden_states"] = [h[:, :64].clone() for h in sample["hidden_states"]]
    torch.save(sample, out / "data_1.pt")
    assert capture(llama, prepared, out) == 0
    assert "data_1.pt: hidden state is not [5, 128]" in caplog.text
    assert load(out, 1)["hidden_states"][0].shape == (5, 128)


def test_full_disk_fails_clearly_and_keeps_complete_samples(llama, tmp_path, monkeypatch, capsys):
    import errno

    prepared = make_prepared(tmp_path / "prep", LENGTHS)
    out = tmp_path / "hs"
    real_save = torch.save
    saved = []

    def filling_save(obj, f, *a, **k):
        if len(saved) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(1)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling_save)
    error = _error(capsys, lambda: capture(llama, prepared, out, "--batch-tokens", "60"))
    assert "No space left on device" in error
    assert len(list(out.glob("data_*.pt"))) == 3
    assert not list(out.glob(".*tmp")) and not (out / "data_config.json").exists()
