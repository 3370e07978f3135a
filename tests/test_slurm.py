"""The workflow on a real SLURM: jobs go through profiles/slurm, sacct records them, and the
outputs equal a local run. Needs the one-machine cluster of scripts/slurm_local.sh (CI starts it).
"""

import filecmp
import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_snakemake, snakemake_cmd

pytestmark = pytest.mark.slurm


def _cluster_ready() -> str | None:
    """None when a SLURM node accepts jobs, else why the tests are skipped."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client commands not installed (run: sudo bash scripts/slurm_local.sh)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.startswith(("idle", "mixed")) for s in states):
        return f"no idle SLURM node (sinfo: {proc.stdout.strip() or proc.stderr.strip()}); run scripts/slurm_local.sh"
    if shutil.which("sacct") is None:
        return "sacct missing: the executor plugin needs it for job states"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = _cluster_ready()
    if reason:
        pytest.skip(reason)


def slurm_cmd(workdir: Path, profile: str, *args: str, snakefile: Path | None = None) -> list:
    """snakemake through a workflow profile with the executor plugin, as a user runs it; the
    site settings go on the command line as README 'Running on SLURM' documents."""
    return snakemake_cmd() + [
        "-s",
        str(snakefile or REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--workflow-profile",
        str(REPO / "profiles" / profile),
        "--default-resources",
        "slurm_partition=debug",
        "slurm_account=root",
        # The plugin waits 40 s before its first status query; a test cluster answers at once.
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--latency-wait",
        "5",
        # The test node has 2 CPUs; rules asking for more threads would pend forever
        # (PartitionConfig). Users with small nodes pass the same option.
        "--max-threads",
        "2",
        *args,
    ]


def slurm_snakemake(workdir: Path, profile: str, *args: str, snakefile: Path | None = None):
    cmd = slurm_cmd(workdir, profile, *args, snakefile=snakefile)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def sacct_jobs(workdir: Path, since: str) -> list[dict]:
    """Jobs sacct recorded since `since` that ran in `workdir` (one row per job allocation)."""
    proc = subprocess.run(
        [
            "sacct",
            "-X",
            "-n",
            "-P",
            "-S",
            since,
            "-o",
            "JobID,JobName,State,Comment,WorkDir,Timelimit",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [
        dict(zip(["id", "name", "state", "comment", "workdir", "timelimit"], line.split("|")))
        for line in proc.stdout.splitlines()
    ]
    return [r for r in rows if Path(r["workdir"]).resolve() == workdir.resolve()]


ACTIVE = {"PENDING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED"}


def _wait_for_accounting(workdir: Path, since: str, n: int) -> list[dict]:
    """slurmctld forwards finished jobs to slurmdbd asynchronously: give it a few seconds."""
    for _ in range(30):
        jobs = sacct_jobs(workdir, since)
        if len(jobs) >= n and not any(j["state"] in ACTIVE for j in jobs):
            return jobs
        time.sleep(1)
    return sacct_jobs(workdir, since)


def _tree(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _same_content(a: Path, b: Path) -> bool:
    """Byte-equal, or for torch/JSON files equal once loaded: torch.save embeds the temporary
    file name and a random serialization id; JSON records wall times and creation times."""
    if filecmp.cmp(a, b, shallow=False):
        return True
    if a.suffix == ".pt":
        import torch

        return _equal(torch.load(a, weights_only=False), torch.load(b, weights_only=False))
    if a.suffix == ".json":
        return _drop_volatile(json.loads(a.read_text())) == _drop_volatile(
            json.loads(b.read_text())
        )
    return False


def _drop_volatile(obj):
    if isinstance(obj, dict):
        return {k: _drop_volatile(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


def _equal(x, y) -> bool:
    import torch

    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(map(_equal, x, y))
    return x == y


# Wall times, creation times and the thread count in a job's device line differ between runs.
VOLATILE_KEYS = {"seconds", "elapsed_s", "wall_s", "created_at", "timestamp", "device"}


def _finished_rules(output: str) -> list[str]:
    return [
        line.split("(Rule: ")[1].rstrip(")")
        for line in output.splitlines()
        if line.startswith("Finished jobid") and "(Rule: " in line
    ]


def test_workflow_through_slurm_matches_local_run(slurm_cluster, tiny_llama, tmp_path):
    cfg = {
        "models": {"tiny": {"path": str(tiny_llama)}},
        "datasets": {"chitchat": {"source": "chitchat"}},
        "runs": {
            "tiny-chitchat": {
                "target": "tiny",
                "datasets": {"chitchat": {"max_samples": 40}},
                "prepare": {"seq_length": 64, "eval_prompts": 4},
                "hidden_states": {"dtype": "float32", "layer_ids": [1, 2, 3, 4]},
                "vocab": {"draft_vocab_size": 128},
            }
        },
    }
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    # The chats, their tokenisation, the hidden states (on CPU) and the vocab: five jobs.
    targets = [
        "results/tiny-chitchat/hidden_states/chitchat/data_config.json",
        "results/tiny-chitchat/vocab/128/d2t.npy",
    ]
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    local.mkdir()
    cluster.mkdir()

    run_snakemake(local, *targets, configfile=cfgfile, check=True)

    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    proc = slurm_snakemake(cluster, "slurm", *targets, f"--configfile={cfgfile}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    ran = _finished_rules(out)
    assert sorted(ran) == [
        "assets_export_chats",
        "hidden_states_capture",
        "prepare_combine_freq",
        "prepare_dataset",
        "vocab_mapping",
    ], out

    # Every rule ran as its own SLURM job: sacct knows each, by the plugin's rule comment.
    jobs = _wait_for_accounting(cluster, since, len(ran))
    assert sorted(j["comment"].split("_wildcards_")[0] for j in jobs) == sorted(
        f"rule_{r}" for r in ran
    ), jobs
    assert all(j["state"] == "COMPLETED" for j in jobs), jobs
    assert len({j["name"] for j in jobs}) == 1  # one workflow run: the plugin's run id
    # The profile keeps SLURM's own logs, one per job, under logs/slurm/.
    slurm_logs = list((cluster / "logs" / "slurm").rglob("*.log"))
    assert {p.stem for p in slurm_logs} == {j["id"] for j in jobs}

    # Same files, same bytes, as the local run.
    for top in ("resources", "results"):
        a, b = _tree(local / top), _tree(cluster / top)
        assert sorted(a) == sorted(b)
        differ = [k for k in a if not _same_content(a[k], b[k])]
        assert not differ, f"outputs differ between local and SLURM runs: {differ}"

    # A second submission finds nothing to do (no job submitted).
    again = slurm_snakemake(cluster, "slurm", *targets, f"--configfile={cfgfile}")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr


MPI_SNAKEFILE = """
rule probe:
    output: "probe.json"
    resources: mpi="srun", tasks=2, nodes=1, mem_mb=500, runtime=5
    shell: "python {probe} > {{output}}"
"""

PROBE = """
import json, os
from speculators.devices import slurm_nodes
print(json.dumps({"env": sorted(k for k in os.environ if k.startswith("SLURM_")),
                  "nodes": slurm_nodes()}))
"""


def test_multinode_style_job_finds_its_nodes_without_slurm_env(slurm_cluster, tmp_path):
    # A rule shaped like profiles/slurm-multinode's train_draft (an `mpi` job): the jobstep
    # plugin runs its shell with SLURM_NNODES/SLURM_JOB_NODELIST removed, so the trainer must
    # ask scontrol (speculators.devices.slurm_nodes) for the hosts to srun torchrun on.
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(MPI_SNAKEFILE.format(probe=shlex.quote(str(probe))))
    work = tmp_path / "work"
    work.mkdir()
    proc = slurm_snakemake(work, "slurm", snakefile=snakefile)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads((work / "probe.json").read_text())
    assert "SLURM_JOB_ID" in seen["env"]
    assert (
        "SLURM_JOB_NODELIST" not in seen["env"]
    )  # what the plugin strips (why slurm_nodes asks scontrol)
    assert seen["nodes"] == [socket.gethostname().split(".")[0]]


def _smk_function(name: str) -> str:
    """Source of one helper function of rules/common.smk (the file itself needs a config)."""
    text = (REPO / "rules" / "common.smk").read_text()
    start = text.index(f"def {name}(")
    end = text.find("\n\n\ndef ", start)
    return text[start : end if end > 0 else None] + "\n"


TIMEOUT_SNAKEFILE = """
{helper}

rule slow:
    output: "done.txt"
    resources: mem_mb=200, runtime=attempt_runtime(10)
    # Attempt 1 (10 min) overruns the limit the test imposes; attempt 2 (20 min) finishes.
    shell: "if [ {{resources.runtime}} -eq 10 ]; then sleep 600; fi; echo {{resources.runtime}} > {{output}}"
"""


def test_job_killed_at_its_time_limit_is_retried_with_twice_the_time(slurm_cluster, tmp_path):
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(TIMEOUT_SNAKEFILE.format(helper=_smk_function("attempt_runtime")))
    work = tmp_path / "work"
    work.mkdir()
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    proc = subprocess.Popen(slurm_cmd(work, "slurm", snakefile=snakefile), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    running = []
    for _ in range(300):
        running = [j for j in sacct_jobs(work, since) if j["state"] == "RUNNING"]
        if running:
            break
        time.sleep(0.5)
    assert running, "the job never started"
    # What a scheduler does to an overrunning job: its limit (1 min, SLURM's unit) ends it.
    subprocess.run(["scontrol", "update", f"JobId={running[0]['id']}", "TimeLimit=1"], check=True)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert "SLURM status is: 'TIMEOUT'" in out
    assert (work / "done.txt").read_text().strip() == "20"
    jobs = _wait_for_accounting(work, since, 2)
    assert [(j["state"], j["timelimit"]) for j in jobs] == [
        ("TIMEOUT", "00:01:00"),
        ("COMPLETED", "00:20:00"),
    ]


def test_slurm_nodes_outside_slurm_is_empty(monkeypatch):
    from speculators.devices import slurm_nodes

    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    assert slurm_nodes() == []
