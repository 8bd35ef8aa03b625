"""A run folder's housekeeping: durable file writes, the ``step-XXXXXXXX`` checkpoint folders,
``latest``, and the cleaning of what a kill left behind (see :mod:`hdlm.checkpoint`).

Every removal first renames its folder to a hidden ``.tmp-`` name (atomic), so a kill during a
removal leaves only a temporary that the next save deletes, never a half-deleted ``step-`` folder.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from .faults import crash_point

LATEST = "latest"
META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write through ``write(f)`` then flush and fsync, so a rename after it publishes real bytes."""
    with open(path, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    return [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run (a ``meta.json`` is written last), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return [p for _, p in sorted(_step_dirs(run_dir)) if (p / META_FILE).exists()]


def _write_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / f"{TMP_PREFIX}{LATEST}-{uuid.uuid4().hex[:8]}"
    _write_file(tmp, lambda f: f.write(name + "\n"), binary=False)
    os.replace(tmp, run_dir / LATEST)
    _fsync_dir(run_dir)


def _remove(folder: Path, step: int | None = None) -> None:
    """Delete ``folder`` via an atomic rename to a ``.tmp-`` name (what a kill leaves, the next save cleans)."""
    trash = folder.parent / f"{TMP_PREFIX}old-{folder.name}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, trash)
    if step is not None:
        crash_point(f"prune-{step}")
    shutil.rmtree(trash, ignore_errors=True)


def _clean_temporaries(run_dir: Path) -> None:
    """Remove what an interrupted save or prune left behind: this library's ``.tmp-`` names, and
    ``step-`` folders without ``meta.json`` (never complete: a folder is published with it)."""
    for p in run_dir.glob(f"{TMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for _, p in _step_dirs(run_dir):
        if not (p / META_FILE).exists():
            _remove(p)


def _prune(run_dir: Path, keep: int, step: int | None = None) -> None:
    """Delete all but the ``keep`` newest checkpoints (never the one ``latest`` names)."""
    latest = read_latest(run_dir)
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[:-keep] if keep > 0 else []:
        if latest is None or p.resolve() != latest.resolve():
            _remove(p, step)


def read_latest(run_dir: str | Path) -> Path | None:
    f = Path(run_dir) / LATEST
    if not f.is_file():
        return None
    name = f.read_text().strip()
    return Path(run_dir) / name if name else None
