#!/usr/bin/env python
"""Reference-compatible vocabulary mapping: token_freq.pt -> `d2t.npy` and `t2d.npy` in
--output-path.

Takes the flags of vllm-project/speculators' `scripts/build_vocab_mapping.py` and runs

    speculators vocab --token-freq FREQ --draft-vocab-size VD --output-dir OUT
        (--target T | --target-vocab-size V)

`d2t` is int64 [VD] (draft id i -> target id i + d2t[i]), `t2d` bool [V]; the VD most
frequent supervised tokens are kept, ties and padding going to the lowest ids, as in the
reference.
"""

from __future__ import annotations

import sys

from speculators.reference_scripts import ReferenceParser, run_stages

PROG = "build_vocab_mapping.py"


def build_parser() -> ReferenceParser:
    p = ReferenceParser(prog=PROG, description=__doc__)
    p.add_argument("--token-freq-path", required=True, help="token_freq.pt (token id -> count)")
    p.add_argument("--draft-vocab-size", required=True, type=int, help="Vd")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--target-vocab-size", type=int, help="V, the target's vocab size")
    size.add_argument("--target-model-path", help="target folder or HF id (V from its config)")
    p.add_argument("--output-path", required=True, help="folder for d2t.npy and t2d.npy")
    return p


def commands(args) -> list[list[str]]:
    """The `speculators` command line this script runs."""
    vocab = ["vocab", "--token-freq", args.token_freq_path]
    vocab += ["--draft-vocab-size", str(args.draft_vocab_size), "--output-dir", args.output_path]
    if args.target_model_path is not None:
        return [[*vocab, "--target", args.target_model_path]]
    return [[*vocab, "--target-vocab-size", str(args.target_vocab_size)]]


def main(argv: list[str] | None = None) -> int:
    return run_stages(PROG, commands(build_parser().parse_reference_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
