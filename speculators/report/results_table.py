"""The results table the report opens with: one row per (benchmark, K, temperature) of a run,
with the target, the draft, its training data, acceptance length in vLLM and in process,
per-position acceptance and, where measured on a GPU, the speed-up. `report.md` carries it
ready to paste into a README; `results/comparison.html` stacks the rows of every run.

The eval JSONs of earlier versions (no `benchmark`/`temperature` per row) read as one
benchmark, "heldout", at the file's temperature.
"""

from __future__ import annotations

from speculators.report.document import Section, fmt

# evaluator backend -> column label
EVALUATORS = {"vllm": "vLLM", "transformers": "in-process"}


def eval_points(ev: dict) -> list[dict]:
    """An eval JSON's result rows, each with its `benchmark` and `temperature` filled in."""
    default_t = ev.get("temperature") or 0.0
    return [
        {"benchmark": "heldout", **r, "temperature": float(r.get("temperature", default_t))}
        for r in ev.get("results") or []
    ]


def headline(ev: dict) -> dict:
    """`ev` with only the rows of its first benchmark at its lowest temperature (greedy where
    measured): the one K sweep that the summary, the evaluator agreement check and the plots
    show."""
    points = eval_points(ev)
    if not points:
        return ev
    named = [b.get("name") for b in ev.get("benchmarks") or [] if b.get("name")]
    bench = named[0] if named else points[0]["benchmark"]
    temp = min(p["temperature"] for p in points if p["benchmark"] == bench)
    rows = [p for p in points if p["benchmark"] == bench and p["temperature"] == temp]
    return {**ev, "results": rows}


def on_gpu(ev: dict) -> bool:
    """Was `ev` measured on a GPU (the only place a speed-up is a speed figure)?"""
    device = ev.get("device") or ""
    return bool(device) and "threads on" not in device and not device.startswith("vllm-cpu")


def _benchmark_info(evals: dict[str, dict]) -> dict[str, dict]:
    """name -> {num_prompts, num_turns}, from the first evaluator that describes it."""
    info: dict[str, dict] = {}
    for ev in evals.values():
        for b in ev.get("benchmarks") or []:
            if b.get("name") and "num_prompts" in b:
                info.setdefault(b["name"], b)
    return info


def training_data(run_config: dict, prepared: dict, train_summary: dict | None) -> str:
    """'chitchat (256 conversations, regenerated); 4 epochs, chosen epoch 3' for the table."""
    parts = []
    for name, opts in (run_config.get("datasets") or {}).items():
        stats = prepared.get(name) or {}
        conv = stats.get("conversations_out")
        regen = "regenerated" if (opts or {}).get("regenerate") else "original answers"
        parts.append(f"{name} ({conv if conv is not None else '?'} conversations, {regen})")
    text = ", ".join(parts) or "?"
    summary = train_summary or {}
    if summary.get("epochs") is not None:
        text += f"; {summary['epochs']} epochs"
        chosen = summary.get("chosen_epoch", summary.get("best_epoch"))
        if chosen is not None:
            text += f", chosen epoch {chosen + 1}"  # the trainer counts epochs from 0
    return text


def records(run: str, run_config: dict, prepared: dict, draft_config: dict | None,
            train_summary: dict | None, evals: dict[str, dict]) -> list[dict]:  # fmt: skip
    """The table's rows as plain values (also written to summary.json for the comparison)."""
    draft = draft_config or {}
    layers = (draft.get("transformer_layer_config") or {}).get("num_hidden_layers")
    vocab = draft.get("draft_vocab_size")
    data = training_data(run_config, prepared, train_summary)
    info = _benchmark_info(evals)
    points: dict[tuple, dict] = {}
    for backend, ev in evals.items():
        gpu = on_gpu(ev)
        for p in eval_points(ev):
            key = (p["benchmark"], p["k"], p["temperature"])
            rec = points.setdefault(key, {
                "run": run, "target": run_config.get("target") or ev.get("target"),
                "draft": f"{fmt(layers)} layer(s), vocab {fmt(vocab)}", "training_data": data,
                "benchmark": p["benchmark"], "k": p["k"], "temperature": p["temperature"],
                "num_prompts": (info.get(p["benchmark"]) or {}).get("num_prompts"),
                "num_turns": (info.get(p["benchmark"]) or {}).get("num_turns"),
                "acceptance_length": {}, "per_position_acceptance": {}, "speedup": {},
            })  # fmt: skip
            rec["acceptance_length"][backend] = p.get("acceptance_length")
            rec["per_position_acceptance"][backend] = p.get("per_position_acceptance")
            if gpu and p.get("speedup") is not None:
                rec["speedup"][backend] = p["speedup"]
    order = list(info)
    return [points[key] for key in sorted(points, key=lambda key: (
        order.index(key[0]) if key[0] in order else len(order), key[0], key[2], key[1]))]  # fmt: skip


def _benchmark_cell(rec: dict) -> str:
    if rec.get("num_prompts") is None:
        return rec["benchmark"]
    turns = rec.get("num_turns")
    extra = f", {turns} turns" if turns and turns != rec["num_prompts"] else ""
    return f"{rec['benchmark']} ({rec['num_prompts']} prompts{extra})"


def table_section(recs: list[dict], title: str = "Results", with_run: bool = False) -> Section:
    """The seed's table: one row per (run, benchmark, K, temperature)."""
    s = Section(title)
    if not recs:
        return s.note("No acceptance measurement available yet.")
    headers = ["run"] if with_run else []
    headers += ["target", "draft (layers, vocab)", "training data", "benchmark", "K", "temperature"]
    headers += [f"acceptance length ({label})" for label in EVALUATORS.values()]
    headers += [f"per-position acceptance ({label})" for label in EVALUATORS.values()]
    headers += ["speed-up (GPU)"]
    rows = []
    for r in recs:
        row = [r["run"]] if with_run else []
        row += [r["target"], r["draft"], r["training_data"], _benchmark_cell(r), r["k"],
                r["temperature"]]  # fmt: skip
        row += [r["acceptance_length"].get(b) for b in EVALUATORS]
        row += [r["per_position_acceptance"].get(b) for b in EVALUATORS]
        speed = [f"{EVALUATORS.get(b, b)} {v:.2f}x" for b, v in r["speedup"].items()]
        row.append(", ".join(speed) or None)
        rows.append(row)
    s.text(
        "Acceptance length = tokens emitted per target verification step, bonus token included "
        "(vLLM's 1 + accepted/drafts); temperature 0 = greedy, > 0 = rejection sampling. "
        "Speed-up is shown only where it was measured on a GPU ('-' for CPU runs, whose "
        "timings are in the Acceptance section)."
    )
    s.table(headers, rows)
    return s


def category_section(evals: dict[str, dict]) -> Section | None:
    """Acceptance per category (MT-Bench's writing, coding, ...) per evaluator; None if no
    benchmark has categories."""
    points: dict[tuple, dict] = {}
    for backend, ev in evals.items():
        for p in eval_points(ev):
            for cat, c in (p.get("per_category") or {}).items():
                key = (p["benchmark"], cat, p["k"], p["temperature"])
                points.setdefault(key, {})[backend] = c.get("acceptance_length")
    if not points:
        return None
    s = Section("Acceptance per category")
    headers = ["benchmark", "category", "K", "temperature"]
    headers += [f"acceptance length ({label})" for label in EVALUATORS.values()]
    rows = [[*key, *(v.get(b) for b in EVALUATORS)] for key, v in sorted(points.items())]
    s.table(headers, rows)
    return s
