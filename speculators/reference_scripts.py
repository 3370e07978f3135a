"""What the reference-compatible scripts (`scripts/data_generation_offline.py`,
`scripts/build_vocab_mapping.py`, `scripts/train.py`) share.

Each script accepts the flags of the script of the same name in vllm-project/speculators,
translates them into `speculators <stage>` command lines and runs those through
`speculators.cli.main`: the same parsers, checks and stage functions as the workflow, no
second implementation. A reference flag this project does not support is still recognised,
so that giving it stops with one line naming it (exit status 2) before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)

UNSUPPORTED_HINT = "see the README section 'Coming from the reference scripts'"


class ReferenceParser(argparse.ArgumentParser):
    """argparse with one-line errors and reference flags that are refused when given."""

    def __init__(self, *args, **kwargs):
        # The description is the script's docstring: its command mapping, kept as written.
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._unsupported: dict[str, tuple[str, str, object]] = {}

    def error(self, message: str):
        # argparse prints the usage first; here a bad command line is a single line.
        self.exit(2, f"{self.prog}: error: {message} ({UNSUPPORTED_HINT})\n")

    def add_unsupported(
        self, flag: str, why: str, *, takes_value: bool = True, type=str, accepted=None
    ) -> None:
        """Recognise the reference flag `flag` but stop if it is given (with a value other
        than `accepted`, the one value whose meaning this project already has)."""
        dest = flag.lstrip("-").replace("-", "_")
        kwargs = {"type": type, "metavar": "X"} if takes_value else {"action": "store_true"}
        suffix = f" (only {accepted})" if accepted is not None else ""
        self.add_argument(
            flag, dest=dest, default=argparse.SUPPRESS, help=f"not supported{suffix}: {why}",
            **kwargs,
        )  # fmt: skip
        self._unsupported[dest] = (flag, why, accepted)

    def parse_reference_args(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        args = self.parse_args(argv)
        for dest, (flag, why, accepted) in self._unsupported.items():
            if hasattr(args, dest):
                value = getattr(args, dest)
                if accepted is not None and value == accepted:
                    delattr(args, dest)
                    continue
                shown = flag if value is True else f"{flag} {value}"
                self.error(f"{shown} is not supported: {why}")
        return args


def run_stages(prog: str, commands: Sequence[Sequence[str]]) -> int:
    """Run each `speculators <argv>` in order through the CLI; the first failure's status."""
    from speculators.cli import main

    for argv in commands:
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per rank
            print(f"{prog}: speculators {shlex.join(argv)}", file=sys.stderr, flush=True)
        status = main(list(argv))
        if status != 0:
            return status
    return 0


def fail(prog: str, where, problem: str) -> int:
    """Report bad input found by a script itself as the CLI does: one line, status 1."""
    print(f"{prog}: error: {where}: {problem}", file=sys.stderr)
    return 1
