"""Atomic file and folder writes, so a crash never leaves output that looks complete.

Everything a stage publishes is written under a temporary name in the same folder and
renamed into place at the end; Snakemake (and a resuming stage) only ever sees whole files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp/mkdtemp create private (0600/0700) entries; published outputs get normal modes.
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp.chmod(0o777 & ~_umask())
        return tmp
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success rename it to `path`, else delete it."""
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir)
    try:
        yield tmp
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as JSON, atomically. NaN or infinity anywhere in it is a `ValueError` (JSON
    has no such values; a measurement that does not exist is None = null)."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def torch_save(obj, path: str | os.PathLike) -> None:
    # Through a file object: saved to a path, torch records the (random) temporary name in
    # the archive and identical objects give different bytes.
    import torch  # here, so the workflow can import this module without loading torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def read_json(path: str | os.PathLike):
    from speculators.errors import SpeculatorsError

    path = Path(path)
    if not path.is_file():
        raise SpeculatorsError(path, "file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpeculatorsError(path, f"not valid JSON ({e})") from None


def json_lines(lines, where):
    """Yield (`where:lineno`, parsed row) for each non-blank JSONL line of `lines`; a line that
    is not JSON is a `SpeculatorsError` naming `where:lineno`."""
    from speculators.errors import SpeculatorsError

    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f"{where}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise SpeculatorsError(f"{where}:{lineno}", f"not valid JSON ({e.msg})") from None
