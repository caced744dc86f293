"""Sidecar: narrows what a sidecar sees and where its inbound traffic goes.

``egress[].hosts`` (``namespace/dnsName``) limit which services a sidecar gets clusters and
routes for, ``ingress[].defaultEndpoint`` says where inbound traffic goes, and
``outboundTrafficPolicy.mode`` what happens to requests for hosts outside the registry.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import StrEnum
from typing import Any, Literal

from pilot.api.base import ApiObject, IstioModel, LabelSelector
from pilot.api.common import Port
from pilot.api.errors import FieldIssue
from pilot.api.hosts import SidecarHost

# Istio accepts 127.0.0.1:PORT, 0.0.0.0:PORT, [::1]:PORT, [::]:PORT or a unix socket.
_ENDPOINT = re.compile(r"^(127\.0\.0\.1|0\.0\.0\.0|\[::1\]|\[::\]):(\d{1,5})$")


def parse_default_endpoint(value: str) -> tuple[str, int] | None:
    """(host, port) of a ``defaultEndpoint`` such as ``127.0.0.1:8080``; None if not that form."""
    match = _ENDPOINT.match(value)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        return None
    return match.group(1).strip("[]"), int(match.group(2))


class IstioIngressListener(IstioModel):
    port: Port
    bind: str | None = None
    capture_mode: str | None = None
    default_endpoint: str | None = None
    tls: dict[str, Any] | None = None
    connection_pool: dict[str, Any] | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        endpoint = self.default_endpoint
        if endpoint and not endpoint.startswith("unix://") and parse_default_endpoint(endpoint) is None:
            yield FieldIssue(
                f"{path}.defaultEndpoint",
                f"{endpoint!r} must be 127.0.0.1:PORT, 0.0.0.0:PORT, [::1]:PORT, [::]:PORT or unix://PATH",
            )


class IstioEgressListener(IstioModel):
    port: Port | None = None
    bind: str | None = None
    capture_mode: str | None = None
    hosts: tuple[SidecarHost, ...] = ()

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.hosts:
            yield FieldIssue(f"{path}.hosts", "at least one host is required")


class OutboundTrafficPolicyMode(StrEnum):
    REGISTRY_ONLY = "REGISTRY_ONLY"
    ALLOW_ANY = "ALLOW_ANY"


class OutboundTrafficPolicy(IstioModel):
    # Istio's mesh-wide default is ALLOW_ANY.
    mode: OutboundTrafficPolicyMode = OutboundTrafficPolicyMode.ALLOW_ANY
    egress_proxy: dict[str, Any] | None = None


class SidecarSpec(IstioModel):
    workload_selector: LabelSelector | None = None
    ingress: tuple[IstioIngressListener, ...] = ()
    egress: tuple[IstioEgressListener, ...] = ()
    outbound_traffic_policy: OutboundTrafficPolicy | None = None
    inbound_connection_pool: dict[str, Any] | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        seen: set[int] = set()
        for i, listener in enumerate(self.ingress):
            if listener.port.number in seen:
                yield FieldIssue(f"{path}.ingress[{i}].port.number", "duplicate ingress port")
            seen.add(listener.port.number)
        yield from self._egress_problems(path)

    def _egress_problems(self, path: str) -> Iterator[FieldIssue]:
        """Istio's rules: egress ports unique; one catch-all (port-less) listener, and last."""
        ports: set[int] = set()
        for i, listener in enumerate(self.egress):
            if listener.port is None:
                if i != len(self.egress) - 1:
                    yield FieldIssue(
                        f"{path}.egress[{i}].port", "the egress listener without a port must be the last one"
                    )
            elif listener.port.number in ports:
                yield FieldIssue(f"{path}.egress[{i}].port.number", "duplicate egress port")
            else:
                ports.add(listener.port.number)


class Sidecar(ApiObject):
    KIND = "Sidecar"
    kind: Literal["Sidecar"]
    spec: SidecarSpec
