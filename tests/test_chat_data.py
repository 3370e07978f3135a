"""Chat data as people have it (issue 11): file reading, the structure policy, pretokenised rows,
tool calls, reasoning and special-token look-alikes, on tiny fixtures and real templates
(tests/data/templates, sources in its README)."""

import json
import logging
import string
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures import build_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_masks import DEFAULT_SYSTEM, supervised_spans
from test_prepare import run_prepare, write_jsonl

from speculators.data import masks, sources
from speculators.report.inputs import RunInputs
from speculators.report.render import data_section

TEMPLATES = Path(__file__).parent / "data" / "templates"
HELLO = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]


def lines(path, *rows: bytes) -> Path:
    path.write_bytes(b"".join(rows))
    return path


def row_bytes(row) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8")


# --- reading files ---------------------------------------------------------------------------


def test_jsonl_splits_only_at_newline_and_accepts_crlf_and_bom(tmp_path):
    odd = "a\u2028b\u2029c\u0085d"  # Unicode line breaks are legal inside JSON strings
    rows = [
        {"id": "odd", "conversations": [HELLO[0], {"role": "assistant", "content": odd}]},
        {"id": "plain", "conversations": HELLO},
    ]
    path = lines(
        tmp_path / "odd.jsonl",
        b"\xef\xbb\xbf" + row_bytes(rows[0]) + b"\r\n",
        b"\r\n",  # blank line
        row_bytes(rows[1]) + b"\n",
    )
    loaded = sources.load_rows(str(path))
    assert loaded == rows
    assert loaded.locations == [f"{path} line 1", f"{path} line 3"]


@pytest.mark.parametrize(
    "name, data, message",
    [
        (
            "bad.jsonl",
            row_bytes({"conversations": HELLO}) + b'\n{"id": "x\xff"}\n',
            "bad.jsonl line 2: not UTF-8 text (byte 0xff at column 10)",
        ),
        (
            "bad.json",
            b'[\n {"id": 1},\n {"id": "\xc3("}\n]',
            "bad.json line 3: not UTF-8 text (byte 0xc3 at column 10)",
        ),
        ("utf16.jsonl", "\ufeff{}\n".encode("utf-16-le"), "utf16.jsonl: UTF-16 text"),
        ("broken.json", b'[\n {"id": 1},\n {"id" 2}\n]', "at line 3 column 8"),
    ],
)
def test_undecodable_files_stop_with_one_line_naming_line_and_column(
    tiny_tokenizer_dir, tmp_path, capsys, name, data, message
):
    src = lines(tmp_path / name, data)
    out = tmp_path / "prepared"
    assert run_prepare(tiny_tokenizer_dir, src, out) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_lone_surrogate_row_is_skipped_counted_and_its_line_named(
    tiny_tokenizer_dir, tmp_path, caplog
):
    good = [row_bytes({"id": f"g{i}", "conversations": HELLO}) + b"\n" for i in range(3)]
    bad = b'{"id": "s", "conversations": [{"role": "user", "content": "\\ud83d"},'
    bad += b' {"role": "assistant", "content": "ok"}]}\n'
    src = lines(tmp_path / "s.jsonl", good[0], bad, *good[1:])
    out = tmp_path / "prepared"
    with caplog.at_level(logging.WARNING):
        assert run_prepare(tiny_tokenizer_dir, src, out, "--eval-prompts", "0") == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["selection"]["dropped"] == {"unencodable_text": 1}
    assert stats["rows_out"] == 3
    assert f"{src} line 2" in caplog.text and "unencodable_text" in caplog.text


def test_json_array_with_bom_and_a_lone_surrogate_names_the_row(tmp_path, caplog):
    rows = [{"id": "a", "conversations": HELLO}, {"id": "\udc00", "conversations": HELLO}]
    path = lines(tmp_path / "a.json", b"\xef\xbb\xbf" + json.dumps(rows).encode())
    loaded = sources.load_rows(str(path))
    with caplog.at_level(logging.WARNING):
        sel = sources.select(loaded, seed=0, eval_prompts=0)
    assert [r["id"] for r in sel.train] == ["a"]
    assert sel.dropped == {"unencodable_text": 1}
    assert f"{path} row 2" in caplog.text


def parquet(path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def test_parquet_names_a_missing_or_wrongly_typed_column(tiny_tokenizer_dir, tmp_path, capsys):
    missing = parquet(tmp_path / "missing.parquet", pa.table({"text": ["a", "b"]}))
    as_text = parquet(
        tmp_path / "text.parquet", pa.table({"conversations": [json.dumps(HELLO)] * 2})
    )
    keys = parquet(
        tmp_path / "keys.parquet",
        pa.table({"messages": [[{"speaker": "user", "text": "hi"}]] * 2}),
    )
    ids = parquet(
        tmp_path / "ids.parquet", pa.table({"input_ids": [["1", "2"]], "loss_mask": [[0, 1]]})
    )
    expected = {
        missing: "has no 'conversations' or 'messages' column, nor 'input_ids' + 'loss_mask' "
        "(columns: ['text'])",
        as_text: "column 'conversations' has type string; expected a list of message structs",
        keys: "column 'messages' messages have fields ['speaker', 'text']",
        ids: "column 'input_ids' has type list<element: string>; expected a list of integers",
    }
    for src, message in expected.items():
        assert run_prepare(tiny_tokenizer_dir, src, tmp_path / "out") == 1
        err = capsys.readouterr().err.strip()
        assert f"{src}: {message}" in err and len(err.splitlines()) == 1


def test_hub_dataset_without_a_usable_column_is_named(
    tiny_tokenizer_dir, tmp_path, monkeypatch, capsys
):
    def load_dataset(name, split=None, **kw):
        return datasets.Dataset.from_list([{"conversations": "user: hi"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert run_prepare(tiny_tokenizer_dir, "someone/chats", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert "someone/chats (someone/chats split train): column 'conversations' has type" in err
    assert len(err.splitlines()) == 1


def test_parquet_conversations_with_merged_schemas_are_read(tiny_tokenizer_dir, tmp_path):
    """Arrow fills keys absent from one message with None: those are not message content."""
    rows = [
        {"id": "a", "conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Yo"}]},
        {"id": "b", "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]  # fmt: skip
    src = parquet(tmp_path / "c.parquet", pa.Table.from_pylist(rows))
    out = tmp_path / "prepared"
    assert run_prepare(tiny_tokenizer_dir, src, out, "--eval-prompts", "0") == 0
    assert sorted(datasets.load_from_disk(str(out / "dataset"))["row_id"]) == ["a", "b"]


# --- structure policy ------------------------------------------------------------------------


def parse(row):
    normalised = sources.Counter()
    return sources.parse_row(row, normalised), dict(normalised)


def test_role_names_are_stripped_lowercased_and_aliased():
    item, _ = parse(
        {
            "conversations": [
                {"from": " Human ", "value": "Hi"},
                {"role": "GPT", "content": "Yo"},
                {"role": " user\n", "content": "And?"},
                {"role": "Model", "content": "Done."},
            ]
        }
    )
    assert [m["role"] for m in item["conversations"]] == ["user", "assistant"] * 2


def test_mixed_key_schemas_in_one_row_are_read_per_message():
    item, _ = parse(
        {"messages": [{"from": "human", "value": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    )
    assert item["conversations"] == HELLO[:0] + [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]


def test_leading_assistant_turns_are_removed_and_counted():
    item, normalised = parse(
        {
            "conversations": [
                {"role": "system", "content": "Be kind."},
                {"role": "assistant", "content": "Welcome!"},
                *HELLO,
            ]
        }
    )
    assert item["conversations"] == [{"role": "system", "content": "Be kind."}, *HELLO]
    assert normalised == {"leading_assistant_removed": 1}
    with pytest.raises(sources.SkippedRow) as skip:
        parse({"conversations": [{"role": "assistant", "content": "Only me."}]})
    assert skip.value.reason == "no_assistant_turn"


def test_consecutive_messages_of_one_role_are_merged_tool_results_are_not():
    item, normalised = parse(
        {
            "conversations": [
                {"role": "user", "content": "Hi", "truncated": True},
                {"role": "user", "content": "Anyone?"},
                {"role": "assistant", "content": "Yes.", "truncated": True},
                {"role": "assistant", "content": "Here.", "truncated": True},
                {"role": "tool", "content": "r1"},
                {"role": "tool", "content": "r2"},
                {"role": "assistant", "content": "Done."},
            ]
        }
    )
    assert item["conversations"] == [
        {"role": "user", "content": "Hi\n\nAnyone?"},
        {"role": "assistant", "content": "Yes.\n\nHere.", "truncated": True},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
        {"role": "assistant", "content": "Done."},
    ]
    assert normalised == {"consecutive_merged": 2}


def test_top_level_system_field_becomes_the_first_message():
    item, normalised = parse({"system": "You are a pirate.", "conversations": HELLO})
    assert item["conversations"] == [{"role": "system", "content": "You are a pirate."}, *HELLO]
    assert normalised == {"top_level_system": 1}
    # With a system message already first, the two are one system message.
    item, _ = parse(
        {"system": "Pirate.", "conversations": [{"role": "system", "content": "Brief."}, *HELLO]}
    )
    assert item["conversations"][0] == {"role": "system", "content": "Pirate.\n\nBrief."}


def test_reasoning_fields_reach_the_template_under_every_name():
    for key in ("reasoning_content", "thinking", "reasoning"):
        item, _ = parse(
            {"conversations": [HELLO[0], {"role": "assistant", "content": "4", key: "2+2"}]}
        )
        answer = item["conversations"][1]
        assert answer == {
            "role": "assistant",
            "content": "4",
            "reasoning_content": "2+2",
            "reasoning": "2+2",
            "thinking": "2+2",
        }


def test_tool_calls_are_normalised_as_vllm_renders_them():
    item, _ = parse(
        {
            "tools": json.dumps([{"type": "function", "function": {"name": "f"}}]),
            "conversations": [
                HELLO[0],
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "function": {"name": "f", "arguments": '{"x": 1}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "2"},
                {"role": "assistant", "content": "It is 2."},
            ],
        }
    )
    assert item["tools"] == [{"type": "function", "function": {"name": "f"}}]
    assert item["conversations"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "id": "c1", "function": {"name": "f", "arguments": {"x": 1}}}
        ],
    }
    assert item["conversations"][2] == {"role": "tool", "tool_call_id": "c1", "content": "2"}


# --- real templates: tool calls and reasoning -------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_ROW = {
    "tools": TOOLS,
    "conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Need the tool.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "Tool says sunny."},
    ],
}
# name -> (added special tokens, EOS, extra end-of-turn tokens from generation_config.json)
REAL = {
    "Qwen-Qwen3-0.6B": (
        ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
        "<|im_end|>",
        [],
    ),
    "meta-llama-Llama-3.1-8B-Instruct": (["<|python_tag|>", "<|eom_id|>"], "<|eot_id|>", []),
    "openai-gpt-oss-120b": (
        ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"],
        "<|return|>",
        ["<|call|>"],
    ),
}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """name -> Masker over the fixture BPE with a published chat template and its tokens."""
    from transformers import AutoTokenizer

    out = {}
    for name, (extra, eos, more_eos) in REAL.items():
        d = tmp_path_factory.mktemp(name)
        build_tokenizer(d, chat_template=(TEMPLATES / f"{name}.jinja").read_text())
        tok = AutoTokenizer.from_pretrained(d)
        tok.add_tokens(extra, special_tokens=True)
        tok.eos_token = eos
        eos_ids = masks.end_of_turn_ids(tok) | set(tok.convert_tokens_to_ids(more_eos))
        out[name] = masks.Masker(tok, 4096, eos_ids)
    return out


def real_rows(masker, row):
    item = sources.parse_row(row)
    return masker.rows(item["conversations"], item.get("tools"))


def test_qwen3_tool_calls_and_reasoning_are_supervised_tool_results_are_not(real):
    m = real["Qwen-Qwen3-0.6B"]
    result = real_rows(m, TOOL_ROW)
    assert not result.dropped and [r.turn for r in result.rows] == [-1]
    row = result.rows[0]
    assert supervised_spans(m.tokenizer, row) == [
        "<think>\nNeed the tool.\n</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\nTool says sunny.\n</think>\n\nIt is sunny.<|im_end|>",
    ]
    text = m.tokenizer.decode(row.input_ids)
    assert '"name": "get_weather", "description": "Weather in a city"' in text  # tools rendered
    assert "<tool_response>\nSunny, 21 C\n</tool_response>" in text  # present, not supervised


def two_sums(reasoning_key: str) -> dict:
    """Two questions, each answer with its reasoning under `reasoning_key`."""
    return {
        "conversations": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", reasoning_key: "Add."},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6", reasoning_key: "Add again."},
        ]
    }


def test_qwen3_reasoning_of_earlier_turns_gets_per_turn_rows(real):
    m = real["Qwen-Qwen3-0.6B"]
    result = real_rows(m, two_sums("reasoning_content"))
    assert result.per_turn and [r.turn for r in result.rows] == [0, 1]
    assert [supervised_spans(m.tokenizer, r) for r in result.rows] == [
        ["<think>\nAdd.\n</think>\n\n4<|im_end|>"],
        ["<think>\nAdd again.\n</think>\n\n6<|im_end|>"],
    ]
    # The template drops the earlier turn's reasoning once a later question follows.
    assert "Add.\n" not in m.tokenizer.decode(result.rows[1].input_ids)


def test_llama31_tool_call_json_is_supervised_ipython_result_is_not(real):
    m = real["meta-llama-Llama-3.1-8B-Instruct"]
    result = real_rows(m, TOOL_ROW)
    assert not result.dropped and [r.turn for r in result.rows] == [-1]
    row = result.rows[0]
    assert supervised_spans(m.tokenizer, row) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is sunny.<|eot_id|>",
    ]
    text = m.tokenizer.decode(row.input_ids)
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"Sunny, 21 C"<|eot_id|>' in text


def test_gpt_oss_thinking_is_rendered_and_supervised_in_the_answer_row(real):
    m = real["openai-gpt-oss-120b"]
    result = real_rows(m, two_sums("thinking"))
    assert result.per_turn and [r.turn for r in result.rows] == [0, 1]
    assert [supervised_spans(m.tokenizer, r) for r in result.rows] == [
        ["<|channel|>analysis<|message|>Add.<|end|><|start|>assistant<|channel|>final"
         "<|message|>4<|return|>"],
        ["<|channel|>analysis<|message|>Add again.<|end|><|start|>assistant<|channel|>final"
         "<|message|>6<|return|>"],
    ]  # fmt: skip


def test_gpt_oss_tool_call_and_final_answer_rows(real):
    m = real["openai-gpt-oss-120b"]
    result = real_rows(m, TOOL_ROW)
    assert not result.dropped and [r.turn for r in result.rows] == [0, 1]
    first, second = result.rows
    assert supervised_spans(m.tokenizer, first) == [
        "<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant to=functions."
        'get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
    ]
    # gpt-oss drops a tool call's analysis once a final answer follows, so no render of the
    # history is a prefix of the answer's render: the row is the prompt as served (analysis
    # kept, as the template renders it for inference) + the answer as rendered last.
    conv = sources.parse_row(TOOL_ROW)["conversations"]
    prompt = m.render(conv[:4], True, TOOLS)
    assert second.input_ids[: len(prompt)] == prompt
    assert "Need the tool." in m.tokenizer.decode(prompt)
    assert supervised_spans(m.tokenizer, second) == [
        "<|channel|>analysis<|message|>Tool says sunny.<|end|><|start|>assistant<|channel|>"
        "final<|message|>It is sunny.<|return|>"
    ]
    assert sum(second.loss_mask) == len(second.input_ids) - len(prompt)


# --- special-token look-alikes ---------------------------------------------------------------


def test_special_token_look_alikes_are_tokenised_as_vllm_does(tiny_tokenizer_dir, tmp_path):
    """vLLM renders the chat to text and tokenises it whole (special tokens parsed), so typed
    `<|im_end|>` becomes the special token: the row holds exactly those ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    conv = [
        {"role": "user", "content": "What does <|im_end|> mean?"},
        {"role": "assistant", "content": "It ends a turn."},
    ]
    row = masks.Masker(tok, 4096, masks.end_of_turn_ids(tok)).rows(conv).rows[0]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert row.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    user_ids = tok("<|im_start|>user\nWhat does <|im_end|> mean?", add_special_tokens=False)
    assert im_end in user_ids["input_ids"]  # the look-alike is the special id ...
    position = row.input_ids.index(im_end)
    assert row.loss_mask[position] == 0  # ... and, typed by the user, never supervised
    assert supervised_spans(tok, row) == ["It ends a turn.<|im_end|>"]
    # Typed in an answer, it is part of the answer: supervised with it.
    conv[1]["content"] = "Type <|im_end|> to stop."
    text = tok.apply_chat_template(conv, tokenize=False)
    for template in (None, DEFAULT_SYSTEM):  # generation markers, then render boundaries
        if template:
            build_tokenizer(tmp_path, chat_template=template)
            tok = AutoTokenizer.from_pretrained(tmp_path)
            text = tok.apply_chat_template(conv, tokenize=False)
        row = masks.Masker(tok, 4096, masks.end_of_turn_ids(tok)).rows(conv).rows[0]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert row.input_ids == ids[: len(row.input_ids)]  # the row ends at its last target
        assert supervised_spans(tok, row) == ["Type <|im_end|> to stop.<|im_end|>"]


# --- pretokenised rows and one file with everything -----------------------------------------


def test_pretokenized_rows_pass_through_unchanged(tiny_tokenizer_dir, tmp_path):
    rows = [
        {"id": "p1", "input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]},
        {"id": "p2", "input_ids": [9, 10, 11], "loss_mask": [0, 1, 0]},
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "prepared"
    assert run_prepare(tiny_tokenizer_dir, src, out, "--eval-prompts", "2") == 0
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert [(r["row_id"], r["input_ids"], r["loss_mask"]) for r in ds] == [
        (r["id"], r["input_ids"], r["loss_mask"]) for r in rows
    ]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["selection"]["pretokenized"] == 2 and stats["eval_prompts"] == 0


def test_pretokenized_rows_need_no_chat_template(tmp_path):
    target = tmp_path / "plain-tok"
    build_tokenizer(target, chat_template=None)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    src = write_jsonl(tmp_path / "p.jsonl", [{"input_ids": [5, 6], "loss_mask": [0, 1]}])
    out = tmp_path / "prepared"
    assert run_prepare(target, src, out) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["template_mode"] == "pretokenized" and stats["rows_out"] == 1


def test_a_file_with_every_kind_gives_exact_counts(tiny_tokenizer_dir, tmp_path):
    chat = {"id": "chat", "conversations": HELLO}
    good = [
        chat,
        {"id": "sharegpt", "conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Yo"}]},
        {"id": "lsep", "conversations": [HELLO[0], {"role": "assistant", "content": "a\u2028b"}]},
        {"id": "leading", "conversations": [{"role": "assistant", "content": "Hi!"}, *HELLO]},
        {"id": "twice", "conversations": [HELLO[0], HELLO[0], *HELLO[1:]]},
        {"id": "pirate", "system": "You are a pirate.", "conversations": HELLO},
        {"id": "think", "conversations": [HELLO[0], {"role": "assistant", "content": "4", "reasoning_content": "2+2"}]},
        {"id": "tool", **TOOL_ROW},
        {"id": "pre", "input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
    ]  # fmt: skip
    bad = [
        {"id": "vocab", "input_ids": [5, 100000], "loss_mask": [0, 1]},  # tokenise stage
        {"id": "len", "input_ids": [5, 6], "loss_mask": [1]},
        {"id": "mask", "input_ids": [5, 6], "loss_mask": [0, 2]},
        {"id": "role", "conversations": [HELLO[0], {"role": "robot", "content": "beep"}]},
        {"id": "call", "conversations": [HELLO[0], {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}]},
        {"id": "tools", "tools": "{oops", "conversations": HELLO},
        {"id": "none", "conversations": [HELLO[0]]},
    ]  # fmt: skip
    data = [row_bytes(r) + b"\n" for r in good + bad]
    data.insert(3, b'{"id": "sur", "conversations": [{"role": "user", "content": "\\udc00"},'
                   b' {"role": "assistant", "content": "x"}]}\r\n')  # fmt: skip
    data.insert(5, b"[1, 2]\n")
    src = lines(tmp_path / "all.jsonl", *data)
    out = tmp_path / "prepared"
    assert run_prepare(tiny_tokenizer_dir, src, out, "--eval-prompts", "0") == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["selection"]["dropped"] == {
        "bad_tool_call": 1,
        "bad_tools": 1,
        "no_assistant_turn": 1,
        "not_an_object": 1,
        "pretokenized_bad_mask": 1,
        "pretokenized_length_mismatch": 1,
        "unencodable_text": 1,
        "unknown_role": 1,
    }
    assert stats["selection"]["normalised"] == {
        "consecutive_merged": 1,
        "leading_assistant_removed": 1,
        "top_level_system": 1,
    }
    assert stats["dropped"] == {"pretokenized_token_out_of_vocab": 1}
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert sorted(ds["row_id"]) == sorted(r["id"] for r in good)
    assert stats["rows_in"] == len(good) + 1 and stats["rows_out"] == len(good)
    # The report shows every count by reason.
    inputs = RunInputs(run="r", prepared={"chats": stats})
    shown = json.dumps(data_section(inputs).__dict__, default=str)
    for reason in [*stats["selection"]["dropped"], *stats["dropped"], "top_level_system"]:
        assert reason in shown


def test_a_history_that_changes_with_the_generation_prompt_is_counted_not_guessed(tmp_path):
    """When not even the history's own render starts the served prompt, no answer position can
    be trusted: the turn is dropped as turn_prefix_mismatch."""
    from transformers import AutoTokenizer

    template = (
        "{% if add_generation_prompt %}Answer briefly.\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    build_tokenizer(tmp_path, chat_template=template)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    result = masks.Masker(tok, 4096, masks.end_of_turn_ids(tok)).rows(HELLO)
    assert result.rows == [] and result.dropped == {"turn_prefix_mismatch": 1}


# Property test on the published templates: user, system and tool-result text uses capitals and
# digits, answers, reasoning and tool calls only lower case, so a supervised capital or digit
# would be a token of a turn the draft never generates.
LOWER = st.text(string.ascii_lowercase + " ,.", min_size=1, max_size=20).filter(str.strip)
UPPER = st.text(string.ascii_uppercase + string.digits + " ,.", min_size=1, max_size=20).filter(
    str.strip
)


@st.composite
def tool_conversations(draw):
    conv = [{"role": "system", "content": draw(UPPER)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        conv.append({"role": "user", "content": draw(UPPER)})
        if draw(st.booleans()):
            call = {"function": {"name": "get_weather", "arguments": {"city": draw(LOWER)}}}
            conv.append({"role": "assistant", "content": None, "tool_calls": [call]})
            conv.append({"role": "tool", "content": draw(UPPER)})
        answer = {"role": "assistant", "content": draw(LOWER)}
        if draw(st.booleans()):
            answer["reasoning_content"] = draw(LOWER)
        conv.append(answer)
    return {"tools": TOOLS, "conversations": conv}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(row=tool_conversations(), name=st.sampled_from(sorted(REAL)))
def test_tool_results_user_and_system_tokens_are_never_supervised(real, row, name):
    m = real[name]
    result = real_rows(m, row)
    answers = sum(msg["role"] == "assistant" for msg in row["conversations"])
    assert result.rows and not result.dropped
    for r in result.rows:
        for token, flag in zip(r.input_ids, r.loss_mask):
            if flag:
                piece = m.tokenizer.decode([token])
                assert not any(c.isupper() or c.isdigit() for c in piece), (piece, name)
    # Every answer is supervised exactly once: in the shared row or in its own row.
    assert [r.turn for r in result.rows] in ([-1], list(range(answers)))


# --- inputs found by an adversarial review -----------------------------------------------------


def test_deeply_nested_json_is_one_line(tiny_tokenizer_dir, tmp_path, capsys):
    src = lines(tmp_path / "deep.jsonl", b"[" * 100_000 + b"\n")
    assert run_prepare(tiny_tokenizer_dir, src, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 1: JSON nested too deeply" in err[0]
    assert not (tmp_path / "out").exists()


def test_pretokenized_row_with_an_unencodable_id_is_skipped_and_counted(
    tiny_tokenizer_dir, tmp_path
):
    good = {"id": "ok", "input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}
    bad = b'{"id": "\\ud83d", "input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}\n'
    src = lines(tmp_path / "p.jsonl", row_bytes(good) + b"\n", bad)
    out = tmp_path / "out"
    assert run_prepare(tiny_tokenizer_dir, src, out, "--eval-prompts", "0") == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["selection"]["dropped"] == {"unencodable_text": 1}
    assert stats["rows_out"] == 1


def test_an_output_path_that_is_a_file_is_one_line(tiny_tokenizer_dir, tmp_path, capsys):
    from fixtures import sample_conversations

    src = write_jsonl(tmp_path / "c.jsonl", [{"conversations": c} for c in sample_conversations(4)])
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert run_prepare(tiny_tokenizer_dir, src, taken / "out", "--eval-prompts", "0") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"speculators prepare: error: {taken}: File exists"
    assert taken.read_text() == "not a folder"
