"""What one change puts on the wire per proxy: the bytes the arithmetic next to a figure multiplies.

Why: where a change's bytes decide its latency and CPU (a 0.57 MB route configuration to 2,000
SotW proxies is 1.1 GB), the issue asks for the arithmetic next to the figure. The response is
exactly what the recording proxy was sent for the change (`Recording.changes`, which the replay
baseline sends every proxy). The ACK is rebuilt as the simulated Envoys and Envoy write it: a
SotW ACK repeats every name of the type it subscribes to (at mission scale an EDS ACK names
~3,000 clusters, ~148 KB, and 2,000 of them are read per endpoint change), a delta ACK carries
the type and the nonce alone.

Cost: decodes the recording's responses of the changed types once per run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from pilot.xds import typeurls

# The types a benchmark change answers with, and each one's resource name.
_NAMED = {
    typeurls.ENDPOINT: lambda raw: endpoint_pb2.ClusterLoadAssignment.FromString(raw).cluster_name,
    typeurls.ROUTE: lambda raw: route_pb2.RouteConfiguration.FromString(raw).name,
    typeurls.VIRTUAL_HOST: lambda raw: route_components_pb2.VirtualHost.FromString(raw).name,
}


@dataclass(frozen=True)
class ChangeWire:
    """Bytes per proxy for one change: the response it is sent and the ACK it sends back."""

    response: int
    ack: int


def _sotw_names(responses: Sequence[bytes], type_url: str) -> list[str]:
    """Every resource name of `type_url` in the proxy's SotW responses: what its ACKs repeat."""
    name_of = _NAMED.get(type_url)
    if name_of is None:
        return []
    names: dict[str, None] = {}
    for raw in responses:
        for any_ in discovery_pb2.DiscoveryResponse.FromString(raw).resources:
            names[name_of(any_.value)] = None
    return list(names)


def change_wire(initial: Mapping[str, Sequence[bytes]], changes: Mapping[str, bytes],
                delta: bool) -> dict[str, ChangeWire]:
    """Per change kind (route, endpoint): its response's size and its ACK's, per proxy.

    `initial`: the recording proxy's responses before the changes, by type URL; `changes`: its
    response to each change."""
    out = {}
    for kind, raw in changes.items():
        if delta:
            resp = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
            ack = discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        else:
            sotw = discovery_pb2.DiscoveryResponse.FromString(raw)
            names = _sotw_names([*initial.get(sotw.type_url, ()), raw], sotw.type_url)
            ack = discovery_pb2.DiscoveryRequest(type_url=sotw.type_url, version_info=sotw.version_info,
                                                 response_nonce=sotw.nonce, resource_names=names)
        out[kind] = ChangeWire(len(raw), ack.ByteSize())
    return out


def size(n: float) -> str:
    """Bytes in the unit that reads best: 148 KB, 1.14 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def arithmetic(clients: int, wire: ChangeWire) -> str:
    """The change's bytes for `clients` proxies, as the sum the figure next to it pays for."""
    return (f"{clients:,} x {size(wire.response)} = {size(clients * wire.response)} out, "
            f"{clients:,} ACKs x {size(wire.ack)} = {size(clients * wire.ack)} in")
