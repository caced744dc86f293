"""Which listener and filter chain accept a connection (pure).

Three ways in, as the proxies pilot generates use them:
- **direct**: the client connects to an address a listener binds (a local-mesh sidecar's inbound
  listener on its workload address, a gateway's port);
- **captured** (Kubernetes pods): outbound traffic lands on `virtualOutbound` (15001, original
  destination), which hands it to the listener for `ip:port`, else `0.0.0.0:port` (both with
  `bind_to_port: false`), else keeps it on its own filter chains; inbound traffic lands on
  `virtualInbound` (15006), which picks a chain by destination port;
- **local-mesh outbound**: a local sidecar's client sends every request to its sidecar's port
  15001 and names the service in the Host header.
Filter chains are chosen Envoy's way: stage by stage (destination port, destination IP, server
name, transport protocol, application protocols, source IP, source port), keeping at each stage
the most specific chains that match, else those that do not constrain it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pilot.simulate.request import Request

Json = Mapping[str, Any]
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006


@dataclass(frozen=True)
class Entry:
    """The listener that took the connection, how it got there, and the chain that serves it."""

    listener: Json
    how: str  # direct | original-destination | virtual-outbound | virtual-inbound | local-outbound
    chain: Json | None
    chain_index: int | None  # None: the default filter chain (or none)
    destination_port: int


def _address(listener: Json) -> tuple[str, int]:
    sock = (listener.get("address") or {}).get("socketAddress") or {}
    return str(sock.get("address", "")), int(sock.get("portValue", 0))


def _binds(listener: Json) -> bool:
    return listener.get("bindToPort", True) is not False


def select_listener(listeners: Sequence[Json], request: Request) -> Entry | None:
    """The listener (and chain) that would take the request's connection; None: nothing listens."""
    dst_ip = request.destination_ip
    if request.inbound:
        virtual = _by_port(listeners, INBOUND_PORT, _binds)
        if virtual is not None:
            return _entry(virtual, "virtual-inbound", request, request.port)
    if dst_ip is not None:
        for lis in listeners:
            addr, port = _address(lis)
            bound_here = port == request.port and addr in (dst_ip, "0.0.0.0", "::")
            if bound_here and _binds(lis) and not lis.get("useOriginalDst"):
                return _entry(lis, "direct", request, port)
    virtual_out = next((lis for lis in listeners if lis.get("useOriginalDst")), None)
    if virtual_out is not None:
        for wanted in (dst_ip, "0.0.0.0"):
            for lis in listeners:
                if not _binds(lis) and _address(lis) == (wanted, request.port):
                    return _entry(lis, "original-destination", request, request.port)
        return _entry(virtual_out, "virtual-outbound", request, request.port)
    local = _by_port(listeners, OUTBOUND_PORT, _binds)
    if local is not None:
        return _entry(local, "local-outbound", request, OUTBOUND_PORT)
    return None


def _by_port(listeners: Iterable[Json], port: int, keep: Callable[[Json], bool]) -> Json | None:
    return next((lis for lis in listeners if _address(lis)[1] == port and keep(lis)), None)


def _entry(listener: Json, how: str, request: Request, port: int) -> Entry:
    chains = list(listener.get("filterChains", ()))
    peer_tls = request.source_principal is not None and how in ("direct", "virtual-inbound")
    index = select_chain(chains, request, port, peer_tls=peer_tls)
    if index is None:
        default = listener.get("defaultFilterChain")
        return Entry(listener, how, default, None, port)
    return Entry(listener, how, chains[index], index, port)


def select_chain(chains: Sequence[Json], request: Request, port: int, *, peer_tls: bool = False) -> int | None:
    """Index of the filter chain Envoy picks for the connection, or None (default chain).

    `peer_tls`: the connection comes from a mesh peer over mutual TLS (a client principal was
    given and the request arrives at a workload), with the ALPN a sidecar client offers.
    """
    candidates = list(range(len(chains)))
    tls = request.scheme == "https" or peer_tls
    server_name = request.host.lower() if request.scheme == "https" else ""
    alpn: tuple[str, ...] = ("istio-http/1.1", "istio", "istio-peer-exchange") if peer_tls else (
        () if tls else ("http/1.1",))
    stages: list[Callable[[Json], int | None]] = [
        lambda m: _exact(m.get("destinationPort"), port),
        lambda m: _cidr(m.get("prefixRanges"), request.destination_ip),
        lambda m: _server_name(m.get("serverNames"), server_name),
        lambda m: _exact(m.get("transportProtocol"), "tls" if tls else "raw_buffer"),
        lambda m: _one_of(m.get("applicationProtocols"), alpn),
        lambda m: _cidr(m.get("directSourcePrefixRanges"), request.source_ip),
        lambda m: _cidr(m.get("sourcePrefixRanges"), request.source_ip),
    ]
    for stage in stages:
        scored = [(i, stage(chains[i].get("filterChainMatch") or {})) for i in candidates]
        best = max((s for _, s in scored if s is not None and s > 0), default=None)
        keep = best if best is not None else 0
        candidates = [i for i, s in scored if s == keep]
        if not candidates:
            return None
    return candidates[0]


# Stage scores: None = the chain constrains this and the request does not match it;
# 0 = the chain does not constrain it; > 0 = a match, larger is more specific.

def _exact(want: Any, got: Any) -> int | None:
    if want in (None, "", 0):
        return 0
    return 1 if str(want) == str(got) else None


def _one_of(wants: Any, got: Sequence[str]) -> int | None:
    if not wants:
        return 0
    return 1 if any(g in wants for g in got) else None


def _cidr(ranges: Any, ip: str | None) -> int | None:
    if not ranges:
        return 0
    if ip is None:
        return None
    best = None
    for cidr in ranges:
        net = ipaddress.ip_network(f'{cidr.get("addressPrefix")}/{int(cidr.get("prefixLen", 0) or 0)}', strict=False)
        if ipaddress.ip_address(ip) in net:
            best = max(best or 0, net.prefixlen + 1)
    return best


def _server_name(names: Any, got: str) -> int | None:
    if not names:
        return 0
    if not got:
        return None
    if got in names:
        return 1000
    best = None
    for name in names:
        if name.startswith("*.") and got.endswith(name[1:]) and len(got) > len(name) - 1:
            best = max(best or 0, len(name))
    return best
