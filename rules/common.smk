# Config validation and the helper functions the stage rules use; no rules here.
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError

from speculators.config import validate_config
from speculators.errors import SpeculatorsError

try:
    validate_config(config, Path(workflow.basedir) / "config" / "schema.yaml")
except SpeculatorsError as e:
    raise WorkflowError(f"invalid configuration: {e}") from None

RUNS = config["runs"]
GGUF_MODELS = [name for name, m in config["models"].items() if "gguf_package" in m]
CHITCHAT_DATASETS = [n for n, d in config["datasets"].items() if d["source"] == "chitchat"]


wildcard_constraints:
    run="|".join(map(re.escape, RUNS)) or "(?!)",
    model="|".join(map(re.escape, config["models"])) or "(?!)",
    dataset="|".join(map(re.escape, config["datasets"])) or "(?!)",


def model_cfg(name):
    return config["models"][name]


def target_path(run):
    """Folder (or Hugging Face id) of a run's target model."""
    name = RUNS[run]["target"]
    m = model_cfg(name)
    return f"resources/models/{name}" if "gguf_package" in m else m["path"]


def target_input(wildcards):
    """The exported target folder when the workflow makes it; nothing for user paths/ids."""
    name = RUNS[wildcards.run]["target"]
    return [f"resources/models/{name}"] if "gguf_package" in model_cfg(name) else []


def dataset_source(name):
    """What `prepare`/`regenerate` read for a dataset: a local file, built-in name or HF id."""
    src = config["datasets"][name]["source"]
    return f"resources/datasets/{name}.jsonl" if src == "chitchat" else src


def dataset_input(name):
    src = config["datasets"][name]["source"]
    return [f"resources/datasets/{name}.jsonl"] if src == "chitchat" else []


def stage_cfg(run, stage):
    return RUNS[run][stage]


def final_outputs():
    """What `snakemake` with no target builds: each run's furthest stage."""
    outputs = [f"resources/models/{m}" for m in GGUF_MODELS]
    outputs += [f"resources/datasets/{d}.jsonl" for d in CHITCHAT_DATASETS]
    return outputs
