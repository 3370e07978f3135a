"""vLLM backends: hidden-state capture, answer regeneration and the vLLM evaluator's engine code.

The submodules import vLLM and run only in the separate vLLM environment (`.venv-vllm`); this
file does not, so the main environment can locate that interpreter and hand work to it.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import speculators

# Where `scripts/install.sh vllm` puts the environment, relative to the repository.
REPO = Path(speculators.__file__).resolve().parent.parent
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def vllm_importable() -> bool:
    """True when this interpreter can run the vLLM backends itself."""
    return importlib.util.find_spec("vllm") is not None


def find_vllm_python(configured: str | os.PathLike | None = None) -> Path | None:
    """The vLLM interpreter: `configured`, else $SPECULATORS_VLLM_PYTHON, else .venv-vllm.

    Returns None when the chosen candidate does not exist (a configured path is never
    silently replaced by the default).
    """
    candidate = configured or os.environ.get("SPECULATORS_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON
    path = Path(candidate)
    # No resolve(): a venv's python is a symlink to the base interpreter, which lacks vLLM.
    return path if path.is_file() and os.access(path, os.X_OK) else None


def run_in_vllm_python(python: str | os.PathLike, argv: list[str]) -> int:
    """Run `speculators <argv>` with the vLLM interpreter; returns its exit status.

    PYTHONPATH points at this checkout, so the vLLM environment runs the same code even if its
    editable install came from another clone.
    """
    env = dict(os.environ)
    # Only a source checkout: an installed package's parent is site-packages, whose torch
    # would shadow the vLLM environment's own.
    if (REPO / "pyproject.toml").is_file():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [str(python), "-m", "speculators.cli", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.run(cmd, env=env).returncode


def rerun_with_vllm(configured: str | os.PathLike | None, argv: list[str], what: str) -> None:
    """Run `speculators <argv>` in the vLLM environment for a `--backend vllm` stage; one-line
    errors when that environment is missing or the run fails (`what` names the work)."""
    from speculators.errors import SpeculatorsError

    python = find_vllm_python(configured)
    if python is None:
        raise SpeculatorsError(
            "--backend vllm",
            "vLLM is not installed in this Python and no vLLM environment was found"
            " (bash scripts/install.sh vllm, or --vllm-python / $SPECULATORS_VLLM_PYTHON)",
        )
    returncode = run_in_vllm_python(python, argv)
    if returncode != 0:
        raise SpeculatorsError(
            "--backend vllm", f"{what} in {python} failed (exit status {returncode})"
        )


def shutdown_engine(llm) -> None:
    """Stop a `vllm.LLM`'s engine-core processes now: the next engine gets the memory, and a
    process does not linger on the engine's threads after its work is done."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()
