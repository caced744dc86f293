"""What kind of change separates two mesh snapshots, for the pusher's EDS-only fast path.

`endpoints_only(old, new)` is True when the two meshes differ at most in where endpoints are
(addresses and weights of WorkloadEntries and inline endpoints): every input of clusters,
listeners and routes is unchanged, so proxies need new ClusterLoadAssignments and nothing else.
It errs on the side of False: any doubt means a full push.
"""

from __future__ import annotations

import dataclasses

from pilot.model.mesh import DNS_RESOLUTIONS, MeshSnapshot, Service


def endpoints_only(old: MeshSnapshot, new: MeshSnapshot) -> bool:
    """True if `new` differs from `old` only in endpoint addresses or weights."""
    if (old.cluster_domain, old.sidecars, old.destination_rules, old.virtual_services, old.scoping, old.security) != (
        new.cluster_domain, new.sidecars, new.destination_rules, new.virtual_services, new.scoping, new.security
    ):
        return False
    if (old.peer_authn, old.trust_domain) != (new.peer_authn, new.trust_domain):  # mutual TLS: listeners, clusters
        return False
    if old.workloads.keys() != new.workloads.keys() or old.services.keys() != new.services.keys():
        return False
    for key, was in old.workloads.items():
        now = new.workloads[key]
        if (was.labels, was.ports, was.service_account) != (now.labels, now.ports, now.service_account):
            return False
    return all(_same_but_endpoints(s, new.services[h]) for h, s in old.services.items())


def _same_but_endpoints(old: Service, new: Service) -> bool:
    if dataclasses.replace(old, endpoints=()) != dataclasses.replace(new, endpoints=()):
        return False
    if old.resolution in DNS_RESOLUTIONS:
        return old.endpoints == new.endpoints
    # Having endpoints at all decides a cluster's discovery type (EDS or original destination).
    return bool(old.endpoints) == bool(new.endpoints)
