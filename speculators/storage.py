"""`cleanup-hidden-states`: delete a run's hidden-state samples once its draft is trained.

They are the run's largest files (16-64 KiB per token); `cleanup_hidden_states: true` runs this
after the report, and the JSON it writes records how much it freed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from speculators.errors import SpeculatorsError
from speculators.fileio import write_json

log = logging.getLogger(__name__)

SAMPLE_GLOB = "data_*.pt"  # speculators.hidden_states.store.FILE_PATTERN
DATA_CONFIG = "data_config.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hidden-states", nargs="+", required=True, help="hidden-states folders of one run"
    )
    p.add_argument("--output", required=True, help="JSON with the bytes freed per folder")


def cleanup(folders: list[Path]) -> dict:
    """Delete the sample files of finished hidden-states folders; return what was freed.

    A folder without data_config.json is refused before anything is deleted: it is not a
    finished capture (or not a hidden-states folder at all). data_config.json itself stays,
    it is tiny and records what the samples were. Rerunning frees 0 bytes.
    """
    for folder in folders:
        if not folder.is_dir():
            raise SpeculatorsError(folder, "no such hidden-states folder")
        if not (folder / DATA_CONFIG).is_file() and any(folder.glob(SAMPLE_GLOB)):
            raise SpeculatorsError(
                folder, f"no {DATA_CONFIG}: not a finished capture, not deleting"
            )
    per_folder = {}
    for folder in folders:
        files = sorted(folder.glob(SAMPLE_GLOB))
        freed = 0
        for f in files:
            freed += f.stat().st_size
            f.unlink()
        per_folder[str(folder)] = {"files": len(files), "bytes": freed}
        log.info("%s: deleted %d sample files, %.1f MiB", folder, len(files), freed / 2**20)
    return {"folders": per_folder, "bytes_freed": sum(v["bytes"] for v in per_folder.values())}


def run(args: argparse.Namespace) -> None:
    write_json(args.output, cleanup([Path(p) for p in args.hidden_states]))
