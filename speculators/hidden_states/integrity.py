"""Integrity of captured hidden states: per-layer checks, the fidelity probe, `speculators verify`.

Silent corruption is the failure that matters (a vLLM release wrote all-zero states for hybrid
targets; a truncated or foreign file reads back as plausible numbers), so every sample is
checked when it is written, when a resume keeps it, and when the trainer loads it:

- `layer_stats(states)` -> one dict per layer: `non_finite` count, `rms` (whole layer), `std`
  (over all elements), `zero_tokens` (tokens whose state is exactly 0), `token_rms` (median
  per-token RMS, the first token left out: attention sinks carry 10-100x the norm of the rest).
- `check_layers(stats, layer_ids, where)` raises SpeculatorsError naming the sample and layer
  id for: any NaN/inf; an all-zero layer; a constant or near-constant layer (std below
  `MIN_RELATIVE_SPREAD` x RMS; real residual streams have std ~ RMS); a token whose state is
  exactly zero at a layer id > 0 (a partial capture padded with zeros; only an embedding row
  of layer 0 can legitimately be 0).
- `probe(...)`: reruns the target on a few stored rows and compares: per-layer RMS and
  relative error of the stored (dequantised) states against the target's own forward, and the
  argmax of the target's final norm + LM head applied to the stored last layer against the
  next token (`next_token_agreement`, ~100% on greedily regenerated rows).
- `check_folder(...)`: every sample's per-layer token RMS against the probe's (within a factor
  of `RMS_FACTOR`), the probe's error and agreement against their thresholds; the summary goes
  into data_config.json under `integrity`.
- `speculators verify <folder>`: sizes and sha256 against manifest.json, then every sample
  loaded and checked as above.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from speculators.errors import SpeculatorsError

log = logging.getLogger(__name__)

# std / RMS of a layer below this is "constant": a residual stream's elements spread about as
# much as their RMS (std/RMS ~ 0.9-1 on real targets); 1e-2 leaves two orders of margin.
MIN_RELATIVE_SPREAD = 1e-2
# A sample's median token RMS of a layer more than this factor away from the target's own on
# the probe rows is "far outside": content moves it by well under 2x, another layer, model or
# scale (a dtype or dequantisation bug) moves it by orders of magnitude.
RMS_FACTOR = 8.0
# Stored states vs the target's own forward on the probe rows: relative RMS error. bf16
# rounding gives ~0.4%, fp8 e4m3 ~3% (at most 2^-4 per element), another engine's kernels a
# few %; states of another layer or row differ by ~100%.
MAX_RELATIVE_ERROR = 0.25
RMS_MIN_TOKENS = 4  # samples shorter than this are left out of the RMS comparison
CHUNK = 256  # positions per LM-head product (bounds the [chunk, V] logits)


def layer_stats(states: Sequence[torch.Tensor]) -> list[dict]:
    """Statistics of each layer's states [seq, H] (any dtype/device), accumulated in fp32.

    Two passes over the data, no fp32 copy of it (the writer thread runs this on every
    sample): per-token norms (NaN/inf propagate into them), then the sum for the mean.
    """
    out = []
    for t in states:
        x = t.detach()
        seq, width = int(x.shape[0]), int(x.shape[-1])
        norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)  # [seq]
        if not bool(torch.isfinite(norms).all()):
            bad = int((~torch.isfinite(x.float())).sum())
            out.append({"non_finite": max(bad, 1), "seq": seq})
            continue
        numel = max(seq * width, 1)
        token_rms = norms / math.sqrt(width)
        mean_sq = float(norms.double().square().sum()) / numel
        mean = float(x.sum(dtype=torch.float32)) / numel
        typical = token_rms[1:] if seq > 1 else token_rms
        out.append(
            {
                "non_finite": 0,
                "seq": seq,
                "rms": math.sqrt(mean_sq),
                "std": math.sqrt(max(mean_sq - mean * mean, 0.0) * numel / max(numel - 1, 1)),
                "zero_tokens": int((norms == 0).sum()),
                "token_rms": float(typical.median()),
            }
        )
    return out


def layer_problem(st: dict, layer_id: int) -> str | None:
    """What is wrong with one layer's statistics, or None."""
    if st["non_finite"]:
        return f"layer {layer_id}: {st['non_finite']} non-finite values (NaN/inf)"
    if st["rms"] == 0:
        return f"layer {layer_id}: all zero (the backend wrote no states)"
    if st["std"] < MIN_RELATIVE_SPREAD * st["rms"]:
        return (
            f"layer {layer_id}: constant (std {st['std']:.3g} < {MIN_RELATIVE_SPREAD:g} x"
            f" RMS {st['rms']:.3g})"
        )
    if st["zero_tokens"] and layer_id > 0:
        return (
            f"layer {layer_id}: {st['zero_tokens']} of {st['seq']} tokens have an all-zero state"
            " (a truncated or partial capture)"
        )
    return None


def check_layers(
    stats: Sequence[dict], layer_ids: Sequence[int], where, allow_non_finite: bool = False
) -> None:
    """Raise SpeculatorsError(`where`, "layer <id>: ...") for the first degenerate layer."""
    for st, layer_id in zip(stats, layer_ids):
        if allow_non_finite and st["non_finite"]:
            continue  # the trainer skips and counts such batches itself
        problem = layer_problem(st, layer_id)
        if problem:
            raise SpeculatorsError(where, problem)


# -- the probe -----------------------------------------------------------------------------------


def probe_indices(lengths: Sequence[int], rows: int) -> list[int]:
    """Up to `rows` sample indices spread evenly over the folder (first and last included)."""
    n = len(lengths)
    if rows <= 0 or n == 0:
        return []
    if rows >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (rows - 1)) for i in range(rows)} if rows > 1 else {0})


def probe(
    target: str,
    store,
    indices: Sequence[int],
    *,
    device: str,
    dtype: torch.dtype,
) -> dict:
    """Compare the stored samples `indices` with the target's own forward (transformers).

    Returns `{"rows", "tokens", "supervised_positions", "next_token_agreement",
    "reference_next_token_agreement", "argmax_agreement_with_target", "layers": {id: {"rms",
    "stored_rms", "relative_error"}}}`. `next_token_agreement`: fraction of supervised
    positions t+1 whose token is the argmax of LM head(final norm(stored last layer at t));
    `reference_...` the same from the target's forward; None without supervised positions.
    """
    from speculators.hidden_states.capture import LayerCapture, _find_child, load_model
    from speculators.hidden_states.store import read_sample, sample_states

    started = time.perf_counter()
    model = load_model(target, device, dtype)
    capture = LayerCapture(model, store.layer_ids)
    norm = _find_child(model.get_decoder(), ("norm", "final_layernorm", "ln_f"), "final norm")
    head = model.get_output_embeddings()
    first = next(model.parameters()).device
    n_layers = len(store.layer_ids)
    sq_err, sq_ref = [0.0] * n_layers, [0.0] * n_layers
    ref_rms: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    stored_rms: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    agree = ref_agree = same = supervised = tokens = 0
    for idx in indices:
        path = store.path(idx)
        sample = read_sample(path)
        stored = sample_states(sample, torch.float32, path)
        ids = sample["input_ids"].long()
        mask = sample["loss_mask"].long()
        with torch.inference_mode():
            ref = capture(ids[None].to(first), torch.ones_like(ids)[None].to(first))
            ref = [r[0].float().cpu() for r in ref]
            for pos in range(n_layers):
                s, r = stored[pos], ref[pos]
                sq_err[pos] += float((s - r).square().sum())
                sq_ref[pos] += float(r.square().sum())
                ref_rms[pos].append(r.square().mean(-1).sqrt()[1:])
                stored_rms[pos].append(s.square().mean(-1).sqrt()[1:])
            top_stored, top_ref = [], []
            # norm and head may sit on different GPUs (device_map="auto" over several).
            norm_at = next(norm.parameters()).device
            head_at, head_dtype = head.weight.device, head.weight.dtype
            for start in range(0, len(ids), CHUNK):
                for src, top in ((stored[-1], top_stored), (ref[-1], top_ref)):
                    h = norm(src[start : start + CHUNK].to(norm_at, head_dtype))
                    top.append(head(h.to(head_at)).argmax(-1).cpu())
            top_stored, top_ref = torch.cat(top_stored), torch.cat(top_ref)
        target_next = mask[1:].bool()
        supervised += int(target_next.sum())
        agree += int(((top_stored[:-1] == ids[1:]) & target_next).sum())
        ref_agree += int(((top_ref[:-1] == ids[1:]) & target_next).sum())
        same += int((top_stored == top_ref).sum())
        tokens += len(ids)
    capture.remove()
    layers = {}
    for pos, layer_id in enumerate(store.layer_ids):
        r = torch.cat(ref_rms[pos]) if ref_rms[pos] else torch.zeros(0)
        s = torch.cat(stored_rms[pos]) if stored_rms[pos] else torch.zeros(0)
        layers[str(layer_id)] = {
            "rms": float(r.median()) if r.numel() else math.sqrt(sq_ref[pos] / max(tokens, 1)),
            "stored_rms": float(s.median()) if s.numel() else None,
            "relative_error": math.sqrt(sq_err[pos] / sq_ref[pos]) if sq_ref[pos] else None,
        }
    result = {
        "rows": len(indices),
        "tokens": tokens,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "supervised_positions": supervised,
        "next_token_agreement": agree / supervised if supervised else None,
        "reference_next_token_agreement": ref_agree / supervised if supervised else None,
        "argmax_agreement_with_target": same / tokens if tokens else None,
        "layers": layers,
    }
    log.info(
        "probe on %d rows (%.1f s): next-token agreement %s (target's own forward: %s), argmax agreement"
        " with the target %s, relative error per layer %s",
        len(indices),
        time.perf_counter() - started,
        _pct(result["next_token_agreement"]),
        _pct(result["reference_next_token_agreement"]),
        _pct(result["argmax_agreement_with_target"]),
        {k: round(v["relative_error"] or 0.0, 4) for k, v in layers.items()},
    )
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


# -- a whole folder ------------------------------------------------------------------------------


def check_folder(
    output_dir,
    entries: Sequence[dict],
    layer_ids: Sequence[int],
    *,
    probe: dict | None = None,
    min_fidelity: float = 0.0,
    reference: dict[int, float] | None = None,
) -> dict:
    """Every sample's layer RMS against the reference (given, else the probe's, else the
    folder median), the probe's error and fidelity against their thresholds. Returns the
    `integrity` summary; raises SpeculatorsError naming the sample (or probe) and layer."""
    from speculators.hidden_states.store import FILE_PATTERN

    output_dir = Path(output_dir)
    if reference is not None:
        source = "the reference recorded in data_config.json"
    elif probe is not None:
        source = "the target's own forward on the probe"
        reference = {i: probe["layers"][str(i)]["rms"] for i in layer_ids}
    else:
        source = "the folder's median"
        reference = {}
        for pos, layer_id in enumerate(layer_ids):
            values = sorted(e["layer_rms"][pos] for e in entries)
            reference[layer_id] = values[len(values) // 2] if values else 0.0
    outliers = []
    for idx, e in enumerate(entries):
        if e["tokens"] < RMS_MIN_TOKENS:
            continue  # a median of 1-2 tokens is no typical token (a sink may be one of them)
        for pos, layer_id in enumerate(layer_ids):
            ref, value = reference[layer_id], e["layer_rms"][pos]
            if ref > 0 and not (ref / RMS_FACTOR <= value <= ref * RMS_FACTOR):
                outliers.append((idx, layer_id, value, ref))
    if outliers:
        idx, layer_id, value, ref = outliers[0]
        more = f" ({len(outliers) - 1} more sample layers like it)" if len(outliers) > 1 else ""
        raise SpeculatorsError(
            output_dir / FILE_PATTERN.format(idx=idx),
            f"layer {layer_id}: token RMS {value:.4g} is more than {RMS_FACTOR:g}x away from"
            f" {ref:.4g}, {source}{more}",
        )
    if probe is not None:
        for layer_id, info in probe["layers"].items():
            err = info["relative_error"]
            if err is not None and err > MAX_RELATIVE_ERROR:
                raise SpeculatorsError(
                    output_dir,
                    f"layer {layer_id}: stored states differ from the target's own forward by"
                    f" {100 * err:.1f}% (relative RMS error on {probe['rows']} probe rows; at most"
                    f" {100 * MAX_RELATIVE_ERROR:g}% allowed)",
                )
        fidelity = probe["next_token_agreement"]
        if min_fidelity > 0 and fidelity is None:
            log.warning("fidelity probe: no supervised position in the probe rows, not checked")
        if min_fidelity > 0 and fidelity is not None and fidelity < min_fidelity:
            raise SpeculatorsError(
                output_dir,
                f"fidelity probe: LM head on the stored last layer predicts the next token at"
                f" {_pct(fidelity)} of {probe['supervised_positions']} supervised positions,"
                f" below hidden_states.min_fidelity {_pct(min_fidelity)}",
            )
    return {
        "checked_samples": len(entries),
        "checked_tokens": sum(e["tokens"] for e in entries),
        "non_finite_samples": 0,
        "degenerate_layers": 0,
        "rms_outliers": 0,
        "layer_token_rms": {str(k): v for k, v in reference.items()},
        "rms_reference": source,
        "thresholds": {
            "min_relative_spread": MIN_RELATIVE_SPREAD,
            "rms_factor": RMS_FACTOR,
            "rms_min_tokens": RMS_MIN_TOKENS,
            "max_relative_error": MAX_RELATIVE_ERROR,
            "min_fidelity": min_fidelity,
        },
        "probe": probe,
    }


# -- speculators verify ------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="hidden-states folder (with data_config.json)")
    p.add_argument("--output", type=Path, default=None, help="JSON with the counts and timing")
    p.add_argument(
        "--sizes-only", action="store_true", help="check sizes against manifest.json, not hashes"
    )


def verify_folder(folder: str | Path, *, hashes: bool = True) -> dict:
    """Check a finished hidden-states folder in full.

    Per sample: present, size and (with `hashes`) sha256 as in manifest.json, readable, the
    schema of data_config.json (tensor count, [seq, H] shapes, dtype, fp8 scales), ids and mask
    of the recorded length, then `check_layers`; finally the per-layer RMS of every sample
    against data_config's reference. Returns counts; raises SpeculatorsError with the first
    problem (and how many there are) in one line.
    """
    from speculators.hidden_states.store import (
        SampleStore,
        dtype_from_name,
        read_data_config,
        read_manifest,
        stray_files,
    )

    folder = Path(folder)
    started = time.perf_counter()
    cfg = read_data_config(folder)
    lengths = cfg["data"]["sample_lengths"]
    manifest = read_manifest(folder, len(lengths), cfg.get("manifest"))
    store = SampleStore(
        folder,
        hidden_size=cfg["target"]["hidden_size"],
        layer_ids=cfg["layer_ids"],
        dtype=dtype_from_name(cfg["dtype"]),
        vocab_size=cfg["target"]["vocab_size"],
    )
    problems: list[tuple] = []  # (where, problem)
    counts = {"missing": 0, "size": 0, "hash": 0, "schema": 0, "degenerate": 0, "stray": 0}
    nbytes = 0
    stray = stray_files(folder, len(lengths))
    if stray:
        counts["stray"] = len(stray)
        shown = ", ".join(stray[:3]) + (", ..." if len(stray) > 3 else "")
        problems.append(
            (
                folder,
                f"{len(stray)} sample files not in {len(lengths)}-sample manifest.json: {shown}",
            )
        )
    for idx, (n, entry) in enumerate(zip(lengths, manifest)):
        path = store.path(idx)
        if not path.is_file():
            counts["missing"] += 1
            problems.append((path, "missing"))
            continue
        size = path.stat().st_size
        nbytes += size
        if size != entry["bytes"]:
            counts["size"] += 1
            problems.append((path, f"{size} bytes, manifest.json says {entry['bytes']}"))
            continue
        if not hashes:
            problem = store.check(idx, [0] * n, [0] * n, compare_rows=False)
            if problem:
                counts["schema"] += 1
                problems.append((path, problem))
            continue
        try:
            got = store.inspect(idx, seq=n)  # one read: hash, schema, layer checks
        except SpeculatorsError as e:
            counts["degenerate" if e.problem.startswith("layer ") else "schema"] += 1
            problem = e.problem
            if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                counts["hash"] += 1
                problem += "; sha256 differs from manifest.json (content changed)"
            problems.append((e.where, problem))
            continue
        if got["sha256"] != entry["sha256"]:
            counts["hash"] += 1
            problems.append((path, "sha256 differs from manifest.json (content changed)"))
    if not problems and hashes:
        recorded = cfg.get("integrity", {}).get("layer_token_rms")  # checked by the reader
        reference = {int(k): v for k, v in recorded.items()} if recorded else None
        try:
            entries = [store.entries[i] for i in range(len(lengths))]
            check_folder(folder, entries, store.layer_ids, reference=reference)
        except SpeculatorsError as e:
            problems.append((e.where, e.problem))
            counts["degenerate"] += 1
    seconds = time.perf_counter() - started
    result = {
        "folder": str(folder),
        "samples": len(lengths),
        "bytes": nbytes,
        "hashes_checked": hashes,
        "problems": len(problems),
        "counts": counts,
        "seconds": round(seconds, 3),
    }
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise SpeculatorsError(problems[0][0], f"{problems[0][1]}{more}")
    return result


def run(args: argparse.Namespace) -> None:
    from speculators.fileio import write_json

    result = verify_folder(args.folder, hashes=not args.sizes_only)
    log.info(
        "%s: %d samples, %.1f MiB verified in %.2f s (%s)",
        args.folder,
        result["samples"],
        result["bytes"] / 2**20,
        result["seconds"],
        "sizes, sha256, schema, finite and non-degenerate layers"
        if result["hashes_checked"]
        else "sizes only",
    )
    if args.output:
        write_json(args.output, result)
