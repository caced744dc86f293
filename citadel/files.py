"""Writing secret and public files atomically, with their final mode from the first byte.

A secret (CA key, token-signing key, workload token) is written to a temporary file in the same
directory created with `os.open(..., 0o600)` (umask can only remove bits, so there is never a
moment where another user may read it), fsynced, then renamed over the target. Readers see the
old or the new content, never a mix. Cost: one fsync per write; these files change rarely.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` via a same-directory temporary file created with `mode`."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def write_secret_file(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (0600)."""
    write_file_atomic(path, data, SECRET_MODE)


def ensure_private_dir(path: Path) -> None:
    """Create `path` (0700) if missing; an existing directory keeps its mode."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
