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
    `loss_mask` [seq]), checks every layer (finite, not degenerate: `integrity.py`), casts to
    the store dtype -- or, for `float8_e4m3fn`, quantises each token of each layer with its own
    scale (`quantize`) -- copies every tensor into its own compact storage and writes
    `data_{idx}.pt` atomically (temp name, then rename), recording its size and sha256 for the
    manifest. Bytes are a pure function of the tensors, so a rerun writes identical files.
  - `.check(idx, input_ids, loss_mask)` -> None if the file is present and valid for that
    prepared row, else a one-line problem.
  - `.scan(rows)` with `rows` an iterable of `(idx, input_ids, loss_mask)`: returns
    `(valid, todo)` index lists and logs every broken file it will regenerate. Call
    `.begin(settings)` first: it drops samples made with other settings.
  - `.finish(...)` checks every index is present, removes stale extras, writes `manifest.json`
    (size + sha256 + per-layer statistics of every sample) and `data_config.json` last (via
    `write_data_config`).

Readers: `read_sample(path)` loads a file, `sample_states(sample, dtype)` returns its states
dequantised into `dtype` ([seq, H] per layer id) whatever the stored format.

Formats (`data_config.json` `format_version`): 1 = bf16/fp32 states (what every earlier
version wrote, byte for byte); 2 = fp8 states plus `hidden_states_scale` (float32
[num_layers, seq]): state = fp8 value x scale of its token and layer. A reader that knows only
version 1 refuses version 2 with one line (`read_data_config`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from speculators.errors import SpeculatorsError
from speculators.fileio import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bf16 / fp32 states: the files every earlier version wrote
FP8_FORMAT_VERSION = 2  # fp8 states + per-token scales; readers of version 1 refuse it
FORMAT_VERSIONS = (FORMAT_VERSION, FP8_FORMAT_VERSION)
FILE_PATTERN = "data_{idx}.pt"
DATA_CONFIG = "data_config.json"
MANIFEST = "manifest.json"
# Settings of the run that made the samples; a resume with other settings starts over.
SETTINGS_FILE = "capture_settings.json"
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_KEY = "hidden_states_scale"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float8_e4m3fn": FP8}
SAMPLE_KEYS = {"input_ids", "hidden_states", "loss_mask"}


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


def quantize(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's states [seq, H] (any float dtype) -> (float8_e4m3fn [seq, H], float32 [seq]).

    Each token is scaled so that its largest magnitude maps to 448, e4m3's largest value:
    `scale = amax / 448` (1.0 for an all-zero token), `q = fp8(clamp(x / scale))`. The relative
    rounding error is at most 2^-4 per element. Deterministic: same input, same bytes.
    """
    x = state.detach().to("cpu")
    amax = x.abs().amax(dim=-1).float()  # exact in the input dtype
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    y = x.to(torch.float32, copy=True)
    y.div_(scale[:, None]).clamp_(-FP8_MAX, FP8_MAX)
    return y.to(FP8).contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """fp8 states [seq, H] and their float32 scales [seq] -> states [seq, H] in `dtype`."""
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def storage_round(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`state` [seq, H] as a capture stored in `dtype` and the trainer read back: float32 on
    the CPU, rounded exactly as `SampleStore.write` then `sample_states` round it (a cast, or
    fp8 quantise -> dequantise with per-token scales). Online training hands these over, so
    its batches equal an offline run's."""
    if dtype == FP8:
        return dequantize(*quantize(state), torch.float32)
    return _own_copy(state, dtype).to(torch.float32)


def load_problem(e: BaseException) -> str:
    """One short line for why `torch.load` failed on a file (damaged, foreign or random bytes)."""
    first = (str(e).splitlines() or [""])[0].split(". ")[0][:120]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def read_sample(path: str | os.PathLike | io.BytesIO, *, mmap: bool = False, where=None) -> dict:
    """The raw dict of `data_{idx}.pt`; SpeculatorsError naming the file if it cannot be read.

    Any exception of the loader counts: random bytes reach the legacy (non-zip) unpickler,
    which fails with UnpicklingError, struct or Unicode errors, not just the zip reader's.
    `where` names the file when `path` is its bytes in memory.
    """
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - whatever the bytes are, one line naming the file
        raise SpeculatorsError(where or path, f"unreadable sample ({load_problem(e)})") from None


def scale_problem(scale: torch.Tensor) -> str | None:
    """fp8 scales must be finite and > 0: a zero, negative (every state's sign flipped), NaN or
    infinite scale is no quantisation this module writes (it writes amax / 448, or 1)."""
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        return f"{SCALE_KEY}: {int(bad.sum())} of {scale.numel()} not finite and > 0"
    return None


def ids_problem(ids: torch.Tensor, vocab_size: int) -> str | None:
    """Token ids must lie in the target's vocabulary [0, vocab_size)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        return (
            f"input_ids outside the target's vocabulary [0, {vocab_size})"
            f" (min {int(ids.min())}, max {int(ids.max())})"
        )
    return None


def mask_problem(mask: torch.Tensor) -> str | None:
    """A loss mask holds 0 (not supervised) and 1 (supervised), nothing else."""
    if not bool(((mask == 0) | (mask == 1)).all()):
        return "loss_mask has values other than 0 and 1"
    return None


def sample_states(
    sample: dict, dtype: torch.dtype | None = torch.float32, where: object = "sample"
) -> list[torch.Tensor]:
    """The hidden states of a loaded sample in `dtype`, one [seq, H] per layer id.

    fp8 states are dequantised with their per-token scales (into float32 when `dtype` is
    None; other states then stay as stored); an fp8 sample without valid scales (or scales
    beside non-fp8 states) raises SpeculatorsError naming `where`.
    """
    states = sample.get("hidden_states")
    if not isinstance(states, list) or not all(isinstance(t, torch.Tensor) for t in states):
        raise SpeculatorsError(where, "no list of hidden-state tensors in the sample")
    scale = sample.get(SCALE_KEY)
    fp8 = [t.dtype == FP8 for t in states]
    if any(fp8) and not all(fp8):
        raise SpeculatorsError(where, "fp8 and non-fp8 hidden states mixed in one sample")
    if not any(fp8):
        if scale is not None:
            raise SpeculatorsError(where, f"{SCALE_KEY} beside {states[0].dtype} states")
        return list(states) if dtype is None else [t.to(dtype) for t in states]
    seq = states[0].shape[0] if states else 0
    if not (
        isinstance(scale, torch.Tensor)
        and scale.dtype == torch.float32
        and tuple(scale.shape) == (len(states), seq)
    ):
        got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else "none"
        raise SpeculatorsError(
            where, f"fp8 states need float32 {SCALE_KEY} [{len(states)}, {seq}], got {got}"
        )
    problem = scale_problem(scale)
    if problem:
        raise SpeculatorsError(where, problem)
    return [dequantize(t, s, dtype or torch.float32) for t, s in zip(states, scale)]


class SampleStore:
    """Reads, checks and writes the `data_{idx}.pt` files of one output folder."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        hidden_size: int,
        layer_ids: Sequence[int],
        dtype: torch.dtype = torch.bfloat16,
        vocab_size: int | None = None,
    ):
        if dtype not in DTYPES.values():
            raise SpeculatorsError("hidden_states.dtype", f"{dtype} is not one of {sorted(DTYPES)}")
        self.output_dir = Path(output_dir)
        self.hidden_size = hidden_size
        self.layer_ids = list(layer_ids)
        self.dtype = dtype
        self.vocab_size = vocab_size  # with it, `check_sample` checks the ids' range
        # idx -> manifest entry and layer statistics of the samples written or checked here.
        self.entries: dict[int, dict] = {}
        self.broken_on_resume = 0  # files `scan` found broken (unreadable, degenerate, ...)

    @property
    def quantized(self) -> bool:
        return self.dtype == FP8

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
        from speculators.hidden_states import integrity

        # Finite, not all zero, not constant: checked before anything is written.
        stats = integrity.layer_stats(hidden_states)
        integrity.check_layers(stats, self.layer_ids, where)
        sample = {
            "input_ids": _own_copy(input_ids, torch.long),
            "hidden_states": [],
            "loss_mask": _own_copy(loss_mask, torch.long),
        }
        if self.quantized:
            pairs = [quantize(t) for t in hidden_states]
            sample["hidden_states"] = [q for q, _ in pairs]
            sample[SCALE_KEY] = torch.stack([s for _, s in pairs])
        else:
            sample["hidden_states"] = [_own_copy(t, self.dtype) for t in hidden_states]
        # A file object (not a path) keeps the archive's inner name fixed ("archive"), so the
        # bytes do not depend on the temporary file name; hashed in memory, then written.
        buffer = io.BytesIO()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            torch.save(sample, buffer)
            data = buffer.getvalue()
            with atomic_path(where) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data)
        except OSError as e:  # a full disk or a lost mount: the samples already written stay
            raise SpeculatorsError(where, f"cannot write ({e.strerror or e})") from None
        self.entries[idx] = {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "tokens": seq,
            "layer_rms": [st["token_rms"] for st in stats],
        }
        return where

    # -- checking ----------------------------------------------------------------------------

    def check(
        self,
        idx: int,
        input_ids: Sequence[int],
        loss_mask: Sequence[int],
        *,
        compare_rows: bool = True,
    ) -> str | None:
        """None if `data_{idx}.pt` exists and matches the prepared row, else what is wrong.

        `compare_rows=False` checks only the lengths of `input_ids`/`loss_mask` (verify has
        no prepared rows), not their values.
        """
        path = self.path(idx)
        if not path.exists():
            return "missing"
        try:
            # mmap: shapes and dtypes are checked without reading every state into memory.
            sample = read_sample(path, mmap=True)
        except SpeculatorsError as e:
            return e.problem
        return self.check_sample(sample, input_ids, loss_mask, compare_rows=compare_rows)

    def check_sample(
        self, sample, input_ids: Sequence[int], loss_mask: Sequence[int], *, compare_rows=True
    ) -> str | None:
        """`check` on a loaded sample: None if it fits the prepared row, else what is wrong."""
        keys = SAMPLE_KEYS | ({SCALE_KEY} if self.quantized else set())
        if not isinstance(sample, dict) or set(sample) != keys:
            return "not a hidden-states sample" + (
                " of this format" if isinstance(sample, dict) else ""
            )
        seq = len(input_ids)
        ids, mask, states = sample["input_ids"], sample["loss_mask"], sample["hidden_states"]
        if not (isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.shape == (seq,)):
            return f"input_ids are not a LongTensor of length {seq}"
        if compare_rows and not torch.equal(ids, torch.as_tensor(input_ids, dtype=torch.long)):
            return "input_ids differ from the prepared row"
        if self.vocab_size and ids_problem(ids, self.vocab_size):
            return ids_problem(ids, self.vocab_size)
        if not (
            isinstance(mask, torch.Tensor) and mask.dtype == torch.long and mask.shape == (seq,)
        ):
            return f"loss_mask is not a LongTensor of length {seq}"
        if compare_rows and not torch.equal(mask, torch.as_tensor(loss_mask, dtype=torch.long)):
            return "loss_mask differs from the prepared row"
        if mask_problem(mask):
            return mask_problem(mask)
        if not isinstance(states, list) or len(states) != len(self.layer_ids):
            return f"expected {len(self.layer_ids)} hidden-state tensors"
        for t in states:
            if not isinstance(t, torch.Tensor) or t.shape != (seq, self.hidden_size):
                return f"hidden state is not [{seq}, {self.hidden_size}]"
            if t.dtype != self.dtype:
                return f"hidden state dtype {t.dtype} != {self.dtype}"
        if self.quantized:
            scale = sample[SCALE_KEY]
            if not (
                isinstance(scale, torch.Tensor)
                and scale.dtype == torch.float32
                and scale.shape == (len(self.layer_ids), seq)
            ):
                return f"{SCALE_KEY} is not float32 [{len(self.layer_ids)}, {seq}]"
            return scale_problem(scale)
        return None

    def inspect(self, idx: int, seq: int | None = None) -> dict:
        """Read a whole sample file once: its manifest entry (bytes, sha256, layer RMS), after
        the integrity checks of `integrity.check_layers` and, with `seq`, the schema of `check`
        for a row of that length (SpeculatorsError naming the file, and the layer)."""
        from speculators.hidden_states import integrity

        path = self.path(idx)
        data = path.read_bytes()
        sample = read_sample(io.BytesIO(data), where=path) if data else read_sample(path)
        if seq is not None:
            problem = self.check_sample(sample, [0] * seq, [0] * seq, compare_rows=False)
            if problem:
                raise SpeculatorsError(path, problem)
        # Statistics accumulate in fp32 whatever the dtype: no fp32 copy of bf16 states.
        states = sample_states(sample, None, path)
        stats = integrity.layer_stats(states)
        integrity.check_layers(stats, self.layer_ids, path)
        entry = {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "tokens": int(states[0].shape[0]) if states else 0,
            "layer_rms": [st["token_rms"] for st in stats],
        }
        self.entries[idx] = entry
        return entry

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
                # The whole file: its hash for the manifest, and no NaN or degenerate layer.
                try:
                    self.inspect(idx)
                except SpeculatorsError as e:
                    problem = e.problem
            if problem is None:
                valid.append(idx)
                continue
            if problem != "missing":
                self.broken_on_resume += 1
                log.warning("%s: %s; regenerating it", self.path(idx), problem)
                self.path(idx).unlink(missing_ok=True)
            todo.append(idx)
        return valid, todo

    def complete(self, num_samples: int) -> None:
        """Check all `num_samples` files exist and drop stale extras beyond them."""
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
                self.entries.pop(i, None)

    def finish(
        self,
        num_samples: int,
        *,
        probe: dict | None = None,
        min_fidelity: float = 0.0,
        **data_config,
    ) -> Path:
        """Check all `num_samples` files exist, drop stale extras, check the folder's integrity
        (`integrity.check_folder`: every sample's layer RMS against the probe, the probe's
        fidelity against `min_fidelity`), write `manifest.json`, then data_config.json last.

        Samples written by another process (vLLM data parallel) are read and hashed here.
        """
        from speculators.hidden_states import integrity

        self.complete(num_samples)
        for i in range(num_samples):
            if i not in self.entries:
                self.inspect(i)
        entries = [self.entries[i] for i in range(num_samples)]
        summary = integrity.check_folder(
            self.output_dir, entries, self.layer_ids, probe=probe, min_fidelity=min_fidelity
        )
        manifest = write_manifest(self.output_dir, entries)
        extra = dict(data_config.pop("extra", None) or {})
        extra["integrity"] = {**summary, "broken_on_resume": self.broken_on_resume}
        extra["manifest"] = manifest
        return write_data_config(
            self.output_dir,
            layer_ids=self.layer_ids,
            dtype=self.dtype,
            hidden_size=self.hidden_size,
            extra=extra,
            **data_config,
        )


# -- manifest.json -----------------------------------------------------------------------------


def write_manifest(output_dir: str | os.PathLike, entries: Sequence[dict]) -> dict:
    """Write `manifest.json` (sample i's `bytes` and `sha256`, in index order); returns the
    summary recorded in data_config.json: file name, its sha256, sample count, total bytes."""
    samples = [
        {"file": FILE_PATTERN.format(idx=i), "bytes": e["bytes"], "sha256": e["sha256"]}
        for i, e in enumerate(entries)
    ]
    body = {"algorithm": "sha256", "num_samples": len(samples), "samples": samples}
    text = json.dumps(body, indent=1) + "\n"
    path = Path(output_dir) / MANIFEST
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return {
        "file": MANIFEST,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "num_samples": len(samples),
        "total_bytes": sum(e["bytes"] for e in samples),
    }


def read_manifest(
    folder: str | os.PathLike, num_samples: int, recorded: dict | None = None
) -> list[dict]:
    """The `num_samples` entries of a folder's manifest.json, each `{"file": "data_<i>.pt",
    "bytes": int, "sha256": hex}` in index order (one-line error if absent, foreign or not
    agreeing with itself). `recorded` is data_config.json's `manifest` summary: when it has a
    `sha256`, manifest.json's bytes must hash to it, so a manifest copied from another capture
    or edited by hand is refused rather than trusted."""
    path = Path(folder) / MANIFEST
    want = (recorded or {}).get("sha256")
    if want is not None:
        try:
            got = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            raise SpeculatorsError(path, f"missing, but {DATA_CONFIG} records one") from None
        if got != want:
            raise SpeculatorsError(
                path,
                f"sha256 {got[:12]}... differs from the {want[:12]}... that {DATA_CONFIG}"
                " recorded: replaced or edited after the capture",
            )
    body = read_json(path)
    samples = body.get("samples") if isinstance(body, dict) else None
    if not isinstance(samples, list) or len(samples) != num_samples:
        got = len(samples) if isinstance(samples, list) else "no"
        raise SpeculatorsError(path, f"{got} entries, data_config.json has {num_samples} samples")
    if body.get("algorithm", "sha256") != "sha256":
        raise SpeculatorsError(path, f"algorithm {body['algorithm']!r} is not sha256")
    if body.get("num_samples", num_samples) != num_samples:
        raise SpeculatorsError(
            path,
            f"num_samples {body['num_samples']!r} != the {num_samples} samples of {DATA_CONFIG}",
        )
    for idx, e in enumerate(samples):
        name = FILE_PATTERN.format(idx=idx)
        if not (
            isinstance(e, dict)
            and e.get("file") == name
            and _is_int(e.get("bytes"))
            and e["bytes"] >= 0
            and isinstance(e.get("sha256"), str)
        ):
            raise SpeculatorsError(
                path, f"entry {idx} is not {name} with its bytes and sha256: {str(e)[:120]}"
            )
    return samples


def stray_files(folder: str | os.PathLike, num_samples: int) -> list[str]:
    """Names of `data_*.pt` files in `folder` that are not samples 0..num_samples-1 (copied in
    from elsewhere, or left by another capture), sorted by index where there is one."""
    expected = {FILE_PATTERN.format(idx=i) for i in range(num_samples)}
    names = [p.name for p in Path(folder).glob("data_*.pt") if p.name not in expected]

    def order(name: str):
        stem = name[len("data_") : -len(".pt")]
        return (0, int(stem), name) if stem.isdigit() else (1, 0, name)

    return sorted(names, key=order)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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
    fp8 = dtype == FP8
    schema = {
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
    }
    if fp8:
        schema[SCALE_KEY] = {
            "dtype": "torch.float32",
            "shape": f"[{len(layer_ids)}, seq_len]",
            "description": (
                "per layer and token: state = float(hidden_states[l][t]) * scale[l, t];"
                f" scale = max|state| / {FP8_MAX:g} (1 for an all-zero token)"
            ),
        }
    config = {
        "format_version": FP8_FORMAT_VERSION if fp8 else FORMAT_VERSION,
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
            "data_format_version": 2 if fp8 else 1,
            "schema": schema,
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
    if not isinstance(config, dict):
        raise SpeculatorsError(
            path, f"the top level is a {type(config).__name__}, not an object: not a data_config"
        )
    version = config.get("format_version")
    if version not in FORMAT_VERSIONS:
        raise SpeculatorsError(
            path,
            f"format_version {version!r} is not one this reader knows {list(FORMAT_VERSIONS)}"
            " (written by a newer speculators?)",
        )
    if config.get("dtype") not in DTYPES:
        raise SpeculatorsError(
            path, f"dtype {config.get('dtype')!r} is not one of {sorted(DTYPES)}"
        )
    if (version == FP8_FORMAT_VERSION) != (config["dtype"] == "float8_e4m3fn"):
        raise SpeculatorsError(
            path, f"format_version {version} does not match dtype {config['dtype']}"
        )
    _check_structure(path, config)
    return config


def _check_structure(path: Path, config: dict) -> None:
    """The keys readers index, with their types, and the fields that must agree with each
    other (a hand-edited or foreign file stops here in one line, not in a KeyError later)."""
    target, data = config.get("target"), config.get("data")
    for name, value in (("target", target), ("data", data)):
        if not isinstance(value, dict):
            raise SpeculatorsError(path, f"{name} is not an object")
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if not (_is_int(target.get(key)) and target[key] > 0):
            raise SpeculatorsError(path, f"target.{key} {target.get(key)!r} is not a positive int")
    lengths = data.get("sample_lengths")
    if not isinstance(lengths, list) or not all(_is_int(n) and n >= 1 for n in lengths):
        raise SpeculatorsError(path, "data.sample_lengths is not a list of positive ints")
    if data.get("num_samples", len(lengths)) != len(lengths):
        raise SpeculatorsError(
            path, f"data.num_samples {data['num_samples']!r} != {len(lengths)} sample_lengths"
        )
    ids = config.get("layer_ids")
    if not (isinstance(ids, list) and len(ids) >= 2 and all(_is_int(i) for i in ids)):
        raise SpeculatorsError(path, f"layer_ids is not a list of layer ids: {str(ids)[:80]}")
    if "aux_layer_ids" in config and config["aux_layer_ids"] != ids[:-1]:
        raise SpeculatorsError(
            path, f"aux_layer_ids {config['aux_layer_ids']} != layer_ids[:-1] {ids[:-1]}"
        )
    for name in ("integrity", "manifest"):
        if name in config and not isinstance(config[name], dict):
            raise SpeculatorsError(path, f"{name} is not an object")
    sha = config.get("manifest", {}).get("sha256")
    if sha is not None and not (
        isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)
    ):
        raise SpeculatorsError(path, f"manifest.sha256 is not a sha256 hex digest: {str(sha)[:80]}")
    rms = config.get("integrity", {}).get("layer_token_rms")
    if rms is not None and not (
        isinstance(rms, dict)
        and set(rms) == {str(i) for i in ids}
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in rms.values())
    ):
        raise SpeculatorsError(
            path, f"integrity.layer_token_rms is not one RMS per layer id {ids}: {str(rms)[:80]}"
        )


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SpeculatorsError("--dtype", f"{name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]
