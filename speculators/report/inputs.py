"""Reads what a run left on disk for its report; a missing optional file becomes a note.

Malformed files are bad input (`SpeculatorsError`); absent ones are recorded in `notes` so the
report says what it could not show instead of failing.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from speculators.errors import SpeculatorsError
from speculators.fileio import read_json
from speculators.report.results_table import headline

STAGE_ORDER = [
    "assets",
    "regenerate",
    "prepare",
    "hidden_states",
    "vocab",
    "train",
    "evaluate",
    "report",
]


@dataclass
class RunInputs:
    run: str
    run_config: dict = field(default_factory=dict)
    prepared: dict[str, dict] = field(default_factory=dict)  # dataset -> stats.json
    data_configs: dict[str, dict] = field(default_factory=dict)  # dataset -> data_config.json
    draft_config: dict | None = None
    train_summary: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    # backend -> eval JSON with only its headline rows (first benchmark, greedy): one K sweep
    evals: dict[str, dict] = field(default_factory=dict)
    eval_files: dict[str, dict] = field(default_factory=dict)  # backend -> eval JSON, every row
    benchmarks: list[dict] = field(default_factory=list)
    hidden_states_bytes: dict[str, int | None] = field(default_factory=dict)  # folder -> bytes
    notes: dict[str, list[str]] = field(default_factory=dict)  # section key -> missing inputs

    def note(self, key: str, text: str) -> None:
        self.notes.setdefault(key, []).append(text)


def _optional_json(path: Path, inputs: RunInputs, key: str, what: str):
    if not path.is_file():
        inputs.note(key, f"{what} not found ({path}).")
        return None
    return read_json(path)


def read_metrics(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SpeculatorsError(
                        f"{path}:{lineno}", f"not valid JSON ({e.msg})"
                    ) from None
    return rows


def read_benchmark(path: Path) -> dict | None:
    """One Snakemake benchmark TSV -> its first measurement (s, max_rss, cpu_time...)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        return None

    def num(key):
        try:
            return float(rows[0][key])
        except (KeyError, TypeError, ValueError):  # "NA" when a value could not be measured
            return None

    return {
        "s": num("s"),
        "max_rss": num("max_rss"),
        "cpu_time": num("cpu_time"),
        "hms": rows[0].get("h:m:s"),
    }


def _belongs(parts: list[str], run: str, asset_names: set[str]) -> bool:
    """Is a benchmark (path parts below benchmarks/) one of this run's jobs?

    Paths are benchmarks/<stage>/<rule>/<wildcards>.tsv; a run's own jobs have the run name as a
    wildcard component, the shared asset jobs the name of its target model or one of its datasets.
    """
    names = [p.removesuffix(".tsv") for p in parts[2:]]
    if any(n == run or n.startswith((f"{run}_", f"{run}.", f"{run}~")) for n in names):
        return True
    return parts[0] == "assets" and any(n in asset_names for n in names)


def collect_benchmarks(bench_dir: Path, run: str, asset_names: set[str]) -> list[dict]:
    rows = []
    for path in sorted(bench_dir.rglob("*.tsv")):
        parts = list(path.relative_to(bench_dir).parts)
        if len(parts) < 3 or not _belongs(parts, run, asset_names):
            continue
        measured = read_benchmark(path)
        if measured:
            rows.append(
                {
                    "stage": parts[0],
                    "rule": parts[1],
                    "job": "/".join(parts[2:]).removesuffix(".tsv"),
                    **measured,
                }
            )
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    rows.sort(key=lambda r: (order.get(r["stage"], len(order)), r["rule"], r["job"]))
    return rows


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum((Path(root) / f).stat().st_size for f in files)
    return total


def gather(args) -> RunInputs:
    """All report inputs named on the command line (see render.add_arguments)."""
    inputs = RunInputs(run=args.run_name)
    if args.run_config:
        try:
            inputs.run_config = json.loads(args.run_config)
        except json.JSONDecodeError as e:
            raise SpeculatorsError("--run-config", f"not valid JSON ({e.msg})") from None
    for path in args.prepared_stats or []:
        stats = _optional_json(Path(path), inputs, "data", "prepared stats.json")
        if stats is not None:
            inputs.prepared[stats.get("dataset") or Path(path).parent.name] = stats
    for path in args.data_config or []:
        cfg = _optional_json(Path(path), inputs, "provenance", "hidden-states data_config.json")
        if cfg is not None:
            inputs.data_configs[Path(path).parent.name] = cfg
    if args.draft:
        draft = Path(args.draft)
        inputs.draft_config = _optional_json(
            draft / "config.json", inputs, "provenance", "draft config.json"
        )
        inputs.train_summary = _optional_json(
            draft / "train_summary.json", inputs, "training", "train_summary.json"
        )
        if (draft / "metrics.jsonl").is_file():
            inputs.metrics = read_metrics(draft / "metrics.jsonl")
        else:
            inputs.note("training", f"training metrics not found ({draft / 'metrics.jsonl'}).")
    else:
        inputs.note("training", "no draft folder given.")
    for path in args.eval or []:
        ev = _optional_json(Path(path), inputs, "acceptance", "evaluation result")
        if ev is not None:
            backend = ev.get("backend") or Path(path).stem
            if "results" not in ev and not ev.get("skipped"):
                raise SpeculatorsError(path, 'evaluation JSON has neither "results" nor "skipped"')
            inputs.eval_files[backend] = ev
            inputs.evals[backend] = headline(ev)
    if args.benchmarks_dir and Path(args.benchmarks_dir).is_dir():
        assets = {inputs.run_config.get("target", "")} | set(
            inputs.run_config.get("datasets") or {}
        )
        assets |= set(inputs.prepared)
        inputs.benchmarks = collect_benchmarks(Path(args.benchmarks_dir), inputs.run, assets - {""})
    if not inputs.benchmarks:
        inputs.note(
            "time", f"no benchmark TSVs for this run under {args.benchmarks_dir or '(not given)'}."
        )
    for path in args.hidden_states or []:
        p = Path(path)
        inputs.hidden_states_bytes[str(p)] = folder_bytes(p) if p.is_dir() else None
    return inputs
