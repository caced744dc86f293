"""Conversions from Istio API shapes to mesh model values (one object at a time, pure).

VirtualService conversions live in `pilot.model.convert_routes`.
"""

from __future__ import annotations

from pilot.api import destination_rule as dr
from pilot.model import mesh as m
from pilot.model.convert_policy import port_policies, traffic_policy


def qualify(host: str, namespace: str, cluster_domain: str) -> str:
    """Istio's short-name rule: ``reviews`` in ``default`` is ``reviews.default.svc.<domain>``.

    Names with a dot, wildcards and ``*`` are already fully qualified.
    """
    if "." in host or host.startswith("*"):
        return host
    return f"{host}.{namespace}.svc.{cluster_domain}"


def destination_policy(rule: dr.DestinationRule, host: str) -> m.DestinationPolicy:
    subsets = {
        s.name: m.Subset(
            name=s.name,
            labels=m.frozen_map(s.labels),
            policy=traffic_policy(s.traffic_policy),
            port_policies=m.frozen_map(port_policies(s.traffic_policy)),
        )
        for s in rule.spec.subsets
    }
    return m.DestinationPolicy(
        host=host,
        namespace=rule.metadata.namespace,
        name=rule.metadata.name,
        policy=traffic_policy(rule.spec.traffic_policy),
        port_policies=m.frozen_map(port_policies(rule.spec.traffic_policy)),
        subsets=m.frozen_map(subsets),
        selector=m.frozen_map(selector.match_labels) if (selector := rule.spec.workload_selector) else None,
    )
