"""A Resource's pre-encoded response entries are what protobuf itself makes of the message.

Responses are joined from these entries (`pilot.xds.wire`), so a wrong length prefix here would
reach every proxy as a response it cannot parse. Sizes cross the one-byte varint boundaries.
"""

from __future__ import annotations

import pytest
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from pilot.xds.resources import Resource
from pilot.xds.typeurls import ROUTE


@pytest.mark.parametrize("size", [0, 1, 100, 127, 128, 16_383, 16_384, 600_000])
def test_sotw_and_delta_entries_equal_protobufs_own_encoding(size: int) -> None:
    message = route_pb2.RouteConfiguration(name="outbound", request_headers_to_remove=["x" * size] if size else [])
    resource = Resource.from_message(ROUTE, "outbound", message)
    packed = any_pb2.Any(type_url=ROUTE, value=message.SerializeToString(deterministic=True))

    sotw = discovery_pb2.DiscoveryResponse(resources=[packed])
    assert resource.sotw_entry == sotw.SerializeToString(deterministic=True)
    assert resource.any_bytes == packed.SerializeToString(deterministic=True)

    delta = discovery_pb2.DeltaDiscoveryResponse(resources=[
        discovery_pb2.Resource(version=resource.version, resource=packed, name="outbound")])
    assert resource.delta_entry == delta.SerializeToString(deterministic=True)
    parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(resource.delta_entry).resources[0]
    assert route_pb2.RouteConfiguration.FromString(parsed.resource.value) == message
