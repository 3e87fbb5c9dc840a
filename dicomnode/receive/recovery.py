"""Start-up recovery of the spool: what a crash mid-write can leave behind, and how it is cleared."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def remove_stale_temporaries(root: Path, *, changed_since: float | None = None) -> int:
    """Delete temporary files left by a crash mid-write (never acknowledged); return how many.

    Temporaries live beside their target, in ``instances/STUDY/SERIES`` and ``results/STUDY/job-N``
    (and its ``heatmaps``), and in the storage folder itself (``serve.json``). Only folders modified
    at or after ``changed_since`` (a POSIX time) are listed, so a start after a crash does not read
    every file of a large archive.
    """
    count = _remove_temporaries_in(root, None)  # the runtime state file's (serve.json)
    for top in ("instances", "results"):
        for study in _subfolders(root / top):
            for leaf in _subfolders(study):
                for folder in (leaf, leaf / "heatmaps"):
                    count += _remove_temporaries_in(folder, changed_since)
    return count


def _subfolders(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _remove_temporaries_in(folder: Path, changed_since: float | None) -> int:
    try:
        if changed_since is not None and folder.stat().st_mtime < changed_since:
            return 0
        with os.scandir(folder) as entries:
            stale = [e.path for e in entries if e.name.startswith(".") and e.name.endswith(".tmp")]
    except FileNotFoundError:
        return 0
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return len(stale)
