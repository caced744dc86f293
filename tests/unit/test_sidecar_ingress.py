"""Sidecar `ingress`: when present it decides the inbound ports, as Istio documents."""

from __future__ import annotations

from pilot.config.yaml_text import load_text
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate.scope import proxy_view

MESH = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.default.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}, {number: 9081, name: grpc, protocol: GRPC}]
  workloadSelector: {labels: {app: api}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: api-1, namespace: default}
spec: {address: 127.0.9.1, labels: {app: api}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: lonely, namespace: default}
spec: {address: 127.0.9.2, labels: {app: lonely}}
"""

SIDECAR = """\
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: default}}
spec:
  ingress:
{entries}
"""


def inbound(config: str, workload: str) -> dict[int, tuple[bool, str, int]]:
    mesh = build_mesh(load_text(config).objects)
    wl = mesh.workload("default", workload)
    assert wl is not None
    proxy = ProxyClass(ProxyKind.SIDECAR, "default", tuple(sorted(wl.labels.items())), wl.address, workload)
    return {p.port: (p.http, p.app_address, p.app_port) for p in proxy_view(mesh, proxy).inbound}


def test_without_ingress_the_services_ports_are_served() -> None:
    assert inbound(MESH, "api-1") == {9080: (True, "127.0.0.1", 9080), 9081: (True, "127.0.0.1", 9081)}


def test_ingress_lists_exactly_the_ports_served_with_their_protocol() -> None:
    entries = "  - port: {number: 9080, protocol: TCP, name: raw}\n    defaultEndpoint: 127.0.0.1:7000\n" \
              "  - port: {number: 9999, protocol: HTTP, name: extra}\n"
    assert inbound(MESH + SIDECAR.format(entries=entries), "api-1") == {
        9080: (False, "127.0.0.1", 7000),  # TCP as listed, to the defaultEndpoint
        9999: (True, "127.0.0.1", 9999),  # not a service port, but listed
    }  # 9081 is not listed: not served


def test_a_listed_port_without_protocol_takes_the_services() -> None:
    entries = "  - port: {number: 9081, name: grpc}\n"
    assert inbound(MESH + SIDECAR.format(entries=entries), "api-1") == {9081: (True, "127.0.0.1", 9081)}


def test_ingress_applies_only_to_workloads_some_service_selects() -> None:
    entries = "  - port: {number: 9080, protocol: HTTP, name: http}\n"
    assert inbound(MESH + SIDECAR.format(entries=entries), "lonely") == {}
