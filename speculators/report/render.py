"""`speculators report`: a run's benchmark report (HTML + Markdown twin) and its summary JSON.

Sections: summary, settings and provenance, wall time and memory, data, training, acceptance.
Every input is an explicit path; whatever is missing is shown as a note.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import platform
from pathlib import Path

from speculators.devices import cpu_summary
from speculators.fileio import write_json, write_text
from speculators.report import plots, results_table
from speculators.report.document import Section, to_html, to_markdown
from speculators.report.inputs import STAGE_ORDER, RunInputs, gather

# Relative gap in acceptance length between the two evaluators that the report flags.
DISAGREEMENT = 0.10
NOISE_SE = 3  # a difference within this many combined standard errors is sampling noise
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-name", required=True)
    p.add_argument("--run-config", help="the run's config section as JSON (shown as settings)")
    p.add_argument(
        "--prepared-stats", nargs="*", default=[], help="prepared/<dataset>/stats.json files"
    )
    p.add_argument(
        "--data-config", nargs="*", default=[], help="hidden_states/<dataset>/data_config.json"
    )
    p.add_argument(
        "--draft", help="trained draft folder (config.json, metrics.jsonl, train_summary.json)"
    )
    p.add_argument(
        "--eval", nargs="*", default=[], help="eval JSON files (inprocess.json, vllm.json)"
    )
    p.add_argument("--benchmarks-dir", help="Snakemake benchmark folder (benchmarks/)")
    p.add_argument(
        "--hidden-states", nargs="*", default=[], help="hidden-state folders, for their size"
    )
    p.add_argument("--output-html", required=True, type=Path)
    p.add_argument("--output-md", required=True, type=Path)
    p.add_argument("--output-summary", type=Path, help="summary JSON read by `speculators compare`")


def _versions() -> str:
    out = []
    for name in ("speculators", "torch", "transformers", "datasets", "snakemake", "vllm"):
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def _first(*values):
    return next((v for v in values if v is not None), None)


def _notes(section: Section, inputs: RunInputs, key: str) -> None:
    for text in inputs.notes.get(key, []):
        section.note(text)


def _eval_rows(inputs: RunInputs) -> dict[str, list[dict]]:
    return {
        b: sorted(e.get("results") or [], key=lambda r: r["k"]) for b, e in inputs.evals.items()
    }


def standard_error(point: dict) -> float | None:
    """Standard error of a point's acceptance length from its own counts: the number of tokens
    a draft gets accepted, n, has P(n >= j) = per_position_acceptance[j-1], so E[n] = sum a_j
    and E[n^2] = sum (2j - 1) a_j; SE = sqrt(Var(n) / drafts). Drafts of one prompt are
    correlated, so this is a lower bound on the real sampling noise. None without counts."""
    a, drafts = point.get("per_position_acceptance"), point.get("drafts")
    if not a or not drafts or any(x is None for x in a):
        return None
    mean = sum(a)
    var = sum((2 * j + 1) * x for j, x in enumerate(a)) - mean**2
    return math.sqrt(max(var, 0.0) / drafts)


def disagreements(inputs: RunInputs, within_noise: list[str] | None = None) -> list[str]:
    """Greedy points (benchmark, K) where transformers and vLLM acceptance lengths differ by
    more than DISAGREEMENT and by more than NOISE_SE combined standard errors (sampled points
    differ by chance on small samples). Points that pass the first test but not the second
    are appended to `within_noise`."""

    def greedy(backend):
        ev = inputs.eval_files.get(backend) or {}
        return {(p["benchmark"], p["k"]): p
                for p in results_table.eval_points(ev) if p["temperature"] == 0}  # fmt: skip

    ours, theirs = greedy("transformers"), greedy("vllm")
    several = len({b for b, _ in ours}) > 1
    out = []
    for key in sorted(set(ours) & set(theirs)):
        a, b = ours[key]["acceptance_length"], theirs[key]["acceptance_length"]
        if a is None or b is None or abs(a - b) <= DISAGREEMENT * max(a, b):
            continue
        where = f"{key[0]} K={key[1]}" if several else f"K={key[1]}"
        text = f"{where}: transformers {a:.3f} vs vLLM {b:.3f}"
        errors = [standard_error(ours[key]), standard_error(theirs[key])]
        if None not in errors and abs(a - b) <= NOISE_SE * math.hypot(*errors):
            if within_noise is not None:
                within_noise.append(f"{text} (within {NOISE_SE} standard errors)")
            continue
        out.append(text)
    return out


def _val_records(inputs: RunInputs) -> list[dict]:
    return [m for m in inputs.metrics if m.get("split") == "val"]


# ---------------------------------------------------------------- sections


def summary_section(inputs: RunInputs) -> Section:
    s = Section("Summary")
    rows = _eval_rows(inputs)
    headline = []
    for backend, results in rows.items():
        for r in results:
            headline.append([backend, r["k"], r["acceptance_length"], r.get("speedup")])
    if headline:
        first = next(r for rs in rows.values() for r in rs)
        if "benchmark" in first:
            s.text(
                f"Benchmark {first['benchmark']} at temperature {first['temperature']:g}; "
                "every benchmark and temperature is in the Results table above."
            )
        s.table(["evaluator", "K", "acceptance length", "speed-up"], headline)
    else:
        s.note("No acceptance measurement available yet.")
    val = _val_records(inputs)
    if val and val[-1].get("acceptance_length_estimate") is not None:
        s.text(
            "Training's own estimate on the validation split (1 + sum of per-step full accuracy, "
            f"last epoch): {val[-1]['acceptance_length_estimate']:.3f}. Measured values above come "
            "from real decoding with the target."
        )
    noise: list[str] = []
    for d in disagreements(inputs, noise):
        s.flag(f"The evaluators disagree by more than {DISAGREEMENT:.0%}: {d}.")
    for d in noise:
        s.note(
            f"The evaluators differ by more than {DISAGREEMENT:.0%} on too few drafts to tell: {d}."
        )
    return s


def provenance_section(inputs: RunInputs) -> Section:
    s = Section("Settings and provenance")
    dc = next(iter(inputs.data_configs.values()), {})
    draft = inputs.draft_config or {}
    layer = draft.get("transformer_layer_config") or {}
    verifier = (draft.get("speculators_config") or {}).get("verifier") or {}
    methods = (draft.get("speculators_config") or {}).get("proposal_methods") or [{}]
    tgt = dc.get("target") or {}
    ev = inputs.evals.get("transformers") or next(iter(inputs.evals.values()), {})
    datasets = ", ".join(
        f"{name} ({st.get('rows_out', '?')} rows, {st.get('conversations_out', '?')} conversations)"
        for name, st in inputs.prepared.items()
    )
    target_path = _first(tgt.get("path"), verifier.get("name_or_path"))
    hidden = _first(tgt.get("hidden_size"), layer.get("hidden_size"))
    devices = [f"{b}: {e['device']}" for b, e in inputs.evals.items() if e.get("device")]
    versions = [f"{k} {v}" for k, v in (dc.get("package_versions") or {}).items() if v]
    evaluation = None
    if ev.get("results"):
        evaluation = (
            f"{ev.get('num_prompts')} prompts, {ev.get('max_new_tokens')} new tokens, "
            f"temperature {ev.get('temperature')}"
        )
        if ev.get("benchmarks"):
            evaluation = (
                "; ".join(
                    f"{b['name']}: {b.get('num_prompts')} prompts x {b.get('max_new_tokens')} tokens"
                    for b in ev["benchmarks"]
                )
                + f"; temperatures {ev.get('temperatures', [ev.get('temperature')])}"
            )
    kv = [
        ("run", inputs.run),
        ("target", _first(inputs.run_config.get("target"), target_path)),
        ("target path", target_path),
        ("target hidden size / layers", f"{hidden} / {tgt.get('num_hidden_layers', '?')}"),
        ("target vocab size", _first(tgt.get("vocab_size"), layer.get("vocab_size"))),
        ("draft vocab size", draft.get("draft_vocab_size")),
        ("datasets", datasets or None),
        ("hidden-state layer ids", dc.get("layer_ids")),
        ("draft aux layer ids", draft.get("eagle_aux_hidden_state_layer_ids")),
        ("draft decoder layers", layer.get("num_hidden_layers")),
        ("ttt_steps (speculative tokens)", methods[0].get("speculative_tokens")),
        (
            "hidden-states backend / device",
            f"{dc.get('backend')} / {dc.get('device')}" if dc else None,
        ),
        ("evaluation device", ", ".join(devices) or None),
        ("evaluation", evaluation),
        ("package versions (hidden states)", ", ".join(versions) or None),
        ("package versions (report)", _versions()),
        (
            "report machine",
            f"{platform.node()} ({platform.machine()}, Python {platform.python_version()})",
        ),
        ("report machine CPU", cpu_summary()),
    ]
    s.table(["setting", "value"], [[k, v] for k, v in kv])
    if inputs.run_config:
        s.text("The run's configuration (after defaults):")
        s.table(["key", "value"], [[k, v] for k, v in _flatten(inputs.run_config)])
    _notes(s, inputs, "provenance")
    return s


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def time_section(inputs: RunInputs) -> Section:
    s = Section("Wall time and memory")
    if inputs.benchmarks:
        s.text("From Snakemake's benchmark files (one row per job; max_rss in MB).")
        s.table(
            ["stage", "rule", "job", "wall s", "h:m:s", "max RSS MB", "CPU s"],
            [
                [b["stage"], b["rule"], b["job"], b["s"], b["hms"], b["max_rss"], b["cpu_time"]]
                for b in inputs.benchmarks
            ],
        )
        per_stage: dict[str, float] = {}
        for b in inputs.benchmarks:
            per_stage[b["stage"]] = per_stage.get(b["stage"], 0.0) + (b["s"] or 0.0)
        order = sorted(per_stage, key=lambda st: STAGE_ORDER.index(st) if st in STAGE_ORDER else 99)
        rows = [[st, round(per_stage[st], 1)] for st in order]
        rows.append(["total (sum of jobs)", round(sum(per_stage.values()), 1)])
        s.table(["stage", "wall s"], rows)
    _notes(s, inputs, "time")
    return s


def data_section(inputs: RunInputs) -> Section:
    s = Section("Data")
    keys = ["rows_in", "rows_out", "conversations_out", "tokens", "supervised_tokens", "mean_length",
            "max_length", "seq_length", "eval_prompts", "template_mode",
            "truncated_answers"]  # fmt: skip
    if inputs.prepared:
        s.table(
            ["dataset", *keys],
            [[name, *(st.get(k) for k in keys)] for name, st in inputs.prepared.items()],
        )
        # Rows skipped while reading (selection), then while tokenising; turns left out.
        drops = [
            [n, stage, k, v]
            for n, st in inputs.prepared.items()
            for stage, counts in (
                ("read", (st.get("selection") or {}).get("dropped")),
                ("tokenise", st.get("dropped")),
                ("tokenise (turns)", st.get("turns_skipped")),
            )
            for k, v in (counts or {}).items()
        ]
        if drops:
            s.table(["dataset", "stage", "skipped because", "count"], drops)
        repairs = [
            [n, k, v]
            for n, st in inputs.prepared.items()
            for k, v in ((st.get("selection") or {}).get("normalised") or {}).items()
        ]
        if repairs:
            s.text("Kept rows repaired by the structure policy (docs/architecture.md):")
            s.table(["dataset", "repair", "count"], repairs)
    _notes(s, inputs, "data")
    if inputs.data_configs:
        rows = []
        for name, dc in inputs.data_configs.items():
            data = dc.get("data") or {}
            width = len(dc.get("layer_ids") or []) * (
                (dc.get("target") or {}).get("hidden_size") or 0
            )
            expected = (data.get("total_tokens") or 0) * width * DTYPE_BYTES.get(dc.get("dtype"), 2)
            rows.append([name, data.get("num_samples"), data.get("total_tokens"), data.get("num_loss_tokens"),
                         dc.get("dtype"), round(expected / 2**20, 1)])  # fmt: skip
        s.text("Hidden states captured for training:")
        s.table(
            [
                "dataset",
                "samples",
                "tokens",
                "loss tokens",
                "dtype",
                "states MiB (tokens x layers x H)",
            ],
            rows,
        )
        storage = [storage_row(name, dc) for name, dc in inputs.data_configs.items()]
        s.text(
            "Storage per token against the bf16 floor (layers x H x 2 bytes), the fidelity probe"
            " (LM head on stored last layers vs the next token; the target's own forward on the"
            " same rows) and the integrity checks (every count must be 0 for the capture to pass):"
        )
        s.table(
            ["dataset", "dtype", "bytes/token on disk", "bf16 floor", "x floor",
             "next-token agreement", "target's own", "argmax = target", "max rel. error",
             "samples checked", "non-finite", "degenerate", "RMS outliers",
             "broken on resume"],
            storage,
        )  # fmt: skip
    sizes = [
        [p, round(b / 2**20, 1) if b is not None else "deleted (cleanup_hidden_states)"]
        for p, b in inputs.hidden_states_bytes.items()
    ]
    if sizes:
        s.table(["hidden-states folder", "size on disk MiB"], sizes)
    return s


def _pct(x) -> str | None:
    return None if x is None else f"{100 * x:.2f}%"


def storage_row(name: str, dc: dict) -> list:
    """One dataset's storage and integrity figures from its data_config.json (None = unknown:
    folders captured before manifests and probes were recorded)."""
    data, target = dc.get("data") or {}, dc.get("target") or {}
    tokens = data.get("total_tokens") or 0
    floor = len(dc.get("layer_ids") or []) * (target.get("hidden_size") or 0) * 2
    total = (dc.get("manifest") or {}).get("total_bytes")
    per_token = total / tokens if total is not None and tokens else None
    integrity = dc.get("integrity") or {}
    probe = integrity.get("probe") or {}
    errors = [v.get("relative_error") for v in (probe.get("layers") or {}).values()]
    errors = [e for e in errors if e is not None]
    return [
        name,
        dc.get("dtype"),
        None if per_token is None else round(per_token, 1),
        floor or None,
        None if per_token is None or not floor else round(per_token / floor, 3),
        _pct(probe.get("next_token_agreement")),
        _pct(probe.get("reference_next_token_agreement")),
        _pct(probe.get("argmax_agreement_with_target")),
        _pct(max(errors)) if errors else None,
        integrity.get("checked_samples"),
        integrity.get("non_finite_samples"),
        integrity.get("degenerate_layers"),
        integrity.get("rms_outliers"),
        integrity.get("broken_on_resume"),
    ]


def training_section(inputs: RunInputs) -> Section:
    s = Section("Training")
    summary = inputs.train_summary or {}
    if summary:
        s.table(["quantity", "value"],
                [[k, v] for k, v in _flatten(summary) if not k.startswith("val_history")])  # fmt: skip
    val = _val_records(inputs)
    if val:
        s.table(
            [
                "epoch",
                "step",
                "val loss",
                "full acc per step",
                "cond acc per step",
                "acceptance estimate",
            ],
            [
                [
                    m.get("epoch"),
                    m.get("step"),
                    m.get("loss"),
                    m.get("full_acc"),
                    m.get("cond_acc"),
                    m.get("acceptance_length_estimate"),
                ]
                for m in val
            ],  # fmt: skip
        )
    png = plots.training_curves(inputs.metrics)
    if png:
        s.image(png, "training loss and per-step accuracy")
    epoch_selection(s, summary)
    _notes(s, inputs, "training")
    return s


def epoch_selection(s: Section, summary: dict) -> None:
    """Which epoch was published and by which criterion (`train.select_best_by`), with the
    validation loss and acceptance estimate of every epoch."""
    png = plots.epoch_selection(
        summary.get("val_history") or [], summary.get("best_epoch"), summary.get("select_best_by")
    )
    if png is None:
        return
    by = summary.get("best_epoch_by") or {}
    s.text(
        f"Published: epoch {summary.get('best_epoch')}, chosen by {summary.get('select_best_by')}"
        f" (train.select_best_by). Best by acceptance estimate: epoch {by.get('acceptance')};"
        f" by validation loss: epoch {by.get('loss')}."
    )
    s.image(png, "validation loss and acceptance estimate per epoch, published epoch marked")


def acceptance_section(inputs: RunInputs) -> Section:
    s = Section("Acceptance")
    s.text(
        "Acceptance length = tokens emitted per target verification step, bonus token included "
        "(vLLM's 1 + accepted/drafts). Per-position rate i = drafts whose first i+1 tokens were "
        "accepted / all drafts."
    )
    headers = ["evaluator", "benchmark", "temperature", "K", "acceptance length", "per-position acceptance", "drafts",
               "accepted / draft tokens", "tokens/s", "baseline tokens/s", "speed-up", "greedy mismatches"]  # fmt: skip
    table = []
    for backend, ev in inputs.eval_files.items():
        if ev.get("skipped"):
            s.note(f"{backend} evaluator skipped: {ev['skipped']}")
        for r in results_table.eval_points(ev):
            table.append([backend, r["benchmark"], r["temperature"], r["k"], r["acceptance_length"],
                          r.get("per_position_acceptance"), r.get("drafts"),
                          f"{r.get('accepted_tokens')} / {r.get('draft_tokens')}", r.get("tokens_per_s"),
                          r.get("baseline_tokens_per_s"), r.get("speedup"), r.get("greedy_mismatches")])  # fmt: skip
    if table:
        s.table(headers, table)
    if "vllm" not in inputs.evals:
        s.note("No vLLM measurement: the vLLM evaluator did not run for this report.")
    for d in disagreements(inputs):
        s.flag(
            f"Large disagreement between evaluators ({d}); check the aux layer ids and the chat template."
        )
    for ev in inputs.evals.values():
        if ev.get("truncated_prompts"):
            s.note(
                f"{ev['backend']}: {ev['truncated_prompts']} prompts were longer than the context and truncated."
            )
        if any(r.get("greedy_mismatches") for r in ev.get("results") or []):
            s.flag(
                f"{ev['backend']}: greedy output with drafting differed from plain greedy output (see table)."
            )
    measured = {b: e for b, e in inputs.evals.items() if e.get("results")}
    for fn, alt in ((plots.acceptance_vs_k, "acceptance length vs K"), (plots.per_position, "per-position acceptance"),
                    (plots.speedup, "speed-up")):  # fmt: skip
        png = fn(measured)
        if png:
            s.image(png, alt)
    _notes(s, inputs, "acceptance")
    return s


def hidden_states_source_section(inputs: RunInputs) -> Section | None:
    """Where training got its hidden states (train_summary.json `hidden_states`): offline
    (captured files) or online (the target ran during training), the target's forward time as
    a share of the training wall time, and the bytes written under hidden_states/."""
    src = (inputs.train_summary or {}).get("hidden_states")
    if not src:
        return None
    s = Section("Hidden-states source")
    share = src.get("target_forward_share")
    written = src.get("bytes_written")
    s.table(
        ["mode", "target forward s", "share of training wall time", "hidden states written MiB"],
        [[src.get("mode"), src.get("target_forward_s"), _pct(share),
          None if written is None else round(written / 2**20, 1)]],
    )  # fmt: skip
    if src.get("mode") == "online":
        s.text(
            "Online: the target ran on every training and validation batch (replicated on each"
            " process); no hidden state was written. Each further epoch repeats that forward time."
        )
    return s


def results_records(inputs: RunInputs) -> list[dict]:
    """The opening table's rows: one per (benchmark, K, temperature) of this run."""
    return results_table.records(inputs.run, inputs.run_config, inputs.prepared,
                                 inputs.draft_config, inputs.train_summary, inputs.eval_files)  # fmt: skip


def results_sections(inputs: RunInputs) -> list[Section]:
    """The seed's results table, then acceptance per category where a benchmark has them."""
    out = [results_table.table_section(results_records(inputs))]
    per_category = results_table.category_section(inputs.eval_files)
    return out + [per_category] if per_category else out


def build_sections(inputs: RunInputs) -> list[Section]:
    sections = [summary_section(inputs), provenance_section(inputs), time_section(inputs),
                data_section(inputs), training_section(inputs), acceptance_section(inputs)]  # fmt: skip
    source = hidden_states_source_section(inputs)
    if source is not None:
        sections.insert(4, source)  # after the data section
    return [*results_sections(inputs), *sections]


def run_summary(inputs: RunInputs, report_path: Path) -> dict:
    """The few numbers the comparison page shows for this run."""
    draft = inputs.draft_config or {}
    layer = draft.get("transformer_layer_config") or {}
    methods = (draft.get("speculators_config") or {}).get("proposal_methods") or [{}]
    val = _val_records(inputs)
    rows = _eval_rows(inputs)
    return {
        "run": inputs.run,
        "report": str(report_path),
        "target": inputs.run_config.get("target"),
        "datasets": {n: st.get("rows_out") for n, st in inputs.prepared.items()},
        "num_layers": layer.get("num_hidden_layers"),
        "ttt_steps": methods[0].get("speculative_tokens"),
        "draft_vocab_size": draft.get("draft_vocab_size"),
        "aux_layer_ids": draft.get("eagle_aux_hidden_state_layer_ids"),
        "epochs": (inputs.train_summary or {}).get("epochs"),
        "train_wall_time_s": (inputs.train_summary or {}).get("wall_time_s"),
        "val_loss": val[-1].get("loss") if val else None,
        "acceptance_length_estimate": val[-1].get("acceptance_length_estimate") if val else None,
        "acceptance_length": {
            b: {str(r["k"]): r["acceptance_length"] for r in rs} for b, rs in rows.items() if rs
        },
        "speedup": {b: {str(r["k"]): r.get("speedup") for r in rs} for b, rs in rows.items() if rs},
        "skipped": {b: e["skipped"] for b, e in inputs.evals.items() if e.get("skipped")},
        "results_table": results_records(inputs),
        "total_wall_s": round(sum(b["s"] or 0 for b in inputs.benchmarks), 1)
        if inputs.benchmarks
        else None,
    }


def run(args: argparse.Namespace) -> None:
    inputs = gather(args)
    sections = build_sections(inputs)
    title = f"Speculator benchmark report: {inputs.run}"
    write_text(args.output_html, to_html(title, sections))
    write_text(args.output_md, to_markdown(title, sections))
    if args.output_summary:
        write_json(args.output_summary, run_summary(inputs, args.output_html))
