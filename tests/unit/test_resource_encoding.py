"""A Resource's pre-encoded response entries are what protobuf itself makes of the message.

Responses are joined from these entries (`pilot.xds.wire`), so a wrong length prefix here would
reach every proxy as a response it cannot parse. Sizes cross the one-byte varint boundaries.
"""

from __future__ import annotations

import pytest
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from pilot.xds.resources import Resource, ResourceSet
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


@pytest.mark.parametrize("count", [1, 3, 7, 8, 40])
def test_a_sets_response_pieces_join_into_protobufs_encoding_and_small_sets_keep_no_copy(count: int) -> None:
    """A set's pieces, joined, are its resources in name order as protobuf encodes them, for SotW and
    delta. A small set hands over its resources' own bytes (nothing joined is kept: at mission scale
    a copy of each 0.57 MB route configuration per namespace); a large one joins once and keeps it."""
    messages = {f"r{i:02d}": route_pb2.RouteConfiguration(name=f"r{i:02d}", request_headers_to_remove=["h" * i])
                for i in reversed(range(count))}
    made = ResourceSet(ROUTE, [Resource.from_message(ROUTE, n, m) for n, m in messages.items()])
    packed = [any_pb2.Any(type_url=ROUTE, value=messages[n].SerializeToString(deterministic=True))
              for n in sorted(messages)]
    assert b"".join(made.sotw_pieces()) == discovery_pb2.DiscoveryResponse(resources=packed).SerializeToString(
        deterministic=True)
    delta = discovery_pb2.DeltaDiscoveryResponse(resources=[
        discovery_pb2.Resource(name=n, version=made.by_name[n].version, resource=p)
        for n, p in zip(sorted(messages), packed, strict=True)])
    assert b"".join(made.delta_pieces()) == delta.SerializeToString(deterministic=True)
    pieces = made.sotw_pieces()
    if count < 8:
        values = {id(r.value) for r in made.by_name.values()}
        assert values <= {id(p) for p in pieces}  # the resources' own bytes, not copies
        assert made.sotw_pieces() is not pieces
    else:
        assert len(pieces) == 1 and made.sotw_pieces()[0] is pieces[0]  # joined once, kept
