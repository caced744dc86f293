"""Virtual hosts over VHDS: a sidecar's route configurations split into a base and virtual hosts.

Why: at mission scale a sidecar's outbound route configuration holds a virtual host per service
port, 1,000 of them, 0.57 MB; a VirtualService edit changes one, yet RDS can only resend the
whole configuration, to every proxy: 1.1 GB per route change for 2,000 proxies, which costs
grpcio (the replay baseline, no pilot logic) 0.4-0.6 s of CPU on the benchmark machine. With
VHDS a route configuration names a virtual host discovery source and the virtual hosts travel as
resources of their own (`envoy.config.route.v3.VirtualHost`), so a route change sends the
virtual hosts it changed: about 0.6 KB per proxy.

What Envoy does (verified against Envoy 1.40, `tests/e2e/test_vhds_envoy.py`, and from 1.37 on,
`tests/e2e/test_vhds_envoy_releases.py`): a route
configuration with `vhds: {config_source: {ads: {}}}` makes a delta ADS stream subscribe to
VirtualHost with no names (a wildcard); the server sends the virtual hosts it has, each named
`<route configuration>/<virtual host>`, and Envoy adds each to the configuration its name
begins with, next to the configuration's own `virtual_hosts` (here: the catch-all). The listener stays
warming until the first VHDS answer, so a proxy never routes with a configuration that lacks
its virtual hosts. A virtual host's `name` must be its resource name: Envoy removes virtual
hosts by that name. VHDS needs delta xDS, and over ADS an Envoy recent enough to accept an
`ads` config source for it (older ones reject "vhds: only 'DELTA_GRPC' is supported"), so only
classes marked `ProxyClass.vhds` get this form (`pilot.xds.server` decides); every other proxy
gets its route configurations whole, as before.

Cost: the split works on the encodings (`pilot.translate.encoded`): one pass over a
configuration's top-level fields, and a renamed copy of each virtual host, carried over from
the last mesh version while its bytes are equal, so unchanged virtual hosts stay the very same
objects (serialized and versioned once). Memoized per route part and mesh version: classes that
share a route part share its split.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from envoy.config.core.v3 import config_source_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2

from pilot.api.http_route import MAX_DIRECT_RESPONSE_BODY
from pilot.model.mesh import MeshSnapshot
from pilot.translate.encoded import Encoded
from pilot.translate.memo import carried_value, memoized_for
from pilot.xds.wire import fields, str_field

_VIRTUAL_HOSTS = 2  # RouteConfiguration.virtual_hosts
_NAME = 1  # VirtualHost.name
_DOMAINS = 2  # VirtualHost.domains

Split = tuple[Mapping[str, Any], Mapping[str, Any]]


def vhds_source() -> config_source_pb2.ConfigSource:
    """The VHDS config source: the ADS stream the proxy already has (delta)."""
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def vhds_parts(mesh: MeshSnapshot, routes: Mapping[str, Any]) -> Split:
    """`routes` (route configuration name -> configuration) as (the configurations naming VHDS,
    with no virtual host of their own but the catch-all; the other virtual hosts by resource
    name), both sorted by name. The same objects for the same `routes` object within a mesh
    version. Cost: O(virtual hosts) per new route part (a route change makes one per group of
    classes), a bytes lookup each; only changed virtual hosts are encoded again."""
    return memoized_for(mesh, "vhds", routes, lambda: _split(mesh, routes))


def _split(mesh: MeshSnapshot, routes: Mapping[str, Any]) -> Split:
    bases: dict[str, Any] = {}
    hosts: dict[str, Any] = {}
    for name, config in routes.items():
        data = config.SerializeToString(deterministic=True)
        rest = bytearray()
        for number, start, end, payload in fields(data):
            host = carried_value(mesh, _renamed, name, data[payload:end]) if number == _VIRTUAL_HOSTS else None
            if host is None or host.wildcard:
                rest += data[start:end]
            else:
                hosts[host.name] = host.encoded
        bases[name] = carried_value(mesh, _base, bytes(rest))
    return dict(sorted(bases.items())), dict(sorted(hosts.items()))


def _base(rest: bytes) -> Encoded:
    """A configuration's base: its fields but the virtual hosts VHDS takes (`rest`), naming VHDS.
    Carried across mesh versions by value, so an edit of virtual hosts leaves it the same object."""
    base = route_pb2.RouteConfiguration.FromString(rest)
    base.vhds.config_source.CopyFrom(vhds_source())
    # Envoy checks the merged configuration's bodies against the base's limit whenever either
    # changes, so a limit raised for one virtual host's body could not be lowered before that
    # virtual host is gone (the RDS update would be refused). The base keeps the highest limit
    # pilot's validation allows; no body above it is ever generated.
    base.max_direct_response_body_size_bytes.value = MAX_DIRECT_RESPONSE_BODY
    return Encoded(route_pb2.RouteConfiguration, base.SerializeToString(deterministic=True))


class _Host:
    """A virtual host as a VHDS resource: its resource name and its encoding under that name;
    `wildcard`: it matches any host (`*`), and stays in the base configuration instead."""

    __slots__ = ("encoded", "name", "wildcard")

    def __init__(self, name: str, encoded: Encoded, wildcard: bool) -> None:
        self.name = name
        self.encoded = encoded
        self.wildcard = wildcard


def _renamed(config: str, data: bytes) -> _Host:
    """The virtual host encoded in `data`, renamed `<config>/<its name>` (its VHDS resource name).

    Why a catch-all (`*`: ALLOW_ANY's passthrough, REGISTRY_ONLY's 502) stays in the base: Envoy
    allows one wildcard domain per configuration, and a mode switch renames it (allow_any ->
    block_all); over VHDS the new one would arrive while the old one is still held, and be refused.
    In the base, the configuration's own list replaces the old with the new at once."""
    own = ""
    wildcard = False
    kept = bytearray()
    for number, start, end, payload in fields(data):
        if number == _NAME:
            own = data[payload:end].decode()
            continue
        if number == _DOMAINS and data[payload:end] == b"*":
            wildcard = True
        kept += data[start:end]
    name = f"{config}/{own}"
    return _Host(name, Encoded(route_components_pb2.VirtualHost, str_field(_NAME, name) + bytes(kept)), wildcard)


def vhost_display_name(config: Mapping[str, Any], vhost: Mapping[str, Any]) -> str:
    """A virtual host's name as Istio shows it: a VHDS one's resource name without the
    `<route configuration>/` it carries (`reviews.default.svc.cluster.local:9080`)."""
    name = str(vhost.get("name", ""))
    prefix = f"{config.get('name', '')}/"
    return name[len(prefix):] if config.get("vhds") and name.startswith(prefix) else name


def merged_json(routes: Mapping[str, Mapping[str, Any]], vhosts: Iterable[Mapping[str, Any]]
                ) -> dict[str, dict[str, Any]]:
    """Route configurations (proto JSON, by name) with the VHDS virtual hosts (proto JSON) each
    receives added to its own, as Envoy merges them: a virtual host named `<configuration>/...`
    goes to that configuration, after its own. What Envoy's config dump shows; for tools that
    compare with it or route by it (`meshctl proxy-status`, `x simulate`)."""
    out = {name: dict(config) for name, config in routes.items()}
    for vhost in vhosts:
        config = out.get(str(vhost.get("name", "")).split("/", 1)[0])
        if config is not None and config.get("vhds"):
            key = "virtualHosts" if "virtualHosts" in config or "virtual_hosts" not in config else "virtual_hosts"
            config[key] = [*config.get(key, ()), {k: v for k, v in vhost.items() if k != "@type"}]  # not an Any
    return out
