"""Gateway `credentialName` secrets served by pilot over ADS (SDS on the proxy's own stream).

On Kubernetes, as istiod does, pilot serves a Gateway server's certificate to the router that
terminates it: the server's TLS context names ``kubernetes://<name>`` (certificate chain and
key) and ``kubernetes://<name>-cacert`` (client CA bundle and CRL) with an ADS config source
(`pilot.translate.gateway_tls`), and the router asks for them on the ADS stream it already has.
Istio's rules, kept here (istio `pilot/pkg/xds/sds.go`, `pilot/pkg/credentials/kube`):

- only streams on the authenticated port (mutual TLS, identity from the client certificate,
  `pilot.xds.peers`) get secrets; a plaintext stream never does;
- a proxy reads only Secrets of its own (verified) namespace: ``kubernetes://<name>`` means the
  Secret ``<name>`` there; Istio's ``kubernetes://<ns>/<name>`` form for another namespace is
  refused, as Istio refuses cross-namespace references without a ReferenceGrant;
- a certificate with its key is served only when the proxy's service account may ``list``
  ``secrets`` in that namespace (Istio asks the API server with a SubjectAccessReview; the
  composition root gives the `Authorize` check, `pilot.kube.secrets.SubjectAccessReviews`); CA
  bundles are public and served to any proxy of the namespace;
- refusals are logged with the proxy, the names and the reason, never with secret data.

Design: the keys live in this process's memory only, in one `SecretServer` fed by the Secret
watch (`pilot.kube.secrets.SecretIndex`); they never enter the snapshot cache (whose snapshots
the debug API dumps) nor a file. A stream's snapshot is its class's cached snapshot with the
SDS type replaced by the `ResourceSet` of its namespace (`Snapshot.with_type`, per stream, a
small dict): proxies of one namespace and grant share that set, its serialized resources and
its encoded responses. A deleted Secret leaves the set; as with Istio over state-of-the-world
xDS, Envoy keeps the last secret it got for a name it still uses (SotW has no removals for
named types), so a running gateway keeps serving until it reconnects or the Gateway changes,
and a gateway that (re)connects gets nothing for the name: its listener stays, that server's
handshakes fail (see README "Gateway certificates (credentialName)").

Concurrency: everything runs on the event loop. The Secret watch is the only writer (`put`,
`replace`); ADS streams read `view` and register a waker per namespace with `watch`. Cost: a
Secret event rebuilds its namespace's sets (O(secrets of the namespace)) and wakes that
namespace's streams only; the authorization check costs one API call per service account and
TTL (cached by the `Authorize` implementation), once per stream opening.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from pilot.model.proxy import ProxyIdentity, ProxyKind
from pilot.xds import typeurls
from pilot.xds.resources import Resource, ResourceSet

log = logging.getLogger(__name__)

PREFIX = "kubernetes://"
CA_SUFFIX = "-cacert"
# (namespace, service account) -> None when it may read the namespace's Secrets, else the reason.
Authorize = Callable[[str, str], Awaitable[str | None]]


@dataclass(frozen=True)
class TlsMaterial:
    """What one Secret holds for TLS, PEM bytes as stored. `key` never appears in a repr."""

    cert_chain: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    ca: bytes | None = None
    crl: bytes | None = None


class MaterialError(ValueError):
    """A Secret's certificate or key cannot be served; the message names the problem, never the key."""


def check_material(material: TlsMaterial) -> None:
    """Raise MaterialError when Envoy would reject the certificate: unparsable PEM or a key that
    is not the certificate's (a NACK would cost the proxy every other secret of the response)."""
    if material.cert_chain is None or material.key is None:
        return
    try:
        leaf = x509.load_pem_x509_certificates(material.cert_chain)[0]
    except ValueError as exc:
        raise MaterialError(f"the certificate chain is not PEM X.509: {exc}") from None
    try:
        key = serialization.load_pem_private_key(material.key, password=None)
    except (ValueError, TypeError):
        raise MaterialError("the private key is not an unencrypted PEM key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, public):
        raise MaterialError("the private key does not match the certificate")


def namespace_secrets(secrets: Mapping[str, TlsMaterial]) -> dict[str, secret_pb2.Secret]:
    """Envoy Secrets of one namespace, by SDS name, from its Secrets by name (pure).

    ``kubernetes://<name>``: a Secret with a certificate and key (names ending in ``-cacert``
    hold CAs only). ``kubernetes://<name>-cacert``: the CA (and CRL) of the Secret
    ``<name>-cacert`` if it has one, else of ``<name>`` (Istio's lookup order).
    """
    out: dict[str, secret_pb2.Secret] = {}
    for name in sorted(secrets):
        material = secrets[name]
        if material.cert_chain is not None and material.key is not None and not name.endswith(CA_SUFFIX):
            sds = PREFIX + name
            secret = secret_pb2.Secret(name=sds)
            secret.tls_certificate.certificate_chain.inline_bytes = material.cert_chain
            secret.tls_certificate.private_key.inline_bytes = material.key
            out[sds] = secret
        if material.ca is None:
            continue
        # "<name>" sorts before "<name>-cacert": the dedicated Secret, when it has a CA, overwrites.
        ca_name = PREFIX + (name if name.endswith(CA_SUFFIX) else name + CA_SUFFIX)
        secret = secret_pb2.Secret(name=ca_name)
        secret.validation_context.trusted_ca.inline_bytes = material.ca
        if material.crl is not None:
            secret.validation_context.crl.inline_bytes = material.crl
        out[ca_name] = secret
    return out


def is_ca_name(sds_name: str) -> bool:
    return sds_name.endswith(CA_SUFFIX)


@dataclass(frozen=True)
class SecretGrant:
    """What one authenticated stream may read: its namespace's CA bundles, and certificates with
    keys if `certificates` (else `reason` says why not)."""

    namespace: str
    service_account: str
    certificates: bool
    reason: str = ""


def refused(grant: SecretGrant, names: frozenset[str]) -> dict[str, str]:
    """SDS names of a subscription the grant does not cover -> why (pure; no secret data)."""
    out: dict[str, str] = {}
    for name in sorted(names):
        ref = name.removeprefix(PREFIX)
        if not name.startswith(PREFIX):
            out[name] = "not a kubernetes:// credential name"
        elif "/" in ref and ref.split("/", 1)[0] != grant.namespace:
            out[name] = (f"Secrets of namespace {ref.split('/', 1)[0]!r} are not readable from namespace "
                         f"{grant.namespace!r} (a gateway reads only its own namespace's Secrets)")
        elif not is_ca_name(name) and not grant.certificates:
            out[name] = grant.reason
    return out


class SecretServer:
    """The namespaces' Envoy Secrets in memory, one shared ResourceSet per namespace and grant kind."""

    def __init__(self, authorize: Authorize | None = None) -> None:
        """`authorize`: Istio's SubjectAccessReview check; None lets every proxy of a namespace read its
        certificates (tests, and a composition root that cannot ask the API server)."""
        self.authorize = authorize
        self._material: dict[str, dict[str, TlsMaterial]] = {}  # namespace -> Secret name -> material
        self._sets: dict[tuple[str, bool], ResourceSet] = {}  # (namespace, with certificates) -> set
        self._wakers: dict[str, set[Callable[[], None]]] = {}
        self._audited: dict[tuple[int, str], frozenset[str]] = {}  # (stream id, node) -> names last audited

    # -- the Secret watch writes ------------------------------------------------------------
    def replace(self, materials: Mapping[tuple[str, str], TlsMaterial]) -> None:
        """The whole set after a (re-)list: namespaces whose Secrets changed are rebuilt and woken."""
        fresh: dict[str, dict[str, TlsMaterial]] = {}
        for (namespace, name), material in materials.items():
            fresh.setdefault(namespace, {})[name] = material
        touched = {ns for ns in fresh.keys() | self._material.keys() if fresh.get(ns) != self._material.get(ns)}
        self._material = fresh
        for namespace in touched:
            self._changed(namespace)

    def put(self, namespace: str, name: str, material: TlsMaterial | None) -> None:
        """One Secret added or changed (`material`), or deleted or holding nothing for TLS (None)."""
        held = self._material.setdefault(namespace, {})
        if held.get(name) == material:
            return
        if material is None:
            held.pop(name, None)
            if not held:
                del self._material[namespace]
        else:
            held[name] = material
        self._changed(namespace)

    def _changed(self, namespace: str) -> None:
        self._sets.pop((namespace, True), None)
        self._sets.pop((namespace, False), None)
        for wake in list(self._wakers.get(namespace, ())):
            wake()

    # -- ADS streams read -------------------------------------------------------------------
    async def grant(self, namespace: str, service_account: str) -> SecretGrant:
        """What an authenticated proxy of `namespace` running as `service_account` may read."""
        reason = None if self.authorize is None else await self.authorize(namespace, service_account)
        if reason is None:
            return SecretGrant(namespace, service_account, True)
        return SecretGrant(namespace, service_account, False, reason)

    async def stream_grant(self, identity: ProxyIdentity, authenticated: bool) -> SecretGrant | None:
        """What an ADS stream may read: an authenticated router its namespace's Secrets (`grant`;
        a warning when that is no certificates), every other stream nothing (None)."""
        if not authenticated or identity.proxy_class.kind != ProxyKind.ROUTER:
            return None
        grant = await self.grant(identity.namespace, identity.service_account or "default")
        if not grant.certificates:
            log.warning("SDS: %s (%s/%s) gets no certificates of its namespace: %s", identity.node_id,
                        grant.namespace, grant.service_account, grant.reason)
        return grant

    def view(self, grant: SecretGrant) -> ResourceSet:
        """The SDS resources `grant` covers: one object per namespace, grant kind and Secret version."""
        key = (grant.namespace, grant.certificates)
        found = self._sets.get(key)
        if found is None:
            messages = namespace_secrets(self._material.get(grant.namespace, {}))
            found = self._sets[key] = ResourceSet(typeurls.SECRET, [
                Resource.from_message(typeurls.SECRET, name, message) for name, message in messages.items()
                if grant.certificates or is_ca_name(name)])
        return found

    @contextlib.contextmanager
    def watch(self, namespace: str, wake: Callable[[], None]) -> Iterator[None]:
        """Call `wake()` whenever the Secrets of `namespace` change, for the duration of a stream."""
        self._wakers.setdefault(namespace, set()).add(wake)
        try:
            yield
        finally:
            wakers = self._wakers.get(namespace)
            if wakers is not None:
                wakers.discard(wake)
                if not wakers:
                    del self._wakers[namespace]

    def audit(self, stream_id: int, node_id: str, grant: SecretGrant, names: frozenset[str]) -> None:
        """Log (once per distinct subscription of a stream) the names it asked for and may not read,
        and those its namespace has no Secret for; names and reasons only, never secret data."""
        key = (stream_id, node_id)
        if self._audited.get(key) is names:
            return
        if len(self._audited) > 4096:
            self._audited.clear()
        self._audited[key] = names
        who = f"{node_id} ({grant.namespace}/{grant.service_account})"
        for name, reason in refused(grant, names).items():
            log.warning("SDS: refused secret %s to %s: %s", name, who, reason)
        available = self.view(SecretGrant(grant.namespace, grant.service_account, True))
        missing = [n for n in sorted(names) if n.startswith(PREFIX) and "/" not in n.removeprefix(PREFIX)
                   and n not in available]
        if missing:
            log.warning("SDS: %s asked for %s: no such Secret in namespace %s (the server's handshakes fail "
                        "until it exists)", who, ", ".join(missing), grant.namespace)

    def forget(self, stream_id: int, node_id: str) -> None:
        """A stream ended: drop what `audit` remembered of it."""
        self._audited.pop((stream_id, node_id), None)
