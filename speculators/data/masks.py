"""Assistant-only loss masks from the target's own chat template, for one conversation at a time.

Uses the template's `{% generation %}` markers when it has them, else render boundaries (tokens
between the render of conv[:j] + generation prompt and the render of conv[:j+1] belong to turn j).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from speculators.errors import SpeculatorsError

GENERATION_MARKERS = "generation-markers"
RENDER_BOUNDARIES = "render-boundaries"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
PER_TURN_REASON = (
    "the template renders an earlier assistant turn differently once later turns follow "
    "(e.g. thinking blocks kept only in the last turn), so each turn gets its own row, "
    "rendered as the last turn"
)
# A short conversation that reveals whether a template re-renders earlier turns.
_PROBE = [
    {"role": "user", "content": "Hi there."},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "Why did the chicken cross the road?"},
]


@dataclass
class Row:
    input_ids: list[int]
    loss_mask: list[int]
    turn: int  # assistant-turn ordinal this row supervises; -1 = all of the conversation's turns


@dataclass
class Result:
    rows: list[Row] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # reason -> rows/turns not emitted
    per_turn: bool = False


def chat_template(tokenizer, where) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: the default one is what chat uses
        template = template.get("default")
    if not template:
        raise SpeculatorsError(where, "the tokenizer has no chat template")
    return template


def template_mode(tokenizer, where) -> str:
    has_markers = _GENERATION_TAG.search(chat_template(tokenizer, where))
    return GENERATION_MARKERS if has_markers else RENDER_BOUNDARIES


def end_of_turn_ids(tokenizer, target: str | Path | None = None) -> set[int]:
    """Ids that end a generated answer: the tokenizer's EOS and generation_config's EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = Path(target) / "generation_config.json" if target else None
    if config is not None and config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


class Masker:
    """Turns conversations into (input_ids, loss_mask) rows for one tokenizer and seq_length."""

    def __init__(self, tokenizer, seq_length: int, eos_ids: set[int], where="target"):
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.eos_ids = eos_ids
        self.mode = template_mode(tokenizer, where)
        # Markers give one mask per render of the whole conversation; that is only right when
        # earlier turns keep their rendering, which the probe checks once per template.
        self.markers_per_turn = (
            self.mode == GENERATION_MARKERS and self.boundary_rows(_PROBE).per_turn
        )

    def render(self, messages: list[dict], generation_prompt: bool, tools=None) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
        # The template writes BOS itself; vLLM also tokenises chat renders without extras.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _span_end(self, ids: list[int], start: int, end: int) -> int:
        """End of turn = just after its last EOS id; template text after it (a newline) is
        never sampled at serving time, so it carries no loss."""
        for k in range(end - 1, start - 1, -1):
            if ids[k] in self.eos_ids:
                return k + 1
        return end

    def rows(self, conversation: list[dict], tools: list[dict] | None = None) -> Result:
        """Rows of one conversation (messages as `sources.parse_row` gives them: reasoning,
        tool calls and tool results included; `tools` = the row's tool definitions, passed to
        the template). Only assistant turns are supervised: their text, reasoning and
        tool-call tokens as the template renders them, up to the end-of-turn id."""
        answers = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        # An answer cut at max_new_tokens ("truncated": true) is the last one trained on: what
        # follows it was never a reply to what the target said.
        cut = next((i for i in answers if conversation[i].get("truncated")), None)
        last = answers[-1] if cut is None else cut
        # Turns after the last answer carry no loss: leave them out of the row.
        conversation = conversation[: last + 1]
        try:
            if self.mode == GENERATION_MARKERS and not self.markers_per_turn:
                result = self.marker_rows(conversation, tools)
            else:
                result = self.boundary_rows(conversation, tools)
        except SpeculatorsError:
            raise
        except Exception:  # jinja raise_exception, role-order checks of strict templates
            return Result(dropped=Counter(template_error=1))
        if cut is not None:
            last_turn = sum(m["role"] == "assistant" for m in conversation) - 1
            for row in result.rows:
                if row.turn in (-1, last_turn):
                    self._unclose(row)
        return result

    def _unclose(self, row: Row) -> None:
        """The template closes every answer with its end-of-turn token; a truncated answer was
        never closed by the target, so that token (and anything after it) is not a target."""
        while row.input_ids and row.input_ids[-1] in self.eos_ids:
            row.input_ids.pop()
            row.loss_mask.pop()

    def marker_rows(self, conversation: list[dict], tools=None) -> Result:
        enc = self.tokenizer.apply_chat_template(
            conversation,
            tools=tools,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        return self._finish([(ids, self._cut_after_end_of_turn(ids, mask), -1)], False)

    def _cut_after_end_of_turn(self, ids: list[int], mask: list[int]) -> list[int]:
        """A `{% generation %}` block may also wrap what the template writes after the
        end-of-turn token (a newline): as with render boundaries, nothing after a supervised
        span's last end-of-turn id is a target."""
        mask = list(mask)
        k = 0
        while k < len(mask):
            if not mask[k]:
                k += 1
                continue
            end = k
            while end < len(mask) and mask[end]:
                end += 1
            stop = self._span_end(ids, k, end)
            mask[stop:end] = [0] * (end - stop)
            k = end
        return mask

    def boundary_rows(self, conversation: list[dict], tools=None) -> Result:
        dropped = Counter()
        spans = []  # (turn, start, end, tokens of conv[:j+1])
        chained = True  # every render is a token prefix of the next one
        previous: list[int] = []
        turns = [j for j, m in enumerate(conversation) if m["role"] == "assistant"]
        for turn, j in enumerate(turns):
            prompt = self.render(conversation[:j], True, tools)
            if len(prompt) >= self.seq_length:
                dropped["turn_beyond_seq_length"] += len(turns) - turn
                break
            full = self.render(conversation[: j + 1], False, tools)
            if full[: len(prompt)] != prompt:
                # The template renders the history differently once this answer follows it
                # (gpt-oss drops a tool call's analysis after a final answer): the row is the
                # prompt as served plus the answer as the template renders it last.
                answer = self._answer_tokens(full, prompt, conversation[:j], tools)
                chained = False
                if answer is None:
                    dropped["turn_prefix_mismatch"] += 1
                    continue
                full = prompt + answer
            if prompt[: len(previous)] != previous:
                chained = False
            spans.append((turn, len(prompt), self._span_end(full, len(prompt), len(full)), full))
            previous = full
        if chained and spans:
            ids = spans[-1][3]
            mask = [0] * len(ids)
            for _, start, end, _ in spans:
                mask[start:end] = [1] * (end - start)
            result = self._finish([(ids, mask, -1)], False)
        else:
            candidates = []
            for turn, start, end, ids in spans:
                mask = [0] * start + [1] * (end - start) + [0] * (len(ids) - end)
                candidates.append((ids, mask, turn))
            result = self._finish(candidates, True)
        result.dropped.update(dropped)
        return result

    def _answer_tokens(self, full, prompt, history, tools, min_match: int = 8):
        """The answer's tokens in `full` (the render ending with it): they follow the
        generation prompt at the position whose preceding tokens best match the end of the
        history's own render (at least `min_match` tokens, or the whole history); None when no
        position qualifies."""
        history_ids = self.render(history, False, tools)
        if prompt[: len(history_ids)] != history_ids:
            return None
        gen = prompt[len(history_ids) :]
        best, best_match = None, min(min_match, len(history_ids))
        for s in range(len(full) - len(gen), 0, -1):
            if full[s : s + len(gen)] != gen:
                continue
            match = 0
            while match < min(s, len(history_ids)) and (
                full[s - 1 - match] == history_ids[-1 - match]
            ):
                match += 1
            if match >= best_match and (best is None or match > best[1]):
                best = (s, match)
        if best is None or best[0] + len(gen) >= len(full):
            return None
        return full[best[0] + len(gen) :]

    def _finish(self, candidates, per_turn: bool) -> Result:
        """Truncate to seq_length and end each row at its last supervised token (what follows
        is never a training target and would only cost hidden-state compute)."""
        result = Result(per_turn=per_turn)
        for ids, mask, turn in candidates:
            ids, mask = ids[: self.seq_length], mask[: self.seq_length]
            stop = max((k + 1 for k, m in enumerate(mask) if m), default=0)
            if stop == 0:
                result.dropped["no_supervised_tokens"] += 1
                continue
            result.rows.append(Row(ids[:stop], [int(m) for m in mask[:stop]], turn))
        return result


def show_row(tokenizer, input_ids: list[int], loss_mask: list[int]) -> str:
    """The row as text with supervised stretches wrapped in ⟦ ⟧, for a person to check."""
    parts, start = [], 0
    for k in range(1, len(input_ids) + 1):
        if k == len(input_ids) or loss_mask[k] != loss_mask[start]:
            text = tokenizer.decode(input_ids[start:k])
            parts.append(f"⟦{text}⟧" if loss_mask[start] else text)
            start = k
    return "".join(parts)
