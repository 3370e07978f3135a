"""The one precision policy: every stage that runs the target or the draft computes in the dtype
`speculators.devices.compute_dtype` gives, and stored hidden states keep their own dtype."""

from __future__ import annotations

import shutil
import types
from pathlib import Path

import pytest
import torch
from test_hidden_states import LENGTHS, capture, load, make_prepared

from speculators import devices
from speculators.errors import SpeculatorsError


@pytest.fixture
def native(monkeypatch):
    """Force the CPU's bf16 verdict: native(False) is an AVX2-only CPU."""

    def force(value: bool) -> None:
        monkeypatch.setenv(devices.NATIVE_BF16_ENV, "1" if value else "0")
        devices.native_bf16.cache_clear()

    yield force
    devices.native_bf16.cache_clear()


@pytest.fixture(scope="module")
def bf16_target(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with its weights stored in bf16 (config dtype bfloat16), as real targets."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16-target")
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(out)
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def test_cpu_policy_follows_native_bf16_and_gpus_keep_the_stored_dtype(native):
    native(False)
    assert devices.compute_dtype("cpu", torch.bfloat16) == torch.float32
    assert devices.compute_dtype(torch.device("cpu")) == torch.float32
    native(True)
    assert devices.compute_dtype("cpu", torch.bfloat16) == torch.bfloat16
    assert devices.compute_dtype("cpu", torch.float16) == torch.bfloat16
    assert devices.compute_dtype("cpu", torch.float32) == torch.float32  # never lowered
    assert devices.compute_dtype("cuda", torch.float16) == torch.float16
    assert devices.compute_dtype(torch.device("cuda")) == torch.bfloat16


def test_flags_without_fast_bf16_matmuls_are_not_native(monkeypatch):
    """A CPU listing AMX whose library emulates bf16 (e.g. ONEDNN_MAX_CPU_ISA=AVX2) is not native;
    no bf16 flag at all is never native, whatever a measurement would say."""
    monkeypatch.delenv(devices.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    monkeypatch.setattr(devices, "_bf16_matmul_is_fast", lambda: False)
    devices.native_bf16.cache_clear()
    assert not devices.native_bf16()
    monkeypatch.setattr(devices, "_bf16_matmul_is_fast", lambda: True)
    devices.native_bf16.cache_clear()
    assert devices.native_bf16()
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "fma"})
    devices.native_bf16.cache_clear()
    assert not devices.native_bf16()
    devices.native_bf16.cache_clear()


def test_bad_override_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(devices.NATIVE_BF16_ENV, "yes")
    devices.native_bf16.cache_clear()
    with pytest.raises(SpeculatorsError, match="SPECULATORS_NATIVE_BF16: must be 0 or 1"):
        devices.native_bf16()
    devices.native_bf16.cache_clear()


def test_cpu_description_names_model_and_matmul_flags(native):
    native(False)
    d = devices.cpu_description()
    assert d["model"] and d["cpus"] >= 1 and d["native_bf16"] is False
    assert set(d["flags"]) <= {"AVX2", "AVX-512", "AVX512-BF16", "AMX"}
    assert "bf16 emulated" in devices.cpu_summary()


@pytest.mark.parametrize("is_native", [False, True])
def test_every_stage_computes_in_the_policy_dtype_and_stores_bf16(
    bf16_target, tmp_path, monkeypatch, native, is_native
):
    """Without native bf16 each stage's loaded model computes in fp32 (with it: bf16), while
    captured hidden states are stored in bf16 either way."""
    from speculators.data import regenerate
    from speculators.evaluate import inprocess
    from speculators.hidden_states import capture as capture_mod
    from speculators.hidden_states.store import SampleStore
    from speculators.train import trainer
    from speculators.vllm.hidden_states import engine_kwargs

    native(is_native)
    want = torch.bfloat16 if is_native else torch.float32

    regenerate._load_target.cache_clear()
    _, model = regenerate._load_target(str(bf16_target))
    regenerate._load_target.cache_clear()
    assert model.dtype == want

    model, _ = inprocess.load_target(str(bf16_target), torch.device("cpu"), "auto")
    assert model.dtype == want

    loaded = []
    real_load = capture_mod.load_model
    monkeypatch.setattr(
        capture_mod,
        "load_model",
        lambda *a: loaded.append(real_load(*a)) or loaded[-1],
    )
    prepared = make_prepared(tmp_path / "prepared", LENGTHS[:3])
    assert capture(bf16_target, prepared, tmp_path / "hs") == 0
    assert [m.dtype for m in loaded] == [want, want]  # the capture, then the fidelity probe
    assert all(s.dtype == torch.bfloat16 for s in load(tmp_path / "hs", 0)["hidden_states"])

    env = types.SimpleNamespace(device=torch.device("cpu"))
    with trainer.autocast(env, "auto"):
        product = torch.ones(4, 4) @ torch.ones(4, 4)
    assert product.dtype == want

    store = SampleStore(tmp_path / "vllm", hidden_size=128, layer_ids=[1, 2, 3, 4])
    assert engine_kwargs(str(bf16_target), store, 64, 1)["dtype"] == str(want).split(".")[1]


def test_quantised_or_unrecorded_storage_computes_in_bf16_on_gpus():
    assert devices.compute_dtype("cuda", torch.int8) == torch.bfloat16
    assert devices.compute_dtype("cuda", torch.float8_e4m3fn) == torch.bfloat16
    assert devices.compute_dtype("cuda", None) == torch.bfloat16
    assert devices.compute_dtype("cuda", torch.float32) == torch.float32


def test_bad_override_stops_any_stage_in_one_line_before_it_starts(
    tiny_llama, chat_jsonl, tmp_path, monkeypatch, capsys
):
    """Even for an fp32 target, whose dtype never depends on the CPU's bf16."""
    from speculators.cli import main

    monkeypatch.setenv(devices.NATIVE_BF16_ENV, "yes")
    devices.native_bf16.cache_clear()
    out = tmp_path / "r.jsonl"
    argv = ["regenerate", "--target", str(tiny_llama), "--source", str(chat_jsonl),
            "--dataset-name", "c", "--output", str(out)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "speculators regenerate: error: SPECULATORS_NATIVE_BF16: must be 0 or 1, got 'yes'"
    ]
    assert not list(tmp_path.glob("r*"))
    devices.native_bf16.cache_clear()
