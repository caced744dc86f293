"""Per-route extras of an HTTP route: header edits, mirrors, and per-filter (fault, CORS) config.

Each function adds one Istio feature to an Envoy ``Route`` or ``RouteAction`` being built, so the
route builder in ``http_routes`` stays a list of steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc

from pilot.model import mesh as m
from pilot.translate.cors import CORS_FILTER, cors_config, cors_filter
from pilot.translate.faults import FAULT_FILTER, fault_config, fault_filter, fractional_percent

HVO = base_pb2.HeaderValueOption
ClusterOf = Callable[[m.RouteDestination], str]


def header_options(ops: m.HeaderOps) -> list[Any]:
    """``set`` overwrites (or adds), ``add`` appends; Istio's order: set first, then add."""
    out = [
        HVO(header=base_pb2.HeaderValue(key=k, value=v), append_action=HVO.OVERWRITE_IF_EXISTS_OR_ADD)
        for k, v in ops.set
    ]
    out += [
        HVO(header=base_pb2.HeaderValue(key=k, value=v), append_action=HVO.APPEND_IF_EXISTS_OR_ADD) for k, v in ops.add
    ]
    return out


def apply_headers(target: Any, rules: m.HeaderRules) -> None:
    """Header edits on a Route or a WeightedCluster.ClusterWeight (same field names)."""
    target.request_headers_to_add.extend(header_options(rules.request))
    target.request_headers_to_remove.extend(rules.request.remove)
    target.response_headers_to_add.extend(header_options(rules.response))
    target.response_headers_to_remove.extend(rules.response.remove)


def mirror_policies(mirrors: tuple[m.Mirror, ...], cluster_of: ClusterOf) -> list[Any]:
    out = []
    for mirror in mirrors:
        policy = rc.RouteAction.RequestMirrorPolicy(cluster=cluster_of(mirror.destination))
        policy.runtime_fraction.default_value.CopyFrom(fractional_percent(mirror.percent))
        out.append(policy)
    return out


def apply_filter_configs(route: Any, http: m.HttpRoute) -> None:
    """Fault and CORS settings ride on the route; their filters are always in the chain."""
    if http.fault is not None:
        route.typed_per_filter_config[FAULT_FILTER].Pack(fault_config(http.fault))
    if http.cors is not None:
        route.typed_per_filter_config[CORS_FILTER].Pack(cors_config(http.cors))


def route_http_filters() -> list[Any]:
    """HTTP filters every outbound (and gateway) chain needs before the router, in Istio's order."""
    return [cors_filter(), fault_filter()]
