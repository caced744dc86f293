"""One service's traffic rules for `describe`: DestinationRules, VirtualServices, Gateways, client TLS.

Every candidate rule is listed, not only the one a given client proxy picks: a rule exported
elsewhere or bound to a gateway still explains traffic. The DestinationRule marked ``in_force`` is
the one clients in the service's own namespace get (`destination_rule_for`, Istio's lookup path).
Warnings name the rule and what goes wrong. Pure; cost: linear in the rules touching the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pilot.describe import words
from pilot.describe.instances import Instance
from pilot.describe.model import DestinationRuleInfo, GatewayInfo, RouteInfo, SubsetInfo, VirtualServiceInfo
from pilot.model.hosts import MESH_GATEWAY, host_matches, visible_to
from pilot.model.mesh import DestinationPolicy, MeshSnapshot, RouteDestination, RoutingRule, Service, selects
from pilot.model.scoping import Exported
from pilot.translate.visibility import destination_rule_for, routes_by_host, visible_rules


@dataclass
class ServiceRules:
    """What `service_rules` found, and the warnings it raised on the way."""

    destination_rules: list[DestinationRuleInfo] = field(default_factory=list)
    virtual_services: list[VirtualServiceInfo] = field(default_factory=list)
    gateways: list[GatewayInfo] = field(default_factory=list)
    client_tls: list[str] = field(default_factory=list)
    client_modes: dict[int, str] = field(default_factory=dict)  # port -> the DestinationRule's TLS mode, if set
    warnings: list[str] = field(default_factory=list)


def service_rules(mesh: MeshSnapshot, service: Service, members: list[Instance],
                  target: Mapping[str, str] | None, target_sidecar: bool = True) -> ServiceRules:
    """The rules of `service`; `target` is the described workload's labels (None for a service)."""
    out = ServiceRules()
    candidates = mesh.scoping.destination_rules_for_host(service.host)
    in_force = destination_rule_for(mesh, service.namespace, service)
    subsets: dict[str, Mapping[str, str]] = {}
    for c in candidates:
        for name, subset in c.value.subsets.items():
            subsets.setdefault(name, subset.labels)
    if in_force is not None:
        subsets.update({n: s.labels for n, s in in_force.subsets.items()})
    for c in candidates:
        out.destination_rules.append(_destination_rule(c, in_force, members, target, out.warnings, service))
    winner = routes_by_host([r.value for r in visible_rules(mesh, service.namespace)],
                            {service.host: service}).get(service.host)
    for rule in mesh.scoping.routing_rules:
        if _touches(rule.value, service.host):
            info = _virtual_service(rule, service, subsets, target, out.warnings)
            out.virtual_services.append(_in_force(info, rule, winner, service, out.warnings))
            out.gateways += _gateways(mesh, rule.value, service, out.warnings)
    out.client_tls = _client_tls(service, in_force, members, target_sidecar, target is not None, out.client_modes)
    return out


def _destination_rule(c: Exported[DestinationPolicy], in_force: DestinationPolicy | None, members: list[Instance],
                      target: Mapping[str, str] | None, warnings: list[str], service: Service) -> DestinationRuleInfo:
    dr = c.value
    ref = f"DestinationRule {dr.namespace}/{dr.name}"
    subsets = []
    for name, s in dr.subsets.items():
        picked = tuple(m.name for m in members if selects(s.labels, m.labels))
        if members and not picked:
            warnings.append(f"subset {name} of {ref} selects no instance of {service.host} "
                            f"(labels {', '.join(words.labels(s.labels))}): traffic routed to it fails")
        subsets.append(SubsetInfo(name, words.labels(s.labels), None if target is None else selects(s.labels, target),
                                  picked, words.traffic_policy(s.policy)))
    ports = tuple(f"port {p}: {'; '.join(words.traffic_policy(pol)) or 'defaults'}"
                  for p, pol in dr.port_policies.items())
    return DestinationRuleInfo(
        dr.namespace, dr.name, dr.host, tuple(sorted(c.export_to)),
        None if dr.selector is None else words.labels(dr.selector),
        in_force is not None and (in_force.namespace, in_force.name) == (dr.namespace, dr.name),
        words.traffic_policy(dr.policy), ports, tuple(subsets))


def _touches(rule: RoutingRule, host: str) -> bool:
    return any(host_matches(h, host) for h in rule.hosts) or any(d.host == host for d in _all_destinations(rule))


def _all_destinations(rule: RoutingRule) -> Iterable[RouteDestination]:
    for route in rule.http:
        yield from route.destinations
        yield from (m.destination for m in route.mirrors)
    for l4 in (*rule.tcp, *rule.tls):
        yield from l4.destinations


def _virtual_service(rule: Exported[RoutingRule], service: Service, subsets: Mapping[str, Mapping[str, str]],
                     target: Mapping[str, str] | None, warnings: list[str]) -> VirtualServiceInfo:
    vs = rule.value
    ref = f"VirtualService {vs.namespace}/{vs.name}"
    routes: list[RouteInfo] = []
    for i, http in enumerate(vs.http):
        match = " OR ".join(words.route_match(m) for m in http.matches) or "every request"
        routes.append(RouteInfo("http", i, http.name, match, words.destinations(http.destinations),
                                words.http_details(http), _reaches(http.destinations, service, subsets, target)))
    for kind, l4s in (("tcp", vs.tcp), ("tls", vs.tls)):
        for i, l4 in enumerate(l4s):
            match = " OR ".join(words.l4_match(m) for m in l4.matches) or "every connection"
            routes.append(RouteInfo(kind, i, "", match, words.destinations(l4.destinations), (),
                                    _reaches(l4.destinations, service, subsets, target)))
    for d in {d for d in _all_destinations(vs) if d.host == service.host and d.subset and d.subset not in subsets}:
        warnings.append(f"{ref} routes to subset {d.subset} of {service.host}, which no DestinationRule defines: "
                        "those requests fail with 503 (no healthy upstream)")
    sent = [r for r in routes if r.reaches_target is not None]
    if target is not None and sent and not any(r.reaches_target for r in sent):
        names = sorted({d.subset for d in _all_destinations(vs) if d.host == service.host and d.subset and d.weight})
        warnings.append(f"receives no traffic from {ref}: its routes to {service.host} go only to subset"
                        f"{'s' if len(names) > 1 else ''} {', '.join(names)}, which this workload is not in")
    return VirtualServiceInfo(vs.namespace, vs.name, vs.hosts, vs.gateways, tuple(sorted(rule.export_to)),
                              tuple(routes))


def _in_force(info: VirtualServiceInfo, rule: Exported[RoutingRule], winner: RoutingRule | None, service: Service,
              warnings: list[str]) -> VirtualServiceInfo:
    """Mark whether the rule routes the host for sidecars of the service's namespace, and warn when a
    rule for the host is shadowed by an older one, or sends the host's requests elsewhere."""
    vs = rule.value
    if not any(host_matches(h, service.host) for h in vs.hosts) or MESH_GATEWAY not in vs.gateways:
        return info
    ref = f"VirtualService {vs.namespace}/{vs.name}"
    used = winner is not None and (winner.namespace, winner.name) == (vs.namespace, vs.name)
    if not used and winner is not None and visible_to(rule.export_to, service.namespace):
        warnings.append(f"{ref} is not used for {service.host} by sidecars in namespace {service.namespace}: "
                        f"VirtualService {winner.namespace}/{winner.name} (older or more specific) routes that host")
    if used and not any(r.reaches_target is not None for r in info.routes):
        warnings.append(f"{ref} routes requests for {service.host} to other hosts: this service receives none "
                        "of them")
    return dataclasses.replace(info, in_force=used)


def _reaches(dests: Iterable[RouteDestination], service: Service, subsets: Mapping[str, Mapping[str, str]],
             target: Mapping[str, str] | None) -> bool | None:
    """None: nothing goes to `service`; else whether some of it can land on `target` (any, for a service)."""
    mine = [d for d in dests if d.host == service.host and d.weight > 0]
    if not mine:
        return None
    if target is None:
        return True
    return any(not d.subset or (d.subset in subsets and selects(subsets[d.subset], target)) for d in mine)


def _gateways(mesh: MeshSnapshot, vs: RoutingRule, service: Service, warnings: list[str]) -> list[GatewayInfo]:
    if not any(d.host == service.host for d in _all_destinations(vs)):
        return []
    out = []
    configs = {g.ref: g for g in mesh.scoping.gateways}
    for ref in vs.gateways:
        if ref == MESH_GATEWAY:
            continue
        gw = configs.get(ref)
        if gw is None:
            warnings.append(f"VirtualService {vs.namespace}/{vs.name} binds to Gateway {ref}, which does not exist: "
                            f"nothing exposes {service.host} through it")
            continue
        servers = []
        for s in gw.servers:
            admitted = sorted({a for h in vs.hosts if (a := s.admits(vs.namespace, h)) is not None})
            if admitted:
                servers.append(f"port {s.port} {s.protocol}, hosts {', '.join(admitted)}")
        if not servers:
            warnings.append(f"Gateway {ref} admits none of the hosts of VirtualService {vs.namespace}/{vs.name} "
                            f"({', '.join(vs.hosts)}): the route is not served there")
        out.append(GatewayInfo(ref, f"{vs.namespace}/{vs.name}", tuple(servers)))
    return out


def _client_tls(service: Service, in_force: DestinationPolicy | None, members: list[Instance],
                target_sidecar: bool, for_workload: bool, modes: dict[int, str]) -> list[str]:
    """Per port, what a client proxy sends: the DestinationRule's TLS mode (also kept in `modes`), else auto
    mTLS."""
    out = []
    for port in service.ports:
        tls = in_force.policy_for(port.number).tls if in_force is not None else None
        if in_force is not None and tls is not None:
            modes[port.number] = tls.mode
            out.append(f"port {port.number}: TLS mode {tls.mode}, from DestinationRule {in_force.namespace}/"
                       f"{in_force.name}")
            continue
        if for_workload:
            who = "this workload runs " + ("a sidecar" if target_sidecar else "no sidecar")
        else:
            who = "every instance runs a sidecar" if all(m.sidecar for m in members) else "some instances run none"
        out.append(f"port {port.number}: auto mTLS (no DestinationRule TLS setting): clients with mesh certificates "
                   f"send Istio mTLS to instances with a sidecar, plaintext to the others; {who}")
    return out
