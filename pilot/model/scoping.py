"""What decides which proxy sees which config: exportTo, Sidecar egress scopes, Gateways.

`build_mesh` fills one `Scoping` per MeshSnapshot with every candidate (all VirtualServices
and all DestinationRules, merged per namespace and host, with their resolved ``exportTo``);
`pilot.translate.scope` then picks, per proxy, what Istio would: visible objects only, the
DestinationRule on the lookup path (proxy namespace, service namespace, root namespace), the
most specific VirtualService host. Frozen like the rest of the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Generic, TypeVar

from pilot.model.gateway import GatewayConfig
from pilot.model.hosts import EVERYWHERE, ROOT_NAMESPACE, host_matches

if TYPE_CHECKING:
    from pilot.model.mesh import DestinationPolicy, RoutingRule

T = TypeVar("T")
ALLOW_ANY = "ALLOW_ANY"
REGISTRY_ONLY = "REGISTRY_ONLY"


def _empty() -> Mapping[str, frozenset[str]]:
    return MappingProxyType({})


def _no_egress() -> Mapping[tuple[str, str], EgressScope]:
    return MappingProxyType({})


def _no_rules() -> Mapping[str, tuple[Exported[DestinationPolicy], ...]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Exported(Generic[T]):
    """A config object with the namespaces it is exported to (``*`` for all)."""

    value: T
    export_to: frozenset[str] = EVERYWHERE


@dataclass(frozen=True, slots=True)
class EgressScope:
    """The outbound part of a Sidecar resource: ``hosts`` None means no egress section (see all)."""

    hosts: tuple[tuple[str, str], ...] | None = None  # (namespace, dnsName); "." already resolved
    outbound_policy: str | None = None  # None: the mesh default, ALLOW_ANY


@dataclass(frozen=True, slots=True)
class Scoping:
    root_namespace: str = ROOT_NAMESPACE
    service_exports: Mapping[str, frozenset[str]] = field(default_factory=_empty)  # host -> exportTo
    routing_rules: tuple[Exported[RoutingRule], ...] = ()  # every VirtualService, oldest first
    destination_rules: tuple[Exported[DestinationPolicy], ...] = ()  # merged per (namespace, host)
    gateways: tuple[GatewayConfig, ...] = ()  # oldest first
    egress: Mapping[tuple[str, str], EgressScope] = field(default_factory=_no_egress)  # Sidecar (ns, name)
    # Indexes of destination_rules, filled by __post_init__: exact hosts, and the wildcard rules.
    rules_by_host: Mapping[str, tuple[Exported[DestinationPolicy], ...]] = field(default_factory=_no_rules)
    wildcard_rules: tuple[Exported[DestinationPolicy], ...] = ()
    # The destination_rules the two indexes were made from. `dataclasses.replace` hands a copy the
    # indexes of its original, and they stand while the rules are that very tuple: a routing edit
    # (`pilot.model.route_patches`) and the route diff copy scoping without indexing 1,000 rules again.
    indexed_from: tuple[Exported[DestinationPolicy], ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.indexed_from is self.destination_rules:
            return
        by_host: dict[str, list[Exported[DestinationPolicy]]] = {}
        for rule in self.destination_rules:
            if not rule.value.host.startswith("*"):
                by_host.setdefault(rule.value.host, []).append(rule)
        object.__setattr__(self, "rules_by_host", MappingProxyType({h: tuple(r) for h, r in by_host.items()}))
        wild = tuple(r for r in self.destination_rules if r.value.host.startswith("*"))
        object.__setattr__(self, "wildcard_rules", wild)
        object.__setattr__(self, "indexed_from", self.destination_rules)

    def service_export(self, host: str) -> frozenset[str]:
        return self.service_exports.get(host, EVERYWHERE)

    def destination_rules_for_host(self, host: str) -> list[Exported[DestinationPolicy]]:
        """Rules whose host is ``host`` or a wildcard matching it, oldest first (indexed, not scanned)."""
        exact = self.rules_by_host.get(host, ())
        wild = [r for r in self.wildcard_rules if host_matches(r.value.host, host)]
        return sorted((*exact, *wild), key=self.destination_rules.index) if wild else list(exact)
