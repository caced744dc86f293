"""ALLOW_ANY on the local mesh: a request for a host the registry does not know goes to that host.

Istio's default outbound policy sends unknown traffic to its original destination (iptables
capture tells the sidecar where the app meant to go). A local-mesh app talks to its sidecar
explicitly, so the only hint is the request's Host: the sidecar resolves it with DNS and
forwards there (Envoy's dynamic forward proxy), under Istio's cluster name PassthroughCluster.
Kubernetes-style proxies (no bind address) are left for original-destination passthrough.
"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.clusters.dynamic_forward_proxy.v3 import cluster_pb2 as dfp_cluster_pb2
from envoy.extensions.common.dynamic_forward_proxy.v3 import dns_cache_pb2
from envoy.extensions.filters.http.dynamic_forward_proxy.v3 import dynamic_forward_proxy_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from pilot.model.scoping import REGISTRY_ONLY
from pilot.translate import names
from pilot.translate.scope import ProxyView

PASSTHROUGH_CLUSTER = "PassthroughCluster"
ALLOW_ANY_VHOST = "allow_any"
DFP_FILTER = "envoy.filters.http.dynamic_forward_proxy"
_DNS_CACHE = "passthrough"  # the filter and the cluster must name the same cache


def allow_any(view: ProxyView) -> bool:
    """A local-mesh sidecar whose outbound policy (its Sidecar's, else Istio's default) is ALLOW_ANY."""
    local = view.bind_address != names.WILDCARD_ADDRESS
    return local and (view.egress is None or view.egress.outbound_policy != REGISTRY_ONLY)


def _dns_cache() -> dns_cache_pb2.DnsCacheConfig:
    # IPv4 first: local-mesh apps listen on 127.0.0.x, and "localhost" may resolve to ::1 first.
    return dns_cache_pb2.DnsCacheConfig(name=_DNS_CACHE, dns_lookup_family=cluster_pb2.Cluster.V4_PREFERRED)


def passthrough_cluster() -> Any:
    cluster = cluster_pb2.Cluster(name=PASSTHROUGH_CLUSTER, lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)
    cluster.cluster_type.name = "envoy.clusters.dynamic_forward_proxy"
    cluster.cluster_type.typed_config.Pack(dfp_cluster_pb2.ClusterConfig(dns_cache_config=_dns_cache()))
    cluster.connect_timeout.FromSeconds(names.DEFAULT_CONNECT_TIMEOUT_SECONDS)
    return cluster


def passthrough_filter() -> Any:
    """The HTTP filter that resolves the Host; it does nothing on routes to other clusters."""
    flt = hcm_pb2.HttpFilter(name=DFP_FILTER)
    flt.typed_config.Pack(dynamic_forward_proxy_pb2.FilterConfig(dns_cache_config=_dns_cache()))
    return flt


def passthrough_vhost() -> Any:
    """Last resort of the outbound route config: any other host, as Istio's passthrough: no
    timeout, a gRPC caller's ``grpc-timeout`` header honoured without a cap, and the attempt
    count sent upstream (``x-envoy-attempt-count``, Istio's default proxy headers)."""
    route = rc.Route(name=ALLOW_ANY_VHOST, match=rc.RouteMatch(prefix="/"))
    route.route.cluster = PASSTHROUGH_CLUSTER
    route.route.timeout.FromSeconds(0)
    route.route.max_grpc_timeout.FromSeconds(0)
    return rc.VirtualHost(name=ALLOW_ANY_VHOST, domains=["*"], routes=[route], include_request_attempt_count=True)
