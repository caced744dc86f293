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

from pilot.model.authz import NO_SECURITY, WorkloadSecurity
from pilot.model.mtls import WorkloadMtls
from pilot.translate import names
from pilot.translate.common import address, ads_config_source
from pilot.translate.jwt import jwt_filter
from pilot.translate.mtls import secure_inbound
from pilot.translate.passthrough import passthrough_filter
from pilot.translate.rbac import http_rbac_filters, network_rbac_filters
from pilot.translate.route_policies import route_http_filters
from pilot.translate.routes import inbound_route_config
from pilot.translate.scope import InboundPort


def router_filter() -> Any:
    flt = hcm_pb2.HttpFilter(name=names.ROUTER_FILTER)
    flt.typed_config.Pack(router_pb2.Router())
    return flt


def _listener(bind: str, port: int, *network_filters: Any) -> Any:
    listener = listener_pb2.Listener(name=names.listener(bind, port), address=address(bind, port))
    listener.filter_chains.append(lc.FilterChain(filters=list(network_filters)))
    return listener


def _istio_hcm_defaults(hcm: Any) -> None:
    """What Istio sets on every HTTP connection manager (``buildHTTPConnectionManager``) where
    Envoy's own default differs: no stream idle timeout (Envoy's 5 min would cut quiet gRPC
    streams and long polls), paths normalised (RFC 3986, Istio's ``DEFAULT`` normalisation:
    ``/a/../b`` is routed and matched as ``/b``) with escaped slashes left as sent, and
    WebSocket upgrades allowed."""
    hcm.stream_idle_timeout.FromSeconds(0)
    hcm.normalize_path.value = True
    hcm.path_with_escaped_slashes_action = hcm_pb2.HttpConnectionManager.KEEP_UNCHANGED
    if not hcm.upgrade_configs:
        hcm.upgrade_configs.add(upgrade_type="websocket")


def hcm_filter(hcm: Any) -> Any:
    _istio_hcm_defaults(hcm)
    hcm.http_filters.append(router_filter())
    flt = lc.Filter(name=names.HCM_FILTER)
    flt.typed_config.Pack(hcm)
    return flt


# Who may steer the outbound listener with Envoy's request headers (x-envoy-upstream-rq-timeout-ms,
# x-envoy-max-retries, x-envoy-retry-on, ...): the app beside the sidecar. A local-mesh app
# reaches it over loopback; a Kubernetes-style proxy's outbound port only receives the pod's own
# traffic (iptables), from private addresses. Everyone else's such headers are removed.
LOOPBACK_RANGES = (("127.0.0.0", 8), ("::1", 128))
PRIVATE_RANGES = (("10.0.0.0", 8), ("172.16.0.0", 12), ("192.168.0.0", 16), ("fc00::", 7))


def trust_the_app(hcm: Any, bind: str) -> None:
    """Let the app override a route's timeout and retries per request, as Istio's concepts page
    describes. Envoy removes those headers unless the request is internal, and with
    ``use_remote_address`` unset a request without X-Forwarded-For never is, so (as Istio does
    with PILOT_SIDECAR_USE_REMOTE_ADDRESS) the HCM uses the sender's address, listed explicitly
    as internal: since Envoy 1.33 no address is internal unless configured. Cost: the upstream
    request carries X-Forwarded-For (the sender) and ``x-envoy-internal: true``."""
    hcm.use_remote_address.value = True
    ranges = LOOPBACK_RANGES + (PRIVATE_RANGES if bind == names.WILDCARD_ADDRESS else ())
    for prefix, length in ranges:
        hcm.internal_address_config.cidr_ranges.add(address_prefix=prefix).prefix_len.value = length


def _outbound_listener(bind: str, passthrough: bool) -> Any:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="outbound")
    trust_the_app(hcm, bind)
    hcm.rds.route_config_name = names.OUTBOUND_ROUTE
    hcm.rds.config_source.CopyFrom(ads_config_source())
    hcm.http_filters.extend(route_http_filters())  # CORS and fault, before the router
    if passthrough:
        hcm.http_filters.append(passthrough_filter())  # resolves the Host for PassthroughCluster
    return _listener(bind, names.OUTBOUND_PORT, hcm_filter(hcm))


def inbound_listener(bind: str, port: InboundPort, security: WorkloadSecurity = NO_SECURITY) -> Any:
    """One inbound port. `security` (the workload's policies) adds, as Istio orders them, the JWT
    filter and the RBAC filters before the router, or the RBAC network filters before tcp_proxy."""
    stat_prefix = f"inbound_{port.port}"
    if port.http:
        hcm = hcm_pb2.HttpConnectionManager(
            stat_prefix=stat_prefix, route_config=inbound_route_config(port.port, port.grpc),
            server_name=names.SERVER_NAME,
        )
        jwt = jwt_filter(security.jwt)
        hcm.http_filters.extend([*([jwt] if jwt is not None else []), *http_rbac_filters(security)])
        return _listener(bind, port.port, hcm_filter(hcm))
    tcp = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=names.inbound_cluster(port.port))
    flt = lc.Filter(name=names.TCP_PROXY_FILTER)
    flt.typed_config.Pack(tcp)
    return _listener(bind, port.port, *network_rbac_filters(security), flt)


def sidecar_listeners_for(
    bind: str, inbound: tuple[InboundPort, ...], passthrough: bool, security: WorkloadSecurity = NO_SECURITY,
    peer: WorkloadMtls | None = None,
) -> dict[str, Any]:
    """The outbound HTTP listener and one per inbound port: a function of these values only, so
    proxies with equal ones share the messages (see `pilot.translate.memo.carried_value`).
    `peer`: the proxy has mesh certificates; inbound ports take its PeerAuthentication modes."""
    listeners = [_outbound_listener(bind, passthrough), *(
        inbound_listener(bind, p, security) if peer is None else
        secure_inbound(inbound_listener(bind, p, security), p.http, peer.at(p.port)) for p in inbound)]
    return {lis.name: lis for lis in listeners}
