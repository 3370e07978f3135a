"""SLURM profiles: what sbatch gets for each GPU rule (built by the executor plugin's own code
from the resources a dry run shows) matches what the rule declares; the profiles stay commented,
site-neutral and in step with each other and with the multi-node example."""

import re
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO
from examples_support import EXAMPLES, planned_example
from snakemake_executor_plugin_slurm.submit_string import get_submit_command
from snakemake_executor_plugin_slurm.utils import set_gres_string
from snakemake_executor_plugin_slurm_jobstep import get_cpu_setting, get_gpu_setting

PROFILES = REPO / "profiles"
SITE_KEYS = ("slurm_partition", "slurm_account", "gpu_model", "constraint", "qos")


class _Resources(dict):
    """The plugin reads resources both as `job.resources.get(k)` and `job.resources.k`."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def sbatch_call(job: dict) -> str:
    """The sbatch command line snakemake-executor-plugin-slurm builds for a planned job."""
    res = _Resources(
        {k: v for k, v in job["resources"].items() if not isinstance(v, str) or "<" not in v}
    )
    fake = SimpleNamespace(resources=res, threads=job["threads"], name=job["rule"])
    params = {
        "run_uuid": "uuid",
        "slurm_logfile": "logs/slurm/x.log",
        "comment_str": f"rule_{job['rule']}",
        "account": "",
        "partition": "",
        "workdir": "/work",
    }
    return get_submit_command(fake, params) + set_gres_string(fake), fake


def profile_for(example) -> str:
    return "slurm-multinode" if "70b" in example.stem else "slurm"


def _is_gpu_job(job: dict) -> bool:
    return bool(job["resources"].get("gpu")) or "gpu" in str(job["resources"].get("gres", ""))


def _keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _keys(v)


def _options(call: str) -> list[str]:
    return call.split()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_sbatch_options_of_gpu_rules_match_their_resources(example):
    jobs = planned_example(example, profile_for(example))
    gpu_jobs = [
        j for j in jobs if j["resources"].get("gpu") or "gpu" in str(j["resources"].get("gres", ""))
    ]
    assert gpu_jobs, "every example has GPU stages"
    for job in gpu_jobs:
        res = job["resources"]
        call, fake = sbatch_call(job)
        opts = _options(call)
        assert f"-t {res['runtime']}" in call, call
        assert f"--mem {res['mem_mb']}" in call, call
        # Never --ntasks-per-gpu: it would split the GPUs over several tasks (plugin #459).
        assert not any(o.startswith("--ntasks-per-gpu") for o in opts), call
        if "gres" in res:  # multi-node: GPUs per node, one task per node
            assert f"--gres={res['gres']}" in opts and f"--nodes={res['nodes']}" in opts, call
            assert f"--ntasks={res['tasks']}" in opts, call
            assert not any(o.startswith("--gpus") for o in opts), call
            assert f"--cpus-per-task={res['cpus_per_task']}" in opts, call
        else:  # one node: all GPUs of the job, visible to its single srun step
            assert f"--gpus={res['gpu']}" in opts, call
            step = get_gpu_setting(fake)
            assert step == f"--gpus={res['gpu']}", step
            if "cpus_per_gpu" in res:
                assert f"--cpus-per-gpu={res['cpus_per_gpu']}" in opts, call
            else:
                assert f"--cpus-per-task={job['threads']}" in opts, call
            assert get_cpu_setting(fake, True) in opts


def test_multinode_profile_matches_the_70b_example():
    example = REPO / "config" / "examples" / "llama-3.3-70b-instruct.yaml"
    (run,) = yaml.safe_load(example.read_text())["runs"].values()
    train = yaml.safe_load((PROFILES / "slurm-multinode" / "config.yaml").read_text())[
        "set-resources"
    ]["train_draft"]
    assert train["nodes"] == run["train"]["nodes"] == train["tasks"]  # one torchrun per node
    assert train["gres"] == f"gpu:{run['train']['gpus']}"
    assert train["tasks_per_gpu"] == 0 and train["gpu"] == 0 and "mpi" in train


def test_multinode_profile_repeats_the_slurm_profile():
    single = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    multi = yaml.safe_load((PROFILES / "slurm-multinode" / "config.yaml").read_text())
    assert {k: v for k, v in multi.items() if k != "set-resources"} == single
    assert set(multi["set-resources"]) == {"train_draft"}


@pytest.mark.parametrize("profile", ["slurm", "slurm-multinode"])
def test_profile_is_site_neutral_and_every_entry_commented(profile):
    path = PROFILES / profile / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg["executor"] == "slurm"
    for key in ("retries", "rerun-incomplete", "latency-wait", "jobs", "slurm-logdir"):
        assert key in cfg, key
    # Site settings come from the user; and no default-resources, which would replace theirs.
    assert not set(_keys(cfg)) & set(SITE_KEYS)
    assert "default-resources" not in cfg
    text = path.read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert lines[i - 1].lstrip().startswith("#"), f"{path}:{i + 1} has no comment: {line}"


def test_every_rule_scales_its_runtime_with_the_attempt():
    # profiles/slurm retries failed jobs; one killed at its time limit must get more time.
    for smk in (REPO / "rules").glob("*.smk"):
        text = smk.read_text()
        runtimes = re.findall(r"^\s+runtime=(.+),$", text, flags=re.M)
        assert len(runtimes) == len(re.findall(r"^rule \w+:", text, flags=re.M)), smk.name
        assert all(r.startswith("attempt_runtime(") for r in runtimes), (smk.name, runtimes)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_partition_config_sends_gpu_jobs_to_gpu_partition(example):
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file

    partitions = read_partition_file(PROFILES / "slurm" / "partitions.example.yaml")
    logger = SimpleNamespace(debug=print, info=print, warning=print)
    for job in planned_example(example, profile_for(example)):
        if job["rule"] == "all":
            continue
        _, fake = sbatch_call(job)
        want = "gpu" if _is_gpu_job(job) else "cpu"
        assert get_best_partition(partitions, fake, logger) == want, job
