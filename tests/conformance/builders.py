"""Tiny hand-built xDS resources for protocol tests (translation has its own golden tests)."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from pilot.xds import typeurls
from pilot.xds.snapshot import Snapshot


def cluster(name: str, connect_timeout: int = 1) -> Any:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.seconds = connect_timeout
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.eds_cluster_config.eds_config.resource_api_version = config_source_pb2.V3
    return c


def endpoints(name: str, *ports: int) -> Any:
    eps = [
        endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.2", port_value=p))))
        for p in ports
    ]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=eps)])


def listener(name: str, port: int, route_name: str) -> Any:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name)
    hcm.rds.route_config_name = route_name
    hcm.rds.config_source.ads.SetInParent()
    hcm.rds.config_source.resource_api_version = config_source_pb2.V3
    hcm.http_filters.add(name="envoy.filters.http.router").typed_config.Pack(router_pb2.Router())
    flt = listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager")
    flt.typed_config.Pack(hcm)
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.2", port_value=port)),
        filter_chains=[listener_components_pb2.FilterChain(filters=[flt])],
    )


def route(name: str, cluster_name: str) -> Any:
    r = route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"))
    r.route.cluster = cluster_name
    vh = route_components_pb2.VirtualHost(name="all", domains=["*"], routes=[r])
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vh])


def snapshot(
    clusters: dict[str, int], routes: dict[str, str] | None = None, timeouts: dict[str, int] | None = None
) -> Snapshot:
    """Clusters with one endpoint each (name -> port), and listeners/routes (route name -> cluster).

    `timeouts` changes a cluster's connect timeout: a cluster change that leaves its endpoints alone.
    """
    routes = routes if routes is not None else {"r1": next(iter(clusters), "")}
    timeouts = timeouts or {}
    res: dict[str, dict[str, Any]] = {
        typeurls.CLUSTER: {n: cluster(n, timeouts.get(n, 1)) for n in clusters},
        typeurls.ENDPOINT: {n: endpoints(n, p) for n, p in clusters.items()},
        typeurls.LISTENER: {f"l_{r}": listener(f"l_{r}", 10000 + i, r) for i, r in enumerate(sorted(routes))},
        typeurls.ROUTE: {r: route(r, c) for r, c in routes.items()},
    }
    return Snapshot.from_resources(res)
