"""The canonical mesh model: what the generators read, independent of Istio's API shapes.

Everything here is frozen and indexed once by `build_mesh`; host names are already fully
qualified and conflicts already resolved. No Envoy types: a MeshSnapshot can be dumped and
golden-tested on its own. Mappings are read-only views so a shared snapshot stays shared.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from pilot.api.service_entry import HTTP2_PROTOCOLS, HTTP_PROTOCOLS
from pilot.model.authz import Security
from pilot.model.conversions import Conversions
from pilot.model.mtls import PeerAuthn
from pilot.model.policy import NO_POLICY, TrafficPolicy, effective_policy
from pilot.model.scoping import Scoping

Labels = Mapping[str, str]
# Resolutions whose clusters carry their endpoints inline (DNS discovery), not through EDS.
DNS_RESOLUTIONS = frozenset({"DNS", "DNS_ROUND_ROBIN"})


K = TypeVar("K", str, int, tuple[str, str])
V = TypeVar("V")


class _SharedMap(dict[Any, Any]):
    """The dict behind equal `frozen_map`s of strings and integers (weakly referenced)."""

    __slots__ = ("__weakref__",)


# Equal maps of strings and integers (labels, ports) share one dict behind their views. At 1,000
# services ~20,000 of the model's ~31,000 maps repeat another: the 5,904 workloads' and endpoints'
# port maps are one, their labels 2,000 (2.7 MB). Weak values: a dict lives only while a view of
# it does, so this keeps nothing of a previous mesh. (A view per call, not one per dict: a view
# kept on its dict would make a cycle, which a `gc.freeze` at start-up would keep forever.)
_SHARED_MAPS: weakref.WeakValueDictionary[tuple[Any, ...], _SharedMap] = weakref.WeakValueDictionary()
_EMPTY_MAP: Mapping[Any, Any] = MappingProxyType({})
_SHAREABLE = (str, int)


def frozen_map(items: Mapping[K, V] | None = None) -> Mapping[K, V]:
    """A read-only mapping sorted by key, for deterministic iteration.

    Empty maps are one object, and equal maps whose keys and values are all strings or integers
    (exactly: `True` is not 1 here) are views of one dict. Cost: a hash of the sorted items and
    a lookup on top of the sort, paid when an object is converted, not per push.
    """
    if not items:
        return _EMPTY_MAP
    pairs = tuple(sorted(items.items()))
    if not all(type(k) in _SHAREABLE and type(v) in _SHAREABLE for k, v in pairs):
        return MappingProxyType(dict(pairs))
    found = _SHARED_MAPS.get(pairs)
    if found is None:
        found = _SHARED_MAPS[pairs] = _SharedMap(pairs)
    return MappingProxyType(found)


def selects(selector: Labels, labels: Labels) -> bool:
    """Kubernetes equality-based selection: every selector label present with the same value."""
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    number: int
    protocol: str
    target_port: int | None = None

    @property
    def is_http(self) -> bool:
        return self.protocol in HTTP_PROTOCOLS

    @property
    def is_http2(self) -> bool:
        return self.protocol in HTTP2_PROTOCOLS


@dataclass(frozen=True, slots=True)
class Workload:
    """A WorkloadEntry: one instance of an application, possibly behind several services."""

    namespace: str
    name: str
    address: str
    labels: Labels = field(default_factory=frozen_map)
    service_account: str = ""
    ports: Mapping[str, int] = field(default_factory=frozen_map)  # port name -> number
    weight: int = 1
    network: str = ""
    locality: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service, with the port it listens on for each service port name."""

    address: str
    ports: Mapping[str, int]
    labels: Labels = field(default_factory=frozen_map)
    weight: int = 1
    workload: str | None = None  # "namespace/name" of the WorkloadEntry; None for inline endpoints
    namespace: str = ""  # of the WorkloadEntry, or of the ServiceEntry for inline endpoints
    service_account: str = ""  # the instance's identity; with it, Istio assumes a sidecar (mtls.py)


@dataclass(frozen=True, slots=True)
class Service:
    """One host of a ServiceEntry, with its ports (sorted by number) and endpoints."""

    host: str
    namespace: str
    name: str  # of the ServiceEntry
    ports: tuple[ServicePort, ...]
    resolution: str = "NONE"
    location: str = "MESH_EXTERNAL"
    selector: Labels | None = None
    endpoints: tuple[Endpoint, ...] = ()
    # Virtual IPs the service is reached at (ServiceEntry `addresses`, a Kubernetes clusterIP):
    # captured traffic is told apart by them (`pilot.translate.captured`).
    addresses: tuple[str, ...] = ()

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.number == number), None)

    @property
    def http_ports(self) -> tuple[ServicePort, ...]:
        return tuple(p for p in self.ports if p.is_http)


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Labels
    policy: TrafficPolicy = NO_POLICY
    port_policies: Mapping[int, TrafficPolicy] = field(default_factory=frozen_map)


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """A DestinationRule resolved to its host: subsets and layered traffic policy."""

    host: str
    namespace: str
    name: str
    policy: TrafficPolicy = NO_POLICY
    port_policies: Mapping[int, TrafficPolicy] = field(default_factory=frozen_map)
    subsets: Mapping[str, Subset] = field(default_factory=frozen_map)
    # workloadSelector: applies only to the proxies it selects in its own namespace; None: every proxy.
    selector: Labels | None = None

    def policy_for(self, port: int, subset: str = "") -> TrafficPolicy:
        """The policy of cluster (port, subset), combined as Istio does (see `pilot.model.policy`)."""
        found = self.subsets.get(subset)
        if found is None:
            return effective_policy(self.policy, self.port_policies, None, {}, port)
        return effective_policy(self.policy, self.port_policies, found.policy, found.port_policies, port)


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: Literal["exact", "prefix", "regex"]
    value: str


# "The header (or query parameter) is present, with any value": Istio's empty match `{}`, and
# for headers also its catch-all `regex: "*"`.
PRESENT = StringMatch("regex", ".*")


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """One HTTP match condition; every field set must match."""

    uri: StringMatch | None = None
    ignore_uri_case: bool = False
    method: StringMatch | None = None
    authority: StringMatch | None = None
    scheme: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    source_labels: tuple[tuple[str, str], ...] = ()  # the proxy's own labels must include these
    source_namespace: str | None = None
    gateways: tuple[str, ...] = ()  # qualified ("mesh" or "ns/name"); empty: the rule's gateways
    name: str = ""
    stat_prefix: str = ""  # Envoy route statistics under vhost.<vhost>.route.<stat_prefix>


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header edits: ``set`` overwrites, ``add`` appends, ``remove`` drops (names sorted)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderRules:
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()
    authority: str | None = None  # request.set of host/:authority: a host rewrite


@dataclass(frozen=True, slots=True)
class RouteDestination:
    host: str  # fully qualified
    subset: str = ""
    port: int | None = None  # None: the service's only port, or the port the request came in on
    weight: int = 100
    headers: HeaderRules = HeaderRules()


@dataclass(frozen=True, slots=True)
class Redirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    scheme: str | None = None
    code: int = 301
    port_from_request: bool = False  # Istio's derivePort FROM_REQUEST_PORT


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: str | None = None  # `body.string`
    body_bytes: bytes | None = None  # `body.bytes`, decoded


@dataclass(frozen=True, slots=True)
class Retries:
    """An explicit retry policy; ``HttpRoute.retries`` None means Istio's default policy."""

    attempts: int
    per_try_timeout: timedelta | None = None
    retry_on: str | None = None
    retry_remote_localities: bool = False
    retry_ignore_previous_hosts: bool | None = None
    backoff: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Fault:
    """Client-side fault injection; percentages are in [0, 100]."""

    delay: timedelta | None = None
    delay_percent: float = 100.0
    abort_http_status: int | None = None
    abort_grpc_status: int | None = None
    abort_percent: float = 100.0


@dataclass(frozen=True, slots=True)
class Mirror:
    destination: RouteDestination
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: timedelta | None = None
    allow_credentials: bool | None = None
    forward_unmatched_preflights: bool = True


@dataclass(frozen=True, slots=True)
class HttpRoute:
    """One VirtualService http entry: matches (empty = everything) and exactly one action."""

    name: str = ""
    matches: tuple[RouteMatch, ...] = ()
    destinations: tuple[RouteDestination, ...] = ()
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    timeout: timedelta | None = None
    retries: Retries | None = None
    rewrite_uri: str | None = None
    rewrite_authority: str | None = None
    rewrite_uri_regex: tuple[str, str] | None = None  # (pattern, substitution)
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    cors: CorsPolicy | None = None
    headers: HeaderRules = HeaderRules()


@dataclass(frozen=True, slots=True)
class L4Match:
    """One match of a tcp or tls route; ``sni_hosts`` is empty for tcp."""

    port: int | None = None
    destination_subnets: tuple[str, ...] = ()
    sni_hosts: tuple[str, ...] = ()
    source_labels: tuple[tuple[str, str], ...] = ()
    source_namespace: str | None = None
    gateways: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class L4Route:
    """A VirtualService tcp or tls entry: matches (empty = every connection) and weighted destinations."""

    matches: tuple[L4Match, ...] = ()
    destinations: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class RoutingRule:
    """A VirtualService that applies to sidecars, with hosts fully qualified."""

    namespace: str
    name: str
    hosts: tuple[str, ...]
    http: tuple[HttpRoute, ...] = ()
    tcp: tuple[L4Route, ...] = ()
    tls: tuple[L4Route, ...] = ()
    gateways: tuple[str, ...] = ("mesh",)  # qualified: "mesh" or "namespace/name"


@dataclass(frozen=True, slots=True)
class SidecarScope:
    """A Sidecar resource: which workloads it selects and where inbound ports forward to."""

    namespace: str
    name: str
    selector: Labels | None
    ingress_endpoints: Mapping[int, str] = field(default_factory=frozen_map)  # port -> defaultEndpoint
    # port -> protocol ("" when not given) of every ingress listener; empty: no ingress section,
    # and inbound ports come from the services that select the workload.
    ingress_ports: Mapping[int, str] = field(default_factory=frozen_map)


@dataclass(frozen=True, slots=True)
class MeshSnapshot:
    """The whole mesh at one config revision. Build with `pilot.model.build.build_mesh`."""

    cluster_domain: str = "cluster.local"
    services: Mapping[str, Service] = field(default_factory=frozen_map)
    workloads: Mapping[tuple[str, str], Workload] = field(default_factory=frozen_map)
    destination_rules: Mapping[str, DestinationPolicy] = field(default_factory=frozen_map)
    virtual_services: Mapping[str, RoutingRule] = field(default_factory=frozen_map)
    sidecars: tuple[SidecarScope, ...] = ()  # precedence order: with selector first, then oldest
    scoping: Scoping = field(default_factory=Scoping)  # exportTo, every VS/DR candidate, Gateways, Sidecar egress
    security: Security = field(default_factory=Security)  # AuthorizationPolicy, RequestAuthentication
    peer_authn: PeerAuthn = field(default_factory=PeerAuthn)  # PeerAuthentication (pilot.model.mtls)
    trust_domain: str = "cluster.local"  # of workload identities: spiffe://<trust_domain>/ns/../sa/..
    # Gateway credentialName secrets come from pilot over ADS (Kubernetes: pilot.xds.secrets), not
    # from the gateway's agent (the local secret store); set by the composition root.
    credentials_over_ads: bool = False
    warnings: tuple[str, ...] = ()
    # Results of pure functions of this snapshot, shared by every proxy class generated from it
    # (see pilot.translate.memo). Not an input: init=False, so `dataclasses.replace` starts empty.
    memo: dict[Hashable, Any] = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)
    # Generator results carried from one mesh version to the next, keyed by the identity of their
    # frozen inputs (see pilot.translate.memo.carried). Not an input: output is the same without it.
    carry: Conversions | None = field(default=None, compare=False, hash=False, repr=False)

    def workload(self, namespace: str, name: str) -> Workload | None:
        return self.workloads.get((namespace, name))

    def service(self, host: str) -> Service | None:
        return self.services.get(host)

    def services_selecting(self, namespace: str, labels: Labels) -> tuple[Service, ...]:
        """Services whose workloadSelector picks a workload with ``labels`` in ``namespace``, in host order.

        Asked once per proxy class, so it looks only at candidates: services indexed under one
        label of their selector (built once per services mapping: a routing change, which keeps the
        mapping, reuses the last mesh version's), never every service of the mesh.
        """
        index = self.memo.get(_SELECTOR_INDEX)
        if index is None:
            services = self.services
            if self.carry is None:
                index = _selector_index(services.values())
            else:  # the same services mapping as the last mesh version (a routing change): same index
                index = self.carry.keyed(_SELECTOR_INDEX, (services,), (), lambda: _selector_index(services.values()))
            self.memo[_SELECTOR_INDEX] = index
        found = [*index.get((namespace, "", ""), ())]
        for key, value in labels.items():
            found += index.get((namespace, key, value), ())
        return tuple(s for _, s in sorted({id(s): (i, s) for i, s in found}.values(), key=lambda e: e[0])
                     if selects(s.selector or {}, labels))

    def sidecar_for(self, namespace: str, labels: Labels) -> SidecarScope | None:
        """The Sidecar resource that applies to a workload, as Istio picks it."""
        return next(
            (
                s
                for s in self.sidecars
                if s.namespace == namespace and (s.selector is None or selects(s.selector, labels))
            ),
            None,
        )


_SELECTOR_INDEX = ("mesh", "selector-index")


def _selector_index(services: Iterable[Service]) -> dict[tuple[str, str, str], list[tuple[int, Service]]]:
    """(namespace, label, value) -> (position, service) for one label of each workloadSelector.

    A selector picks a workload only if the workload has every selector label, so looking up
    each of a workload's labels finds every service that may select it. Empty selectors (every
    workload of the namespace) are under the label "".
    """
    index: dict[tuple[str, str, str], list[tuple[int, Service]]] = {}
    for i, service in enumerate(services):
        if service.selector is None:
            continue
        key, value = min(service.selector.items(), default=("", ""))
        index.setdefault((service.namespace, key, value), []).append((i, service))
    return index
