"""Authenticated xDS: who a proxy is comes from its client certificate, not from its `Node`.

On the authenticated port a proxy presents a certificate from the mesh CA; a hook given by the
composition root (`meshctl`, which knows the CA and the trust domain; pilot imports no CA code)
turns it into a `PeerIdentity`. `check_peer` then holds the Node's claims against it: the
namespace must be the certificate's, a service account the Node names must be the certificate's,
and in the local mesh the WorkloadEntry the Node claims to be must run as the certificate's
service account. A proxy therefore cannot obtain the config of an identity it does not hold.
Pure functions and values; the server calls them once per stream.

    PeerError                 base: the stream is refused
    ├── PeerUnauthenticatedError  no usable client certificate (gRPC UNAUTHENTICATED)
    └── PeerMismatchError         the Node claims another identity (gRPC PERMISSION_DENIED)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from pilot.model.proxy import ProxyIdentity


@dataclass(frozen=True)
class PeerIdentity:
    """An authenticated proxy: the namespace and service account of its certificate, and its principal."""

    namespace: str
    service_account: str
    principal: str  # e.g. spiffe://cluster.local/ns/shop/sa/cart, for logs and status


class PeerError(Exception):
    """A stream on the authenticated port is refused; the message says why (no secrets in it)."""


class PeerUnauthenticatedError(PeerError):
    """No client certificate, or one that names no workload identity of this mesh."""


class PeerMismatchError(PeerError):
    """The Node claims a namespace, service account or workload the certificate does not hold."""


# DER leaf certificate (verified by the TLS handshake) or None -> identity; raises PeerUnauthenticatedError.
PeerIdentityHook = Callable[[bytes | None], PeerIdentity]
# (namespace, workload name) -> the WorkloadEntry's service account ("default" when unset), None if unknown.
WorkloadAccount = Callable[[str, str], str | None]


def check_peer(identity: ProxyIdentity, peer: PeerIdentity, workload_account: str | None) -> ProxyIdentity:
    """`identity` (from the Node) with the certificate's service account, or PeerMismatchError.

    `workload_account` is the service account of the WorkloadEntry the Node names (None: no such
    entry, e.g. a Kubernetes pod or a gateway without one).
    """
    claim = f"node {identity.node_id!r}"
    if identity.namespace != peer.namespace:
        raise PeerMismatchError(f"{claim} claims namespace {identity.namespace!r}, but its client certificate "
                                f"is {peer.principal} (namespace {peer.namespace!r})")
    if identity.service_account and identity.service_account != peer.service_account:
        raise PeerMismatchError(f"{claim} claims service account {identity.service_account!r} (metadata "
                                f"SERVICE_ACCOUNT), but its client certificate is {peer.principal}")
    if workload_account is not None and workload_account != peer.service_account:
        raise PeerMismatchError(f"{claim} claims workload {peer.namespace}/{identity.workload}, whose "
                                f"WorkloadEntry runs as service account {workload_account!r}, but its client "
                                f"certificate is {peer.principal}")
    return dataclasses.replace(identity, service_account=peer.service_account)
