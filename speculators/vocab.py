"""`speculators vocab`: the draft vocabulary as `d2t.npy` / `t2d.npy` from token frequencies.

The draft predicts only the `draft_vocab_size` most frequent supervised tokens; `d2t` maps a
draft id i to the target id `i + d2t[i]` (what vLLM reads), `t2d` marks those target ids.
`vocab.json` records the sha256 of the token_freq.pt used (`check_vocab_source`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from speculators.errors import SpeculatorsError
from speculators.fileio import atomic_path, read_json, write_json
from speculators.targets import target_dims

log = logging.getLogger(__name__)

# Beside d2t.npy/t2d.npy: the sha256 of the token_freq.pt they were built from (and their own),
# so `train --token-freq` refuses a mapping made from other data.
VOCAB_RECORD = "vocab.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token-freq", required=True, type=Path, help="token_freq.pt (token id -> count)"
    )
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--target", help="target model folder or Hugging Face id (for V)")
    size.add_argument(
        "--target-vocab-size", type=int, help="V itself, instead of reading it from --target"
    )
    p.add_argument("--draft-vocab-size", required=True, type=int, help="Vd, at most the target's V")
    p.add_argument("--output-dir", required=True, type=Path, help="folder for d2t.npy and t2d.npy")


def target_vocab_size(target: str) -> int:
    """V from the target's config; the text model's for vision-language configs."""
    return target_dims(target, keys=("vocab_size",))["vocab_size"]


def load_counts(path: Path, vocab_size: int) -> np.ndarray:
    """token_freq.pt (a {token id: count} dict or a 1-D count tensor) as int64 counts [V]."""
    if not path.is_file():
        raise SpeculatorsError(path, "file not found")
    try:
        freq = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise SpeculatorsError(
            path, f"not a readable token_freq.pt ({str(e).splitlines()[0][:120]})"
        ) from None
    if isinstance(freq, torch.Tensor) and freq.dim() == 1:
        freq = dict(enumerate(freq.tolist()))
    if not isinstance(freq, dict) or not all(isinstance(k, int) for k in freq):
        raise SpeculatorsError(path, "expected a {token id: count} dict")
    ids = np.fromiter(freq.keys(), dtype=np.int64, count=len(freq))
    values = np.fromiter((int(v) for v in freq.values()), dtype=np.int64, count=len(freq))
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
        raise SpeculatorsError(
            path,
            f"token id {bad} outside the target's vocabulary (size {vocab_size}): another tokenizer?",
        )
    if len(values) and values.min() < 0:
        raise SpeculatorsError(path, "negative token count")
    counts = np.zeros(vocab_size, dtype=np.int64)
    counts[ids] = values
    return counts


def build_mapping(counts: np.ndarray, draft_vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(d2t int64 [Vd], t2d bool [V]) keeping the Vd most frequent ids.

    A stable sort on descending counts breaks ties towards the lower id, and unseen ids (count
    0) come last in id order, which is exactly "pad with the lowest unused ids".
    """
    vocab_size = len(counts)
    if not 1 <= draft_vocab_size <= vocab_size:
        raise SpeculatorsError(
            "draft_vocab_size",
            f"{draft_vocab_size} must be between 1 and the target's vocab size {vocab_size}",
        )
    selected = np.sort(np.argsort(-counts, kind="stable")[:draft_vocab_size])
    d2t = (selected - np.arange(draft_vocab_size)).astype(np.int64)
    t2d = np.zeros(vocab_size, dtype=bool)
    t2d[selected] = True
    return d2t, t2d


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_vocab_source(vocab_dir: Path, token_freq: Path) -> None:
    """The vocab folder must record (in vocab.json) the sha256 of `token_freq`: a mapping built
    from other data (or of another size left in place) stops with one line, never reused."""
    record = Path(vocab_dir) / VOCAB_RECORD
    if not record.is_file():
        raise SpeculatorsError(
            record,
            "missing: this vocabulary's source is unknown; rebuild it with `speculators vocab`",
        )
    info = read_json(record)
    digest = file_sha256(token_freq)
    if info.get("token_freq_sha256") != digest:
        raise SpeculatorsError(
            record,
            f"built from token counts with sha256 {str(info.get('token_freq_sha256'))[:12]}...,"
            f" not from {token_freq} ({digest[:12]}...): a mapping of other data",
        )


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)  # a file object: np.save would append ".npy" to the temporary name


def run(args: argparse.Namespace) -> None:
    if args.target is not None:
        vocab_size = target_vocab_size(args.target)
    elif args.target_vocab_size < 1:
        raise SpeculatorsError("--target-vocab-size", f"{args.target_vocab_size} must be >= 1")
    else:
        vocab_size = args.target_vocab_size
    if args.draft_vocab_size > vocab_size:
        raise SpeculatorsError(
            "--draft-vocab-size",
            f"{args.draft_vocab_size} exceeds the target's vocab size {vocab_size}",
        )
    counts = load_counts(args.token_freq, vocab_size)
    d2t, t2d = build_mapping(counts, args.draft_vocab_size)
    if args.draft_vocab_size == vocab_size:
        log.info(
            "draft vocab size equals the target's (%d): identity mapping, d2t all zeros", vocab_size
        )
    total = int(counts.sum())
    seen = int((counts > 0).sum())
    covered = int(counts[t2d].sum())
    log.info(
        "draft vocab %d of %d: %d distinct tokens seen, %.2f%% of %d supervised tokens covered",
        args.draft_vocab_size,
        vocab_size,
        seen,
        100.0 * covered / max(total, 1),
        total,
    )
    if seen < args.draft_vocab_size:
        log.info("padded with the %d lowest unused ids", args.draft_vocab_size - seen)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    _save_npy(args.output_dir / "t2d.npy", t2d)
    _save_npy(args.output_dir / "d2t.npy", d2t)
    write_json(
        args.output_dir / VOCAB_RECORD,
        {
            "token_freq": str(args.token_freq),
            "token_freq_sha256": file_sha256(args.token_freq),
            "draft_vocab_size": args.draft_vocab_size,
            "vocab_size": vocab_size,
            "d2t_sha256": file_sha256(args.output_dir / "d2t.npy"),
            "t2d_sha256": file_sha256(args.output_dir / "t2d.npy"),
        },
    )
    log.info("wrote %s and %s", args.output_dir / "d2t.npy", args.output_dir / "t2d.npy")
