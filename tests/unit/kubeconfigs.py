"""Kubeconfig files for unit tests that talk HTTP to a local stand-in or to nothing at all."""

from __future__ import annotations

from pathlib import Path

import yaml


def token_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig at `path` for `server` (plain http), with a bearer token; returns `path`."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return path
