"""Online training data: the target runs on each packed bin's prepared rows while the draft
trains; no hidden state is written.

`OnlineData` is a `TrainingData` (see `data.py`): the same sample order, lengths, split and
packing as the offline folders a capture of the same prepared datasets would write, and
`load(refs)` hands over the same aligned samples: the capture's hooks (`LayerCapture`,
`forward_rows`), its layer ids (`resolve_layer_ids`), its compute precision
(`target_compute_dtype`) and the storage rounding of `hidden_states.dtype` (`storage_round`).

Several processes: every rank holds its own frozen copy of the target (replicated, not
sharded) in the compute dtype and runs it only on its own bins. `check_fit` estimates target +
draft memory per process up front and stops with one line when they cannot fit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from speculators.errors import SpeculatorsError
from speculators.train.data import SampleRef, TrainingData

log = logging.getLogger(__name__)

# Share of a device's memory the estimate may fill: activations, the allocator's cache and the
# CUDA context take the rest.
USABLE_FRACTION = 0.85
# Bytes per draft parameter while training: fp32 weight + fp32 gradient + two AdamW moments.
DRAFT_BYTES_PER_PARAM = 16


class OnlineData(TrainingData):
    """Prepared datasets (`speculators prepare`'s Arrow `dataset/` folders) + the target."""

    mode = "online"

    def __init__(
        self,
        folders: Sequence[str | Path],
        target: str | Path,
        *,
        hidden_size: int,
        vocab_size: int,
        num_layers: int,
        layer_ids: Sequence[int] | None = None,
        dtype: str = "bfloat16",
        batch_tokens: int = 8192,
    ):
        """Read and check each prepared dataset (columns, equal mask lengths, ids < vocab).

        Raises SpeculatorsError naming the folder (not a prepared dataset, empty, given twice,
        nothing to train) or hidden_states.layer_ids (invalid ids).
        """
        from speculators.hidden_states.capture import load_prepared
        from speculators.hidden_states.store import dtype_from_name, resolve_layer_ids

        if not folders:
            raise SpeculatorsError("--data", "no prepared dataset folder given")
        self.folders = [Path(f) for f in folders]
        seen: dict[Path, Path] = {}
        for folder in self.folders:
            first = seen.setdefault(folder.resolve(), folder)
            if first is not folder:
                raise SpeculatorsError(
                    folder, f"given twice in --data (the same folder as {first}): remove one"
                )
        self.target = str(target)
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.layer_ids = resolve_layer_ids(layer_ids, num_layers)
        self.dtype_name, self.dtype = dtype, dtype_from_name(dtype)
        self.batch_tokens = batch_tokens
        self.datasets, self.samples, self.dropped, self.num_loss_tokens = [], [], 0, 0
        for pos, folder in enumerate(self.folders):
            ds, lengths, loss_tokens = load_prepared(folder, vocab_size)
            self.datasets.append(ds.select_columns(["input_ids", "loss_mask"]))
            self.num_loss_tokens += int(loss_tokens)
            for idx, n in enumerate(lengths):
                # As offline: a 1-token row has nothing to predict once shifted.
                if n >= 2:
                    self.samples.append(SampleRef(f"{folder} row {idx}", n - 1, (pos, idx)))
                else:
                    self.dropped += 1
        if not self.samples:
            raise SpeculatorsError(
                self.folders[0], "no rows with 2 or more tokens: nothing to train"
            )
        if self.num_loss_tokens == 0:
            raise SpeculatorsError(self.folders[0], "every loss_mask is 0: no supervised tokens")
        if self.dropped:
            log.warning("%d single-token rows left out (nothing to predict)", self.dropped)
        self.capture = None
        self.compute_dtype: torch.dtype | None = None
        self.forward_s = 0.0  # target forward seconds in this process (all loaders)
        self._lock = threading.Lock()  # one forward at a time (train and val loaders)

    # -- the target ----------------------------------------------------------------------------

    def attach(self, env, draft_parameters: int) -> None:
        """Check that target + draft fit (`check_fit`), then load the frozen target on this
        process's device in the precision policy's dtype."""
        from speculators.devices import target_compute_dtype
        from speculators.hidden_states.capture import LayerCapture, load_model

        device = env.device
        self.compute_dtype = target_compute_dtype(self.target, device.type)
        check_fit(self.target, self.compute_dtype, draft_parameters, env)
        model = load_model(self.target, device, self.compute_dtype, spread=False)
        self.capture = LayerCapture(model, self.layer_ids)
        log.info("online: target %s on %s in %s, layers %s, states rounded as %s",
                 self.target, device, self.compute_dtype, self.layer_ids, self.dtype_name)  # fmt: skip

    def load(self, refs: Sequence[SampleRef]) -> list[dict]:
        """Runs the target on the rows of `refs` (at most `batch_tokens` padded tokens per
        forward, under inference_mode) and returns their aligned samples, the states rounded as
        a capture in `hidden_states.dtype` would store them (float32 tensors). A zero or
        constant layer raises SpeculatorsError naming the row, as it would stop a capture."""
        from speculators.hidden_states.capture import forward_rows
        from speculators.hidden_states.integrity import check_layers, layer_stats
        from speculators.hidden_states.store import storage_round
        from speculators.models.eagle3 import align_sample

        if self.capture is None:
            raise RuntimeError("OnlineData.attach() must run before load()")
        rows = [self.datasets[r.row[0]][r.row[1]] for r in refs]
        ids = [row["input_ids"] for row in rows]
        with self._lock:
            started = time.perf_counter()
            states = forward_rows(self.capture, ids, self.batch_tokens)
            self.forward_s += time.perf_counter() - started
        out = []
        for ref, row, layers in zip(refs, rows, states):
            layers = [storage_round(t, self.dtype) for t in layers]
            check_layers(layer_stats(layers), self.layer_ids, ref.path, allow_non_finite=True)
            input_ids = torch.tensor(row["input_ids"], dtype=torch.long)
            out.append(align_sample(input_ids, layers, torch.tensor(row["loss_mask"])))
        return out

    # -- what the fingerprint and the summary say ----------------------------------------------

    def settings(self) -> dict:
        """What makes online states differ (part of the resume fingerprint; after `attach`)."""
        return {
            "mode": self.mode,
            "layer_ids": self.layer_ids,
            "dtype": self.dtype_name,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "batch_tokens": self.batch_tokens,
        }

    def input_files(self) -> list[tuple[str, Path]]:
        """The prepared datasets' Arrow files and the target's weights: rewriting either means
        other states (stamped into the resume fingerprint)."""
        files = []
        for i, folder in enumerate(self.folders):
            for f in sorted(folder.iterdir()):
                if f.suffix in (".arrow", ".json"):
                    files.append((f"data[{i}]/{f.name}", f))
        target = Path(self.target)
        if target.is_dir():
            files += [(f"target/{f.name}", f) for f in sorted(target.glob("*.safetensors"))]
        return files

    def report(self) -> dict:
        return {
            "mode": self.mode,
            "target_forward_s": round(self.forward_s, 3),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "states_dtype": self.dtype_name,
            "layer_ids": self.layer_ids,
            "bytes_written": 0,
        }


def estimate_bytes(target: str, compute_dtype: torch.dtype, draft_parameters: int, world: int):
    """(target bytes, draft bytes) per process: the whole target in `compute_dtype`
    (replicated), the draft's weights, gradients and AdamW state sharded over `world`."""
    from speculators.targets import target_parameter_count

    params = target_parameter_count(target)
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    return params, params * itemsize, draft_parameters * DRAFT_BYTES_PER_PARAM // max(1, world)


def check_fit(target: str, compute_dtype: torch.dtype, draft_parameters: int, env) -> None:
    """Stops with one line when the target (replicated on every process) and this process's
    share of the draft cannot fit in the device's memory (CUDA: the GPU's; CPU: the host's,
    shared by all processes of the node)."""
    params, target_b, draft_b = estimate_bytes(
        target, compute_dtype, draft_parameters, env.world_size
    )
    if env.device.type == "cuda":
        total = torch.cuda.get_device_properties(env.device).total_memory
        per_device, where = 1, f"GPU {torch.cuda.get_device_name(env.device)}"
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        per_device, where = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))), "host memory"
    need = per_device * (target_b + draft_b)
    gib = 2**30
    log.info("online: target %.2fB parameters, %.2f GiB in %s + draft %.2f GiB per process;"
             " %s has %.1f GiB", params / 1e9, target_b / gib, compute_dtype, draft_b / gib,
             where, total / gib)  # fmt: skip
    if need > USABLE_FRACTION * total:
        raise SpeculatorsError(
            "hidden_states.mode",
            f"online: the target ({params / 1e9:.2f}B parameters, {target_b / gib:.1f} GiB in"
            f" {str(compute_dtype).removeprefix('torch.')}) and the draft"
            f" ({draft_b / gib:.1f} GiB) x {per_device} process(es) need"
            f" {need / gib:.1f} GiB but the {where} has {total / gib:.1f} GiB: use"
            " hidden_states.mode: offline",
        )
