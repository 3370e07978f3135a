"""Sample files (`data_{idx}.pt`) and `data_config.json`: the on-disk contract of hidden states.

Both capture backends (transformers here, vLLM in `speculators.vllm`) write through this module,
so the format, the resume checks and the metadata are the same whichever backend ran.

API for a backend:

- `resolve_layer_ids(requested, num_hidden_layers)` -> validated ids (vLLM convention: id i is
  the residual stream entering decoder layer i, id L the final output before the final norm;
  aux ids first, L last). `None` gives the default `[2, L//2, L-3, L]`.
- `SampleStore(output_dir, hidden_size=H, layer_ids=ids, dtype=torch.bfloat16)`:
  - `.write(idx, input_ids, hidden_states, loss_mask)` validates shapes (`input_ids` [seq],
    `hidden_states` a list of `len(layer_ids)` tensors [seq, H] on any device/dtype,
    `loss_mask` [seq]), casts to the store dtype, copies every tensor into its own compact
    storage and writes `data_{idx}.pt` atomically (temp name, then rename). Bytes are a pure
    function of the tensors, so a rerun writes identical files.
  - `.check(idx, input_ids, loss_mask)` -> None if the file is present and valid for that
    prepared row, else a one-line problem.
  - `.scan(rows)` with `rows` an iterable of `(idx, input_ids, loss_mask)`: returns
    `(valid, todo)` index lists and logs every broken file it will regenerate. Call
    `.begin(settings)` first: it drops samples made with other settings.
  - `.finish(...)` checks every index is present, removes stale extras and writes
    `data_config.json` last (via `write_data_config`).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import shlex
import sys
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from speculators.errors import SpeculatorsError
from speculators.fileio import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILE_PATTERN = "data_{idx}.pt"
DATA_CONFIG = "data_config.json"
# Settings of the run that made the samples; a resume with other settings starts over.
SETTINGS_FILE = "capture_settings.json"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def default_layer_ids(num_hidden_layers: int) -> list[int]:
    n = num_hidden_layers
    return [2, n // 2, n - 3, n]


def resolve_layer_ids(requested: Sequence[int] | None, num_hidden_layers: int) -> list[int]:
    """Validated layer ids: distinct, within [0, L], at least one aux id, the last equal to L."""
    n = num_hidden_layers
    ids = list(requested) if requested is not None else default_layer_ids(n)
    where = "hidden_states.layer_ids"
    hint = "" if requested is not None else f" (the default for a {n}-layer target)"
    if len(ids) < 2:
        raise SpeculatorsError(where, f"{ids}: need auxiliary layer ids and then {n}")
    if len(set(ids)) != len(ids):
        raise SpeculatorsError(where, f"{ids}{hint} are not distinct; set the layer ids")
    bad = [i for i in ids if not 0 <= i <= n]
    if bad:
        raise SpeculatorsError(where, f"{bad} out of range: the target has layers 0..{n}")
    if ids[-1] != n:
        # The trainer computes the target's logits from the last id: it must be the final state.
        raise SpeculatorsError(where, f"{ids}: the last id must be {n} (final pre-norm output)")
    if ids != sorted(ids):
        # vLLM concatenates the aux states in ascending layer order whatever the config lists;
        # a draft trained on another order would get its inputs shuffled when served.
        raise SpeculatorsError(where, f"{ids}: list the layer ids in ascending order")
    return ids


def sample_path(output_dir: str | os.PathLike, idx: int) -> Path:
    return Path(output_dir) / FILE_PATTERN.format(idx=idx)


def _own_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU copy with storage of exactly its size (torch.save writes whole storages)."""
    out = torch.empty(t.shape, dtype=dtype)
    out.copy_(t)
    return out


class SampleStore:
    """Reads, checks and writes the `data_{idx}.pt` files of one output folder."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        hidden_size: int,
        layer_ids: Sequence[int],
        dtype: torch.dtype = torch.bfloat16,
    ):
        self.output_dir = Path(output_dir)
        self.hidden_size = hidden_size
        self.layer_ids = list(layer_ids)
        self.dtype = dtype

    def path(self, idx: int) -> Path:
        return sample_path(self.output_dir, idx)

    # -- writing -----------------------------------------------------------------------------

    def write(
        self,
        idx: int,
        input_ids: torch.Tensor,
        hidden_states: Sequence[torch.Tensor],
        loss_mask: torch.Tensor,
    ) -> Path:
        """Validate and atomically write sample `idx`; returns its path."""
        where = self.path(idx)
        seq = int(input_ids.shape[0]) if input_ids.dim() == 1 else -1
        if seq < 1:
            raise SpeculatorsError(
                where, f"input_ids must be 1-D and non-empty, got {tuple(input_ids.shape)}"
            )
        if tuple(loss_mask.shape) != (seq,):
            raise SpeculatorsError(where, f"loss_mask shape {tuple(loss_mask.shape)} != ({seq},)")
        if len(hidden_states) != len(self.layer_ids):
            raise SpeculatorsError(
                where, f"{len(hidden_states)} hidden-state tensors for layer ids {self.layer_ids}"
            )
        for t in hidden_states:
            if tuple(t.shape) != (seq, self.hidden_size):
                raise SpeculatorsError(
                    where,
                    f"hidden state shape {tuple(t.shape)} != ({seq}, {self.hidden_size}):"
                    " width or length differs from the target/prepared row",
                )
        sample = {
            "input_ids": _own_copy(input_ids, torch.long),
            "hidden_states": [_own_copy(t, self.dtype) for t in hidden_states],
            "loss_mask": _own_copy(loss_mask, torch.long),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(where) as tmp:
                # A file object (not a path) keeps the archive's inner name fixed ("archive"),
                # so the bytes do not depend on the temporary file name.
                with open(tmp, "wb") as f:
                    torch.save(sample, f)
        except OSError as e:  # a full disk or a lost mount: the samples already written stay
            raise SpeculatorsError(where, f"cannot write ({e.strerror or e})") from None
        return where

    # -- checking ----------------------------------------------------------------------------

    def check(self, idx: int, input_ids: Sequence[int], loss_mask: Sequence[int]) -> str | None:
        """None if `data_{idx}.pt` exists and matches the prepared row, else what is wrong."""
        path = self.path(idx)
        if not path.exists():
            return "missing"
        try:
            # mmap: shapes and dtypes are checked without reading every state into memory.
            sample = torch.load(path, weights_only=True, mmap=True)
        except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
            return f"unreadable ({str(e).splitlines()[0].split('. ')[0][:120]})"
        if not isinstance(sample, dict) or set(sample) != {
            "input_ids",
            "hidden_states",
            "loss_mask",
        }:
            return "not a hidden-states sample"
        seq = len(input_ids)
        ids, mask, states = sample["input_ids"], sample["loss_mask"], sample["hidden_states"]
        if not (isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.shape == (seq,)):
            return f"input_ids are not a LongTensor of length {seq}"
        if not torch.equal(ids, torch.as_tensor(input_ids, dtype=torch.long)):
            return "input_ids differ from the prepared row"
        if not (
            isinstance(mask, torch.Tensor) and mask.dtype == torch.long and mask.shape == (seq,)
        ):
            return f"loss_mask is not a LongTensor of length {seq}"
        if not torch.equal(mask, torch.as_tensor(loss_mask, dtype=torch.long)):
            return "loss_mask differs from the prepared row"
        if not isinstance(states, list) or len(states) != len(self.layer_ids):
            return f"expected {len(self.layer_ids)} hidden-state tensors"
        for t in states:
            if not isinstance(t, torch.Tensor) or t.shape != (seq, self.hidden_size):
                return f"hidden state is not [{seq}, {self.hidden_size}]"
            if t.dtype != self.dtype:
                return f"hidden state dtype {t.dtype} != {self.dtype}"
        return None

    def begin(self, settings: dict) -> None:
        """Start or resume: samples made with different settings are deleted, not trusted."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # The folder must not look complete while samples are being (re)written.
        (self.output_dir / DATA_CONFIG).unlink(missing_ok=True)
        settings_path = self.output_dir / SETTINGS_FILE
        previous = None
        if settings_path.exists():
            try:
                previous = json.loads(settings_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                previous = "unreadable"
        existing = self.existing_indices()
        if existing and previous != settings:
            log.warning(
                "%s: %d samples were made with other settings (%s); regenerating all",
                self.output_dir,
                len(existing),
                "no settings file" if previous is None else "settings changed",
            )
            for idx in existing:
                self.path(idx).unlink()
        write_json(settings_path, settings)

    def existing_indices(self) -> list[int]:
        out = []
        for p in self.output_dir.glob("data_*.pt"):
            stem = p.stem[len("data_") :]
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def scan(self, rows: Iterable[tuple[int, Sequence[int], Sequence[int]]]) -> tuple[list, list]:
        """Split prepared rows into (valid, todo) indices; broken files are logged and deleted."""
        valid, todo = [], []
        for idx, input_ids, loss_mask in rows:
            problem = self.check(idx, input_ids, loss_mask)
            if problem is None:
                valid.append(idx)
                continue
            if problem != "missing":
                log.warning("%s: %s; regenerating it", self.path(idx), problem)
                self.path(idx).unlink(missing_ok=True)
            todo.append(idx)
        return valid, todo

    def finish(self, num_samples: int, **data_config) -> Path:
        """Check all `num_samples` files exist, drop stale extras, write data_config.json last."""
        missing = [i for i in range(num_samples) if not self.path(i).exists()]
        if missing:
            raise SpeculatorsError(
                self.output_dir,
                f"{len(missing)} samples missing after capture (first: {missing[0]})",
            )
        stale = [i for i in self.existing_indices() if i >= num_samples]
        if stale:
            log.warning(
                "%s: removing %d samples beyond the %d prepared rows",
                self.output_dir,
                len(stale),
                num_samples,
            )
            for i in stale:
                self.path(i).unlink()
        return write_data_config(
            self.output_dir,
            layer_ids=self.layer_ids,
            dtype=self.dtype,
            hidden_size=self.hidden_size,
            **data_config,
        )


# -- data_config.json --------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in ("speculators", "torch", "transformers", "datasets", "vllm"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _program() -> str:
    name = Path(sys.argv[0]).name
    # `python -m speculators.cli` (the vLLM environment's rerun) is the same command.
    return "speculators" if name in ("cli.py", "__main__.py") else name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_data_config(
    output_dir: str | os.PathLike,
    *,
    target: str,
    hidden_size: int,
    vocab_size: int,
    num_hidden_layers: int,
    prepared: str,
    sample_lengths: Sequence[int],
    num_loss_tokens: int,
    layer_ids: Sequence[int],
    dtype: torch.dtype,
    backend: str,
    device: str,
    extra: dict | None = None,
) -> Path:
    """Write `data_config.json` (atomically); call only once every sample file is in place."""
    dtype_name = _dtype_name(dtype)
    lengths = [int(n) for n in sample_lengths]
    config = {
        "format_version": FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([_program(), *sys.argv[1:]]),
        "package_versions": package_versions(),
        "backend": backend,
        "device": device,
        "target": {
            "path": str(target),
            "hidden_size": hidden_size,
            "vocab_size": vocab_size,
            "num_hidden_layers": num_hidden_layers,
        },
        "data": {
            "prepared": str(prepared),
            "num_samples": len(lengths),
            "total_tokens": sum(lengths),
            "num_loss_tokens": int(num_loss_tokens),
            "sample_lengths": lengths,
        },
        "layer_ids": list(layer_ids),
        "aux_layer_ids": list(layer_ids[:-1]),
        "layer_convention": (
            "vLLM: id i is the residual stream entering decoder layer i; "
            f"id {num_hidden_layers} is the final output before the final norm"
        ),
        "dtype": dtype_name,
        "format": {
            "file_pattern": FILE_PATTERN,
            "data_format_version": 1,
            "schema": {
                "input_ids": {"dtype": "torch.int64", "shape": "[seq_len]"},
                "hidden_states": {
                    "dtype": f"list[torch.{dtype_name}]",
                    "shape": f"list of {len(layer_ids)} x [seq_len, {hidden_size}]",
                    "num_tensors": len(layer_ids),
                    "description": "one per layer id, aux layers first, the last layer last",
                },
                "loss_mask": {
                    "dtype": "torch.int64",
                    "shape": "[seq_len]",
                    "description": "1 = supervised",
                },
            },
        },
        **(extra or {}),
    }
    path = Path(output_dir) / DATA_CONFIG
    write_json(path, config)
    return path


def read_data_config(path: str | os.PathLike) -> dict:
    """Load a data_config.json (a file or its folder) and check the format version."""
    path = Path(path)
    if path.is_dir():
        path = path / DATA_CONFIG
    config = read_json(path)
    if config.get("format_version") != FORMAT_VERSION:
        raise SpeculatorsError(
            path, f"format_version {config.get('format_version')!r} != {FORMAT_VERSION}"
        )
    return config


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SpeculatorsError("--dtype", f"{name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]
