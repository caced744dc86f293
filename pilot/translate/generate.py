"""`generate(mesh, proxy)`: all xDS resources of one proxy class. Pure: same input, same output."""

from __future__ import annotations

from typing import Any

from pilot.model.mesh import MeshSnapshot
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import names
from pilot.translate.clusters import inbound_clusters, outbound_clusters
from pilot.translate.common import sorted_by_name
from pilot.translate.endpoints import load_assignments
from pilot.translate.listeners import sidecar_listeners
from pilot.translate.routes import outbound_route_config
from pilot.translate.scope import proxy_view
from pilot.translate.tcp_routes import outbound_l4_listeners
from pilot.xds import typeurls

Resources = dict[str, dict[str, Any]]  # type URL -> resource name -> xds-protos message


def generate(mesh: MeshSnapshot, proxy: ProxyClass) -> Resources:
    """Clusters, endpoints, listeners and routes for ``proxy``, each keyed and sorted by name.

    Routers (gateways) get clusters and endpoints only until Gateway translation lands.
    """
    clusters = outbound_clusters(mesh)
    listeners: dict[str, Any] = {}
    routes: dict[str, Any] = {}
    if proxy.kind == ProxyKind.SIDECAR:
        view = proxy_view(mesh, proxy)
        clusters.update(inbound_clusters(view))
        listeners = sidecar_listeners(view)
        listeners.update(outbound_l4_listeners(mesh, view))
        routes = {names.OUTBOUND_ROUTE: outbound_route_config(mesh, proxy.namespace, view.labels)}
    return {
        typeurls.CLUSTER: sorted_by_name(clusters),
        typeurls.ENDPOINT: sorted_by_name(load_assignments(mesh)),
        typeurls.LISTENER: sorted_by_name(listeners),
        typeurls.ROUTE: sorted_by_name(routes),
    }
