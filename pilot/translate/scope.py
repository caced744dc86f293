"""What one proxy class sees of the mesh: its bind address, its workload, Sidecar, inbound ports.

The Sidecar resource that applies is picked as Istio does: one in the workload's namespace whose
``workloadSelector`` selects it, else that namespace's selector-less one, else the selector-less
one of the root namespace (the mesh-wide default).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pilot.api.service_entry import HTTP2_PROTOCOLS, HTTP_PROTOCOLS
from pilot.model.build_services import endpoint_port
from pilot.model.mesh import MeshSnapshot, SidecarScope, Workload
from pilot.model.proxy import ProxyClass
from pilot.model.scoping import EgressScope
from pilot.translate import names

GRPC_PROTOCOLS = frozenset({"GRPC", "GRPC-WEB"})  # Istio's IsGRPC(): no inbound retries


@dataclass(frozen=True, slots=True)
class InboundPort:
    """A port the proxy's own application serves, and where the sidecar forwards it."""

    port: int  # the workload port: the sidecar listens here, on its bind address
    http: bool
    http2: bool
    app_address: str  # host or unix:// path the app listens on
    app_port: int
    grpc: bool = False  # every service on the port speaks gRPC: no inbound retries (Istio's rule)


@dataclass(frozen=True, slots=True)
class ProxyView:
    bind_address: str
    namespace: str
    labels: Mapping[str, str]
    workload: Workload | None
    inbound: tuple[InboundPort, ...]
    sidecar: SidecarScope | None = None
    egress: EgressScope | None = None
    mtls: bool = False  # the proxy has mesh certificates (`ProxyClass.mtls`)


def proxy_view(mesh: MeshSnapshot, proxy: ProxyClass) -> ProxyView:
    """Resolve a proxy class against the mesh: the local-mesh WorkloadEntry, else its labels."""
    workload = mesh.workload(proxy.namespace, proxy.workload) if proxy.workload else None
    labels = workload.labels if workload is not None else proxy.label_map
    bind = proxy.bind_address or names.WILDCARD_ADDRESS
    sidecar = sidecar_for(mesh, proxy.namespace, labels)
    return ProxyView(
        bind_address=bind,
        namespace=proxy.namespace,
        labels=labels,
        workload=workload,
        inbound=_inbound_ports(mesh, proxy.namespace, labels, workload, bind, sidecar),
        sidecar=sidecar,
        egress=mesh.scoping.egress.get((sidecar.namespace, sidecar.name)) if sidecar else None,
        mtls=proxy.mtls,
    )


def scope_view(mesh: MeshSnapshot, proxy: ProxyClass) -> ProxyView:
    """`proxy_view` without the inbound ports: what decides which part of the mesh a proxy sees
    (labels, Sidecar, egress scope). The EDS fast path needs only this, for every class on every
    endpoint change, and inbound ports cost a walk over the services selecting the proxy."""
    workload = mesh.workload(proxy.namespace, proxy.workload) if proxy.workload else None
    labels = workload.labels if workload is not None else proxy.label_map
    sidecar = sidecar_for(mesh, proxy.namespace, labels)
    return ProxyView(
        bind_address=proxy.bind_address or names.WILDCARD_ADDRESS,
        namespace=proxy.namespace,
        labels=labels,
        workload=workload,
        inbound=(),
        sidecar=sidecar,
        egress=mesh.scoping.egress.get((sidecar.namespace, sidecar.name)) if sidecar else None,
    )


def sidecar_for(mesh: MeshSnapshot, namespace: str, labels: Mapping[str, str]) -> SidecarScope | None:
    """The Sidecar resource for a workload; the root namespace's default if its namespace has none."""
    found = mesh.sidecar_for(namespace, labels)
    if found is not None or namespace == mesh.scoping.root_namespace:
        return found
    root = mesh.scoping.root_namespace
    return next((s for s in mesh.sidecars if s.namespace == root and s.selector is None), None)


def _inbound_ports(
    mesh: MeshSnapshot,
    namespace: str,
    labels: Mapping[str, str],
    workload: Workload | None,
    bind: str,
    sidecar: SidecarScope | None,
) -> tuple[InboundPort, ...]:
    protocols: dict[int, list[tuple[bool, bool, bool]]] = {}
    services = mesh.services_selecting(namespace, labels)
    for service in services:
        for port in service.ports:
            number = endpoint_port(port, workload.ports if workload else None)
            protocols.setdefault(number, []).append((port.is_http, port.is_http2, port.protocol in GRPC_PROTOCOLS))
    if sidecar is not None and sidecar.ingress_ports:
        # Istio: an ingress section replaces the ports taken from services, and applies only
        # to a workload that some service selects.
        protocols = _listed_ports(sidecar.ingress_ports, protocols) if services else {}
    found = []
    for number, kinds in sorted(protocols.items()):
        if number in names.RESERVED_PORTS:
            continue
        default_endpoint = sidecar.ingress_endpoints.get(number) if sidecar else None
        address, app_port = app_endpoint(default_endpoint, number, bind)
        # Several services on one port: HTTP only if all agree, since TCP proxying suits anything.
        http = all(h for h, _, _ in kinds)
        http2 = http and any(h2 for _, h2, _ in kinds)
        found.append(InboundPort(number, http, http2, address, app_port, http and all(g for _, _, g in kinds)))
    return tuple(found)


def _listed_ports(
    listed: Mapping[int, str], from_services: dict[int, list[tuple[bool, bool, bool]]]
) -> dict[int, list[tuple[bool, bool, bool]]]:
    """The Sidecar's ingress ports; a port without a protocol takes the services' for that port."""
    out: dict[int, list[tuple[bool, bool, bool]]] = {}
    for number, protocol in listed.items():
        if protocol:
            out[number] = [(protocol in HTTP_PROTOCOLS, protocol in HTTP2_PROTOCOLS, protocol in GRPC_PROTOCOLS)]
        else:
            out[number] = from_services.get(number, [(False, False, False)])
    return out


def app_endpoint(default_endpoint: str | None, port: int, bind: str) -> tuple[str, int]:
    """Where the app listens: Sidecar ``defaultEndpoint`` if given, else ``127.0.0.1:<port>``.

    ``0.0.0.0:P`` means "the instance address", which for a local-mesh sidecar is its own bind
    address; ``unix://`` paths are returned whole with port 0.
    """
    if not default_endpoint:
        return names.APP_ADDRESS, port
    if default_endpoint.startswith("unix://"):
        return default_endpoint, 0
    host, _, port_text = default_endpoint.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::"):
        host = bind if bind != names.WILDCARD_ADDRESS else names.APP_ADDRESS
    return host, int(port_text)
