"""ServiceEntry and WorkloadEntry: the services of the mesh and the workloads behind them."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from pilot.api.base import (
    ApiObject,
    Host,
    IstioModel,
    LabelSelector,
    NonNegative,
    PortNumber,
    check_host,
    rule_error,
)
from pilot.api.errors import FieldIssue
from pilot.api.hosts import ExportTo

PROTOCOLS = frozenset(
    {"HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "MYSQL", "REDIS", "TCP", "TLS", "UDP"}
)
# Protocols Envoy handles with the HTTP connection manager.
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB"})
HTTP2_PROTOCOLS = frozenset({"HTTP2", "GRPC", "GRPC-WEB"})  # spoken as HTTP/2 upstream


def _check_protocol(value: str) -> str:
    # Istio parses protocols case-insensitively; keep the canonical upper-case spelling.
    upper = value.upper()
    if upper not in PROTOCOLS:
        raise rule_error(f"unrecognized protocol {value!r} (one of {', '.join(sorted(PROTOCOLS))})")
    return upper


Protocol = Annotated[str, AfterValidator(_check_protocol)]


def protocol_from_name(port_name: str) -> str:
    """Istio's convention for ports without a protocol: ``http-web`` or ``grpc`` name it."""
    prefix = port_name.split("-", 1)[0].upper()
    return prefix if prefix in PROTOCOLS else "TCP"


class ServicePort(IstioModel):
    number: PortNumber
    name: str = Field(min_length=1)
    protocol: Protocol | None = None
    target_port: PortNumber | None = None

    @property
    def effective_protocol(self) -> str:
        return self.protocol or protocol_from_name(self.name)


class Location(StrEnum):
    MESH_EXTERNAL = "MESH_EXTERNAL"
    MESH_INTERNAL = "MESH_INTERNAL"


class Resolution(StrEnum):
    NONE = "NONE"
    STATIC = "STATIC"
    DNS = "DNS"
    DNS_ROUND_ROBIN = "DNS_ROUND_ROBIN"


def is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


class WorkloadEntrySpec(IstioModel):
    """One workload: where it listens and what it is. Also the shape of inline endpoints."""

    address: str = ""
    ports: dict[str, PortNumber] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    network: str = ""
    locality: str = ""
    weight: NonNegative = 1
    service_account: str = ""

    @field_validator("weight")
    @classmethod
    def _unset_weight_is_one(cls, value: int) -> int:
        # proto3 cannot tell 0 from unset; Istio (and Envoy) treat it as weight 1.
        return value or 1

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.address and not self.network:
            yield FieldIssue(f"{path}.address", "required unless network is set")
        elif self.address and not (is_ip(self.address) or self.address.startswith("unix://")):
            try:
                check_host(self.address)
            except ValueError:
                yield FieldIssue(
                    f"{path}.address", f"{self.address!r} is not an IP address, host name or unix:// path"
                )


class ServiceEntrySpec(IstioModel):
    hosts: tuple[Host, ...] = ()
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    location: Location = Location.MESH_EXTERNAL
    resolution: Resolution = Resolution.NONE
    endpoints: tuple[WorkloadEntrySpec, ...] = ()
    workload_selector: LabelSelector | None = None
    export_to: ExportTo = ()
    subject_alt_names: tuple[str, ...] = ()

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.hosts:
            yield FieldIssue(f"{path}.hosts", "at least one host is required")
        yield from _unique_ports(self.ports, f"{path}.ports")
        if self.workload_selector is not None and self.endpoints:
            yield FieldIssue(path, "only one of workloadSelector or endpoints may be set")
        yield from self._resolution_problems(path)
        names = {p.name for p in self.ports}
        for i, ep in enumerate(self.endpoints):
            for port_name in sorted(set(ep.ports) - names):
                yield FieldIssue(
                    f"{path}.endpoints[{i}].ports.{port_name}", "names no port of this ServiceEntry"
                )

    def _resolution_problems(self, path: str) -> Iterator[FieldIssue]:
        if self.resolution == Resolution.STATIC:
            if not self.endpoints and self.workload_selector is None:
                yield FieldIssue(f"{path}.resolution", "STATIC needs endpoints or a workloadSelector")
            for i, ep in enumerate(self.endpoints):
                if ep.address and not (is_ip(ep.address) or ep.address.startswith("unix://")):
                    yield FieldIssue(
                        f"{path}.endpoints[{i}].address", "STATIC endpoints need an IP or unix:// address"
                    )
        if self.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN) and not self.endpoints:
            for i, host in enumerate(self.hosts):
                if host.startswith("*"):
                    yield FieldIssue(
                        f"{path}.hosts[{i}]", "wildcard hosts cannot be resolved by DNS without endpoints"
                    )


def _unique_ports(ports: tuple[ServicePort, ...], path: str) -> Iterator[FieldIssue]:
    seen_numbers: set[int] = set()
    seen_names: set[str] = set()
    for i, port in enumerate(ports):
        if port.number in seen_numbers:
            yield FieldIssue(f"{path}[{i}].number", f"duplicate port {port.number}")
        if port.name in seen_names:
            yield FieldIssue(f"{path}[{i}].name", f"duplicate port name {port.name!r}")
        seen_numbers.add(port.number)
        seen_names.add(port.name)


class ServiceEntry(ApiObject):
    KIND = "ServiceEntry"
    kind: Literal["ServiceEntry"]
    spec: ServiceEntrySpec


class WorkloadEntry(ApiObject):
    KIND = "WorkloadEntry"
    kind: Literal["WorkloadEntry"]
    spec: WorkloadEntrySpec
