"""What an edit of a few VirtualServices patches in `build_mesh` instead of running again.

Why: a route change (new weights, another retry policy) replaces one VirtualService object among
~1,000, and three passes of the build still walked all of them: delegation, the sidecar routing
table and scoping (about 11 of a mission-scale route change's 16 ms build, all of it CPU that
the change pays before any proxy is written to). When every edited object keeps its place in
precedence order and what decides who routes which host (namespace, name, hosts, gateways,
exportTo), each pass's last result is patched at those positions instead: identity checks over
the inputs (in C), plus converting the edited objects. Anything else (an object added, removed,
renamed, re-hosted or moved in the order, a delegate or a root using one, a route bound to a
Gateway) runs the pass in full, as before. The result is the same either way: tests build both
ways and compare.

Bounded like the build's other patched stages: patching only adds conversions to a stage's own
memo, so past twice its inputs the pass runs in full and starts a new memo generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from itertools import chain
from typing import Any

from pilot.api import VirtualService
from pilot.model import convert_routes
from pilot.model import mesh as m
from pilot.model.build_scoping import ScopeInputs
from pilot.model.conversions import Conversions, changed_positions, same_objects
from pilot.model.hosts import MESH_GATEWAY, export_set
from pilot.model.scoping import Exported, Scoping

DELEGATES, ROUTING, SCOPING = "delegates", "routing", "scoping"
Warnings = tuple[str, ...]


def keeps_place(old: VirtualService, new: VirtualService) -> bool:
    """Whether `new` replaces `old` without changing which hosts it routes, for whom, or its name."""
    a, b = old.metadata, new.metadata
    s, t = old.spec, new.spec
    return (a.namespace == b.namespace and a.name == b.name and s.hosts == t.hosts
            and s.gateways == t.gateways and s.export_to == t.export_to)


def delegating(vs: VirtualService) -> bool:
    """A delegate (no hosts), or a root with a route naming one."""
    return vs.spec.is_delegate or any(route.delegate is not None for route in vs.spec.http)


def for_sidecars(vs: VirtualService) -> bool:
    """Whether a VirtualService applies to sidecars (no gateways, or `mesh` among them)."""
    return not vs.spec.gateways or MESH_GATEWAY in vs.spec.gateways


def _mesh_only(vs: VirtualService) -> bool:
    return all(g == MESH_GATEWAY for g in vs.spec.gateways)


def delegates_stage(memo: Conversions, routes: tuple[VirtualService, ...],
                    full: Callable[[Conversions], tuple[list[VirtualService], Warnings]],
                    ) -> tuple[list[VirtualService], Warnings]:
    """Delegation resolved (`pilot.model.delegates`): the routes as they are when the last pass found
    no delegation at all and the edited objects bring none."""
    last = memo.stage_last(DELEGATES)
    if last is not None:
        sub, before, (resolved, warnings) = last
        changed = changed_positions(before, routes)
        if (changed and not warnings and same_objects(resolved, before)
                and not any(delegating(before[i]) or delegating(routes[i]) for i in changed)):
            result: tuple[list[VirtualService], Warnings] = (list(routes), ())
            memo.stage_store(DELEGATES, sub, routes, (), result)
            return result
    return memo.stage(DELEGATES, routes, (), full)


def routing_stage(memo: Conversions, services: tuple[VirtualService, ...], cluster_domain: str,
                  full: Callable[[Conversions], tuple[dict[str, m.RoutingRule], Warnings]],
                  ) -> tuple[dict[str, m.RoutingRule], Warnings]:
    """The sidecar routing table (host -> rule, the oldest rule first): the edited rules take the
    hosts their earlier versions held."""
    args = (cluster_domain,)
    last = memo.stage_last(ROUTING)
    if last is not None and memo.stage_args(ROUTING) == args:
        sub, before, (found, warnings) = last
        changed = changed_positions(before, services)
        if changed and sub.has_room(len(services)) and all(keeps_place(before[i], services[i]) for i in changed):
            patched = dict(found)
            for i in changed:
                vs = services[i]
                if not for_sidecars(vs):
                    continue  # gateway-only, before and after: not in the table
                rule = sub.of(convert_routes.routing_rule, vs, cluster_domain)
                for host in rule.hosts:
                    held = patched.get(host)
                    if held is not None and held.namespace == rule.namespace and held.name == rule.name:
                        patched[host] = rule
            memo.stage_store(ROUTING, sub, services, args, (patched, warnings))
            return patched, warnings
    return memo.stage(ROUTING, services, args, full)


def scoping_stage(memo: Conversions, inputs: ScopeInputs, cluster_domain: str, root_namespace: str,
                  full: Callable[[Conversions], tuple[Scoping, Warnings]]) -> tuple[Scoping, Warnings]:
    """Scoping (`pilot.model.build_scoping`) of `inputs`. When only mesh-bound VirtualServices
    changed, in place: their rules replaced, the rest (DestinationRule indexes included) and the
    warnings kept, since what the warnings read of a rule kept its place."""
    groups = (inputs.service_entries, inputs.destination_rules, inputs.virtual_services, inputs.gateways,
              inputs.sidecars)
    objs: tuple[Any, ...] = tuple(chain.from_iterable(groups))
    args = (cluster_domain, root_namespace, tuple(map(len, groups)))
    last = memo.stage_last(SCOPING)
    if last is not None and memo.stage_args(SCOPING) == args:
        sub, before, (scoping, warnings) = last
        changed = changed_positions(before, objs)
        start = len(groups[0]) + len(groups[1])
        end = start + len(groups[2])
        if (changed and sub.has_room(len(objs)) and all(start <= i < end for i in changed)
                and all(keeps_place(before[i], objs[i]) and _mesh_only(objs[i]) for i in changed)):
            rules = list(scoping.routing_rules)
            for i in changed:
                vs = objs[i]
                rules[i - start] = Exported(sub.of(convert_routes.routing_rule, vs, cluster_domain),
                                            export_set(vs.spec.export_to, vs.metadata.namespace))
            patched = dataclasses.replace(scoping, routing_rules=tuple(rules))
            memo.stage_store(SCOPING, sub, objs, args, (patched, warnings))
            return patched, warnings
    return memo.stage(SCOPING, objs, args, full)
