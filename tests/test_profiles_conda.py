"""Per-rule conda environments (--software-deployment-method conda): every rule names an env
file, the main env carries the package's dependencies, and the post-deploy script installs the
package itself from wherever Snakemake creates the environment."""

import os
import re
import subprocess
import sys

import yaml
from conftest import REPO

ENVS = REPO / "envs"
NOT_IN_RULE_ENVS = {"snakemake", "snakemake-executor-plugin-slurm"}  # the launching env's


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;@]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _pip_names(env_file) -> set[str]:
    env = yaml.safe_load(env_file.read_text())
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    return {_name(r) for r in (pips[0] if pips else [])}


def test_main_env_has_every_package_dependency():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = {_name(d) for d in deps} - NOT_IN_RULE_ENVS - _pip_names(ENVS / "main.yaml")
    assert not missing, f"envs/main.yaml lacks {sorted(missing)}"


def test_every_rule_names_an_env_with_a_post_deploy_script():
    envs = set()
    for smk in (REPO / "rules").glob("*.smk"):
        text = smk.read_text()
        n_rules = len(re.findall(r"^rule \w+:", text, flags=re.M))
        found = re.findall(r'^\s+conda:\s*\n\s+"\.\./envs/([\w.-]+)"', text, flags=re.M)
        assert len(found) == n_rules, f"{smk.name}: {n_rules} rules, {len(found)} conda: entries"
        envs.update(found)
    for env in envs:
        assert (ENVS / env).is_file(), env
        assert (ENVS / env.replace(".yaml", ".post-deploy.sh")).is_file(), env


def _code(path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_vllm_post_deploy_runs_the_same_commands():
    assert _code(ENVS / "vllm.post-deploy.sh") == _code(ENVS / "main.post-deploy.sh")


def test_post_deploy_installs_the_package_from_any_directory(tmp_path):
    script = "main.post-deploy.sh"
    # Snakemake runs the script with the new env activated and the cwd of the run; simulate
    # that env with a bare venv and run from an unrelated directory.
    venv = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    elsewhere = tmp_path / "workdir"
    elsewhere.mkdir()
    proc = subprocess.run(
        ["bash", str(ENVS / script)], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import speculators; print(speculators.__file__)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        check=True,
    ).stdout.strip()
    assert where == str(REPO / "speculators" / "__init__.py")
    assert (venv / "bin" / "speculators").is_file()
