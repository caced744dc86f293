"""VirtualService checks: destinations, subsets and gateways that do not exist, hosts claimed twice,
and routes an earlier route shadows."""

from __future__ import annotations

from collections.abc import Iterator

from pilot.analysis import messages as msg
from pilot.analysis.context import MESH, Context
from pilot.analysis.matches import covers
from pilot.api import DestinationRule, VirtualService
from pilot.api.route_common import Destination
from pilot.model.hosts import export_set, exports_overlap, host_matches, namespace_allows, split_scoped_host


def destinations(vs: VirtualService) -> Iterator[tuple[str, Destination]]:
    """(field path, destination) of every route, mirror and L4 route of `vs`."""
    for i, http in enumerate(vs.spec.http):
        for j, dest in enumerate(http.route):
            yield f"spec.http[{i}].route[{j}].destination", dest.destination
        if http.mirror is not None:
            yield f"spec.http[{i}].mirror", http.mirror
        for j, mirror in enumerate(http.mirrors):
            yield f"spec.http[{i}].mirrors[{j}].destination", mirror.destination
    for i, tcp in enumerate(vs.spec.tcp):
        for j, l4 in enumerate(tcp.route):
            yield f"spec.tcp[{i}].route[{j}].destination", l4.destination
    for i, tls in enumerate(vs.spec.tls):
        for j, sni in enumerate(tls.route):
            yield f"spec.tls[{i}].route[{j}].destination", sni.destination


def host_not_found(ctx: Context) -> Iterator[msg.Message]:
    """IST0101: a route's destination host is no ServiceEntry or Service."""
    for vs in ctx.of(VirtualService):
        for path, dest in destinations(vs):
            host = ctx.qualify(dest.host, vs.metadata.namespace)
            if not ctx.service_known(host):
                yield ctx.message(msg.REFERENCED_RESOURCE_NOT_FOUND, vs, f"{path}.host",
                                  f'Referenced host not found: "{host}"',
                                  "create a ServiceEntry or Kubernetes Service for this host, or correct the name")


def subset_not_found(ctx: Context) -> Iterator[msg.Message]:
    """IST0101: a route names a subset no DestinationRule of its host defines."""
    subsets: dict[str, set[str]] = {}  # DestinationRule host -> the subset names its rules define
    for dr in ctx.of(DestinationRule):
        subsets.setdefault(ctx.qualify(dr.spec.host, dr.metadata.namespace), set()).update(
            s.name for s in dr.spec.subsets)
    wildcards = [h for h in subsets if h.startswith("*")]
    for vs in ctx.of(VirtualService):
        for path, dest in destinations(vs):
            if not dest.subset:
                continue
            host = ctx.qualify(dest.host, vs.metadata.namespace)
            if any(dest.subset in subsets[h] for h in [host, *wildcards] if h in subsets and host_matches(h, host)):
                continue
            yield ctx.message(msg.REFERENCED_RESOURCE_NOT_FOUND, vs, f"{path}.subset",
                              f'Referenced host+subset in destinationrule not found: "{host}+{dest.subset}"',
                              f"define subset {dest.subset} in a DestinationRule for {host}, or route to one "
                              "that exists")


def _gateway_refs(vs: VirtualService) -> Iterator[tuple[str, str]]:
    for i, ref in enumerate(vs.spec.gateways):
        yield f"spec.gateways[{i}]", ref
    for i, http in enumerate(vs.spec.http):
        for j, match in enumerate(http.match):
            for k, ref in enumerate(match.gateways):
                yield f"spec.http[{i}].match[{j}].gateways[{k}]", ref


def gateway_not_found(ctx: Context) -> Iterator[msg.Message]:
    """IST0101: a VirtualService binds to a Gateway that does not exist."""
    for vs in ctx.of(VirtualService):
        for path, ref in _gateway_refs(vs):
            key = ctx.gateway_ref(ref, vs.metadata.namespace)
            if key is not None and key not in ctx.gateways:
                yield ctx.message(msg.REFERENCED_RESOURCE_NOT_FOUND, vs, path,
                                  f'Referenced gateway not found: "{key[0]}/{key[1]}"',
                                  "create the Gateway, or name an existing one (`name` in this namespace, "
                                  "`namespace/name` elsewhere, `mesh` for sidecars)")


def on_mesh(vs: VirtualService) -> bool:
    return not vs.spec.gateways or MESH in vs.spec.gateways


def mesh_host_conflicts(ctx: Context) -> Iterator[msg.Message]:
    """IST0109: two VirtualServices bound to sidecars claim one host where both are visible."""
    claims: dict[str, list[VirtualService]] = {}
    for vs in ctx.of(VirtualService):
        if on_mesh(vs) and not vs.spec.is_delegate:
            for host in dict.fromkeys(ctx.qualify(h, vs.metadata.namespace) for h in vs.spec.hosts):
                claims.setdefault(host, []).append(vs)
    for host, rules in sorted(claims.items()):
        for vs in rules:
            mine = export_set(vs.spec.export_to, vs.metadata.namespace)
            others = [o for o in rules if o is not vs and
                      exports_overlap(mine, export_set(o.spec.export_to, o.metadata.namespace))]
            if others:
                names = ",".join(sorted(f"{o.metadata.namespace}/{o.metadata.name}" for o in [vs, *others]))
                index = next(i for i, h in enumerate(vs.spec.hosts) if ctx.qualify(h, vs.metadata.namespace) == host)
                yield ctx.message(msg.CONFLICTING_MESH_GATEWAY_VS_HOSTS, vs, f"spec.hosts[{index}]",
                                  f"The VirtualServices {names} associated with mesh gateway define the same host "
                                  f"{host}, and only the oldest applies",
                                  "merge the conflicting VirtualServices into a single resource")


def shadowed_routes(ctx: Context) -> Iterator[msg.Message]:
    """IST0130 / IST0131: an HTTP route or match that an earlier route always takes first."""
    for vs in ctx.of(VirtualService):
        routes = vs.spec.http
        for i, route in enumerate(routes):
            catch_all = next((k for k in range(i) if not routes[k].match), None)
            if catch_all is not None:
                yield ctx.message(msg.VS_UNREACHABLE_RULE, vs, f"spec.http[{i}]",
                                  f"VirtualService rule #{i} not used (rule #{catch_all} has no match and takes "
                                  "every request first)",
                                  f"move rule #{catch_all} last, or give it a match")
                continue
            covered = [(j, next((k, m) for k in range(i) for m, earlier in enumerate(routes[k].match)
                                if covers(earlier, match))) for j, match in enumerate(route.match)
                       if any(covers(earlier, match) for k in range(i) for earlier in routes[k].match)]
            if route.match and len(covered) == len(route.match):
                yield ctx.message(msg.VS_UNREACHABLE_RULE, vs, f"spec.http[{i}]",
                                  f"VirtualService rule #{i} not used (all its matches are used by earlier rules)",
                                  "remove the rule, or move it above the rules that shadow it")
                continue
            for j, (k, m) in covered:
                yield ctx.message(msg.VS_INEFFECTIVE_MATCH, vs, f"spec.http[{i}].match[{j}]",
                                  f"VirtualService rule #{i} match #{j} is not used (duplicate/overlapping match "
                                  f"in rule #{k} match #{m})",
                                  "remove the match, or move this rule above the one that covers it")


def host_not_in_gateway(ctx: Context) -> Iterator[msg.Message]:
    """IST0132: a VirtualService host that no server of a Gateway it binds to accepts."""
    for vs in ctx.of(VirtualService):
        for g, ref in enumerate(vs.spec.gateways):
            key = ctx.gateway_ref(ref, vs.metadata.namespace)
            gateway = ctx.gateways.get(key) if key is not None else None
            if key is None or gateway is None:
                continue
            for h, host in enumerate(vs.spec.hosts):
                if not any(_admits(server_host, vs.metadata.namespace, gateway.metadata.namespace, host)
                           for server in gateway.spec.servers for server_host in server.hosts):
                    yield ctx.message(msg.VS_HOST_NOT_FOUND_IN_GATEWAY, vs, f"spec.hosts[{h}]",
                                      f"one or more host [{host}] defined in VirtualService "
                                      f"{vs.metadata.namespace}/{vs.metadata.name} not found in Gateway "
                                      f"{key[0]}/{key[1]} (spec.gateways[{g}])",
                                      "add the host to a server of the Gateway, or remove it from the "
                                      "VirtualService")


def _admits(server_host: str, vs_namespace: str, gateway_namespace: str, host: str) -> bool:
    scope, name = split_scoped_host(server_host, gateway_namespace)
    return namespace_allows(scope, vs_namespace) and (host_matches(name, host) or host_matches(host, name))
