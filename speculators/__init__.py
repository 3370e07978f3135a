"""Train EAGLE-3 draft models ("speculators") for a target LLM and publish them for vLLM.

Every pipeline stage is a function from files to files, exposed as a `speculators <stage>`
subcommand; the Snakemake workflow at the repository root only wires those commands together.
"""

__version__ = "0.1.0"
