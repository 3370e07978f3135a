"""fp8 hidden states end to end, and the integrity checks that catch silent corruption.

fp8 (float8_e4m3fn + one float32 scale per token and layer) must run through capture, train
and evaluate; zero, constant, non-finite, truncated and foreign-size states must each stop the
stage that meets them with one line naming the sample (and layer).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_hidden_states import LAYER_IDS, _error, capture, load, make_prepared

from speculators.cli import main
from speculators.errors import SpeculatorsError
from speculators.hidden_states import capture as capture_mod
from speculators.hidden_states import integrity
from speculators.hidden_states import store as store_mod

H = 128


def greedy_prepared(target: Path, path: Path, n: int = 6, new: int = 24) -> Path:
    """Rows whose supervised tokens are the target's own greedy continuation (fp32), as
    `regenerate` makes them: the fidelity probe must agree with them almost everywhere."""
    import datasets
    from train_fixtures import chat_tokens
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    rows = {"input_ids": [], "loss_mask": [], "seq_len": [], "row_id": [], "turn": []}
    for i, (ids, _) in enumerate(chat_tokens(target, n)):
        prompt = torch.tensor([ids[: 12 + 3 * i]])
        with torch.no_grad():
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                min_new_tokens=new, do_sample=False, pad_token_id=0,
            )[0].tolist()  # fmt: skip
        rows["input_ids"].append(out)
        rows["loss_mask"].append([0] * prompt.shape[1] + [1] * (len(out) - prompt.shape[1]))
        rows["seq_len"].append(len(out))
        rows["row_id"].append(str(i))
        rows["turn"].append(0)
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def greedy(tiny_llama, tmp_path_factory) -> Path:
    return greedy_prepared(tiny_llama, tmp_path_factory.mktemp("greedy") / "prep")


def config(out: Path) -> dict:
    return json.loads((out / "data_config.json").read_text())


# -- the fp8 format ----------------------------------------------------------------------------


def test_quantize_round_trip_error_and_zero_tokens():
    x = torch.randn(7, H) * torch.logspace(-3, 3, 7)[:, None]  # tokens of very different scales
    x[3] = 0
    q, scale = store_mod.quantize(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (7,) and scale[3] == 1.0
    back = store_mod.dequantize(q, scale)
    assert torch.equal(back[3], torch.zeros(H))
    rel = (back - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)
    assert rel[torch.arange(7) != 3].max() < 0.04  # e4m3: <= 2^-4 per element, ~2.5% RMS
    torch.testing.assert_close(back.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0)


def test_fp8_capture_half_the_bytes_close_states_and_format_recorded(tiny_llama, greedy, tmp_path):
    bf16, fp8, fp32 = tmp_path / "bf16", tmp_path / "fp8", tmp_path / "fp32"
    assert capture(tiny_llama, greedy, bf16) == 0
    assert capture(tiny_llama, greedy, fp32, "--dtype", "float32") == 0
    assert (
        capture(tiny_llama, greedy, fp8, "--dtype", "float8_e4m3fn", "--min-fidelity", "0.9") == 0
    )
    cfg = config(fp8)
    assert cfg["format_version"] == 2 and cfg["dtype"] == "float8_e4m3fn"
    assert cfg["format"]["schema"]["hidden_states_scale"]["shape"] == f"[{len(LAYER_IDS)}, seq_len]"
    assert config(bf16)["format_version"] == 1  # bf16 folders stay readable by older versions
    n_tok = cfg["data"]["total_tokens"]
    floor = n_tok * len(LAYER_IDS) * H * 2  # the bf16 floor of the states
    states_fp8 = n_tok * len(LAYER_IDS) * (H + 4)  # fp8 values + float32 scales
    size = {d.name: sum(p.stat().st_size for p in d.glob("data_*.pt")) for d in (bf16, fp8)}
    assert states_fp8 <= size["fp8"] - 16 * n_tok <= states_fp8 + 4500 * len(greedy_rows(greedy))
    assert states_fp8 / floor == (H + 4) / (2 * H)  # 0.516 at H 128, 0.501 at H 4096
    assert size["fp8"] < 0.56 * size["bf16"]  # + ids/masks + framing, the same in both
    for idx in range(len(greedy_rows(greedy))):
        raw, ref = load(fp8, idx), load(fp32, idx)
        assert all(t.dtype == torch.float8_e4m3fn for t in raw["hidden_states"])
        got = store_mod.sample_states(raw)
        for a, b in zip(got, ref["hidden_states"]):
            assert ((a - b).norm() / b.norm()) < 0.05
    probe = cfg["integrity"]["probe"]
    assert probe["next_token_agreement"] >= 0.9 and probe["supervised_positions"] > 100
    assert all(v["relative_error"] < 0.05 for v in probe["layers"].values())
    manifest = json.loads((fp8 / "manifest.json").read_text())
    assert cfg["manifest"]["total_bytes"] == size["fp8"]
    assert [e["bytes"] for e in manifest["samples"]] == [
        (fp8 / f"data_{i}.pt").stat().st_size for i in range(len(manifest["samples"]))
    ]


def greedy_rows(prepared: Path):
    import datasets

    return datasets.load_from_disk(str(prepared))


def test_reader_refuses_unknown_format_in_one_line(tiny_llama, tmp_path):
    out = tmp_path / "hs"
    prepared = make_prepared(tmp_path / "prep", [9, 5])
    assert capture(tiny_llama, prepared, out, "--dtype", "float8_e4m3fn") == 0
    cfg = config(out)
    # A reader of format 1 (every earlier version) checks format_version == 1: fp8 is refused.
    assert cfg["format_version"] != 1
    cfg["format_version"] = 3
    (out / "data_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpeculatorsError, match="format_version 3 is not one this reader knows"):
        store_mod.read_data_config(out)
    cfg["format_version"] = 1  # fp8 states declared as format 1: a contradiction, refused
    (out / "data_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpeculatorsError, match="does not match dtype float8_e4m3fn"):
        store_mod.read_data_config(out)


def test_fp8_resume_is_byte_identical_and_bf16_survivors_are_regenerated(
    tiny_llama, tmp_path, caplog
):
    prepared = make_prepared(tmp_path / "prep", [17, 5, 9])
    a, b = tmp_path / "a", tmp_path / "b"
    assert capture(tiny_llama, prepared, a, "--dtype", "float8_e4m3fn") == 0
    assert capture(tiny_llama, prepared, b, "--dtype", "float8_e4m3fn") == 0
    (b / "data_1.pt").unlink()
    assert capture(tiny_llama, prepared, b, "--dtype", "float8_e4m3fn") == 0
    for i in range(3):
        assert (a / f"data_{i}.pt").read_bytes() == (b / f"data_{i}.pt").read_bytes()
    assert capture(tiny_llama, prepared, b) == 0  # bf16 now: other settings, all regenerated
    assert "regenerating all" in caplog.text
    assert config(b)["format_version"] == 1


# -- fp8 capture -> train -> evaluate ------------------------------------------------------------


def test_fp8_capture_train_evaluate(tiny_llama, greedy, tmp_path, chat_jsonl):
    from collections import Counter

    hs = tmp_path / "hs"
    assert capture(tiny_llama, greedy, hs, "--dtype", "float8_e4m3fn") == 0
    counts = Counter()
    for row in greedy_rows(greedy):
        counts.update(t for t, m in zip(row["input_ids"], row["loss_mask"]) if m)
    torch.save(dict(counts), tmp_path / "token_freq.pt")
    vocab = tmp_path / "vocab"
    assert main(["vocab", "--token-freq", str(tmp_path / "token_freq.pt"), "--target",
                 str(tiny_llama), "--draft-vocab-size", "64", "--output-dir", str(vocab)]) == 0  # fmt: skip
    assert json.loads((vocab / "vocab.json").read_text())["draft_vocab_size"] == 64
    draft = tmp_path / "draft"
    argv = ["train", "--target", str(tiny_llama), "--data", str(hs), "--d2t", str(vocab / "d2t.npy"),
            "--t2d", str(vocab / "t2d.npy"), "--token-freq", str(tmp_path / "token_freq.pt"),
            "--verify-hashes", "--output", str(draft), "--work-dir", str(tmp_path / "work"),
            "--total-seq-len", "128", "--epochs", "2", "--lr", "1e-3", "--val-fraction", "0.2",
            "--loggers"]  # fmt: skip
    assert main(argv) == 0
    assert (draft / "model.safetensors").is_file()
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--target", str(tiny_llama), "--draft", str(draft), "--prompts",
                 str(chat_jsonl), "--num-prompts", "2", "--max-new-tokens", "8", "--k", "2",
                 "--output", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())["results"][0]
    assert result["greedy_mismatches"] == 0 and result["drafts"] > 0


# -- integrity: zero, constant, NaN, partial, truncated, foreign size ------------------------------


def _store(tmp_path, dtype=torch.bfloat16):
    return store_mod.SampleStore(tmp_path / "hs", hidden_size=H, layer_ids=[1, 2, 4], dtype=dtype)


def _states(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, H, generator=g) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda s: s[1].zero_(), "layer 2: all zero"),
        (lambda s: s[2].fill_(0.37), "layer 4: constant"),
        (lambda s: s[0].add_(0.5).mul_(1e-4).add_(3.0), "layer 1: constant"),  # near-constant
        (lambda s: s[1].__setitem__((2, 5), float("nan")), "layer 2: 1 non-finite values"),
        (lambda s: s[2].__setitem__((3, 0), float("inf")), "layer 4: 1 non-finite values"),
        (lambda s: s[2][4:].zero_(), "layer 4: 2 of 6 tokens have an all-zero state"),
    ],
)
def test_writer_refuses_degenerate_layers(tmp_path, dtype, corrupt, problem):
    store = _store(tmp_path, dtype)
    states = _states()
    corrupt(states)
    with pytest.raises(SpeculatorsError, match=problem) as e:
        store.write(3, torch.arange(6), states, torch.ones(6, dtype=torch.long))
    assert str(e.value).startswith(str(store.path(3)))  # names the sample
    assert not store.path(3).exists()


def test_all_zero_capture_stops_the_stage_in_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    """The vLLM hybrid-attention failure: the backend hands over all-zero states."""
    real = capture_mod.LayerCapture.__call__

    def zero_capture(self, input_ids, attention_mask):
        return [torch.zeros_like(s) for s in real(self, input_ids, attention_mask)]

    monkeypatch.setattr(capture_mod.LayerCapture, "__call__", zero_capture)
    prepared = make_prepared(tmp_path / "prep", [9, 5])
    out = tmp_path / "hs"
    error = _error(capsys, lambda: capture(tiny_llama, prepared, out, "--dtype", "float8_e4m3fn"))
    assert "data_0.pt: layer 1: all zero" in error
    assert not (out / "data_config.json").exists() and not list(out.glob("data_*.pt"))


def test_states_of_the_wrong_layer_fail_the_probe(tiny_llama, tmp_path, capsys, monkeypatch):
    """Plausible numbers from the wrong place (each layer gets the one before it): finite, not
    degenerate, but not what the target's own forward gives."""
    real = capture_mod.LayerCapture.__call__

    def shifted(self, input_ids, attention_mask):
        states = real(self, input_ids, attention_mask)
        return [states[0] * 3, *states[:-1]]

    prepared = make_prepared(tmp_path / "prep", [12, 9, 7])
    monkeypatch.setattr(capture_mod.LayerCapture, "__call__", shifted)
    out = tmp_path / "hs"
    capsys.readouterr()
    assert capture(tiny_llama, prepared, out, "--probe-rows", "0") == 0  # no probe: unnoticed
    monkeypatch.setattr(capture_mod.LayerCapture, "__call__", real)
    out2 = tmp_path / "hs2"
    monkeypatch.setattr(capture_mod.LayerCapture, "__call__", shifted)

    # The probe itself reruns LayerCapture: give it the real states.
    def probe_real(*a, **k):
        monkeypatch.setattr(capture_mod.LayerCapture, "__call__", real)
        return real_probe(*a, **k)

    real_probe = integrity.probe
    monkeypatch.setattr(integrity, "probe", probe_real)
    error = _error(capsys, lambda: capture(tiny_llama, prepared, out2))
    assert "stored states differ from the target's own forward" in error
    assert not (out2 / "data_config.json").exists()


def test_min_fidelity_fails_when_rows_are_not_the_targets_answers(tiny_llama, tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prep", [30, 20])  # random tokens: ~chance agreement
    error = _error(capsys, lambda: capture(tiny_llama, prepared, tmp_path / "hs",
                                           "--min-fidelity", "0.9"))  # fmt: skip
    assert "fidelity probe: LM head on the stored last layer predicts the next token at" in error
    assert "below hidden_states.min_fidelity 90.00%" in error


def test_rms_far_from_the_probe_names_sample_and_layer(tmp_path):
    entries = [{"tokens": 5, "layer_rms": [1.0, 2.0]}, {"tokens": 5, "layer_rms": [1.1, 40.0]}]
    probe = {"rows": 1, "next_token_agreement": None, "layers": {
        "1": {"rms": 1.0, "relative_error": 0.0}, "4": {"rms": 2.0, "relative_error": 0.0}}}  # fmt: skip
    with pytest.raises(SpeculatorsError, match=r"data_1.pt: layer 4: token RMS 40 is more than 8x"):
        integrity.check_folder(tmp_path, entries, [1, 4], probe=probe)
    entries[1]["layer_rms"][1] = 3.0
    summary = integrity.check_folder(tmp_path, entries, [1, 4], probe=probe)
    assert summary["checked_samples"] == 2 and summary["rms_reference"].endswith("probe")


@pytest.fixture
def finished(tiny_llama, tmp_path) -> Path:
    out = tmp_path / "hs"
    assert capture(tiny_llama, make_prepared(tmp_path / "prep", [17, 5, 9, 12]), out,
                   "--dtype", "float8_e4m3fn") == 0  # fmt: skip
    return out


def _train_open(folder, **kw):
    from speculators.train.data import HiddenStatesData

    cfg = config(folder)["target"]
    return HiddenStatesData.open([folder], hidden_size=cfg["hidden_size"],
                                 vocab_size=cfg["vocab_size"], num_layers=4, **kw)  # fmt: skip


def _verify_error(capsys, folder) -> str:
    capsys.readouterr()
    assert main(["verify", str(folder)]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(lines) == 1, lines
    return lines[0]


def test_verify_passes_a_clean_folder(finished, tmp_path):
    assert main(["verify", str(finished), "--output", str(tmp_path / "v.json")]) == 0
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["samples"] == 4 and result["problems"] == 0 and result["hashes_checked"]
    data = _train_open(finished, verify_hashes=True)
    assert data.dtypes == ("float8_e4m3fn",)


def test_truncated_sample_caught_by_verify_trainer_and_resume(finished, capsys, caplog, tiny_llama):
    path = finished / "data_2.pt"
    path.write_bytes(path.read_bytes()[:-100])
    assert "data_2.pt: " in _verify_error(capsys, finished)
    with pytest.raises(SpeculatorsError, match=r"data_2.pt: \d+ bytes but manifest.json says"):
        _train_open(finished)


def test_changed_content_of_the_same_size_caught_by_hash(finished, capsys):
    raw = load(finished, 1)
    raw["hidden_states_scale"] = raw["hidden_states_scale"] * 1.5  # same bytes, other states
    before = (finished / "data_1.pt").stat().st_size
    with open(finished / "data_1.pt", "wb") as f:
        torch.save(raw, f)
    assert (finished / "data_1.pt").stat().st_size == before
    assert "data_1.pt: sha256 differs from manifest.json" in _verify_error(capsys, finished)
    _train_open(finished)  # sizes agree: only the hash (on demand) sees it
    with pytest.raises(SpeculatorsError, match="data_1.pt: sha256 differs"):
        _train_open(finished, verify_hashes=True)


def test_foreign_size_states_caught_by_verify_and_trainer(finished, capsys):
    from speculators.train.data import load_sample

    raw = load(finished, 0)
    raw["hidden_states"] = [t[:, :64].contiguous() for t in raw["hidden_states"]]  # another H
    with open(finished / "data_0.pt", "wb") as f:
        torch.save(raw, f)
    assert re.search(r"data_0.pt: \d+ bytes, manifest.json says", _verify_error(capsys, finished))
    with pytest.raises(SpeculatorsError, match="bytes but manifest.json says"):
        _train_open(finished)
    # Even with a manifest that agrees (copied along with the file), the shape gives it away.
    manifest = json.loads((finished / "manifest.json").read_text())
    manifest["samples"][0]["bytes"] = (finished / "data_0.pt").stat().st_size
    _write_manifest(finished, manifest)
    assert "data_0.pt: hidden state is not [17, 128]" in _verify_error(capsys, finished)
    ref = type("Ref", (), {"path": finished / "data_0.pt", "length": 16})
    with pytest.raises(SpeculatorsError, match=r"hidden state \(17, 64\) != \(17, 128\)"):
        load_sample(ref, 4, 128)


def test_zero_layer_in_a_finished_folder_caught_by_verify_and_trainer(finished, capsys):
    from speculators.train.data import load_sample

    raw = load(finished, 3)
    raw["hidden_states"][2] = torch.zeros_like(raw["hidden_states"][2])
    with open(finished / "data_3.pt", "wb") as f:
        torch.save(raw, f)
    assert "data_3.pt: layer 3: all zero" in _verify_error(capsys, finished)
    ref = type("Ref", (), {"path": finished / "data_3.pt", "length": 11})
    with pytest.raises(SpeculatorsError, match="data_3.pt: layer 3: all zero"):
        load_sample(ref, 4, 128, LAYER_IDS)


def test_degenerate_survivor_is_regenerated_on_resume(tiny_llama, tmp_path, caplog):
    prepared = make_prepared(tmp_path / "prep", [9, 5])
    out = tmp_path / "hs"
    assert capture(tiny_llama, prepared, out) == 0
    raw = load(out, 0)
    raw["hidden_states"][1] = torch.full_like(raw["hidden_states"][1], 2.0)
    with open(out / "data_0.pt", "wb") as f:
        torch.save(raw, f)
    assert capture(tiny_llama, prepared, out) == 0
    assert "data_0.pt: layer 2: constant" in caplog.text and "regenerating it" in caplog.text
    assert config(out)["integrity"]["broken_on_resume"] == 1
    assert main(["verify", str(out)]) == 0


def test_vocab_of_other_data_is_refused(tiny_llama, tmp_path):
    from speculators.vocab import check_vocab_source

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({5: 3, 7: 1}, a)
    torch.save({5: 3, 9: 2}, b)
    out = tmp_path / "vocab"
    assert main(["vocab", "--token-freq", str(a), "--target", str(tiny_llama),
                 "--draft-vocab-size", "8", "--output-dir", str(out)]) == 0  # fmt: skip
    check_vocab_source(out, a)
    with pytest.raises(SpeculatorsError, match="vocab.json: built from token counts with sha256"):
        check_vocab_source(out, b)
    (out / "vocab.json").unlink()
    with pytest.raises(SpeculatorsError, match="this vocabulary's source is unknown"):
        check_vocab_source(out, a)


# -- review findings: unreadable files, malformed metadata, tampering the manifest agrees with ------


def _write_manifest(folder: Path, manifest: dict) -> None:
    """Rewrite manifest.json and the sha256 data_config.json records of it (as a thorough
    tamperer would), so that the checks behind the manifest's own hash are what is tested."""
    import hashlib

    text = json.dumps(manifest)
    (folder / "manifest.json").write_text(text)
    cfg = json.loads((folder / "data_config.json").read_text())
    cfg["manifest"]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (folder / "data_config.json").write_text(json.dumps(cfg))


def _rehash(folder: Path, idx: int) -> None:
    """Make manifest.json agree with the (changed) sample `idx`: only content checks can tell."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / f"data_{idx}.pt").read_bytes()
    manifest["samples"][idx].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    _write_manifest(folder, manifest)


def _resave(folder: Path, idx: int, change) -> None:
    raw = load(folder, idx)
    change(raw)
    with open(folder / f"data_{idx}.pt", "wb") as f:
        torch.save(raw, f)
    _rehash(folder, idx)


def _verify_sizes_only_error(capsys, folder) -> str:
    capsys.readouterr()
    assert main(["verify", str(folder), "--sizes-only"]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("rehash", [False, True])
def test_random_bytes_of_the_same_size_are_one_line_in_verify_and_trainer(finished, capsys, rehash):
    from speculators.train.data import SampleRef, load_sample

    path = finished / "data_1.pt"
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (path.stat().st_size,), dtype=torch.uint8, generator=g)
    path.write_bytes(noise.numpy().tobytes())
    if rehash:
        _rehash(finished, 1)
    error = _verify_error(capsys, finished)
    assert "data_1.pt: unreadable sample" in error
    assert ("sha256 differs from manifest.json" in error) is not rehash
    assert "data_1.pt: unreadable" in _verify_sizes_only_error(capsys, finished)
    with pytest.raises(SpeculatorsError, match="data_1.pt: unreadable sample") as e:
        load_sample(SampleRef(path, 4), 4, H, LAYER_IDS)  # train without --verify-hashes
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[]", "data_config.json: the top level is a list, not an object"),
        ('"x"', "data_config.json: the top level is a str, not an object"),
        (lambda c: c.pop("target"), "data_config.json: target is not an object"),
        (lambda c: c["data"].pop("sample_lengths"), "data.sample_lengths is not a list"),
        (lambda c: c.update(layer_ids="1,2"), "layer_ids is not a list of layer ids"),
        (lambda c: c.update(integrity=[]), "integrity is not an object"),
        (
            lambda c: c["integrity"].update(layer_token_rms={"1": 1.0}),
            "integrity.layer_token_rms is not one RMS per layer id [1, 2, 3, 4]",
        ),
    ],
)
def test_malformed_data_config_is_one_line_in_verify_and_trainer(finished, capsys, text, problem):
    from speculators.train.data import HiddenStatesData

    path = finished / "data_config.json"
    dims = config(finished)["target"]
    if callable(text):
        cfg = config(finished)
        text(cfg)
        text = json.dumps(cfg)
    path.write_text(text)
    assert problem in _verify_error(capsys, finished)
    with pytest.raises(SpeculatorsError, match=re.escape(problem)):
        HiddenStatesData.open([finished], hidden_size=dims["hidden_size"],
                              vocab_size=dims["vocab_size"], num_layers=4)  # fmt: skip


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda c: c.update(aux_layer_ids=[1]), "aux_layer_ids [1] != layer_ids[:-1] [1, 2, 3]"),
        (lambda c: c["data"].update(num_samples=3), "data.num_samples 3 != 4 sample_lengths"),
        (
            lambda c: c["manifest"].update(sha256=123),
            "manifest.sha256 is not a sha256 hex digest: 123",
        ),
    ],
)
def test_data_config_that_contradicts_itself_is_refused(finished, capsys, change, problem):
    cfg = config(finished)
    change(cfg)
    (finished / "data_config.json").write_text(json.dumps(cfg))
    assert problem in _verify_error(capsys, finished)
    with pytest.raises(SpeculatorsError, match=re.escape(problem)):
        _train_open(finished)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda m: m.update(num_samples=5), "num_samples 5 != the 4 samples of data_config.json"),
        (lambda m: m.update(algorithm="md5"), "algorithm 'md5' is not sha256"),
        (lambda m: m["samples"][2].update(file="../../etc/passwd"), "entry 2 is not data_2.pt"),
        (lambda m: m["samples"][1].update(bytes="12"), "entry 1 is not data_1.pt"),
    ],
)
def test_manifest_that_contradicts_itself_is_refused(finished, capsys, change, problem):
    manifest = json.loads((finished / "manifest.json").read_text())
    change(manifest)
    _write_manifest(finished, manifest)
    assert f"manifest.json: {problem}" in _verify_error(capsys, finished)
    with pytest.raises(SpeculatorsError, match=re.escape(problem)):
        _train_open(finished)


@pytest.mark.parametrize(
    "change, problem",
    [
        (
            lambda s: s["hidden_states_scale"].neg_(),
            "hidden_states_scale: 68 of 68 not finite and > 0",
        ),
        (lambda s: s["hidden_states_scale"][1, 3].fill_(0.0), "hidden_states_scale: 1 of 68"),
        (lambda s: s["hidden_states_scale"][0, 0].fill_(float("inf")), "hidden_states_scale: 1 of"),
        (lambda s: s["hidden_states_scale"][2, 0].fill_(float("nan")), "hidden_states_scale: 1 of"),
        (lambda s: s["loss_mask"].fill_(2), "loss_mask has values other than 0 and 1"),
        (lambda s: s["loss_mask"].__setitem__(0, -1), "loss_mask has values other than 0 and 1"),
        (lambda s: s["input_ids"].__setitem__(0, 10**6), "input_ids outside the target's vocab"),
        (lambda s: s["input_ids"].__setitem__(5, -1), "input_ids outside the target's vocab"),
    ],
)
def test_scales_and_masks_a_consistent_manifest_cannot_vouch_for(finished, capsys, change, problem):
    """A negated scale flips the sign of every state: finite, not degenerate, RMS unchanged."""
    from speculators.train.data import SampleRef, load_sample

    _resave(finished, 0, change)
    where = f"data_0.pt: {problem}"
    assert where in _verify_error(capsys, finished)
    assert where in _verify_sizes_only_error(capsys, finished)
    _train_open(finished, verify_hashes=True)  # the manifest agrees: only the content tells
    vocab = config(finished)["target"]["vocab_size"]
    with pytest.raises(SpeculatorsError, match=re.escape(where)):
        load_sample(SampleRef(finished / "data_0.pt", 16), 4, H, LAYER_IDS, vocab)


def test_manifest_replaced_after_capture_is_refused_by_its_recorded_hash(
    finished, tmp_path, capsys
):
    # Another capture's manifest of the same sample count, sizes and hashes rewritten to match
    # changed samples: self-consistent, but not the manifest data_config.json recorded.
    manifest = json.loads((finished / "manifest.json").read_text())
    manifest["samples"][0]["sha256"] = "0" * 64
    (finished / "manifest.json").write_text(json.dumps(manifest))
    line = _verify_error(capsys, finished)
    assert "manifest.json: sha256" in line and "that data_config.json recorded" in line
    with pytest.raises(SpeculatorsError, match="replaced or edited after the capture"):
        _train_open(finished)
    (finished / "manifest.json").unlink()
    with pytest.raises(SpeculatorsError, match="no manifest.json, but this format_version 2"):
        _train_open(finished)
    assert "manifest.json: missing, but data_config.json records one" in _verify_error(
        capsys, finished
    )


def test_stray_sample_files_fail_verify_and_are_named_by_the_trainer(finished, capsys, caplog):
    import shutil

    for name in ("data_4.pt", "data_17.pt"):
        shutil.copy(finished / "data_0.pt", finished / name)
    line = _verify_error(capsys, finished)
    assert "2 sample files not in 4-sample manifest.json: data_4.pt, data_17.pt" in line
    with caplog.at_level("WARNING"):
        data = _train_open(finished)
    assert [s.path.name for s in data.samples] == [f"data_{i}.pt" for i in range(4)]
    assert (
        "2 data_*.pt files not among the 4 samples of data_config.json are not read" in caplog.text
    )
