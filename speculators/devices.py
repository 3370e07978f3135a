"""GPU jobs check that they see the GPUs they asked for before doing any work.

A SLURM job can be granted N GPUs yet show fewer to the process (snakemake-executor-plugin-slurm
issue #459: `--ntasks-per-gpu` splits the allocation); failing at once beats a slow wrong run.
"""

from __future__ import annotations

import os

from speculators.errors import SpeculatorsError

# Environment variables that explain where a GPU count came from, shown in the error.
_GPU_ENV = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS")


def visible_gpus() -> int:
    """GPUs this process can use (CUDA_VISIBLE_DEVICES applies); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_gpus(expected: int, where: str = "gpus") -> int:
    """Raise unless exactly `expected` GPUs are visible; `expected` 0 (a CPU job) always passes.

    `where` names the config key or option that asked for the GPUs, so the one-line error
    points at what to change. Returns the number of visible GPUs.
    """
    if expected < 0:
        raise SpeculatorsError(where, f"GPU count must be >= 0, got {expected}")
    seen = visible_gpus()
    if expected == 0 or seen == expected:
        return seen
    env = ", ".join(f"{k}={os.environ[k]}" for k in _GPU_ENV if k in os.environ) or "no GPU env"
    hint = (
        "under SLURM the allocation did not reach this process: give the rule tasks_per_gpu: 0 "
        "(snakemake-executor-plugin-slurm #459) or check the --gpus/--gres request"
        if "SLURM_JOB_ID" in os.environ
        else "set CUDA_VISIBLE_DEVICES or the config's gpus to match this machine"
    )
    raise SpeculatorsError(
        where, f"the job asked for {expected} GPU(s) but sees {seen} ({env}); {hint}"
    )


def slurm_nodes() -> list[str]:
    """Host names of this SLURM job's allocation, first node first; [] outside SLURM.

    Inside a rule run by snakemake-executor-plugin-slurm only SLURM_JOB_ID survives (the
    jobstep plugin drops SLURM_NNODES and SLURM_JOB_NODELIST before running the rule's
    shell), so the node list is asked from `scontrol` when the environment lacks it.
    """
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    if not nodelist and not job_id:
        return []
    try:
        if not nodelist:
            show = _scontrol("show", "job", "--oneliner", job_id)
            fields = dict(f.split("=", 1) for f in show.split() if "=" in f)
            nodelist = fields.get("NodeList", "")
            if not nodelist or nodelist == "(null)":
                raise SpeculatorsError(f"SLURM job {job_id}", "scontrol shows no NodeList")
        return _scontrol("show", "hostnames", nodelist).split()
    except FileNotFoundError:
        raise SpeculatorsError("scontrol", "not found, but this is a SLURM job") from None


def _scontrol(*args: str) -> str:
    import subprocess

    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SpeculatorsError(f"scontrol {' '.join(args)}", proc.stderr.strip() or "failed")
    return proc.stdout


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AMX or AVX512-BF16)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_dtype(device: str, stored):
    """The dtype to run a target in: its stored dtype on GPUs; on CPUs bf16/fp16 weights run in
    bf16 only where the CPU has native bf16 (3x faster than fp32 for SmolLM2 generation on an
    AMX machine), else in fp32, which is faster than emulated bf16."""
    import torch

    if device != "cpu":
        return stored
    if stored in (torch.bfloat16, torch.float16) and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def add_gpus_argument(parser) -> None:
    """`--gpus N`: the GPUs the job asked for (the stage's `gpus` config key), checked at start."""
    parser.add_argument(
        "--gpus", type=int, default=None, help="GPUs the job asked for; stop unless exactly these are visible"
    )  # fmt: skip


def check_job_gpus(gpus: int | None, key: str) -> None:
    """`require_gpus` for a stage's `--gpus` option; nothing to check when it was not given."""
    if gpus is not None:
        require_gpus(gpus, key)
