"""Atomic output folders: write into a temporary sibling, rename on success, never half-write."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"output {str(path)!r} exists and is a file; choose a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"output folder {str(path)!r} exists and is not empty; pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False):
    """Yield a temporary folder next to `path`; on success it replaces `path` in one rename.

    On any exception the temporary folder is removed and a previous `path` is left untouched."""
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a published output folder should read like any other
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
