"""Listeners: the outbound HTTP listener (port 15001) and one listener per inbound port.

Local-mesh sidecars bind every listener on their own loopback address; proxies without a
bind address (Kubernetes style) bind on 0.0.0.0.
"""

from __future__ import annotations

from typing import Any

from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from pilot.translate import names
from pilot.translate.common import address, ads_config_source
from pilot.translate.passthrough import passthrough_filter
from pilot.translate.route_policies import route_http_filters
from pilot.translate.routes import inbound_route_config
from pilot.translate.scope import InboundPort


def router_filter() -> Any:
    flt = hcm_pb2.HttpFilter(name=names.ROUTER_FILTER)
    flt.typed_config.Pack(router_pb2.Router())
    return flt


def _listener(bind: str, port: int, network_filter: Any) -> Any:
    listener = listener_pb2.Listener(name=names.listener(bind, port), address=address(bind, port))
    listener.filter_chains.append(lc.FilterChain(filters=[network_filter]))
    return listener


def _hcm_filter(hcm: Any) -> Any:
    hcm.http_filters.append(router_filter())
    flt = lc.Filter(name=names.HCM_FILTER)
    flt.typed_config.Pack(hcm)
    return flt


def _outbound_listener(bind: str, passthrough: bool) -> Any:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="outbound")
    hcm.rds.route_config_name = names.OUTBOUND_ROUTE
    hcm.rds.config_source.CopyFrom(ads_config_source())
    hcm.http_filters.extend(route_http_filters())  # CORS and fault, before the router
    if passthrough:
        hcm.http_filters.append(passthrough_filter())  # resolves the Host for PassthroughCluster
    return _listener(bind, names.OUTBOUND_PORT, _hcm_filter(hcm))


def inbound_listener(bind: str, port: InboundPort) -> Any:
    stat_prefix = f"inbound_{port.port}"
    if port.http:
        hcm = hcm_pb2.HttpConnectionManager(
            stat_prefix=stat_prefix, route_config=inbound_route_config(port.port)
        )
        return _listener(bind, port.port, _hcm_filter(hcm))
    tcp = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=names.inbound_cluster(port.port))
    flt = lc.Filter(name=names.TCP_PROXY_FILTER)
    flt.typed_config.Pack(tcp)
    return _listener(bind, port.port, flt)


def sidecar_listeners_for(bind: str, inbound: tuple[InboundPort, ...], passthrough: bool) -> dict[str, Any]:
    """The outbound HTTP listener and one per inbound port: a function of these values only, so
    proxies with equal ones share the messages (see `pilot.translate.memo.carried_value`)."""
    listeners = [_outbound_listener(bind, passthrough), *(inbound_listener(bind, p) for p in inbound)]
    return {lis.name: lis for lis in listeners}
