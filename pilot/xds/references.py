"""Names that resources of one type refer to in another type (EDS from CDS, RDS from LDS)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from pilot.xds import typeurls

_HCM = hcm_pb2.HttpConnectionManager
_CLUSTER_TYPE = typeurls.CLUSTER
_LISTENER_TYPE = typeurls.LISTENER


def cluster_eds_name(cluster: Any) -> str | None:
    """The ClusterLoadAssignment name an EDS cluster waits for; None for other discovery types."""
    if not cluster.HasField("type") or cluster.type != cluster_pb2.Cluster.EDS:
        return None
    return str(cluster.eds_cluster_config.service_name or cluster.name)


def listener_route_names(listener: Any) -> Iterator[str]:
    """RDS names used by the HTTP connection managers of a listener's filter chains."""
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for flt in chain.filters:
            if not flt.typed_config.Is(_HCM.DESCRIPTOR):
                continue
            hcm = _HCM()
            flt.typed_config.Unpack(hcm)
            if hcm.HasField("rds"):
                yield str(hcm.rds.route_config_name)


def references_of(type_url: str, message: Any) -> tuple[str, ...]:
    """Names a resource makes a proxy ask for in the dependent type (CDS -> EDS, LDS -> RDS).

    A resource the generators handed over as its encoding (`pilot.translate.encoded.Encoded`,
    which has no fields to read) is parsed here, once per object: a few microseconds a cluster."""
    if type_url not in (_CLUSTER_TYPE, _LISTENER_TYPE):
        return ()
    if not hasattr(message, "ListFields"):
        message = message.message()
    if type_url == _CLUSTER_TYPE:
        name = cluster_eds_name(message)
        return (name,) if name else ()
    if type_url == _LISTENER_TYPE:
        return tuple(listener_route_names(message))
    return ()
