"""`speculators regenerate`: turn-by-turn answers from the target, resume after a kill."""

import json

import datasets
import pytest

from speculators.cli import main
from speculators.data import regenerate, sources


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Tiny models gain nothing from threads; on a shared 2-core machine they spin and stall.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def settings_for(target, **overrides):
    base = {
        "target": str(target),
        "source": "chats.jsonl",
        "split": None,
        "backend": "transformers",
        "seed": 0,
        "max_samples": None,
        "eval_prompts": 2,
        "max_new_tokens": 8,
        "temperature": 0.0,
        "top_p": 1.0,
        "batch_size": 3,
        "max_turns": None,
    }
    return {**base, **overrides}


def selection_of(chat_jsonl, eval_prompts=2):
    return sources.select(sources.load_rows(str(chat_jsonl)), 0, eval_prompts)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_regeneration_resumes_after_interruption_and_equals_uninterrupted_run(
    tiny_llama, chat_jsonl, tmp_path, temperature
):
    settings = settings_for(tiny_llama, temperature=temperature)
    selection = selection_of(chat_jsonl)  # 10 training rows -> batches of 3, 3, 3, 1
    whole = tmp_path / "whole.jsonl"
    regenerate.regenerate_selection(selection, regenerate.generate_chat_answers, settings, whole)

    def dies_in_second_batch(target, conversations, *args):
        if args[-1] >= 1000:  # the seed of batch b is seed + 1000 * b + turn step
            raise Interrupt
        return regenerate.generate_chat_answers(target, conversations, *args)

    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(Interrupt):
        regenerate.regenerate_selection(selection, dies_in_second_batch, settings, resumed)
    assert not resumed.exists()
    partial = read_jsonl(tmp_path / "resumed.jsonl.partial")
    assert partial[0] == {"settings": settings}
    assert [r["pos"] for r in partial[1:]] == [0, 1, 2]

    seen = []

    def recording(target, conversations, *args):
        seen.extend(c[0]["content"] for c in conversations if len(c) == 1)
        return regenerate.generate_chat_answers(target, conversations, *args)

    counts = regenerate.regenerate_selection(selection, recording, settings, resumed)
    assert counts["resumed"] == 3
    # Only the 7 unfinished conversations were started again.
    assert len(seen) == 7
    assert resumed.read_text() == whole.read_text()
    assert not (tmp_path / "resumed.jsonl.partial").exists()


def test_torn_partial_line_and_changed_settings_are_handled(tmp_path):
    partial_path = tmp_path / "out.jsonl.partial"
    settings = {"seed": 0}
    header = json.dumps({"settings": settings})
    row = json.dumps({"pos": 0, "row": {"id": "a"}})
    partial_path.write_text(f"{header}\n{row}\n" + '{"pos": 1, "ro')
    partial = regenerate.Partial(partial_path, settings)
    assert list(partial.rows) == [0]
    assert partial_path.read_text() == f"{header}\n{row}\n"
    other = regenerate.Partial(partial_path, {"seed": 1})
    assert other.rows == {}


def fake_generate(target, conversations, max_new_tokens, temperature, top_p, seed):
    """Answers name the last user turn and how many answers the history already holds."""
    out = []
    for conv in conversations:
        assert conv[-1]["role"] == "user"
        previous = [m["content"] for m in conv if m["role"] == "assistant"]
        assert all(p.startswith("re:") for p in previous)  # history holds regenerated answers
        out.append(regenerate.Answer(f"re:{conv[-1]['content']}#{len(previous)}", False))
    return out


def test_answers_are_generated_turn_by_turn_keeping_user_turns():
    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "U3"},
    ]
    counts = {"answers": 0, "empty_answers": 0, "truncated_answers": 0, "stopped_no_user_turn": 0}
    settings = settings_for("t", max_turns=None)
    (out,) = regenerate.regenerate_batch([conv], fake_generate, settings, 0, counts)
    assert out == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "re:U1#0"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "re:U2#1"},
    ]
    assert counts["answers"] == 2
    (cut,) = regenerate.regenerate_batch(
        [conv], fake_generate, settings_for("t", max_turns=1), 0, counts
    )
    assert cut == out[:3]


def test_empty_answer_and_answer_without_user_turn_stop_the_conversation():
    def silent_second(target, conversations, *args):
        return [regenerate.Answer("" if len(c) > 1 else "re:ok", False) for c in conversations]

    counts = {"answers": 0, "empty_answers": 0, "truncated_answers": 0, "stopped_no_user_turn": 0}
    convs = [
        [
            {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"},
        ],
        [{"role": "assistant", "content": "A0"}, {"role": "user", "content": "U1"}],
    ]
    first, second = regenerate.regenerate_batch(convs, silent_second, settings_for("t"), 0, counts)
    assert first == [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "re:ok"}]
    assert second == []
    assert counts["empty_answers"] == 1 and counts["stopped_no_user_turn"] == 1


def test_truncated_answer_is_marked_counted_and_ends_the_conversation():
    """An answer cut at max_new_tokens is kept with "truncated": true and no later turn is
    generated on it (the target never finished that reply)."""

    def cut_first(target, conversations, *args):
        # A cut inside a multi-byte character decodes to U+FFFD, which is not the target's text.
        return [regenerate.Answer(f"re{len(c)}\ufffd", len(c) == 1) for c in conversations]

    conv = [
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    counts = {"answers": 0, "empty_answers": 0, "truncated_answers": 0, "stopped_no_user_turn": 0}
    (out,) = regenerate.regenerate_batch([conv], cut_first, settings_for("t"), 0, counts)
    assert out == [
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "re1", "truncated": True},
    ]
    assert counts["answers"] == 1 and counts["truncated_answers"] == 1


def test_sorted_batches_give_one_at_a_time_greedy_answers_and_mark_cut_ones(tiny_llama):
    """The transformers backend sorts prompts by length into batches: its greedy answers equal
    generating each conversation alone, in the order given; an answer that used every one of
    max_new_tokens without an end-of-turn token is marked truncated."""
    import torch
    from fixtures import sample_conversations

    convs = [c[:1] for c in sample_conversations(7)] + [sample_conversations(6)[5][:3]]
    batched = regenerate.generate_chat_answers(str(tiny_llama), convs, 6, 0.0, 1.0, 0)
    alone = [
        regenerate.generate_chat_answers(str(tiny_llama), [c], 6, 0.0, 1.0, 0)[0] for c in convs
    ]
    assert batched == alone
    tokenizer, model = regenerate._load_target(str(tiny_llama))
    for conv, answer in zip(convs, batched):
        ids = tokenizer.apply_chat_template(
            conv, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        ended = any(
            t in (tokenizer.eos_token_id, model.generation_config.eos_token_id) for t in new
        )
        assert answer.truncated == (not ended)
        assert answer.text == tokenizer.decode(new, skip_special_tokens=True)


def test_cli_regenerate_then_prepare_keeps_the_split(tiny_llama, chat_jsonl, tmp_path):
    out = tmp_path / "regenerated" / "chats.jsonl"
    common = ["--target", str(tiny_llama), "--dataset-name", "chats", "--eval-prompts", "3"]
    args = ["regenerate", "--source", str(chat_jsonl), *common, "--max-new-tokens", "6"]
    args += ["--batch-size", "4", "--max-turns", "1", "--max-samples", "5", "--output", str(out)]
    assert main(args) == 0
    rows = read_jsonl(out)
    assert [r["split"] for r in rows] == ["eval"] * 3 + ["train"] * 5
    source = {r["id"]: r for r in read_jsonl(chat_jsonl)}
    for r in rows:
        assert (r["conversations"] == source[r["id"]]["conversations"]) == (r["split"] == "eval")
        if r["split"] == "train":  # one user turn kept, the answer replaced
            assert len(r["conversations"]) == 2
            assert r["conversations"][0] == source[r["id"]]["conversations"][0]
    meta = json.loads((tmp_path / "regenerated" / "chats.meta.json").read_text())
    assert meta["settings"]["max_new_tokens"] == 6 and meta["settings"]["backend"] == "transformers"
    assert meta["counts"]["train"] == 5 and meta["counts"]["eval"] == 3 and meta["greedy"] is True

    prepared = tmp_path / "prepared"
    # A different seed and eval count would reshuffle a source; a split file is used as is.
    args = ["prepare", "--source", str(out), *common[:4], "--seed", "9", "--eval-prompts", "1"]
    assert main(args + ["--seq-length", "128", "--output", str(prepared)]) == 0
    ds = datasets.load_from_disk(str(prepared / "dataset"))
    train_ids = [r["id"] for r in rows if r["split"] == "train"]
    kept = [i for i in train_ids if i in set(ds["row_id"])]
    assert ds["row_id"] == kept
    eval_rows = read_jsonl(prepared / "eval_prompts.jsonl")
    assert eval_rows == [{"id": r["id"], "conversations": r["conversations"]} for r in rows[:3]]
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["selection"]["presplit"] is True


def test_unknown_source_file_stops_before_loading_the_model(tmp_path, capsys):
    args = ["regenerate", "--target", str(tmp_path / "nope"), "--source", str(tmp_path / "x.jsonl")]
    args += ["--dataset-name", "d", "--output", str(tmp_path / "o.jsonl")]
    assert main(args) == 1
    assert "x.jsonl: file not found" in capsys.readouterr().err


def test_vllm_backend_reruns_the_command_in_the_vllm_environment(tmp_path, chat_jsonl):
    record = tmp_path / "argv.txt"
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    fake_python.chmod(0o755)
    out = tmp_path / "r.jsonl"
    args = ["regenerate", "--target", "t", "--source", str(chat_jsonl), "--dataset-name", "d"]
    args += ["--backend", "vllm", "--max-turns", "2", "--temperature", "0.5"]
    args += ["--vllm-python", str(fake_python), "--output", str(out)]
    import speculators.vllm

    if speculators.vllm.vllm_importable():
        pytest.skip("this interpreter runs vLLM itself")
    assert main(args) == 0
    argv = record.read_text().splitlines()
    assert argv[:4] == ["-m", "speculators.cli", "regenerate", "--backend"]
    assert "--vllm-python" not in argv
    pairs = dict(zip(argv[5::2], argv[6::2]))
    assert pairs["--max-turns"] == "2" and pairs["--temperature"] == "0.5"
    assert pairs["--output"] == str(out) and pairs["--source"] == str(chat_jsonl)
    assert "--max-samples" not in pairs  # unset options stay unset


def test_killed_run_over_a_source_that_changed_starts_over(tiny_llama, tmp_path, monkeypatch):
    """The finished rows of a killed run are reused only while the source file (and target)
    are unchanged: a replaced source never mixes its rows with the old file's."""
    from fixtures import sample_conversations

    def write(conversations, prefix):
        src.write_text(
            "".join(
                json.dumps({"id": f"{prefix}{i}", "conversations": c}) + "\n"
                for i, c in enumerate(conversations)
            )
        )

    src, out = tmp_path / "chats.jsonl", tmp_path / "out.jsonl"
    write(sample_conversations(6), "old")
    argv = ["regenerate", "--target", str(tiny_llama), "--source", str(src), "--dataset-name", "c",
            "--eval-prompts", "0", "--max-new-tokens", "2", "--batch-size", "1", "--output", str(out)]  # fmt: skip
    calls = []

    def dies_second(*args):
        calls.append(1)
        if len(calls) > 1:
            raise Interrupt
        return regenerate.generate_chat_answers(*args)

    monkeypatch.setattr(regenerate, "backend", lambda name: dies_second)
    with pytest.raises(Interrupt):
        main(argv)
    assert len(read_jsonl(tmp_path / "out.jsonl.partial")) == 2  # header + one finished row
    monkeypatch.undo()
    write(list(reversed(sample_conversations(6))), "new")
    assert main(argv) == 0
    assert all(r["id"].startswith("new") for r in read_jsonl(out))


@pytest.mark.parametrize(
    "option, value, problem",
    [
        ("--max-new-tokens", "0", "must be >= 1"),
        ("--batch-size", "0", "must be >= 1"),
        ("--max-turns", "0", "must be >= 1"),
        ("--eval-prompts", "-1", "must be >= 0"),
        ("--temperature", "-1", "must be >= 0"),
        ("--top-p", "0", "must be in (0, 1]"),
        ("--vllm-python", "/nonexistent/python", "is not an executable"),
    ],
)
def test_unusable_values_stop_with_one_line_and_write_nothing(
    tiny_llama, chat_jsonl, tmp_path, capsys, option, value, problem
):
    out = tmp_path / "out.jsonl"
    argv = ["regenerate", "--target", str(tiny_llama), "--source", str(chat_jsonl),
            "--dataset-name", "c", "--backend", "auto", option, value, "--output", str(out)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err and problem in err
    assert not list(tmp_path.glob("out*"))
