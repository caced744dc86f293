"""Small Envoy message builders shared by the generators."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ep_pb2

UNIX_PREFIX = "unix://"


def address(host: str, port: int) -> Any:
    """A socket address, or a pipe for ``unix://`` paths."""
    if host.startswith(UNIX_PREFIX):
        return address_pb2.Address(pipe=address_pb2.Pipe(path=host[len(UNIX_PREFIX) :]))
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def ads_config_source() -> Any:
    """ "Ask the ADS stream you already have" (v3)."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def lb_endpoint(host: str, port: int, weight: int = 1) -> Any:
    endpoint = ep_pb2.LbEndpoint(endpoint=ep_pb2.Endpoint(address=address(host, port)))
    endpoint.load_balancing_weight.value = max(weight, 1)
    return endpoint


def sorted_by_name(messages: dict[str, Any]) -> dict[str, Any]:
    """Resources keyed by name in name order: deterministic output whatever the build order."""
    return dict(sorted(messages.items()))
