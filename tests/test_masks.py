"""Loss masks on four template styles: golden supervised spans, and a property test that no
user or system token is ever supervised."""

import string

import pytest
from fixtures import CHATML_GENERATION, build_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speculators.data import masks
from speculators.errors import SpeculatorsError

# Llama-3 style: headers around the role, <|eot_id|> closes every turn, no generation markers.
LLAMA3_HEADERS = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Qwen3 style: the (empty) think block is rendered only in the last assistant turn.
QWEN3_THINKING = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% if loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2 style: ChatML that inserts a default system prompt, no generation markers.
DEFAULT_SYSTEM = (
    "{% for m in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {
    "chatml-generation": CHATML_GENERATION,
    "llama3-headers": LLAMA3_HEADERS,
    "qwen3-thinking": QWEN3_THINKING,
    "default-system": DEFAULT_SYSTEM,
}
CONVERSATION = [
    {"role": "user", "content": "Hello, how are you doing today?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    out = {}
    for name, template in TEMPLATES.items():
        d = tmp_path_factory.mktemp(name)
        build_tokenizer(d, chat_template=template)
        out[name] = AutoTokenizer.from_pretrained(d)
    return out


def masker(tokenizer, seq_length=4096):
    return masks.Masker(tokenizer, seq_length, masks.end_of_turn_ids(tokenizer))


def supervised_spans(tokenizer, row) -> list[str]:
    """Decoded text of each contiguous run of supervised tokens."""
    spans, current = [], []
    for token, m in zip(row.input_ids, row.loss_mask):
        if m:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def test_chatml_generation_markers_supervise_answers_and_im_end(tokenizers):
    tok = tokenizers["chatml-generation"]
    m = masker(tok)
    assert m.mode == masks.GENERATION_MARKERS
    result = m.rows(CONVERSATION)
    assert [r.turn for r in result.rows] == [-1]
    assert supervised_spans(tok, result.rows[0]) == [
        "I am fine, thank you.<|im_end|>",
        "The capital of France is Paris.<|im_end|>",
    ]
    # The row is exactly the template's own rendering (nothing hand-written, no drift).
    assert result.rows[0].input_ids == tok.apply_chat_template(CONVERSATION)["input_ids"]


def test_llama3_header_template_supervises_answers_and_eot_id(tokenizers):
    tok = tokenizers["llama3-headers"]
    m = masker(tok)
    assert m.mode == masks.RENDER_BOUNDARIES
    result = m.rows(CONVERSATION)
    assert [r.turn for r in result.rows] == [-1]
    row = result.rows[0]
    assert supervised_spans(tok, row) == [
        "I am fine, thank you.<|eot_id|>",
        "The capital of France is Paris.<|eot_id|>",
    ]
    assert tok.decode(row.input_ids).startswith("<|bos|><|start_header_id|>user")
    assert row.input_ids == tok.apply_chat_template(CONVERSATION)["input_ids"]


def test_qwen3_thinking_template_gets_one_row_per_turn_rendered_as_last(tokenizers):
    tok = tokenizers["qwen3-thinking"]
    result = masker(tok).rows(CONVERSATION)
    assert result.per_turn
    assert [r.turn for r in result.rows] == [0, 1]
    first, second = result.rows
    assert supervised_spans(tok, first) == [
        "<think>\n\n</think>\n\nI am fine, thank you.<|im_end|>"
    ]
    # The earlier answer appears as the template renders it there (no think block), unmasked.
    assert supervised_spans(tok, second) == [
        "<think>\n\n</think>\n\nThe capital of France is Paris.<|im_end|>"
    ]
    assert tok.decode(second.input_ids) == (
        "<|im_start|>user\nHello, how are you doing today?<|im_end|>\n"
        "<|im_start|>assistant\nI am fine, thank you.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nThe capital of France is Paris.<|im_end|>"
    )


def test_qwen3_thinking_template_single_turn_needs_no_split(tokenizers):
    result = masker(tokenizers["qwen3-thinking"]).rows(CONVERSATION[:2])
    assert [r.turn for r in result.rows] == [-1]


def test_default_system_prompt_is_rendered_and_unmasked(tokenizers):
    tok = tokenizers["default-system"]
    result = masker(tok).rows(CONVERSATION)
    row = result.rows[0]
    assert row.turn == -1
    assert tok.decode(row.input_ids).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )
    # The newline the template writes after <|im_end|> is never generated: not supervised.
    assert supervised_spans(tok, row) == [
        "I am fine, thank you.<|im_end|>",
        "The capital of France is Paris.<|im_end|>",
    ]


def test_markers_and_boundaries_agree_on_chatml(tokenizers):
    tok = tokenizers["chatml-generation"]
    m = masker(tok)
    by_markers = m.marker_rows(CONVERSATION).rows[0]
    by_boundaries = m.boundary_rows(CONVERSATION).rows[0]
    assert by_markers == by_boundaries


def test_explicit_system_turn_and_trailing_user_turn_are_not_supervised(tokenizers):
    tok = tokenizers["default-system"]
    conv = (
        [{"role": "system", "content": "Be brief."}]
        + CONVERSATION
        + [{"role": "user", "content": "Thanks!"}]
    )
    row = masker(tok).rows(conv).rows[0]
    text = tok.decode(row.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    # The row ends at the last supervised token: the trailing user turn teaches nothing.
    assert text.endswith("The capital of France is Paris.<|im_end|>")
    assert len(supervised_spans(tok, row)) == 2


def test_truncation_cuts_rows_and_counts_turns_beyond_the_window(tokenizers):
    tok = tokenizers["default-system"]
    full = masker(tok).rows(CONVERSATION).rows[0]
    first_answer_end = full.loss_mask.index(0, full.loss_mask.index(1))
    cut = masker(tok, seq_length=first_answer_end + 3).rows(CONVERSATION)
    row = cut.rows[0]
    assert row.input_ids == full.input_ids[:first_answer_end]
    assert supervised_spans(tok, row) == ["I am fine, thank you.<|im_end|>"]
    assert cut.dropped["turn_beyond_seq_length"] == 1


def test_tokenizer_without_chat_template_is_an_error(tmp_path):
    tok = build_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(SpeculatorsError, match="no chat template"):
        masks.Masker(tok, 64, {0}, where=str(tmp_path))


def test_show_row_marks_supervised_tokens(tokenizers):
    tok = tokenizers["chatml-generation"]
    row = masker(tok).rows(CONVERSATION[:2]).rows[0]
    shown = masks.show_row(tok, row.input_ids, row.loss_mask)
    assert shown.endswith("<|im_start|>assistant\n⟦I am fine, thank you.<|im_end|>⟧")


# Property test: user/system text uses capitals and digits, answers only lower case, so any
# supervised token with a capital or digit would be a user or system token.
ANSWER_TEXT = st.text(string.ascii_lowercase + " ,.!?", min_size=1, max_size=40).filter(str.strip)
OTHER_TEXT = st.text(
    string.ascii_uppercase + string.digits + " ,.", min_size=1, max_size=40
).filter(str.strip)


@st.composite
def conversations(draw):
    conv = []
    if draw(st.booleans()):
        conv.append({"role": "system", "content": draw(OTHER_TEXT)})
    for _ in range(draw(st.integers(1, 4))):
        conv.append({"role": "user", "content": draw(OTHER_TEXT)})
        conv.append({"role": "assistant", "content": draw(ANSWER_TEXT)})
    if draw(st.booleans()):
        conv.append({"role": "user", "content": draw(OTHER_TEXT)})
    return conv


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(conv=conversations(), name=st.sampled_from(sorted(TEMPLATES)))
def test_mask_never_marks_user_or_system_tokens(tokenizers, conv, name):
    tok = tokenizers[name]
    result = masker(tok).rows(conv)
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    closing = "<|eot_id|>" if name == "llama3-headers" else "<|im_end|>"
    think = "<think>\n\n</think>\n\n" if name == "qwen3-thinking" else ""
    assert result.rows
    for row in result.rows:
        for token, m in zip(row.input_ids, row.loss_mask):
            if m:
                piece = tok.decode([token])
                assert not any(c.isupper() or c.isdigit() for c in piece), (piece, row)
    if result.per_turn:  # each row supervises exactly its own answer, as the last turn
        assert [supervised_spans(tok, r) for r in result.rows] == [
            [think + a + closing] for a in answers
        ]
    else:  # every answer supervised, closing token included, nothing else
        last = len(answers) - 1
        assert "".join(supervised_spans(tok, result.rows[0])) == "".join(
            (think if i == last else "") + a + closing for i, a in enumerate(answers)
        )


@pytest.mark.parametrize("name", ["chatml-generation", "default-system"])
def test_truncated_answer_is_supervised_without_an_end_of_turn_and_ends_the_row(tokenizers, name):
    """A regenerated answer cut at max_new_tokens: its text is supervised, the template's
    <|im_end|> after it is not (the target never chose to stop there), and later turns are left
    out; earlier answers keep their closing token."""
    tok = tokenizers[name]
    eos = masks.end_of_turn_ids(tok) | {tok.convert_tokens_to_ids("<|im_end|>")}
    m = masks.Masker(tok, 4096, eos)
    cut = [
        CONVERSATION[0],
        CONVERSATION[1],
        CONVERSATION[2],
        {**CONVERSATION[3], "truncated": True},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
    (row,) = m.rows(cut).rows
    assert supervised_spans(tok, row) == [
        "I am fine, thank you.<|im_end|>",
        "The capital of France is Paris.",
    ]
    assert tok.decode(row.input_ids).endswith("Paris.")
    whole = m.rows(CONVERSATION[:4]).rows[0]
    assert row.input_ids == whole.input_ids[:-1]
    assert row.loss_mask == whole.loss_mask[:-1]


def test_generation_block_that_wraps_the_newline_after_the_end_of_turn(tmp_path):
    """A template whose {% generation %} block also holds the newline after <|im_end|>: the
    newline is never a target, and a truncated answer loses its <|im_end|> as well."""
    from transformers import AutoTokenizer

    template = CHATML_GENERATION.replace(
        "<|im_end|>{% endgeneration %}\n", "<|im_end|>\n{% endgeneration %}"
    )
    assert template != CHATML_GENERATION
    build_tokenizer(tmp_path, chat_template=template)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    eos = masks.end_of_turn_ids(tok) | {tok.convert_tokens_to_ids("<|im_end|>")}
    m = masks.Masker(tok, 4096, eos)
    assert m.mode == masks.GENERATION_MARKERS
    (row,) = m.rows(CONVERSATION).rows
    assert supervised_spans(tok, row) == [
        "I am fine, thank you.<|im_end|>",
        "The capital of France is Paris.<|im_end|>",
    ]
    (cut,) = m.rows([*CONVERSATION[:3], {**CONVERSATION[3], "truncated": True}]).rows
    assert supervised_spans(tok, cut)[-1] == "The capital of France is Paris."
    assert tok.decode(cut.input_ids).endswith("Paris.")
