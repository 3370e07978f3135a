"""The EAGLE-3 draft model: config, TTT training forward, greedy drafting, and its checkpoint format.

`eagle3` holds the model, `attention` the TTT masks, `loss` the chunked KL and metrics, `io` save/load.
"""

from speculators.models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel, align_sample
from speculators.models.io import load_draft, save_draft
from speculators.models.loss import step_metrics

__all__ = [
    "Eagle3DraftConfig",
    "Eagle3DraftModel",
    "align_sample",
    "load_draft",
    "save_draft",
    "step_metrics",
]
