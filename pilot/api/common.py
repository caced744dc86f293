"""Small message types shared by several kinds (Istio's common protos)."""

from __future__ import annotations

from pilot.api.base import IstioModel, PortNumber
from pilot.api.service_entry import Protocol


class PortSelector(IstioModel):
    """Selects a port of a service by number."""

    number: PortNumber


class Port(IstioModel):
    """A port a proxy listens on (Gateway servers, Sidecar ingress/egress)."""

    number: PortNumber
    protocol: Protocol | None = None
    name: str = ""
    target_port: PortNumber | None = None
