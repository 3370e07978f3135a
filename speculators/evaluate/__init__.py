"""Stage 4, evaluate: measure how many draft tokens the target accepts, and how fast.

`inprocess` (CLI `evaluate`) decodes held-out prompts with transformers; `spec_decode` is the loop.
"""

from pathlib import Path


def add_common_arguments(p, output_help: str) -> None:
    """Options both evaluators (`evaluate`, `evaluate-vllm`) take, so they measure alike."""
    p.add_argument("--target", required=True, help="target (verifier) model folder or HF id")
    p.add_argument("--draft", required=True, type=Path, help="trained draft folder")
    p.add_argument(
        "--prompts", nargs="+", type=Path, help="prompt JSONL files (one benchmark, 'heldout')"
    )
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--benchmarks",
        default=None,
        help='JSON list of {"name", "paths", "num_prompts", "max_new_tokens"}, measured one'
        " after the other (replaces --prompts/--num-prompts/--max-new-tokens)",
    )
    p.add_argument(
        "--k", type=int, nargs="+", default=None, help="draft lengths (default: ttt_steps)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        nargs="+",
        default=[0.0],
        help="sampling temperatures, each measured: 0 = greedy, > 0 = rejection sampling",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the prompt sample and of sampled decoding"
    )
    p.add_argument("--output", required=True, type=Path, help=output_help)


def check_common_arguments(args) -> None:
    """One line for a value neither evaluator can measure with, before a model is loaded."""
    from speculators.errors import SpeculatorsError

    for name in ("num_prompts", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise SpeculatorsError(f"--{name.replace('_', '-')}", "must be at least 1")
    if not all(0 <= t < float("inf") for t in args.temperature):  # also refuses nan
        raise SpeculatorsError("--temperature", "must be finite and >= 0")
    if len(set(args.temperature)) != len(args.temperature):
        raise SpeculatorsError("--temperature", "a temperature is given twice")
    args.benchmark_list = benchmarks_of(args)
    if args.k and min(args.k) < 1:
        raise SpeculatorsError("--k", "draft lengths must be at least 1")
    if args.k and len(set(args.k)) != len(args.k):
        raise SpeculatorsError("--k", "a draft length is given twice")
    if not (args.draft / "config.json").is_file():
        raise SpeculatorsError(args.draft, "not a draft folder (no config.json)")


def benchmarks_of(args) -> list:
    """The benchmarks to measure: `--benchmarks`, else one 'heldout' set from `--prompts`."""
    from speculators.errors import SpeculatorsError
    from speculators.evaluate.prompts import Benchmark, parse_benchmarks

    if args.benchmarks:
        return parse_benchmarks(args.benchmarks)
    if not args.prompts:
        raise SpeculatorsError("--prompts", "give prompt files (or --benchmarks)")
    return [
        Benchmark("heldout", [str(p) for p in args.prompts], args.num_prompts, args.max_new_tokens)
    ]


def round_or_none(x: float | None, digits: int = 4) -> float | None:
    """`round` that keeps None (a setting that drafted nothing has no acceptance)."""
    return None if x is None else round(x, digits)
