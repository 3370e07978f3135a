"""Helpers for the draft-model tests: a tiny vocabulary mapping, a draft on the tiny target, a batch."""

from __future__ import annotations

import numpy as np
import torch

from speculators.models import Eagle3DraftConfig, Eagle3DraftModel

AUX_LAYER_IDS = [1, 2, 3]


def vocab_mapping(vocab_size: int, draft_vocab_size: int, seed: int = 0):
    """d2t (offsets) and t2d (mask) for a random ascending selection of target ids."""
    rng = np.random.default_rng(seed)
    selected = np.sort(rng.choice(vocab_size, draft_vocab_size, replace=False))
    t2d = np.zeros(vocab_size, dtype=bool)
    t2d[selected] = True
    return selected - np.arange(draft_vocab_size), t2d


def tiny_draft(target, draft_vocab_size=96, num_layers=1, seed=0, **kwargs) -> Eagle3DraftModel:
    cfg = Eagle3DraftConfig.from_target(
        target,
        draft_vocab_size=draft_vocab_size,
        aux_layer_ids=AUX_LAYER_IDS,
        num_layers=num_layers,
        **kwargs,
    )
    d2t, t2d = vocab_mapping(cfg.vocab_size, draft_vocab_size, seed)
    torch.manual_seed(seed)
    return Eagle3DraftModel.from_target(cfg, target, d2t, t2d)


def packed_batch(model, lengths, pad=0, seed=0, mask_holes=True) -> dict:
    """A packed batch of documents with `lengths` plus `pad` padding positions (document id -1)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    t = sum(lengths) + pad
    docs = torch.cat(
        [torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)]
    ).long()
    positions = torch.cat([torch.arange(1, n + 1) for n in lengths] + [torch.zeros(pad)]).long()
    mask = (docs >= 0).long()
    if mask_holes:  # unsupervised stretches inside documents, like user turns
        mask = mask * (torch.rand(t, generator=g) > 0.25).long()
    return {
        "input_ids": torch.randint(0, cfg.vocab_size, (1, t), generator=g),
        "aux": torch.randn(1, t, cfg.aux_width, generator=g),
        "last": torch.randn(1, t, cfg.hidden_size, generator=g) * 3,
        "loss_mask": mask[None],
        "position_ids": positions[None],
        "document_ids": docs[None],
    }
