"""Gateways in the mesh model: servers with resolved hosts and TLS file paths, and their selection.

`gateway_config` converts one API Gateway (pure); `servers_by_port` groups the servers of the
Gateways that select one proxy by port, naming servers that cannot share a port (the older
server keeps it) so `build_mesh` can report them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pilot.api.gateway import HTTP_SERVER_PROTOCOLS, Gateway, Server, ServerTLSMode, ServerTLSSettings
from pilot.model.hosts import host_intersection, namespace_allows, split_scoped_host

HTTP = "HTTP"
HTTPS = "HTTPS"
TLS = "TLS"
TCP = "TCP"


@dataclass(frozen=True, slots=True)
class ServerTls:
    """TLS a gateway terminates: certificates from files (read by Envoy) or `credential_names` (SDS)."""

    mode: str  # SIMPLE | MUTUAL | OPTIONAL_MUTUAL | ISTIO_MUTUAL (files empty: the agent's certificates)
    server_certificate: str
    private_key: str
    ca_certificates: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    ca_crl: str | None = None  # client certificates it revokes
    spki_pins: tuple[str, ...] = ()  # accepted clients by public key (base64 SHA-256); empty: any
    hash_pins: tuple[str, ...] = ()  # accepted clients by certificate (hex SHA-256); empty: any
    min_version: str = "TLS_AUTO"
    max_version: str = "TLS_AUTO"
    cipher_suites: tuple[str, ...] = ()
    credential_names: tuple[str, ...] = ()  # secrets from the gateway's agent (SDS); files empty then


@dataclass(frozen=True, slots=True)
class GatewayServer:
    """One server of a Gateway. ``protocol`` is what the listener does: HTTP, HTTPS, TLS or TCP.

    ``TLS`` means SNI passthrough; ``HTTPS`` means TLS terminated and HTTP routed.
    """

    gateway: str  # "namespace/name"
    index: int
    port: int
    port_name: str
    protocol: str
    hosts: tuple[tuple[str, str], ...]  # (namespace or "*", dnsName)
    bind: str | None = None
    tls: ServerTls | None = None
    https_redirect: bool = False

    @property
    def namespace(self) -> str:
        return self.gateway.partition("/")[0]

    @property
    def sni_names(self) -> frozenset[str]:
        """Server names a TLS filter chain matches; empty (match any) if a host is ``*``."""
        names = frozenset(host for _, host in self.hosts)
        return frozenset() if "*" in names else names

    def admits(self, namespace: str, host: str) -> str | None:
        """The host to serve when a VirtualService in ``namespace`` claims ``host``, else None."""
        for scope, allowed in self.hosts:
            found = host_intersection(allowed, host) if namespace_allows(scope, namespace) else None
            if found is not None:
                return found
        return None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    namespace: str
    name: str
    selector: Mapping[str, str]
    servers: tuple[GatewayServer, ...]

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, labels: Mapping[str, str]) -> bool:
        """Istio: a selector matches a proxy carrying all of its labels (an empty one matches all)."""
        return all(labels.get(k) == v for k, v in self.selector.items())


def gateway_config(gw: Gateway, warnings: list[str]) -> GatewayConfig:
    ref = f"{gw.metadata.namespace}/{gw.metadata.name}"
    servers = []
    for i, server in enumerate(gw.spec.servers):
        unsupported = _unsupported(server)
        converted = None if unsupported else _server(ref, i, server)
        if converted is None:
            warnings.append(f"{gw.ref}: spec.servers[{i}] {unsupported or 'cannot be served'}; skipped")
        else:
            servers.append(converted)
    return GatewayConfig(
        namespace=gw.metadata.namespace,
        name=gw.metadata.name,
        selector=MappingProxyType(dict(sorted(gw.spec.selector.items()))),
        servers=tuple(servers),
    )


def _unsupported(server: Server) -> str | None:
    """Why a server cannot be served locally yet (no secret store, no mesh CA), else None."""
    tls = server.tls
    if tls is None:
        return None
    if tls.terminates and not (tls.server_certificate and tls.private_key) and not _credentials(tls):
        return "has neither certificate files nor a credentialName"
    return None


def _credentials(tls: ServerTLSSettings) -> tuple[str, ...]:
    """credentialNames, else credentialName (Istio: the list wins), in order."""
    return tls.credential_names or ((tls.credential_name,) if tls.credential_name else ())


def _server(ref: str, index: int, server: Server) -> GatewayServer | None:
    protocol = server.port.protocol or HTTP
    tls = server.tls
    if (
        tls is not None
        and tls.mode in (ServerTLSMode.PASSTHROUGH, ServerTLSMode.AUTO_PASSTHROUGH)
        and (protocol in (HTTPS, TLS))
    ):
        kind = TLS  # Istio: a passthrough server forwards TLS by SNI whatever its protocol says
    elif protocol == HTTPS or (protocol == TLS and tls is not None and tls.terminates):
        kind = HTTPS if protocol == HTTPS else TCP
    else:
        kind = HTTP if protocol in HTTP_SERVER_PROTOCOLS else TCP
    server_tls = None
    if tls is not None and tls.mode == ServerTLSMode.ISTIO_MUTUAL:
        server_tls = ServerTls(mode=tls.mode.value, server_certificate="", private_key="",
                               min_version=tls.min_protocol_version.value, max_version=tls.max_protocol_version.value,
                               cipher_suites=tls.cipher_suites)
    elif tls is not None and tls.terminates:
        credentials = _credentials(tls)  # Istio: credentialName wins over certificate files
        if not credentials and not (tls.server_certificate and tls.private_key):
            return None
        server_tls = ServerTls(
            mode=tls.mode.value,
            server_certificate="" if credentials else tls.server_certificate or "",
            private_key="" if credentials else tls.private_key or "",
            credential_names=credentials,
            ca_certificates=tls.ca_certificates,
            subject_alt_names=tls.subject_alt_names,
            ca_crl=tls.ca_crl,
            spki_pins=tls.verify_certificate_spki,
            hash_pins=tls.verify_certificate_hash,
            min_version=tls.min_protocol_version.value,
            max_version=tls.max_protocol_version.value,
            cipher_suites=tls.cipher_suites,
        )
    namespace = ref.partition("/")[0]
    return GatewayServer(
        gateway=ref,
        index=index,
        port=server.port.number,
        port_name=server.port.name or f"{kind.lower()}-{server.port.number}",
        protocol=kind,
        hosts=tuple(split_scoped_host(h, namespace) for h in server.hosts),
        bind=server.bind,
        tls=server_tls,
        https_redirect=bool(tls and tls.https_redirect),
    )


def servers_by_port(gateways: Iterable[GatewayConfig]) -> Iterator[tuple[int, list[GatewayServer], list[str]]]:
    """Servers grouped by port, the first server's protocol winning; conflicts named, never dropped silently."""
    ports: dict[int, list[GatewayServer]] = {}
    conflicts: dict[int, list[str]] = {}
    for gw in gateways:
        for server in gw.servers:
            group = ports.setdefault(server.port, [])
            clash = next((other for other in group if _clashes(other, server)), None)
            if clash is not None:
                conflicts.setdefault(server.port, []).append(
                    f"Gateway {server.gateway}: servers[{server.index}] ({server.protocol}) on port {server.port} "
                    f"conflicts with servers[{clash.index}] ({clash.protocol}) of Gateway {clash.gateway}; ignored"
                )
                continue
            group.append(server)
    for port in sorted(ports):
        yield port, ports[port], conflicts.get(port, [])


def _clashes(first: GatewayServer, later: GatewayServer) -> bool:
    """Different listener kinds on one port; two TCP servers; TLS servers matching the same SNI."""
    if _family(first) != _family(later):
        return True
    if _family(later) == TCP:
        return True
    if _family(later) == "SNI":
        a, b = first.sni_names, later.sni_names
        return (not a and not b) or bool(a & b)
    return False


def _family(server: GatewayServer) -> str:
    """HTTP and HTTPS cannot share a port, nor can TCP and anything else; HTTPS and TLS can (both by SNI)."""
    return "SNI" if server.protocol in (HTTPS, TLS) else server.protocol
