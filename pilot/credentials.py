"""Which Gateway `credentialName` secrets exist, so pilot can name the missing ones in /debug/configz.

Pilot never reads a key: it lists the local secret store's directories
(``<root>/<namespace>/<name>/`` holding a certificate file, laid out as
`citadel.agent.credentials` reads them) and reports every terminating Gateway server whose
secret is absent from its own namespace (a gateway reads only its namespace's secrets, Istio's
rule). The server stays in the config: the gateway agent serves the secret as soon as it
appears, and until then Envoy fails only that server's handshakes (see
`pilot.translate.gateway_tls.CREDENTIAL_FETCH_TIMEOUT_S`).

`root` is set by the composition root (`meshctl up`, `LocalMesh`) before start; without it
(no secret store known, e.g. plaintext-only) nothing is checked. `run` polls the directory
names every `interval` and touches the config store when the set changes, so the mesh is
rebuilt with new warnings. Cost per poll: one `listdir` per namespace and one `stat` per secret.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pilot.model.gateway import GatewayConfig

CERT_FILES = ("tls.crt", "cert")
CA_FILES = ("ca.crt", "cacert")
CA_SUFFIX = "-cacert"
PREFIX = "kubernetes://"

Available = frozenset[tuple[str, str, str]]  # (namespace, name, "cert" | "ca")


def scan(root: Path) -> Available:
    """(namespace, secret name, what it holds) for each secret directory under `root`."""
    found: set[tuple[str, str, str]] = set()
    try:
        namespaces = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return frozenset()
    for namespace in namespaces:
        try:
            secrets = [p for p in namespace.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            continue
        for secret in secrets:
            if any((secret / f).is_file() for f in CERT_FILES):
                found.add((namespace.name, secret.name, "cert"))
            if any((secret / f).is_file() for f in CA_FILES):
                found.add((namespace.name, secret.name, "ca"))
    return frozenset(found)


def missing_credentials(gateways: Iterable[GatewayConfig], available: Available) -> list[str]:
    """A warning per Gateway server whose certificate (or, verifying clients, CA bundle) secret is absent."""
    out: list[str] = []
    for gw in gateways:
        for server in gw.servers:
            tls = server.tls
            if tls is None or not tls.credential_names:
                continue
            names = [n.removeprefix(PREFIX) for n in tls.credential_names]
            absent = [n for n in names if (gw.namespace, n, "cert") not in available]
            if tls.mode in ("MUTUAL", "OPTIONAL_MUTUAL"):
                first = names[0]
                if (gw.namespace, first + CA_SUFFIX, "ca") not in available and \
                        (gw.namespace, first, "ca") not in available:
                    absent.append(f"{first}{CA_SUFFIX} (or ca.crt in {first})")
            if absent:
                out.append(f"Gateway {gw.ref}: servers[{server.index}] credentialName: no secret "
                           f"{', '.join(absent)} in namespace {gw.namespace} of the secret store; its TLS "
                           "handshakes fail until the secret exists")
    return out


def with_credential_warnings(mesh: Any, available: Available | None) -> Any:
    """`mesh` (a MeshSnapshot) with the missing-secret warnings added; itself if nothing is checked or missing."""
    if available is None:
        return mesh
    extra = missing_credentials(mesh.scoping.gateways, available)
    return replace(mesh, warnings=(*mesh.warnings, *extra)) if extra else mesh


class CredentialIndex:
    """The secret store's directory listing, kept current by polling (see the module docstring)."""

    def __init__(self, store: Any, root: Path | None = None, interval: float = 1.0) -> None:
        self.store = store
        self.root = root
        self.interval = interval
        self._available: Available | None = None

    def current(self) -> Available | None:
        """What exists now; None when no secret store is known (nothing is checked)."""
        if self.root is not None and self._available is None:
            self._available = scan(self.root)  # the first build, before `run` has looked
        return self._available

    async def run(self) -> None:
        """Poll until cancelled; touch the config store whenever the listing changes."""
        while True:
            if self.root is not None:
                now = await asyncio.to_thread(scan, self.root)
                if self._available is not None and now != self._available:
                    self._available = now
                    self.store.touch()
                self._available = now
            await asyncio.sleep(self.interval)
