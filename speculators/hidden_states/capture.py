"""`speculators hidden-states`: capture the target's hidden states for every prepared row.

The CLI checks the inputs, resumes from valid existing samples and runs a backend on the rest:
the transformers backend below (hooks on the decoder, length-sorted batches) or
`speculators.vllm.hidden_states.capture(target, dataset, indices, store, *,
tensor_parallel_size, data_parallel_size) -> device description`, which must write each index
of `indices` with `store.write(...)` (see `store.py`). `data_config.json` is written last.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from speculators.devices import default_device, describe, dtype_name, target_compute_dtype
from speculators.errors import SpeculatorsError
from speculators.hidden_states.store import SampleStore, dtype_from_name, resolve_layer_ids
from speculators.targets import target_dims

log = logging.getLogger(__name__)

PREPARED_COLUMNS = ("input_ids", "loss_mask")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="target model folder or Hugging Face id")
    p.add_argument("--prepared", required=True, type=Path, help="prepared dataset folder (Arrow)")
    p.add_argument(
        "--output", required=True, type=Path, help="folder for data_*.pt and data_config.json"
    )
    p.add_argument(
        "--layer-ids",
        type=int,
        nargs="+",
        default=None,
        help="aux layer ids then L (vLLM convention); default 2 L//2 L-3 L",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32", "float8_e4m3fn"],
        default="bfloat16",
        help="stored dtype; float8_e4m3fn = fp8 with one float32 scale per token and layer",
    )
    p.add_argument(
        "--probe-rows",
        type=int,
        default=8,
        help="rows rerun through the target to check the stored states (0 = no probe)",
    )
    p.add_argument(
        "--min-fidelity",
        type=float,
        default=0.0,
        help="fail when the LM head on stored last layers predicts fewer next tokens (0-1)",
    )
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward batch")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="GPUs the job asked for; checked (transformers backend)",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM backend only")
    p.add_argument("--data-parallel-size", type=int, default=1, help="vLLM backend only")
    p.add_argument(
        "--vllm-python",
        default=None,
        help="interpreter of the vLLM environment (default: $SPECULATORS_VLLM_PYTHON, .venv-vllm)",
    )


# -- inputs ------------------------------------------------------------------------------------


def load_prepared(path: Path, vocab_size: int):
    """(dataset, row lengths, supervised tokens), checked: columns, mask lengths, ids < vocab."""
    import datasets
    import pyarrow.compute as pc

    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise SpeculatorsError(path, "not a prepared dataset folder (run `speculators prepare`)")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise SpeculatorsError(path, f"cannot load the prepared dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise SpeculatorsError(path, "expected one dataset, found a DatasetDict")
    missing = [c for c in PREPARED_COLUMNS if c not in ds.column_names]
    if missing:
        raise SpeculatorsError(path, f"missing columns {missing}")
    if len(ds) == 0:
        raise SpeculatorsError(path, "the prepared dataset is empty")
    ids = ds.data.column("input_ids")
    lengths = pc.list_value_length(ids).to_pylist()
    if lengths != pc.list_value_length(ds.data.column("loss_mask")).to_pylist():
        raise SpeculatorsError(path, "loss_mask and input_ids lengths differ")
    if min(lengths) < 1:
        raise SpeculatorsError(path, f"row {lengths.index(min(lengths))} has no tokens")
    flat = pc.list_flatten(ids)
    top, low = pc.max(flat).as_py(), pc.min(flat).as_py()
    if top >= vocab_size or low < 0:
        raise SpeculatorsError(
            path,
            f"token id {top if top >= vocab_size else low} outside the target's vocabulary"
            f" (size {vocab_size}): prepared with another tokenizer?",
        )
    num_loss_tokens = pc.sum(pc.list_flatten(ds.data.column("loss_mask"))).as_py() or 0
    return ds, lengths, num_loss_tokens


def iter_rows(ds, indices: Sequence[int], chunk: int = 256):
    """(idx, input_ids, loss_mask) for `indices`, read in chunks from the Arrow table."""
    for start in range(0, len(indices), chunk):
        part = list(indices[start : start + chunk])
        rows = ds.select_columns(list(PREPARED_COLUMNS))[part]
        yield from zip(part, rows["input_ids"], rows["loss_mask"])


# -- transformers backend ----------------------------------------------------------------------


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Longest first, ties by index; each batch holds at most `batch_tokens` padded tokens.

    The plan covers every row, whatever is left to do, so a resumed run recomputes a sample
    in exactly the batch it had the first time (same padding, same numerics, same bytes).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for idx in order:
        # Sorted descending, so the first row of a batch sets its padded length.
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(idx)
    if current:
        batches.append(current)
    return batches


def _find_child(module, names: Sequence[str], what: str):
    for name in names:
        child = getattr(module, name, None)
        if child is not None:
            return child
    raise SpeculatorsError(
        type(module).__name__, f"cannot find the {what} (looked for {list(names)})"
    )


class LayerCapture:
    """Forward pre-hooks that keep only the requested residual-stream states of one forward.

    Id i < L is the input of decoder layer i; id L is the input of the final norm, i.e. the
    last layer's output before normalisation (vLLM's EAGLE-3 convention).
    """

    def __init__(self, model, layer_ids: Sequence[int]):
        self.decoder = model.get_decoder()
        layers = _find_child(self.decoder, ("layers", "h", "blocks"), "decoder layers")
        norm = _find_child(self.decoder, ("norm", "final_layernorm", "ln_f"), "final norm")
        self.states: dict[int, torch.Tensor] = {}
        self.handles = []
        for pos, layer_id in enumerate(layer_ids):
            module = norm if layer_id == len(layers) else layers[layer_id]
            self.handles.append(module.register_forward_pre_hook(self._hook(pos), with_kwargs=True))
        self.num_layers = len(layer_ids)

    def _hook(self, pos: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            # A copy, in case a later layer updates the residual stream in place.
            self.states[pos] = h.detach().clone()

        return hook

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        self.states.clear()
        # The decoder alone: the LM head (vocab-sized logits) is never computed.
        self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        states = [self.states[pos] for pos in range(self.num_layers)]
        self.states.clear()
        return states

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def resolve_device(device: str, gpus: int | None = None) -> str:
    """cpu or cuda; `gpus` (the job's GPU request, when given) must match what is visible."""
    if gpus is not None:
        from speculators.devices import require_gpus

        require_gpus(gpus, "hidden_states.gpus")
        if device == "auto":
            return "cuda" if gpus > 0 else "cpu"  # a CPU job leaves a node's GPUs alone
    if device == "auto":
        return default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise SpeculatorsError("--device", "cuda requested but no GPU is visible")
    return device


def load_model(target: str, device: str | torch.device, dtype: torch.dtype, *, spread: bool = True):
    """The target in `dtype` on `device`, frozen and in eval mode. With `spread` and several
    visible GPUs it is split across them (`device_map="auto"`); the trainer's online source
    passes `spread=False`: each rank holds its own copy on its own GPU."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if spread and str(device) == "cuda" and torch.cuda.device_count() > 1:
        kwargs["device_map"] = "auto"  # a target too big for one GPU is split across them
    model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    model.requires_grad_(False)
    return model.eval()


def forward_rows(
    capture: LayerCapture, rows: Sequence[Sequence[int]], batch_tokens: int | None = None
) -> list[list[torch.Tensor]]:
    """The captured states of token rows, one forward per batch, as CPU tensors per row.

    `rows` are right-padded to the longest row of their batch (an attention mask keeps
    padding out, so rows never attend to each other); with `batch_tokens` they are first
    split as `plan_batches` splits a capture (longest first, at most that many padded tokens
    per forward), else all go in one batch. Returns, per row in the given order, one
    `[len(row), H]` tensor per captured layer, in the model's compute dtype. Running out of
    accelerator memory raises SpeculatorsError naming hidden_states.batch_tokens.
    """
    lengths = [len(r) for r in rows]
    plan = plan_batches(lengths, batch_tokens) if batch_tokens else [list(range(len(rows)))]
    device = next(capture.decoder.parameters()).device
    out: list[list[torch.Tensor]] = [[] for _ in rows]
    for batch in plan:
        width = max(lengths[i] for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        attn = torch.zeros(len(batch), width, dtype=torch.long)
        for j, i in enumerate(batch):
            ids[j, : lengths[i]] = torch.as_tensor(rows[i], dtype=torch.long)
            attn[j, : lengths[i]] = 1
        try:
            with torch.inference_mode():
                states = capture(ids.to(device), attn.to(device))
        except torch.OutOfMemoryError:
            raise SpeculatorsError(
                "hidden_states.batch_tokens",
                f"{batch_tokens} tokens per batch ran out of memory",
            ) from None
        states = [s.to("cpu") for s in states]
        for j, i in enumerate(batch):  # padding is never handed on
            out[i] = [s[j, : lengths[i]] for s in states]
    return out


def _write_batch(store: SampleStore, items) -> None:
    """Write rows `items` = [(idx, input_ids, loss_mask, states)] of a batch."""
    for idx, ids, mask, states in items:
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        store.write(idx, ids_t, states, mask_t)


def capture_transformers(
    target: str,
    ds,
    lengths: Sequence[int],
    todo: Sequence[int],
    store: SampleStore,
    *,
    device: str,
    batch_tokens: int,
) -> None:
    """Capture and write the samples in `todo` with a transformers model."""
    from tqdm import tqdm

    # Computed in the device's precision (fp32 on CPUs without native bf16), stored in the
    # store's dtype: SampleStore.write casts (fp8: quantises per token).
    model = load_model(target, device, target_compute_dtype(target, device))
    capture = LayerCapture(model, store.layer_ids)
    todo_set = set(todo)
    batches = [b for b in plan_batches(lengths, batch_tokens) if todo_set.intersection(b)]
    total = sum(lengths[i] for i in todo)
    columns = ds.select_columns(list(PREPARED_COLUMNS))
    started = time.perf_counter()
    # One writer thread: the next batch is computed while the previous one is saved.
    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer,
        tqdm(total=total, unit="tok", unit_scale=True, desc="hidden states", mininterval=2) as bar,
    ):
        pending = None
        for batch in batches:
            rows = columns[batch]
            # One plan batch is one forward (its rows fit batch_tokens by construction).
            states = forward_rows(capture, rows["input_ids"])
            if pending is not None:
                pending.result()  # re-raises a write error
            items = [
                (idx, rows["input_ids"][j], rows["loss_mask"][j], states[j])
                for j, idx in enumerate(batch)
                if idx in todo_set
            ]
            pending = writer.submit(_write_batch, store, items)
            bar.update(sum(len(item[1]) for item in items))
        if pending is not None:
            pending.result()
    capture.remove()
    seconds = time.perf_counter() - started
    log.info(
        "captured %d samples, %d tokens in %.1f s (%.0f tokens/s)",
        len(todo),
        total,
        seconds,
        total / max(seconds, 1e-9),
    )


def _capture_vllm(args, ds, todo, store) -> str:
    try:
        from speculators.vllm import hidden_states as vllm_hidden_states
    except ImportError as e:
        raise SpeculatorsError("--backend vllm", f"the vLLM backend cannot load ({e})") from None

    return vllm_hidden_states.capture(
        args.target,
        ds,
        todo,
        store,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
    )


def _run_in_vllm_env(args) -> None:
    """vLLM pins its own torch, so it lives in another environment: rerun this command there."""
    from speculators.vllm import rerun_with_vllm

    argv = ["hidden-states", "--target", str(args.target), "--prepared", str(args.prepared)]
    argv += ["--output", str(args.output), "--dtype", args.dtype, "--backend", "vllm"]
    argv += ["--probe-rows", str(args.probe_rows), "--min-fidelity", str(args.min_fidelity)]
    if args.layer_ids is not None:
        argv += ["--layer-ids", *map(str, args.layer_ids)]
    argv += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    argv += ["--data-parallel-size", str(args.data_parallel_size)]
    log.info("running the vLLM backend")
    rerun_with_vllm(args.vllm_python, argv, "capture")


def run(args: argparse.Namespace) -> None:
    if args.batch_tokens < 1:
        raise SpeculatorsError("--batch-tokens", "must be at least 1")
    if not 0.0 <= args.min_fidelity <= 1.0:
        raise SpeculatorsError("--min-fidelity", f"{args.min_fidelity} is not between 0 and 1")
    from speculators.vllm import vllm_importable  # locates vLLM without importing it

    if args.backend == "vllm" and not vllm_importable():
        return _run_in_vllm_env(args)
    device = resolve_device(args.device, args.gpus) if args.backend == "transformers" else None
    dims = target_dims(args.target)
    layer_ids = resolve_layer_ids(args.layer_ids, dims["num_hidden_layers"])
    dtype = dtype_from_name(args.dtype)
    ds, lengths, num_loss_tokens = load_prepared(args.prepared, dims["vocab_size"])
    store = SampleStore(
        args.output, hidden_size=dims["hidden_size"], layer_ids=layer_ids, dtype=dtype
    )
    store.begin(
        {
            "target": str(args.target),
            **dims,
            "layer_ids": layer_ids,
            "dtype": args.dtype,
            "backend": args.backend,
            # Samples computed in another precision are not mixed into one capture.
            "compute_dtype": dtype_name(target_compute_dtype(args.target, device)),
        }
    )
    valid, todo = store.scan(iter_rows(ds, range(len(ds))))
    log.info(
        "%s: %d of %d samples already valid, %d to capture",
        args.output,
        len(valid),
        len(ds),
        len(todo),
    )
    if args.backend == "vllm":
        device = _capture_vllm(args, ds, todo, store) if todo else "vllm (nothing to capture)"
    else:
        if todo:
            capture_transformers(
                args.target, ds, lengths, todo, store, device=device, batch_tokens=args.batch_tokens
            )
    probe = _probe(args, store, lengths, device if args.backend == "transformers" else None)
    if args.backend != "vllm":
        device = describe(device)
    path = store.finish(
        len(ds),
        target=str(args.target),
        vocab_size=dims["vocab_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        prepared=str(args.prepared),
        sample_lengths=lengths,
        num_loss_tokens=num_loss_tokens,
        backend=args.backend,
        device=device,
        probe=probe,
        min_fidelity=args.min_fidelity,
    )
    log.info("wrote %s", path)


def _probe(args, store: SampleStore, lengths: Sequence[int], device: str | None) -> dict | None:
    """The fidelity probe (integrity.probe) on `--probe-rows` stored rows, or None."""
    from speculators.hidden_states import integrity

    indices = integrity.probe_indices(lengths, args.probe_rows)
    if not indices:
        return None
    store.complete(len(lengths))
    if device is None:  # vLLM backend: the engine is gone, its GPU (if any) is free again
        device = default_device()
    # The capture's own compute precision, so the reference has the capture's numerics.
    dtype = target_compute_dtype(args.target, device)
    return integrity.probe(args.target, store, indices, device=device, dtype=dtype)
