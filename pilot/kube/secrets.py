"""Which Gateway `credentialName` secrets exist in the cluster: `pilot.credentials` backed by Secrets.

The same answer `pilot.credentials.CredentialIndex` gives from the local secret store's
directories, from Kubernetes Secrets instead, with Istio's key names: a certificate is `tls.crt`
+ `tls.key` (type kubernetes.io/tls or generic) or `cert` + `key` (generic); a CA bundle is
`ca.crt` or `cacert`, in the same secret or in `<name>-cacert`. The index itself keeps no key:
each Secret is reduced to what it holds as it arrives, and its data dropped. Service-account
token Secrets are filtered out by the API server (a field selector), as they are never credentials.

With a `SecretServer` (`pilot.xds.secrets`: pilot serves the certificates to gateways over ADS,
as istiod does), the watch also hands it each Secret's TLS material, decoded and checked
(`material_of`; a certificate that cannot be parsed or whose key is not its own is left out with
a warning naming the Secret and the reason, never the data): that server's memory is the only
place pilot keeps a key. `SubjectAccessReviews` is Istio's authorization of a gateway to read
its namespace's certificates: may its service account ``list`` ``secrets`` there?

Concurrency: `run` is the Secret watch; the handler runs on the event loop and touches the config
store when the set changes, so the next mesh build has the new warnings. Cost: per Secret event,
a look at its data keys (and, with a server, one PEM parse of its certificate and key).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio.client import (
    ApiClient,
    AuthorizationV1Api,
    V1ResourceAttributes,
    V1SubjectAccessReview,
    V1SubjectAccessReviewSpec,
)
from kubernetes_asyncio.client.exceptions import ApiException

from pilot.config.store import ConfigStore
from pilot.credentials import Available, CredentialIndex
from pilot.kube.watch import Resource, Watch
from pilot.xds.secrets import MaterialError, SecretServer, TlsMaterial, check_material

log = logging.getLogger(__name__)

SECRETS = Resource("", "v1", "secrets", "Secret")
NOT_CREDENTIALS = "type!=kubernetes.io/service-account-token,type!=helm.sh/release.v1"
REVIEW_TIMEOUT_S = 10  # a SubjectAccessReview holds up the opening of a gateway's stream: bounded


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

    def __init__(self, store: ConfigStore, api_client: ApiClient, server: SecretServer | None = None,
                 **watch_options: Any) -> None:
        """`server`: also hand each Secret's TLS material to it (pilot serves certificates over ADS)."""
        super().__init__(store)
        self.server = server
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
        if self.server is not None:
            self.server.replace({_key(o): m for o in objects if (m := checked_material(o)) is not None})
        self._changed()

    def upsert(self, obj: dict[str, Any]) -> None:
        self._held[_key(obj)] = holds(obj)
        if self.server is not None:
            self.server.put(*_key(obj), checked_material(obj))
        self._changed()

    def delete(self, obj: dict[str, Any]) -> None:
        self._held.pop(_key(obj), None)
        if self.server is not None:
            self.server.put(*_key(obj), None)
        self._changed()

    def _changed(self) -> None:
        now = frozenset((ns, name, what) for (ns, name), held in self._held.items() for what in held)
        if now != self._available:
            self._available = now
            self.store.touch()  # a rebuild; the same output makes no push


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _field(data: Mapping[str, Any], string_data: Mapping[str, Any], *keys: str) -> bytes | None:
    """The first of `keys` present: `stringData` as text, `data` base64-decoded (MaterialError if not)."""
    for key in keys:
        if key in string_data:
            return str(string_data[key]).encode()
        if key in data:
            try:
                return base64.b64decode(str(data[key]), validate=True)
            except (binascii.Error, ValueError):
                raise MaterialError(f"data.{key} is not base64") from None
    return None


def material_of(secret: Mapping[str, Any]) -> TlsMaterial | None:
    """The TLS material of a Secret with Istio's key names (see `holds`); None if it holds none.

    Raises MaterialError (naming the key, never its value) when a value cannot be decoded or the
    certificate and key would be rejected by Envoy.
    """
    data = secret.get("data") or {}
    string_data = secret.get("stringData") or {}
    cert, key = _field(data, string_data, "tls.crt"), _field(data, string_data, "tls.key")
    if cert is None or key is None:
        cert, key = _field(data, string_data, "cert"), _field(data, string_data, "key")
    material = TlsMaterial(cert_chain=cert if key is not None else None, key=key if cert is not None else None,
                           ca=_field(data, string_data, "ca.crt", "cacert"),
                           crl=_field(data, string_data, "ca.crl", "crl"))
    if material == TlsMaterial():
        return None
    check_material(material)
    return material


def checked_material(secret: Mapping[str, Any]) -> TlsMaterial | None:
    """`material_of`, with a Secret that cannot be served logged (name and reason) and left out."""
    try:
        return material_of(secret)
    except MaterialError as exc:
        namespace, name = _key(secret)
        log.warning("Secret %s/%s: not served to gateways: %s", namespace, name, exc)
        return None


class SubjectAccessReviews:
    """Istio's check that a gateway may read its namespace's certificates: a SubjectAccessReview
    asking whether ``system:serviceaccount:<ns>:<sa>`` may ``list`` ``secrets`` in ``<ns>``.

    Cached per service account as istiod caches it: an allow for `allow_ttl` seconds, a denial
    (or a failed review) for `deny_ttl`, so a gateway fleet costs one API call per account and
    TTL. Pilot needs ``create`` on ``subjectaccessreviews.authorization.k8s.io``.
    """

    def __init__(self, api_client: ApiClient, allow_ttl: float = 300.0, deny_ttl: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = AuthorizationV1Api(api_client)
        self.allow_ttl, self.deny_ttl, self.clock = allow_ttl, deny_ttl, clock
        self._cache: dict[tuple[str, str], tuple[float, str | None]] = {}

    async def __call__(self, namespace: str, service_account: str) -> str | None:
        """None when allowed, else the reason (for logs)."""
        key = (namespace, service_account)
        found = self._cache.get(key)
        now = self.clock()
        if found is not None and found[0] > now:
            return found[1]
        reason = await self._review(namespace, service_account)
        self._cache[key] = (now + (self.allow_ttl if reason is None else self.deny_ttl), reason)
        return reason

    async def _review(self, namespace: str, service_account: str) -> str | None:
        user = f"system:serviceaccount:{namespace}:{service_account}"
        body = V1SubjectAccessReview(spec=V1SubjectAccessReviewSpec(
            user=user,  # no groups, as istiod asks: a binding to the account itself counts
            resource_attributes=V1ResourceAttributes(namespace=namespace, verb="list", resource="secrets")))
        try:
            result = await self.api.create_subject_access_review(body, _request_timeout=REVIEW_TIMEOUT_S)
        except ApiException as exc:
            return f"the SubjectAccessReview for {user} failed: {exc.status} {exc.reason}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"the SubjectAccessReview for {user} failed: {exc!r}"
        status = result.status
        if status is not None and status.allowed:
            return None
        why = (status.reason if status is not None else "") or "no RBAC rule allows it"
        return f"{user} may not list secrets in namespace {namespace}: {why}"
