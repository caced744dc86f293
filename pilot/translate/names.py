"""Resource names and well-known ports: the contract between generators, Envoy and tooling.

Names follow Istio (`outbound|9080|v1|reviews.default.svc.cluster.local`) so istioctl-style
habits and dashboards read the same.
"""

from __future__ import annotations

from pilot.api.service_entry import is_ip

OUTBOUND_PORT = 15001
INBOUND_CAPTURE_PORT = 15006  # captured model: where iptables redirects inbound connections
OUTBOUND_ROUTE = "outbound"
WILDCARD_ADDRESS = "0.0.0.0"
APP_ADDRESS = "127.0.0.1"
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10
# Ports the sidecar itself uses; a workload port among them would clash with the sidecar.
RESERVED_PORTS = frozenset({15000, 15001, 15006, 15021, 15090})

# Istio's names in the captured-traffic model (`pilot.translate.captured`).
VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
PASSTHROUGH_FILTER_CHAIN = "PassthroughFilterChain"

# The Server header inbound listeners and gateways answer with (Istio's default proxy headers;
# a sidecar's outbound listener keeps Envoy's "envoy", as Istio's does).
SERVER_NAME = "istio-envoy"

HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
ROUTER_FILTER = "envoy.filters.http.router"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def outbound_cluster(port: int, subset: str, host: str) -> str:
    return f"outbound|{port}|{subset}|{host}"


def inbound_cluster(port: int) -> str:
    return f"inbound|{port}||"


def inbound_route(port: int) -> str:
    return f"inbound|{port}"


def listener(address: str, port: int) -> str:
    return f"{address}_{port}"


def virtual_host(host: str, port: int) -> str:
    return f"{host}:{port}"


def port_route(port: int) -> str:
    """Captured model: the route configuration of every HTTP service on ``port`` (Istio's "8080")."""
    return str(port)


def host_domains(host: str) -> list[str]:
    """A service host as a sidecar's virtual host domains: the host and its absolute form.

    Istio 1.27 on (`PILOT_ENABLE_ABSOLUTE_FQDN_VHOST_DOMAIN`, on by default) adds the host with
    a trailing dot, ``reviews.default.svc.cluster.local.``: a client that writes the absolute
    name (as DNS allows) gets the service's routes, not the catch-all. An IP address has no such
    form.
    """
    return [host] if is_ip(host) else [host, f"{host}."]
