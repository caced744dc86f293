"""Which Gateway `credentialName` secrets exist in the cluster: `pilot.credentials` backed by Secrets.

The same answer `pilot.credentials.CredentialIndex` gives from the local secret store's
directories, from Kubernetes Secrets instead, with Istio's key names: a certificate is `tls.crt`
+ `tls.key` (type kubernetes.io/tls or generic) or `cert` + `key` (generic); a CA bundle is
`ca.crt` or `cacert`, in the same secret or in `<name>-cacert`. Pilot still never keeps a key:
each Secret is reduced to what it holds as it arrives, and its data dropped. Service-account
token Secrets are filtered out by the API server (a field selector), as they are never credentials.

Concurrency: `run` is the Secret watch; the handler runs on the event loop and touches the config
store when the set changes, so the next mesh build has the new warnings. Cost: per Secret event,
a look at its data keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio.client import ApiClient

from pilot.config.store import ConfigStore
from pilot.credentials import Available, CredentialIndex
from pilot.kube.watch import Resource, Watch

SECRETS = Resource("", "v1", "secrets", "Secret")
NOT_CREDENTIALS = "type!=kubernetes.io/service-account-token,type!=helm.sh/release.v1"


def holds(secret: Mapping[str, Any]) -> frozenset[str]:
    """What a Secret can serve: "cert" (a certificate with its key) and/or "ca" (a CA bundle)."""
    keys = set((secret.get("data") or {}).keys()) | set((secret.get("stringData") or {}).keys())
    found = set()
    if {"tls.crt", "tls.key"} <= keys or {"cert", "key"} <= keys:
        found.add("cert")
    if keys & {"ca.crt", "cacert"}:
        found.add("ca")
    return frozenset(found)


class SecretIndex(CredentialIndex):
    """A `CredentialIndex` (`current`, `run`) over a watch of the cluster's Secrets."""

    def __init__(self, store: ConfigStore, api_client: ApiClient, **watch_options: Any) -> None:
        super().__init__(store)
        self._held: dict[tuple[str, str], frozenset[str]] = {}
        self._available: Available | None = None
        self.watch = Watch(api_client, SECRETS, self, field_selector=NOT_CREDENTIALS, **watch_options)

    def current(self) -> Available | None:
        """What exists now; None until the first list (nothing is checked before)."""
        return self._available

    async def run(self) -> None:
        """Watch until cancelled."""
        await self.watch.run()

    # WatchHandler
    def replace(self, objects: list[dict[str, Any]]) -> None:
        self._held = {_key(o): holds(o) for o in objects}
        self._changed()

    def upsert(self, obj: dict[str, Any]) -> None:
        self._held[_key(obj)] = holds(obj)
        self._changed()

    def delete(self, obj: dict[str, Any]) -> None:
        self._held.pop(_key(obj), None)
        self._changed()

    def _changed(self) -> None:
        now = frozenset((ns, name, what) for (ns, name), held in self._held.items() for what in held)
        if now != self._available:
            self._available = now
            self.store.touch()  # a rebuild; the same output makes no push


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))
