"""Helpers for the example-config and profile tests: stand-in copies of the examples and the
jobs a dry run plans (rule, threads, resources), parsed from Snakemake's own job listing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from conftest import REPO, snakemake_cmd

# CPU examples (the demo target on other data) are tested on their own (test_examples.py).
CPU_EXAMPLES = [REPO / "config" / "examples" / "smollm2-sharegpt.yaml"]
EXAMPLES = sorted(p for p in (REPO / "config" / "examples").glob("*.yaml") if p not in CPU_EXAMPLES)
STANDINS = REPO / "tests" / "data" / "standins"


def standin_config(example: Path, dest: Path) -> Path:
    """Copy of `example` whose models read their config.json from tests/data/standins/<name>/,
    named after the last part of the Hugging Face id, so nothing is downloaded."""
    cfg = yaml.safe_load(example.read_text())
    for name, model in cfg["models"].items():
        local = STANDINS / Path(model["path"]).name
        if not (local / "config.json").is_file():
            raise AssertionError(f"{example.name}: model {name} ({model['path']}) has no stand-in")
        model["path"] = str(local)
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def _value(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


def planned_jobs(workdir: Path, configfile: Path, profile: str = "none") -> list[dict]:
    """Jobs of `snakemake -n` for `configfile` under a workflow profile: rule, threads, resources."""
    profile_arg = profile if profile == "none" else str(REPO / "profiles" / profile)
    cmd = snakemake_cmd() + ["-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    cmd += ["--workflow-profile", profile_arg, f"--configfile={configfile}", "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    jobs, job = [], None
    for line in out.splitlines():
        head = line.strip()
        if (
            not line.startswith(" ")
            and head.endswith(":")
            and head.split()[0] in ("rule", "localrule")
        ):
            job = {"rule": head.split()[1].rstrip(":"), "threads": 1, "resources": {}}
            jobs.append(job)
        elif job is not None and head.startswith("threads:"):
            job["threads"] = int(head.split(":", 1)[1])
        elif job is not None and head.startswith("resources:"):
            for item in head.split(":", 1)[1].split(", "):
                key, _, value = item.strip().partition("=")
                job["resources"][key] = _value(value)
    return jobs


_PLANS: dict[tuple[str, str], list[dict]] = {}


def planned_example(example: Path, profile: str = "none") -> list[dict]:
    """planned_jobs of an example's stand-in copy, computed once per session and profile."""
    key = (str(example), profile)
    if key not in _PLANS:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix=f"plan-{example.stem}-"))
        _PLANS[key] = planned_jobs(tmp, standin_config(example, tmp / "config.yaml"), profile)
    return _PLANS[key]
