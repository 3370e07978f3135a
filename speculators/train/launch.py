"""Re-launches `speculators train` under torchrun when it asks for several processes.

One node: `torchrun --standalone`. Several nodes under SLURM: one `srun` task per node, each
running torchrun, meeting at the first host through the c10d rendezvous.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from speculators.devices import slurm_nodes
from speculators.errors import SpeculatorsError

log = logging.getLogger(__name__)

RDZV_PORT = 29500


def needs_launch(args: argparse.Namespace) -> bool:
    """More than one process wanted and not already one of torchrun's workers."""
    return (args.nproc_per_node > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ


def to_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Command-line options that parse back to `args` (for the re-launched workers)."""
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(action, argparse._StoreTrueAction):
            if value:
                argv.append(flag)
        elif value is None:
            continue
        elif isinstance(value, list):
            if value or action.nargs == "*":  # `--loggers` alone means none
                argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def launch_command(args: argparse.Namespace, worker_argv: list[str]) -> list[str]:
    # torchrun as a module of this interpreter: no reliance on PATH or an activated venv.
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    module = [*torchrun, "--nproc-per-node", str(args.nproc_per_node)]
    tail = ["-m", "speculators.cli", "train", *worker_argv]
    if args.nnodes == 1:
        return [*torchrun, "--standalone", *module[len(torchrun) :], *tail]
    # Not SLURM_NNODES/SLURM_JOB_NODELIST: the SLURM executor plugin removes them from the
    # rule's environment; slurm_nodes() asks scontrol for the job's hosts.
    hosts = slurm_nodes()
    if len(hosts) < args.nnodes:
        raise SpeculatorsError(
            "--nnodes",
            f"{args.nnodes} nodes need a SLURM allocation of as many (this job has"
            f" {len(hosts) or 'no SLURM allocation'}); elsewhere start torchrun yourself",
        )
    rdzv = [
        "--nnodes",
        str(args.nnodes),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{hosts[0]}:{RDZV_PORT}",
        "--rdzv-id",
        os.environ.get("SLURM_JOB_ID", "speculators-train"),
    ]
    srun = ["srun", "--ntasks-per-node=1", f"--nodes={args.nnodes}", "--kill-on-bad-exit=1"]
    return [*srun, *module, *rdzv, *tail]


def relaunch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Run this same training command as torchrun workers; fail if any worker fails."""
    cmd = launch_command(args, to_argv(parser, args))
    log.info("launching: %s", " ".join(cmd))
    sys.stdout.flush()
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise SpeculatorsError("train", f"torchrun workers failed (exit status {rc}); see above")
