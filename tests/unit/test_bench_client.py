"""The load benchmark's simulated Envoy (`benchmarks.client`): what it asks for and what it caches."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from benchmarks.client import NameCache, SimClient, response_key
from pilot.testing.ads_client import make_node
from pilot.xds.typeurls import CLUSTER, ENDPOINT

CLUSTERS = 20  # over the client's "few resources" threshold, so the response goes through the cache


def _cluster(i: int) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=f"outbound|80||svc-{i:03d}.bench.svc.cluster.local",
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource())))


def _cds(version: str, nonce: str, clusters: list[cluster_pb2.Cluster]) -> bytes:
    resources = []
    for c in clusters:
        packed = any_pb2.Any()
        packed.Pack(c)
        resources.append(discovery_pb2.Resource(name=c.name, version=f"{c.name}-1", resource=packed))
    response = discovery_pb2.DeltaDiscoveryResponse(system_version_info=version, resources=resources,
                                                    type_url=CLUSTER, nonce=nonce)
    return bytes(response.SerializeToString())


def test_response_key_ignores_version_and_nonce_but_not_resources() -> None:
    clusters = [_cluster(i) for i in range(CLUSTERS)]
    first, again = _cds("v1", "n1", clusters), _cds("v22", "n-second", clusters)
    assert first != again
    assert response_key(first, "v1", "n1") == response_key(again, "v22", "n-second")
    changed = _cds("v1", "n1", [*clusters[:-1], _cluster(999)])
    assert response_key(changed, "v1", "n1") != response_key(first, "v1", "n1")


def test_clients_decode_a_response_they_share_once_and_subscribe_to_every_eds_name() -> None:
    """Two clients of one worker getting the same clusters (other version, other nonce) share one
    decoded result, and each asks for the clusters' endpoints, sorted, in one subscribe request."""
    names = NameCache()
    clients = [SimClient(make_node(f"sidecar~10.0.0.{i}~a.bench~bench.svc.cluster.local"), True, names)
               for i in (1, 2)]
    clusters = [_cluster(i) for i in range(CLUSTERS)]
    raws = [_cds("v1", "n1", clusters), _cds("v2", "n2", clusters)]
    decoded = []
    for client, raw in zip(clients, raws, strict=True):
        type_url, requests = client._delta_response(raw)
        assert type_url == CLUSTER
        ack, subscribe = requests
        assert ack.type_url == CLUSTER and ack.response_nonce in ("n1", "n2")
        assert subscribe.type_url == ENDPOINT
        assert list(subscribe.resource_names_subscribe) == sorted(c.name for c in clusters)
        assert client.types[ENDPOINT].subscribed == {c.name for c in clusters}
        decoded.append(names.response(discovery_pb2.DeltaDiscoveryResponse.FromString(raw), True, raw))
    assert decoded[0] is decoded[1]
    # A later response removing one cluster unsubscribes its endpoints only.
    removal = discovery_pb2.DeltaDiscoveryResponse(system_version_info="v3", type_url=CLUSTER, nonce="n3",
                                                   removed_resources=[clusters[0].name])
    _, requests = clients[0]._delta_response(removal.SerializeToString())
    assert [list(r.resource_names_unsubscribe) for r in requests[1:]] == [[clusters[0].name]]
    assert not requests[1].resource_names_subscribe
