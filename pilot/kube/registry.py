"""The service registry from Kubernetes, as pure functions: Services, EndpointSlices and Pods in,
API objects the mesh model already understands out.

Shape. A Kubernetes Service becomes a `KubeService`: a ServiceEntry (host
``<name>.<namespace>.svc.<cluster domain>``, the cluster IPs as addresses, MESH_INTERNAL, its
ports) stored under its own kind, ``("Service", namespace, name)``, so it never collides with a
user's ServiceEntry of the same name. Its ready endpoints (EndpointSlice endpoints completed by
their Pods: labels, service account, sidecar or not) are a second object, `ServiceEndpoints`
``("ServiceEndpoints", namespace, name)``, which `build_mesh` adds to the service as inline
endpoints. Two kinds rather than one because they change at different rates: a scale-up or a
rollout touches only ServiceEndpoints, a kind listed in `pilot.debounce.ENDPOINT_KINDS`, so it takes
the short endpoint debounce and (the mesh differing in endpoints only) the EDS fast path, while
the Service object, and so every listener, cluster and route built from it, stays the same
instance. Feeding `m.Service` directly was the alternative; it would bypass what `build_mesh`
already does for ServiceEntries (exportTo scoping, host conflicts, WorkloadEntries selected by the
Service's selector, per-object memoization), so the registry stays an input like any other.

Semantics follow Istio (pilot/pkg/serviceregistry/kube, pkg/config/kube), with these choices:

- Protocol: ``appProtocol`` first (``kubernetes.io/h2c`` HTTP2, ``kubernetes.io/ws`` HTTP,
  ``kubernetes.io/wss`` HTTPS), else the port name: ``grpc-web`` prefix, else the part before the
  first ``-`` (``http``, ``http2``, ``https``, ``grpc``, ``tcp``, ``tls``, ``mongo``, ``redis``,
  ``mysql``, ``udp``; any case). UDP and SCTP ports (``protocol`` or a ``udp`` name) are left
  out: sidecars proxy TCP only, and Istio builds nothing for them either. Istio sniffs a port whose protocol it
  cannot tell (HTTP or TCP, decided per connection); the model has no sniffing, so such a port is
  TCP here: traffic flows, as opaque TCP, without L7 routing. Name your ports.
- targetPort: the EndpointSlice carries each endpoint's resolved port, so named targetPorts are
  resolved by Kubernetes against each pod's container ports; the service's own ``target_port``
  (the inbound listener port of its pods' sidecars) is the number if given, else the one number
  its endpoints agree on for that port (none if they disagree or there are none yet).
- Endpoints: an endpoint is sent when its ``ready`` condition is true or unset. Istio 1.30 also
  sends not-ready endpoints marked UNHEALTHY (``PILOT_AUTO_SEND_UNHEALTHY_ENDPOINTS``, on by
  default unless outlier detection sets ``minHealthPercent``; ``PILOT_SEND_UNHEALTHY_ENDPOINTS``,
  off by default, forces it), with the panic threshold off so Envoy never uses them, and never
  sends terminating ones (DRAINING only for persistent-session services); the model has no health
  status, so not-ready and terminating endpoints are left out: the traffic outcome is the same.
  ``publishNotReadyAddresses`` needs nothing here: Kubernetes then reports every endpoint ready.
  An endpoint whose targetRef names a Pod not (yet) known is left out until the Pod arrives (as
  Istio does); one without a targetRef is matched to a Pod of its namespace by IP, else sent
  bare. FQDN slices are ignored (as in Istio).
- Labels and identity come from the Pod: its labels (DestinationRule subsets select them), its
  service account (``spiffe://<trust domain>/ns/<ns>/sa/<sa>``, used for mTLS SANs), and its
  ``security.istio.io/tlsMode`` label; a pod without that label has no sidecar, so its endpoints
  get ``tlsMode: disabled`` (Istio's rule for pods) and are reached in plain text.
- Headless (``clusterIP: None``): Istio passes traffic through to the address the client
  resolved (ORIGINAL_DST). The model uses EDS for resolution NONE with endpoints (it has no
  iptables in the local mesh), so a headless service is load-balanced over its ready pods;
  requests addressed to one pod (``pod-0.svc...``) match no service host and are passed through.
- ExternalName: resolution DNS to ``spec.externalName`` on each service port, MESH_EXTERNAL (the
  Kubernetes registry's long-standing behaviour; Istio 1.30's default instead aliases the name to
  a mesh service of that host, which the model has no notion of).
- ``networking.istio.io/exportTo`` (comma separated) is the service's exportTo.
- The selector is kept as the entry's workloadSelector: WorkloadEntries in the namespace with
  matching labels are endpoints too (Istio's default), and sidecars of selected pods get inbound
  listeners for the service. A Service without a selector selects nothing (an empty
  workloadSelector would select the whole namespace), its endpoints come from its slices only.

Errors (`RegistryError`) name the Service, the field and the reason. Everything here is pure:
`pilot.kube.registry_source` feeds it the watched objects and the store the results.

Cost: converting a service is O(its ports + endpoints). In `build_mesh`, an endpoint change
replaces one ServiceEndpoints: the merged entry of its service is patched in (O(endpoint
objects) identity checks), then the services pass runs as for a moved WorkloadEntry, while
scoping, routing and rule stages are skipped (their inputs are the same objects).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError

from pilot.api.base import ApiObject, IstioModel, LabelSelector, ObjectMeta, check_host
from pilot.api.service_entry import (
    Location,
    Resolution,
    ServiceEntry,
    ServiceEntrySpec,
    ServicePort,
    WorkloadEntrySpec,
)
from pilot.model.mtls import DISABLED_TLS_MODE, TLS_MODE_LABEL

SERVICE_KIND = "Service"
ENDPOINTS_KIND = "ServiceEndpoints"
EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # on every EndpointSlice of a Service
DEFAULT_SERVICE_ACCOUNT = "default"
# Kubernetes' standard application protocols (core/v1 ServicePort.appProtocol).
_APP_PROTOCOLS = {"kubernetes.io/h2c": "HTTP2", "kubernetes.io/ws": "HTTP", "kubernetes.io/wss": "HTTPS"}
# Istio's protocol names (pkg/config/protocol Parse) the model knows; "http_proxy" is Istio's
# egress-only protocol and, like any other name, means "unknown": TCP here (module docstring).
_NAMED_PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "grpc": "GRPC", "grpc-web": "GRPC-WEB", "http": "HTTP",
                    "http2": "HTTP2", "https": "HTTPS", "tls": "TLS", "mongo": "MONGO", "redis": "REDIS",
                    "mysql": "MYSQL"}


class RegistryError(ValueError):
    """A Kubernetes object the registry cannot convert: names the object, the field and the reason."""


class KubeService(ServiceEntry):
    """A Kubernetes Service as the ServiceEntry the model serves; keyed ("Service", ns, name)."""

    KIND = SERVICE_KIND
    kind: Literal["Service"] = "Service"  # type: ignore[assignment]  # its own kind, a ServiceEntry's shape


class ServiceEndpointsSpec(IstioModel):
    endpoints: tuple[WorkloadEntrySpec, ...] = Field(default_factory=tuple)


class ServiceEndpoints(ApiObject):
    """The ready endpoints of the Service of the same namespace and name, from all its EndpointSlices."""

    KIND = ENDPOINTS_KIND
    kind: Literal["ServiceEndpoints"] = "ServiceEndpoints"
    spec: ServiceEndpointsSpec


def hostname(name: str, namespace: str, domain: str) -> str:
    return f"{name}.{namespace}.svc.{domain}"


# Ports a sidecar does not proxy: left out of the service (Istio builds no listener or cluster for
# them either), which also keeps port numbers unique (Kubernetes allows 53/TCP beside 53/UDP).
_UNPROXIED = frozenset({"UDP", "SCTP"})


def port_protocol(port: Mapping[str, Any]) -> str:
    """Istio's protocol for a Service port: appProtocol, else the port name (see the module docstring)."""
    l4 = str(port.get("protocol") or "TCP").upper()
    if l4 in _UNPROXIED:
        return l4
    name = str(port.get("name") or "")
    app = port.get("appProtocol")
    if app is not None:
        name = str(app)
        if name in _APP_PROTOCOLS:
            return _APP_PROTOCOLS[name]
    if name[:8].lower() == "grpc-web":
        return "GRPC-WEB"
    return _NAMED_PROTOCOLS.get(name.split("-", 1)[0].lower(), "TCP")


def port_name(port: Mapping[str, Any]) -> str:
    """The port's name; a single-port Service may leave it empty, the model needs one."""
    return str(port.get("name") or "") or f"port-{port.get('port')}"


@dataclass(frozen=True, slots=True)
class PodFacts:
    """What the registry reads from a Pod: identity and whether it runs a sidecar."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    service_account: str
    ips: tuple[str, ...]


def pod_facts(pod: Mapping[str, Any]) -> PodFacts:
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    ips = tuple(str(p["ip"]) for p in status.get("podIPs") or () if p.get("ip"))
    if not ips and status.get("podIP"):
        ips = (str(status["podIP"]),)
    return PodFacts(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        labels={str(k): str(v) for k, v in sorted((meta.get("labels") or {}).items())},
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or DEFAULT_SERVICE_ACCOUNT),
        ips=ips,
    )


def service_name_of_slice(endpoint_slice: Mapping[str, Any]) -> str:
    """The Service an EndpointSlice belongs to ("" if none: not ours to read)."""
    return str(((endpoint_slice.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL) or "")


def kube_service(
    service: Mapping[str, Any], domain: str = "cluster.local", resolved_ports: Mapping[str, int] | None = None,
) -> KubeService:
    """The ServiceEntry-shaped object of a Kubernetes Service; `resolved_ports` maps a port name to
    the number its named targetPort resolves to (`agreed_target_ports`)."""
    meta, spec = service.get("metadata") or {}, service.get("spec") or {}
    name, namespace = str(meta.get("name") or ""), str(meta.get("namespace") or "")
    ref = f"Service {namespace}/{name}"
    ports = tuple(_service_port(p, i, ref, resolved_ports or {}) for i, p in enumerate(spec.get("ports") or ())
                  if port_protocol(p) not in _UNPROXIED)
    selector = {str(k): str(v) for k, v in (spec.get("selector") or {}).items()}
    external = str(spec.get("externalName") or "").rstrip(".") if spec.get("type") == "ExternalName" else ""
    entry: dict[str, Any] = {
        "hosts": (hostname(name, namespace, domain),),
        "ports": ports,
        "location": Location.MESH_INTERNAL,
        "workload_selector": LabelSelector(labels=selector) if selector else None,
        "export_to": _export_to(meta.get("annotations") or {}),
    }
    if external:
        _check_external_name(external, ref)
        entry.update(location=Location.MESH_EXTERNAL, resolution=Resolution.DNS, workload_selector=None,
                     endpoints=(WorkloadEntrySpec(address=external, ports={p.name: p.number for p in ports}),))
    elif spec.get("clusterIP") == "None":
        entry.update(resolution=Resolution.NONE)
    else:
        ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
        entry.update(resolution=Resolution.STATIC, addresses=tuple(str(ip) for ip in ips))
    try:
        return KubeService(
            api_version="v1",
            metadata=ObjectMeta(name=name, namespace=namespace, labels=meta.get("labels") or {},
                                creation_timestamp=meta.get("creationTimestamp"),
                                resource_version=meta.get("resourceVersion"), uid=meta.get("uid")),
            spec=ServiceEntrySpec(**entry),
        )
    except ValidationError as exc:
        raise RegistryError(f"{ref}: {_first_error(exc)}") from None


def _service_port(port: Mapping[str, Any], index: int, ref: str, resolved: Mapping[str, int]) -> ServicePort:
    name, target = port_name(port), port.get("targetPort")
    number = target if isinstance(target, int) else resolved.get(name)
    try:
        return ServicePort(number=port.get("port"), name=name, protocol=port_protocol(port), target_port=number)
    except ValidationError as exc:
        raise RegistryError(f"{ref}: spec.ports[{index}]: {_first_error(exc)}") from None


def _export_to(annotations: Mapping[str, Any]) -> tuple[str, ...]:
    value = str(annotations.get(EXPORT_TO_ANNOTATION) or "")
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _check_external_name(external: str, ref: str) -> None:
    try:
        check_host(external)
    except ValueError as exc:
        raise RegistryError(f"{ref}: spec.externalName: {exc}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def agreed_target_ports(slices: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Port name -> the one endpoint port all the slices give it (names with several are left out)."""
    seen: dict[str, set[int]] = {}
    for endpoint_slice in slices:
        for port in endpoint_slice.get("ports") or ():
            if isinstance(port.get("port"), int):
                seen.setdefault(port_name({"name": port.get("name"), "port": port["port"]}), set()).add(port["port"])
    return {name: next(iter(numbers)) for name, numbers in sorted(seen.items()) if len(numbers) == 1}


PodLookup = Callable[[str, str], PodFacts | None]  # (namespace, name) -> the Pod, if known
IpLookup = Callable[[str, str], PodFacts | None]  # (namespace, ip) -> a Pod with that IP, if any


def is_ready(endpoint: Mapping[str, Any]) -> bool:
    """Kubernetes: an unset ``ready`` condition means ready."""
    ready = (endpoint.get("conditions") or {}).get("ready")
    return ready is None or bool(ready)


def service_endpoints(
    service: Mapping[str, Any], slices: Iterable[Mapping[str, Any]], pod: PodLookup, pod_by_ip: IpLookup,
) -> ServiceEndpoints:
    """The ready endpoints of `service` from its EndpointSlices (see the module docstring).

    One endpoint per address, with every service port the slices give it; when an address
    appears in several slices (an endpoint moving between slices) the slice first by name wins
    for that port. Sorted by address, so equal input gives an equal object.
    """
    meta = service.get("metadata") or {}
    name, namespace = str(meta.get("name") or ""), str(meta.get("namespace") or "")
    found: dict[str, tuple[dict[str, int], PodFacts | None]] = {}
    for endpoint_slice in sorted(slices, key=lambda s: str((s.get("metadata") or {}).get("name") or "")):
        if endpoint_slice.get("addressType") not in ("IPv4", "IPv6"):
            continue  # FQDN slices: not supported (nor by Istio)
        ports = {port_name({"name": p.get("name"), "port": p.get("port")}): int(p["port"])
                 for p in endpoint_slice.get("ports") or () if isinstance(p.get("port"), int)}
        for endpoint in endpoint_slice.get("endpoints") or ():
            if is_ready(endpoint):
                _add_endpoint(found, endpoint, ports, namespace, pod, pod_by_ip)
    try:
        spec = ServiceEndpointsSpec(endpoints=tuple(
            _workload_spec(address, ports, facts) for address, (ports, facts) in sorted(found.items())))
    except ValidationError as exc:  # e.g. a port out of range in a hand-written slice
        raise RegistryError(f"EndpointSlices of Service {namespace}/{name}: {_first_error(exc)}") from None
    return ServiceEndpoints(api_version="meshctl.io/v1", metadata=ObjectMeta(name=name, namespace=namespace),
                            spec=spec)


def _add_endpoint(
    found: dict[str, tuple[dict[str, int], PodFacts | None]], endpoint: Mapping[str, Any], ports: Mapping[str, int],
    namespace: str, pod: PodLookup, pod_by_ip: IpLookup,
) -> None:
    ref = endpoint.get("targetRef") or {}
    for address in endpoint.get("addresses") or ():
        if ref.get("kind") == "Pod":
            facts = pod(str(ref.get("namespace") or namespace), str(ref.get("name") or ""))
            if facts is None:
                continue  # the Pod has not arrived yet: its endpoint follows when it does
        else:
            facts = pod_by_ip(namespace, str(address))
        have, _ = found.setdefault(str(address), ({}, facts))
        for port, number in ports.items():
            have.setdefault(port, number)


def _workload_spec(address: str, ports: Mapping[str, int], facts: PodFacts | None) -> WorkloadEntrySpec:
    if facts is None:
        return WorkloadEntrySpec(address=address, ports=dict(ports))
    labels = dict(facts.labels)
    labels.setdefault(TLS_MODE_LABEL, DISABLED_TLS_MODE)  # no tlsMode label: no sidecar (Istio's rule for pods)
    return WorkloadEntrySpec(address=address, ports=dict(ports), labels=labels,
                             service_account=facts.service_account)
