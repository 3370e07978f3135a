"""`speculators prepare` / `combine-freq`: outputs, selection, token counts, bad input."""

import json
from collections import Counter

import datasets
import pytest
import torch
from fixtures import build_tokenizer
from test_masks import QWEN3_THINKING

from speculators.cli import main
from speculators.data import prepare, sources


def run_prepare(target, source, out, *extra):
    return main(
        [
            "prepare",
            "--target",
            str(target),
            "--source",
            str(source),
            "--dataset-name",
            "chats",
            "--seq-length",
            "256",
            "--eval-prompts",
            "2",
            "--output",
            str(out),
            *extra,
        ]
    )


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_writes_dataset_counts_stats_and_eval_prompts(
    tiny_tokenizer_dir, chat_jsonl, tmp_path
):
    out = tmp_path / "prepared"
    assert run_prepare(tiny_tokenizer_dir, chat_jsonl, out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset",
        "eval_prompts.jsonl",
        "stats.json",
        "token_freq.pt",
    ]
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert set(ds.column_names) == set(prepare.COLUMNS)
    assert ds.features["input_ids"].feature.dtype == "int64"
    assert ds.features["loss_mask"].feature.dtype == "int64"
    assert len(ds) == 10  # 12 conversations, 2 held out, one row each (ChatML keeps renders)
    for row in ds:
        assert row["seq_len"] == len(row["input_ids"]) == len(row["loss_mask"])
        assert set(row["loss_mask"]) <= {0, 1} and row["loss_mask"][-1] == 1
        assert row["turn"] == -1
    eval_rows = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(eval_rows) == 2
    assert not {r["id"] for r in eval_rows} & set(ds["row_id"])  # held out: never trained on
    source_rows = {json.loads(line)["id"]: json.loads(line) for line in chat_jsonl.open()}
    for r in eval_rows:  # untouched
        assert r["conversations"] == source_rows[r["id"]]["conversations"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_in"] == 10 and stats["rows_out"] == 10
    assert stats["template_mode"] == "generation-markers"
    assert stats["per_turn_rows"]["used"] is False
    assert stats["supervised_tokens"] == sum(sum(m) for m in ds["loss_mask"])


def test_token_frequencies_equal_a_direct_count(tiny_tokenizer_dir, chat_jsonl, tmp_path):
    out = tmp_path / "prepared"
    assert run_prepare(tiny_tokenizer_dir, chat_jsonl, out) == 0
    ds = datasets.load_from_disk(str(out / "dataset"))
    direct = Counter()
    for ids, mask in zip(ds["input_ids"], ds["loss_mask"]):
        direct.update(t for t, m in zip(ids, mask) if m)
    freq = torch.load(out / "token_freq.pt", weights_only=True)
    assert freq == dict(direct)
    assert all(type(k) is int and type(v) is int for k, v in freq.items())


def test_combine_freq_adds_counts(tmp_path):
    a, b, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "all.pt"
    torch.save({1: 2, 5: 1}, a)
    torch.save({5: 3, 7: 4}, b)
    assert main(["combine-freq", str(a), str(b), "--output", str(out)]) == 0
    assert torch.load(out, weights_only=True) == {1: 2, 5: 4, 7: 4}


def test_combine_freq_rejects_a_non_count_file(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save({"a": 1.5}, bad)
    assert main(["combine-freq", str(bad), "--output", str(tmp_path / "o.pt")]) == 1
    assert f"{bad}: expected a dict[int, int]" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_same_seed_same_selection_and_max_samples(tiny_tokenizer_dir, chat_jsonl, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, "3"), (b, "3"), (c, "4")):
        assert (
            run_prepare(tiny_tokenizer_dir, chat_jsonl, out, "--seed", seed, "--max-samples", "4")
            == 0
        )
    ids = [datasets.load_from_disk(str(o / "dataset"))["row_id"] for o in (a, b, c)]
    assert ids[0] == ids[1] and len(ids[0]) == 4
    assert ids[0] != ids[2]


def test_num_proc_gives_the_same_rows(tiny_tokenizer_dir, chat_jsonl, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_prepare(tiny_tokenizer_dir, chat_jsonl, one) == 0
    assert run_prepare(tiny_tokenizer_dir, chat_jsonl, two, "--num-proc", "2") == 0
    a = datasets.load_from_disk(str(one / "dataset")).to_list()
    b = datasets.load_from_disk(str(two / "dataset")).to_list()
    assert a == b


def test_thinking_template_rows_per_turn_recorded(tmp_path, chat_jsonl):
    target = tmp_path / "qwen3-tok"
    build_tokenizer(target, chat_template=QWEN3_THINKING)
    out = tmp_path / "prepared"
    assert run_prepare(target, chat_jsonl, out) == 0
    ds = datasets.load_from_disk(str(out / "dataset"))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["template_mode"] == "render-boundaries"
    assert stats["per_turn_rows"]["used"] is True and stats["per_turn_rows"]["reason"]
    multi = [r for r in ds if r["turn"] >= 0]
    assert multi and {r["turn"] for r in multi} >= {0, 1}
    assert stats["conversations_out"] == 10 < stats["rows_out"]


def test_bad_rows_are_skipped_and_counted(tiny_tokenizer_dir, tmp_path):
    good = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]
    rows = [{"id": f"g{i}", "conversations": good} for i in range(4)]
    rows += [
        {"id": "no-answer", "conversations": [{"role": "user", "content": "Hello"}]},
        {"id": "empty", "conversations": [good[0], {"role": "assistant", "content": "  "}]},
        {"id": "role", "conversations": [good[0], {"role": "robot", "content": "beep"}]},
        {"id": "nonstr", "conversations": [good[0], {"role": "assistant", "content": ["x"]}]},
        {
            "id": "sharegpt",
            "conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Yo"}],
        },
        {"id": "nothing"},
    ]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "prepared"
    assert run_prepare(tiny_tokenizer_dir, src, out, "--eval-prompts", "0") == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["selection"]["dropped"] == {
        "empty_content": 1,
        "no_assistant_turn": 1,
        "no_conversation": 1,
        "non_string_content": 1,
        "unknown_role": 1,
    }
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert sorted(ds["row_id"]) == ["g0", "g1", "g2", "g3", "sharegpt"]


SHAREGPT_ROWS = [
    {"id": f"sg{i}", "conversations": [{"from": "human", "value": f"Question {i}?"},
                                       {"from": "gpt", "value": f"Answer {i}."}]}
    for i in range(5)
] + [{"id": "sg-bad", "conversations": [{"from": "human", "value": "Only a question"}]}]  # fmt: skip
ULTRACHAT_ROWS = [
    {"prompt": f"Question {i}?", "prompt_id": f"uc{i}",
     "messages": [{"role": "user", "content": f"Question {i}?"},
                  {"role": "assistant", "content": f"Answer {i}."},
                  {"role": "user", "content": "And then?"},
                  {"role": "assistant", "content": "Then more."}]}
    for i in range(5)
]  # fmt: skip


@pytest.mark.parametrize(
    "source,hub_id,split,kwargs,rows",
    [
        ("sharegpt", "Aeala/ShareGPT_Vicuna_unfiltered", "train",
         {"data_files": "ShareGPT_V4.3_unfiltered_cleaned_split.json"}, SHAREGPT_ROWS),
        ("ultrachat", "HuggingFaceH4/ultrachat_200k", "train_sft", {}, ULTRACHAT_ROWS),
    ],
)  # fmt: skip
def test_builtin_hub_sources_load_their_dataset_and_schema(
    tiny_tokenizer_dir, tmp_path, monkeypatch, source, hub_id, split, kwargs, rows
):
    """The named sources ask the Hub for the right id/split/files and read its row schema (the
    Hub itself is offline here: load_dataset returns rows of the published schema)."""
    calls = []

    def load_dataset(name, split=None, **kw):
        calls.append((name, split, kw))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = tmp_path / "prepared"
    assert run_prepare(tiny_tokenizer_dir, source, out, "--eval-prompts", "0") == 0
    assert calls == [(hub_id, split, kwargs)]
    ds = datasets.load_from_disk(str(out / "dataset"))
    ids = sorted(r.get("id") or r["prompt_id"] for r in rows if r.get("id") != "sg-bad")
    assert sorted(set(ds["row_id"])) == ids
    assert all(sum(mask) > 0 for mask in ds["loss_mask"])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["selection"]["dropped"] == (
        {"no_assistant_turn": 1} if source == "sharegpt" else {}
    )


def test_min_supervised_tokens_drops_short_rows(tiny_tokenizer_dir, tmp_path):
    rows = [
        {
            "id": "short",
            "conversations": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Ok"},
            ],
        },
        {
            "id": "long",
            "conversations": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
            ],
        },
    ]
    out = tmp_path / "prepared"
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    assert (
        run_prepare(
            tiny_tokenizer_dir, src, out, "--eval-prompts", "0", "--min-supervised-tokens", "5"
        )
        == 0
    )
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"] == {"too_few_supervised_tokens": 1}
    assert datasets.load_from_disk(str(out / "dataset"))["row_id"] == ["long"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "broken.jsonl",
            '{"id": 1, "conversations": []}\n{not json\n',
            "broken.jsonl line 2: not valid JSON",
        ),
        ("broken.json", "[{", "broken.json: not valid JSON"),
        ("missing.jsonl", None, "missing.jsonl: file not found"),
    ],
)
def test_file_level_problems_stop_with_one_line_naming_the_file(
    tiny_tokenizer_dir, tmp_path, capsys, name, content, message
):
    src = tmp_path / name
    if content is not None:
        src.write_text(content)
    out = tmp_path / "prepared"
    assert run_prepare(tiny_tokenizer_dir, src, out) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_tokenizer_without_chat_template_stops(tmp_path, chat_jsonl, capsys):
    target = tmp_path / "plain-tok"
    build_tokenizer(target, chat_template=None)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    assert run_prepare(target, chat_jsonl, tmp_path / "prepared") == 1
    assert f"{target}: the tokenizer has no chat template" in capsys.readouterr().err
    assert not (tmp_path / "prepared").exists()


def test_crash_leaves_no_complete_looking_folder(
    tiny_tokenizer_dir, chat_jsonl, tmp_path, monkeypatch
):
    def boom(path, rows):  # fails after the dataset and token counts are written
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare, "_write_eval_prompts", boom)
    out = tmp_path / "prepared"
    with pytest.raises(RuntimeError):
        run_prepare(tiny_tokenizer_dir, chat_jsonl, out)
    assert not out.exists()
    assert list(tmp_path.glob(".prepared*")) == []


def test_select_holds_out_eval_before_max_samples():
    rows = [
        {
            "id": str(i),
            "conversations": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ],
        }
        for i in range(20)
    ]
    sel = sources.select(rows, seed=1, eval_prompts=3, max_samples=5)
    assert len(sel.eval) == 3 and len(sel.train) == 5
    assert not {r["id"] for r in sel.eval} & {r["id"] for r in sel.train}
    # Growing max_samples keeps the held-out set and extends the training set.
    bigger = sources.select(rows, seed=1, eval_prompts=3, max_samples=8)
    assert bigger.eval == sel.eval and bigger.train[:5] == sel.train
