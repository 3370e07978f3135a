"""Training data: hidden-states folders checked against the target, the validation split,
the vocabulary mapping, and packed per-rank batches (with aux-state noise for training).

A batch is one packed row `[1, total_seq_len]` of whole aligned samples plus padding.

The seam between the loop and where hidden states come from is `TrainingData`: its `samples`
(lengths, for the split and packing) and `load(refs)` (the aligned samples of one bin). The
offline source (`HiddenStatesData`, here) reads captured files; the online source
(`speculators.train.online.OnlineData`) runs the target on prepared rows. `BatchLoader`, the
packing, the noise and the loop are the same for both.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speculators.errors import SpeculatorsError
from speculators.hidden_states.integrity import check_layers, layer_stats
from speculators.hidden_states.store import (
    DATA_CONFIG,
    FP8_FORMAT_VERSION,
    MANIFEST,
    ids_problem,
    mask_problem,
    read_data_config,
    read_manifest,
    read_sample,
    sample_path,
    sample_states,
    stray_files,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRef:
    path: Path | str  # the sample file (offline), or "<prepared folder> row <i>" (online)
    length: int  # tokens after alignment (stored length - 1): what the sample packs as
    row: tuple[int, int] | None = None  # online: (dataset position in --data, row index)


class TrainingData:
    """What the trainer needs of a data source (attributes set by the subclasses):
    `folders`, `layer_ids`, `hidden_size`, `samples` (`SampleRef`s in a fixed order),
    `num_loss_tokens`, `dropped`, `vocab_size`; and `load(refs)`."""

    mode = "offline"
    layer_ids: list[int]
    samples: list[SampleRef]

    @property
    def aux_layer_ids(self) -> list[int]:
        return self.layer_ids[:-1]

    def split(self, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Seeded (train, val) sample indices; validation holds out whole samples."""
        n = len(self.samples)
        n_val = round(n * val_fraction) if val_fraction > 0 else 0
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), n - 1)
        if val_fraction > 0 and n_val < 1:
            raise SpeculatorsError("--val-fraction", f"{n} sample(s): too few to hold any out")
        order = np.random.default_rng([seed, 0x5A11]).permutation(n).tolist()
        return sorted(order[n_val:]), sorted(order[:n_val])

    def attach(self, env, draft_parameters: int) -> None:
        """Called once the draft is built, before the first batch (online: checks that the
        target fits beside the draft and loads it). Nothing to do offline."""

    def load(self, refs: Sequence[SampleRef]) -> list[dict]:
        """The aligned samples (`align_sample`'s dict, float32 states) of `refs`, in order."""
        raise NotImplementedError

    def report(self) -> dict:
        """What train_summary.json says about the source: mode, target forward time, bytes."""
        return {"mode": self.mode}


@dataclass
class HiddenStatesData(TrainingData):
    """All samples of one or more hidden-states folders, in folder then index order."""

    folders: list[Path]
    layer_ids: list[int]
    hidden_size: int
    samples: list[SampleRef]
    num_loss_tokens: int
    dropped: int = 0  # samples of a single token: nothing to predict after alignment
    dtypes: tuple[str, ...] = ()  # stored dtype of each folder (fp8 is dequantised on read)
    vocab_size: int | None = None  # the target's: sample ids are checked against it on load

    @classmethod
    def open(
        cls,
        folders: Sequence[str | Path],
        *,
        hidden_size: int,
        vocab_size: int,
        num_layers: int,
        verify_hashes: bool = False,
    ) -> HiddenStatesData:
        """Read each folder's data_config.json and check it against the target's dimensions.

        Every sample file's size is checked against the folder's manifest.json (a truncated,
        replaced or missing file stops training with one line naming it); `verify_hashes` also
        reads every file and compares its sha256. Folders captured before manifests existed
        are accepted with a warning.
        """
        if not folders:
            raise SpeculatorsError("--data", "no hidden-states folder given")
        layer_ids, samples, loss_tokens, dropped, dtypes = None, [], 0, 0, []
        seen: dict[Path, Path] = {}
        for folder in map(Path, folders):
            # `--data hs ./hs/` (or a link to hs) would count every sample twice, and put
            # copies of training samples into validation.
            first = seen.setdefault(folder.resolve(), folder)
            if first is not folder:
                raise SpeculatorsError(
                    folder, f"given twice in --data (the same folder as {first}): remove one"
                )
            where = folder / DATA_CONFIG
            cfg = read_data_config(folder)
            dtypes.append(cfg["dtype"])
            target = cfg.get("target", {})
            if target.get("hidden_size") != hidden_size:
                raise SpeculatorsError(
                    where,
                    f"hidden_size {target.get('hidden_size')} != the target's {hidden_size}:"
                    " hidden states of another model",
                )
            if target.get("vocab_size") != vocab_size:
                raise SpeculatorsError(
                    where, f"vocab_size {target.get('vocab_size')} != the target's {vocab_size}"
                )
            if target.get("num_hidden_layers") != num_layers:
                raise SpeculatorsError(
                    where,
                    f"num_hidden_layers {target.get('num_hidden_layers')} != the target's"
                    f" {num_layers}",
                )
            ids = list(cfg["layer_ids"])
            if ids[-1] != num_layers:
                raise SpeculatorsError(where, f"layer_ids {ids}: the last must be {num_layers}")
            if layer_ids is not None and ids != layer_ids:
                raise SpeculatorsError(
                    where, f"layer_ids {ids} differ from {layer_ids} of {folders[0]}"
                )
            layer_ids = ids
            lengths = cfg["data"]["sample_lengths"]
            check_files(folder, len(lengths), verify_hashes, cfg)
            loss_tokens += int(cfg["data"].get("num_loss_tokens", 1))
            for idx, n in enumerate(lengths):
                # A 1-token sample has nothing to predict once inputs and targets are shifted.
                if n >= 2:
                    samples.append(SampleRef(sample_path(folder, idx), int(n) - 1))
                else:
                    dropped += 1
        if not samples:
            raise SpeculatorsError(folders[0], "no samples with 2 or more tokens: nothing to train")
        if loss_tokens == 0:
            raise SpeculatorsError(folders[0], "every loss_mask is 0: no supervised tokens")
        if dropped:
            log.warning("%d single-token samples left out (nothing to predict)", dropped)
        folders = [Path(f) for f in folders]
        return cls(
            folders, layer_ids, hidden_size, samples, loss_tokens, dropped, tuple(dtypes),
            vocab_size,
        )  # fmt: skip

    def load(self, refs: Sequence[SampleRef]) -> list[dict]:
        ids, n = self.layer_ids, len(self.layer_ids)
        return [load_sample(r, n, self.hidden_size, ids, self.vocab_size) for r in refs]

    def report(self) -> dict:
        """Offline: the bytes of the sample files this run read (what the capture wrote)."""
        written = 0
        for ref in self.samples:
            with contextlib.suppress(OSError):
                written += Path(ref.path).stat().st_size
        return {"mode": self.mode, "target_forward_s": 0.0, "bytes_written": written}


def load_vocab_mapping(d2t_path, t2d_path, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`d2t` (int64 offsets, [Vd]) and `t2d` (bool mask, [V]) checked against each other."""
    d2t = torch.from_numpy(np.load(d2t_path)).long()
    t2d = torch.from_numpy(np.load(t2d_path)).bool()
    if d2t.dim() != 1 or t2d.dim() != 1:
        raise SpeculatorsError(d2t_path, "d2t and t2d must be 1-D arrays")
    if t2d.numel() != vocab_size:
        raise SpeculatorsError(
            t2d_path, f"{t2d.numel()} entries != the target's vocab_size {vocab_size}"
        )
    if int(t2d.sum()) != d2t.numel():
        raise SpeculatorsError(
            t2d_path, f"{int(t2d.sum())} tokens selected but d2t has {d2t.numel()} entries"
        )
    if not torch.equal(torch.arange(d2t.numel()) + d2t, t2d.nonzero().flatten()):
        raise SpeculatorsError(d2t_path, "arange(Vd) + d2t does not list t2d's tokens in order")
    return d2t, t2d


def check_files(folder: Path, num_samples: int, hashes: bool, cfg: dict | None = None) -> None:
    """Sizes (and with `hashes` sha256) of a folder's samples against its manifest.json.

    Only a format-1 folder whose data_config.json records no manifest (`cfg`) may lack one:
    it was captured before manifests existed. Every fp8 (format 2) capture wrote one.
    """
    if not (folder / MANIFEST).is_file():
        cfg = cfg or {}
        if cfg.get("format_version") == FP8_FORMAT_VERSION:
            raise SpeculatorsError(
                folder,
                f"no {MANIFEST}, but this format_version {FP8_FORMAT_VERSION} folder was written"
                " with one: sizes and hashes cannot be checked (copy it along, or re-capture)",
            )
        if "manifest" in cfg:
            raise SpeculatorsError(
                folder,
                f"no {MANIFEST}, but {DATA_CONFIG} records one: sizes and hashes cannot be"
                " checked (copy it along, or re-capture)",
            )
        log.warning(
            "%s: no %s (captured by an older version): sizes%s not checked",
            folder,
            MANIFEST,
            " and sha256" if hashes else "",
        )
        return
    stray = stray_files(folder, num_samples)
    if stray:
        log.warning(
            "%s: %d data_*.pt files not among the %d samples of %s are not read (%s%s)",
            folder,
            len(stray),
            num_samples,
            DATA_CONFIG,
            ", ".join(stray[:3]),
            ", ..." if len(stray) > 3 else "",
        )
    for idx, entry in enumerate(read_manifest(folder, num_samples, (cfg or {}).get("manifest"))):
        path = sample_path(folder, idx)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise SpeculatorsError(path, "missing (deleted by cleanup-hidden-states?)") from None
        if size != entry["bytes"]:
            raise SpeculatorsError(
                path,
                f"{size} bytes but {MANIFEST} says {entry['bytes']}: truncated or replaced"
                f" (`speculators verify {folder}` checks the whole folder)",
            )
        if hashes and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise SpeculatorsError(path, f"sha256 differs from {MANIFEST}: the content changed")
    if hashes:
        log.info("%s: %d samples match %s (sizes and sha256)", folder, num_samples, MANIFEST)


def load_sample(
    ref: SampleRef, num_states: int, hidden_size: int, layer_ids=None, vocab_size=None
) -> dict:
    """The aligned sample (model inputs shifted against targets), length `ref.length`.

    fp8 samples are dequantised with their per-token scales into float32 (the batch dtype;
    autocast casts to the compute dtype). With `layer_ids`, a zero or constant layer (the
    integrity checks of the capture) raises SpeculatorsError naming the file and layer id;
    so do fp8 scales that are not finite and > 0, a loss mask other than 0/1 and (with
    `vocab_size`) token ids outside the vocabulary.
    """
    from speculators.models.eagle3 import align_sample

    raw = read_sample(ref.path)
    if not isinstance(raw, dict):
        raise SpeculatorsError(ref.path, "not a hidden-states sample")
    n = ref.length + 1
    states = raw.get("hidden_states")
    if not isinstance(states, list) or len(states) != num_states:
        got = len(states) if isinstance(states, list) else "no"
        raise SpeculatorsError(
            ref.path, f"{got} hidden-state tensors, data_config says {num_states}"
        )
    states = sample_states(raw, torch.float32, ref.path)
    for t in states:
        if tuple(t.shape) != (n, hidden_size):
            raise SpeculatorsError(
                ref.path, f"hidden state {tuple(t.shape)} != ({n}, {hidden_size}) per data_config"
            )
    for key in ("input_ids", "loss_mask"):
        if not isinstance(raw.get(key), torch.Tensor):
            raise SpeculatorsError(ref.path, f"no {key} tensor in the sample")
        if raw[key].shape != (n,):
            raise SpeculatorsError(ref.path, f"{key} length != {n} per data_config")
    problem = mask_problem(raw["loss_mask"])
    if vocab_size and not problem:
        problem = ids_problem(raw["input_ids"], vocab_size)
    if problem:  # a 2 would weigh a token twice, a -1 reward the wrong prediction
        raise SpeculatorsError(ref.path, problem)
    if layer_ids is not None:
        check_layers(layer_stats(states), layer_ids, ref.path, allow_non_finite=True)
    return align_sample(raw["input_ids"], states, raw["loss_mask"])


def noise_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """A generator that depends only on where the batch is, so a resumed run draws the same."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0]))
    return g


def pack_batch(samples: Sequence[dict], capacity: int) -> dict:
    """Concatenate aligned samples into one `[1, capacity]` row; padding has document id -1."""
    if not samples:
        raise ValueError("pack_batch needs at least one sample; use empty_batch")
    keys = ("input_ids", "aux", "last", "loss_mask", "position_ids")
    parts: dict[str, list] = {k: [] for k in keys}
    docs = []
    for doc, s in enumerate(samples):
        n = min(len(s["input_ids"]), capacity)  # longer samples are cut (counted by the plan)
        for k in keys:
            parts[k].append(s[k][:n])
        docs.append(torch.full((n,), doc, dtype=torch.long))
    used = sum(len(d) for d in docs)
    pad = capacity - used
    if pad < 0:
        raise ValueError(f"packed {used} tokens into a budget of {capacity}")
    aux_w, last_w = parts["aux"][0].shape[-1], parts["last"][0].shape[-1]
    parts["input_ids"].append(torch.zeros(pad, dtype=torch.long))
    parts["aux"].append(torch.zeros(pad, aux_w))
    parts["last"].append(torch.zeros(pad, last_w))
    parts["loss_mask"].append(torch.zeros(pad, dtype=torch.long))
    parts["position_ids"].append(torch.zeros(pad, dtype=torch.long))
    docs.append(torch.full((pad,), -1, dtype=torch.long))
    batch = {
        k: torch.cat([p.to(torch.float32) if k in ("aux", "last") else p.long() for p in v])
        for k, v in parts.items()
    }
    batch["document_ids"] = torch.cat(docs)
    return {k: v.unsqueeze(0) for k, v in batch.items()}


def empty_batch(capacity: int, aux_width: int, hidden_size: int) -> dict:
    """An all-padding batch: a rank with no sample left still joins the step's collectives."""
    zeros = torch.zeros(1, capacity, dtype=torch.long)
    return {
        "input_ids": zeros,
        "aux": torch.zeros(1, capacity, aux_width),
        "last": torch.zeros(1, capacity, hidden_size),
        "loss_mask": zeros,
        "position_ids": zeros,
        "document_ids": torch.full((1, capacity), -1, dtype=torch.long),
    }


class BatchLoader:
    """Loads this rank's packed batches for one epoch's plan, one batch ahead in a thread."""

    def __init__(
        self,
        data: TrainingData,
        indices: Sequence[int],
        capacity: int,
        noise: float = 0.0,
        seed: int = 0,
    ):
        self.data, self.indices, self.capacity = data, list(indices), capacity
        self.noise, self.seed = noise, seed
        self.num_states = len(data.layer_ids)

    def ref(self, i: int) -> SampleRef:
        """The file of sample `i` of this loader's split."""
        return self.data.samples[self.indices[i]]

    def batch(self, bin_: Sequence[int], epoch: int, step: int, rank: int) -> dict:
        h = self.data.hidden_size
        if not bin_:
            return empty_batch(self.capacity, h * (self.num_states - 1), h)
        batch = pack_batch(self.data.load([self.ref(i) for i in bin_]), self.capacity)
        if self.noise > 0:
            # Uniform in [-noise, noise) on the aux states only; padding stays zero.
            g = noise_generator(self.seed, epoch, step, rank)
            u = torch.rand(batch["aux"].shape, generator=g)
            real = (batch["document_ids"] >= 0).unsqueeze(-1)
            batch["aux"] += (2 * u - 1) * self.noise * real
        return batch

    def iterate(
        self, bins: Sequence[Sequence[int]], epoch: int, rank: int, start: int = 0
    ) -> Iterator[tuple[int, dict]]:
        """(step, batch) for steps start.. of `bins` (this rank's bin per step)."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for step in range(start, len(bins)):
                nxt = pool.submit(self.batch, bins[step], epoch, step, rank)
                if pending is not None:
                    yield step - 1, pending.result()
                pending = nxt
            if pending is not None:
                yield len(bins) - 1, pending.result()
