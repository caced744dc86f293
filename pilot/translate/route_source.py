"""Which proxy a route config is for, as far as VirtualService matches care.

``sourceLabels``, ``sourceNamespace`` and ``gateways`` in a match select *senders*, so a route
config that honours them is specific to its proxy class: sidecars pass their own labels and
namespace with the gateway ``mesh``; gateway proxies pass their Gateway names instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pilot.model import mesh as m

MESH = "mesh"


@dataclass(frozen=True, slots=True)
class RouteSource:
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    gateways: frozenset[str] = frozenset({MESH})  # qualified: "mesh" or "namespace/name"

    def accepts(
        self,
        rule_gateways: tuple[str, ...],
        match_gateways: tuple[str, ...],
        source_labels: tuple[tuple[str, str], ...],
        source_namespace: str | None,
    ) -> bool:
        """Istio: match gateways override the rule's; labels and namespace must also fit."""
        gateways = match_gateways or rule_gateways or (MESH,)
        if not self.gateways.intersection(gateways):
            return False
        if source_namespace and source_namespace != self.namespace:
            return False
        return all(self.labels.get(k) == v for k, v in source_labels)

    def accepts_http(self, rule: m.RoutingRule, match: m.RouteMatch) -> bool:
        return self.accepts(rule.gateways, match.gateways, match.source_labels, match.source_namespace)

    def accepts_l4(self, rule: m.RoutingRule, match: m.L4Match) -> bool:
        return self.accepts(rule.gateways, match.gateways, match.source_labels, match.source_namespace)
