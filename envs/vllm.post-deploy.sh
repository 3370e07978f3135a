#!/usr/bin/env bash
# Snakemake runs this inside a freshly created envs/vllm.yaml environment
# (--software-deployment-method conda). It installs this repository's `speculators` package
# (the command every rule calls) into that environment. Done here rather than as a pip `-e ..`
# line in the env file, because Snakemake copies env files to .snakemake/conda/ before creating
# them, where a relative path no longer points at the repository; this script runs from its
# own place in the repository, so the path below is always right. Editable, so the rules see
# the checked-out code; --no-deps, because vllm.yaml already lists the dependencies.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python -m pip install --no-deps -e "$repo"
