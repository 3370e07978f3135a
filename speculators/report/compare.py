"""`speculators compare`: one page across the runs of the config: the results table (a row per
run, benchmark, K and temperature), then a row per run (settings, acceptance).

Reads the `summary.json` that `speculators report` writes next to each run's report.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from speculators.errors import SpeculatorsError
from speculators.fileio import read_json, write_text
from speculators.report import plots, results_table
from speculators.report.document import Link, Section, to_html


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--summary", nargs="+", required=True, type=Path, help="results/<run>/report/summary.json"
    )
    p.add_argument("--output", required=True, type=Path, help="results/comparison.html")


def _al(summary: dict, backend: str) -> str:
    by_k = (summary.get("acceptance_length") or {}).get(backend) or {}
    if not by_k:
        return "skipped" if (summary.get("skipped") or {}).get(backend) else "-"
    ordered = sorted(by_k.items(), key=lambda kv: int(kv[0]))
    return ", ".join(f"K={k}: {'-' if v is None else f'{v:.3f}'}" for k, v in ordered)


def comparison_sections(summaries: list[dict], out_dir: Path) -> list[Section]:
    table = Section("Runs")
    rows = []
    for s in summaries:
        report = os.path.relpath(s["report"], out_dir) if s.get("report") else None
        report = Link(report, report) if report else None
        datasets = ", ".join(f"{n} ({r})" for n, r in (s.get("datasets") or {}).items())
        speed = (s.get("speedup") or {}).get("transformers") or {}
        rows.append([s["run"], s.get("target"), datasets or None, s.get("num_layers"), s.get("ttt_steps"),
                     s.get("draft_vocab_size"), s.get("aux_layer_ids"), s.get("epochs"), s.get("val_loss"),
                     s.get("acceptance_length_estimate"), _al(s, "transformers"), _al(s, "vllm"),
                     ", ".join(f"K={k}: {v}x" for k, v in speed.items()) or None,
                     s.get("total_wall_s"), report])  # fmt: skip
    table.table(
        ["run", "target", "datasets (rows)", "draft layers", "ttt_steps", "draft vocab", "aux layer ids",
         "epochs", "val loss", "train estimate", "acceptance (transformers)", "acceptance (vLLM)",
         "speed-up (transformers)", "wall s (all jobs)", "report"],
        rows,
    )  # fmt: skip
    plot = Section("Acceptance length per run")
    png = plots.comparison(summaries)
    if png:
        plot.image(png, "acceptance length vs K per run")
    else:
        plot.note("No run has an acceptance measurement yet.")
    recs = [r for s in summaries for r in s.get("results_table") or []]
    results = results_table.table_section(recs, "Results per run, benchmark and K", with_run=True)
    return [results, table, plot]


def run(args: argparse.Namespace) -> None:
    summaries = []
    for path in args.summary:
        s = read_json(path)
        if not isinstance(s, dict) or "run" not in s:
            raise SpeculatorsError(path, 'not a report summary (no "run")')
        summaries.append(s)
    summaries.sort(key=lambda s: s["run"])
    html = to_html("Speculator runs compared", comparison_sections(summaries, args.output.parent))
    write_text(args.output, html)
