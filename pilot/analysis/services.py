"""Service checks: ports whose protocol cannot be told, and ServiceEntries that need addresses."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pilot.analysis import messages as msg
from pilot.analysis.context import Context
from pilot.api import ServiceEntry

# Istio's protocol names (pkg/config/protocol), as a port name's prefix before the first "-".
KNOWN_PROTOCOLS = frozenset({"tcp", "udp", "grpc", "grpc-web", "http", "http_proxy", "http2", "https", "tls",
                             "mongo", "redis", "mysql"})
_UNPROXIED = ("UDP", "SCTP")


def named_protocol(name: str) -> bool:
    """Whether a port name states its protocol (``http``, ``grpc-api``, ``tcp-db``...)."""
    lower = name.lower()
    return lower.startswith("grpc-web") or lower.split("-", 1)[0] in KNOWN_PROTOCOLS


def _service_ports(service: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [p for p in (service.get("spec") or {}).get("ports") or () if isinstance(p, Mapping)]


def service_port_names(ctx: Context) -> Iterator[msg.Message]:
    """IST0118: a Kubernetes Service port with neither a protocol-prefixed name nor appProtocol.

    Istio sniffs such a port; pilot cannot, so it is plain TCP: no HTTP routing, retries or
    per-request metrics for it."""
    for service in ctx.inp.services:
        meta = service.get("metadata") or {}
        ns, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        for i, port in enumerate(_service_ports(service)):
            if str(port.get("protocol") or "TCP").upper() in _UNPROXIED or port.get("appProtocol"):
                continue
            port_name = str(port.get("name") or "")
            if not named_protocol(port_name):
                yield msg.Message(
                    msg.PORT_NAME_NOT_UNDER_NAMING_CONVENTION, "Service", ns, name, f"spec.ports[{i}].name",
                    f"Port name {port_name or '(none)'} (port: {port.get('port')}, targetPort: "
                    f"{port.get('targetPort', port.get('port'))}) doesn't follow the naming convention of Istio "
                    "port; pilot treats it as TCP",
                    "name the port <protocol>[-<suffix>] (http, http2, grpc, tcp, tls, ...) or set appProtocol",
                    ctx.inp.origins.get(("Service", ns, name), ""))


def service_entry_port_protocols(ctx: Context) -> Iterator[msg.Message]:
    """MSH0105: a ServiceEntry port with no protocol and a name that does not state one: it is TCP."""
    for se in ctx.of(ServiceEntry):
        for i, port in enumerate(se.spec.ports):
            if port.protocol is None and not named_protocol(port.name):
                yield ctx.message(msg.SERVICE_ENTRY_PORT_PROTOCOL, se, f"spec.ports[{i}].protocol",
                                  f"port {port.number} ({port.name}) sets no protocol and its name states none, so "
                                  "pilot treats it as TCP (no HTTP routing)",
                                  "set protocol (HTTP, HTTP2, GRPC, HTTPS, TLS, TCP, ...) on the port")


def service_entry_addresses(ctx: Context) -> Iterator[msg.Message]:
    """IST0134: a ServiceEntry with a TCP port and no addresses: a pod's captured TCP traffic cannot be
    told apart by host, so the port needs a virtual IP. Kubernetes config only (the input holds
    Kubernetes objects or comes from a cluster): the local mesh tells TCP services apart by port."""
    if not ctx.inp.kubernetes:
        return
    for se in ctx.of(ServiceEntry):
        if se.spec.addresses:
            continue
        tcp = [i for i, p in enumerate(se.spec.ports) if p.effective_protocol == "TCP"]
        if tcp:
            yield ctx.message(msg.SERVICE_ENTRY_ADDRESSES_REQUIRED, se, "spec.addresses",
                              f"ServiceEntry addresses are required for this protocol (port "
                              f"{se.spec.ports[tcp[0]].number} is TCP)",
                              "add a virtual IP in spec.addresses, or set an HTTP, TLS or GRPC protocol on the port")
