"""GPU jobs check that they see the GPUs they asked for before doing any work.

A SLURM job can be granted N GPUs yet show fewer to the process (snakemake-executor-plugin-slurm
issue #459: `--ntasks-per-gpu` splits the allocation); failing at once beats a slow wrong run.
"""

from __future__ import annotations

import functools
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


# ---------------------------------------------------------------- precision policy
#
# One rule for every stage that runs the target or the draft (regenerate, hidden-states, train,
# evaluate, and their vLLM hand-overs): what a stage *computes* in is decided here, from the
# device; what it *stores* (hidden states, the draft's weights) is its own setting, cast on write.

NATIVE_BF16_ENV = "SPECULATORS_NATIVE_BF16"  # "1"/"0" overrides detection (tests, odd CPUs)
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_description() -> dict:
    """What benchmark figures are measured on: the CPU's model name, the flags that decide its
    matmul speed, its logical CPUs, and whether bf16 counts as native (see `native_bf16`)."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model
            )
    except OSError:
        pass
    flags = cpu_flags()
    named = {
        "avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX",
    }  # fmt: skip
    return {
        "model": model,
        "flags": [name for flag, name in named.items() if flag in flags],
        "cpus": os.cpu_count(),
        "native_bf16": native_bf16(),
    }


def cpu_summary() -> str:
    """`cpu_description` as one line, e.g. 'Intel Xeon (AVX2, AVX-512, AMX; 2 CPUs; bf16 native)'."""
    d = cpu_description()
    flags = ", ".join(d["flags"]) or "no AVX2"
    bf16 = "bf16 native" if d["native_bf16"] else "bf16 emulated: fp32 compute"
    return f"{d['model']} ({flags}; {d['cpus']} CPUs; {bf16})"


def describe(device="cpu") -> str:
    """The device figures were measured on, for data_config.json, eval JSON and the report:
    the GPU's name and count, or the CPU's model, flags and threads (`cpu_summary`)."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"{torch.get_num_threads()} threads on {cpu_summary()}"


def _bf16_matmul_is_fast() -> bool:
    """Measure: a bf16 matmul at least as fast as fp32 (about 10 ms). Flags alone can lie: a
    library limited to AVX2 (ONEDNN_MAX_CPU_ISA, a VM that hides AMX state) emulates bf16 at a
    60th of the fp32 rate even on a CPU that lists amx_bf16."""
    import time

    import torch

    def seconds(dtype) -> float:
        a = torch.ones(256, 512, dtype=dtype)
        b = torch.ones(512, 512, dtype=dtype)
        a @ b  # warm-up: kernel selection and packing
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return best

    return seconds(torch.bfloat16) <= seconds(torch.float32)


def check_precision_override() -> None:
    """Raise (one line) when `$SPECULATORS_NATIVE_BF16` is set to anything but 0 or 1."""
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced is not None and forced not in ("0", "1"):
        raise SpeculatorsError(NATIVE_BF16_ENV, f"must be 0 or 1, got {forced!r}")


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware: it lists AMX-BF16 or AVX512-BF16 *and* a
    measured bf16 matmul is not slower than fp32. `$SPECULATORS_NATIVE_BF16` (1/0) overrides."""
    check_precision_override()
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced is not None:
        return forced == "1"
    return bool(cpu_flags().intersection(_BF16_FLAGS)) and _bf16_matmul_is_fast()


def compute_dtype(device, stored=None):
    """The dtype a stage runs a model in, from the device and the weights' stored dtype.

    GPUs: the stored dtype (bf16 when unknown). CPUs: bf16 for half-precision weights only where
    bf16 is native (`native_bf16`; 3x the fp32 speed of SmolLM2 generation with AMX), else fp32,
    which is 60x faster than emulated bf16 on an AVX2-only CPU. fp32 weights stay fp32.
    `device` is a torch.device or its type name ("cpu", "cuda").
    """
    import torch

    half = (torch.bfloat16, torch.float16)
    if getattr(device, "type", device) != "cpu":
        # Quantised or unknown storage (int8, fp8, none given) computes in bf16.
        return stored if stored in (*half, torch.float32) else torch.bfloat16
    if (stored is None or stored in half) and native_bf16():
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype) -> str:
    """'float32' for torch.float32: the spelling vLLM's `dtype=` and the configs use."""
    return str(dtype).removeprefix("torch.")


def default_device() -> str:
    """ "cuda" when this process sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def target_compute_dtype(target, device=None):
    """`compute_dtype` for a target folder or Hugging Face id, from its config's dtype; `device`
    None means this process's default device (CUDA when visible)."""
    import torch
    from transformers import AutoConfig

    if device is None:
        device = default_device()
    config = AutoConfig.from_pretrained(target)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if not isinstance(stored, torch.dtype):
        stored = None  # not recorded: bf16 on GPUs, the CPU's policy for half precision
    return compute_dtype(device, stored)


def add_gpus_argument(parser) -> None:
    """`--gpus N`: the GPUs the job asked for (the stage's `gpus` config key), checked at start."""
    parser.add_argument(
        "--gpus", type=int, default=None, help="GPUs the job asked for; stop unless exactly these are visible"
    )  # fmt: skip


def check_job_gpus(gpus: int | None, key: str) -> None:
    """`require_gpus` for a stage's `--gpus` option; nothing to check when it was not given."""
    if gpus is not None:
        require_gpus(gpus, key)
