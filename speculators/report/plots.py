"""Report plots with matplotlib (Agg backend), returned as base64 PNG for embedding in HTML.

Each function takes plain dicts/lists (the parsed report inputs) and returns None when there is
nothing to draw, so the caller can show a note instead.
"""

from __future__ import annotations

import base64
import io

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no display on workers; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def training_curves(metrics: list[dict]) -> str | None:
    """Loss and per-step full accuracy against the optimizer step, train lines and val points."""
    train = [m for m in metrics if m.get("split") == "train" and m.get("loss") is not None]
    val = [m for m in metrics if m.get("split") == "val" and m.get("loss") is not None]
    if not train and not val:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.4))
    for rows, style, name in ((train, "-", "train"), (val, "o--", "val")):
        if rows:
            ax_loss.plot([m["step"] for m in rows], [m["loss"] for m in rows], style, label=name)
            n_steps = max(len(m.get("full_acc") or []) for m in rows)
            for k in range(n_steps):
                pts = [
                    (m["step"], m["full_acc"][k]) for m in rows if len(m.get("full_acc") or []) > k
                ]
                ax_acc.plot(*zip(*pts), style, color=f"C{k}", label=f"{name} step {k}")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    ax_acc.set(
        xlabel="optimizer step", ylabel="full accuracy", title="Per-step accuracy", ylim=(0, 1)
    )
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=7, ncol=2)
    return _png(fig)


def epoch_selection(history: list[dict], chosen: int | None, by: str | None) -> str | None:
    """Validation loss (left axis) and acceptance-length estimate (right axis) against the
    epoch, from train_summary.json `val_history`, with the published epoch marked."""
    pts = [h for h in history if h.get("loss") is not None]
    if not pts:
        return None
    fig, ax_loss = plt.subplots(figsize=(6, 3.4))
    epochs = [h["epoch"] for h in pts]
    ax_loss.plot(epochs, [h["loss"] for h in pts], "o-", color="C0", label="val loss")
    ax_loss.set(xlabel="epoch", ylabel="validation loss", title="Epoch selection")
    ax_acc = ax_loss.twinx()
    acc = [(h["epoch"], h["acceptance_length_estimate"]) for h in pts
           if h.get("acceptance_length_estimate") is not None]  # fmt: skip
    if acc:
        ax_acc.plot(*zip(*acc), "s--", color="C1", label="val acceptance estimate")
    ax_acc.set_ylabel("acceptance length estimate")
    if chosen is not None:
        ax_loss.axvline(chosen, color="C2", linestyle=":", label=f"published (by {by})")
    ax_loss.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    lines = ax_loss.get_legend_handles_labels()
    more = ax_acc.get_legend_handles_labels()
    ax_loss.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    return _png(fig)


def acceptance_vs_k(evals: dict[str, dict]) -> str | None:
    """Acceptance length against K, one line per evaluator, with the ideal K+1 for reference."""
    series = {
        b: sorted(e["results"], key=lambda r: r["k"]) for b, e in evals.items() if e.get("results")
    }
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ks = sorted({r["k"] for rows in series.values() for r in rows})
    ax.plot(ks, [k + 1 for k in ks], ":", color="grey", label="ideal (K+1)")
    for backend, rows in series.items():
        rows = [r for r in rows if r["acceptance_length"] is not None]  # drafted nothing
        ax.plot([r["k"] for r in rows], [r["acceptance_length"] for r in rows], "o-", label=backend)
    ax.set(xlabel="draft length K", ylabel="acceptance length", title="Acceptance length vs K")
    ax.set_xticks(ks)
    ax.legend(fontsize=8)
    return _png(fig)


def per_position(evals: dict[str, dict]) -> str | None:
    """Acceptance rate of draft position i (vLLM's per-position rate), per evaluator and K."""
    lines = [
        (f"{b} K={r['k']}", r["per_position_acceptance"])
        for b, e in evals.items()
        for r in e.get("results") or []
        if r.get("per_position_acceptance")
    ]
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, rates in lines:
        ax.plot(range(1, len(rates) + 1), rates, "o-", label=label)
    ax.set(
        xlabel="draft position",
        ylabel="acceptance rate",
        title="Per-position acceptance",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8)
    return _png(fig)


def speedup(evals: dict[str, dict]) -> str | None:
    """Tokens/s with drafting over tokens/s without, per K and evaluator (bars)."""
    rows = [(b, r) for b, e in evals.items() for r in e.get("results") or [] if r.get("speedup")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    labels = [f"{b}\nK={r['k']}" for b, r in rows]
    values = [r["speedup"] for _, r in rows]
    ax.bar(range(len(rows)), values, color=[f"C{i % 10}" for i in range(len(rows))])
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set(ylabel="speed-up (x)", title="Speed-up over plain decoding")
    return _png(fig)


def comparison(runs: list[dict]) -> str | None:
    """Acceptance length vs K for every run of the config (comparison page)."""
    drawn = False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, run in enumerate(runs):
        for backend, by_k in (run.get("acceptance_length") or {}).items():
            ks = sorted(by_k, key=int)
            if ks:
                style = "o-" if backend == "transformers" else "s--"
                ax.plot([int(k) for k in ks], [by_k[k] for k in ks], style, color=f"C{i % 10}",
                        label=f"{run['run']} ({backend})")  # fmt: skip
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="draft length K", ylabel="acceptance length", title="Acceptance length per run")
    ax.legend(fontsize=8)
    return _png(fig)
