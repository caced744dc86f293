"""A `Description` in plain words: one block per section, two-space indents, no colour.

The text is deterministic (the description is already sorted) so golden files can hold it; the
``-o json|yaml`` forms are `Description.to_dict` instead. Pure: returns the text.
"""

from __future__ import annotations

from pilot.describe.model import (
    Description,
    DestinationRuleInfo,
    RouteInfo,
    ServiceInfo,
    VirtualServiceInfo,
)

I1, I2, I3 = "  ", "    ", "      "


def render(d: Description) -> str:
    lines: list[str] = []
    if d.workload is not None:
        w = d.workload
        lines.append(f"{w.kind}: {w.namespace}/{w.name}")
        if w.address:
            lines.append(f"{I1}Address: {w.address}")
        lines.append(f"{I1}Labels: {', '.join(w.labels) or 'none'}")
        lines.append(f"{I1}Service account: {w.service_account}")
        lines.append(f"{I1}Sidecar: {'yes' if w.sidecar else 'no'}")
    else:
        lines.append(f"Service: {d.namespace}/{d.name}")
    for s in d.services:
        lines += ["", *_service(s, d.workload is not None)]
    if not d.services:
        lines += ["", "Services: none"]
    if d.mtls is not None:
        lines += ["", f"Inbound mTLS: {d.mtls.mode}, set by {d.mtls.source}"]
        lines += [f"{I1}{p}" for p in d.mtls.ports]
    lines += ["", "Policies:" if d.policies else "Policies: none (every request is allowed, no JWT is checked)"]
    for p in d.policies:
        lines.append(f"{I1}{p.kind} {p.namespace}/{p.name} {p.action}: {p.summary}")
        if p.applies_to:
            lines.append(f"{I2}applies to {', '.join(p.applies_to)}")
    if d.sidecar is not None:
        lines += ["", f"Sidecar resource {d.sidecar.namespace}/{d.sidecar.name}:"]
        lines += [f"{I1}{line}" for line in d.sidecar.summary]
    elif d.workload is not None:
        lines += ["", "Sidecar resource: none (the proxy sees every exported service)"]
    if d.warnings:
        lines += ["", "Warnings:"] + [f"{I1}- {w}" for w in d.warnings]
    return "\n".join(lines) + "\n"


def _service(s: ServiceInfo, for_workload: bool) -> list[str]:
    verb = "Backs service" if for_workload else "Service host"
    lines = [f"{verb} {s.host} ({s.kind} {s.namespace}/{s.name})"]
    lines.append(f"{I1}Ports: {', '.join(s.ports) or 'none'}")
    if s.selector is not None:
        lines.append(f"{I1}Selects workloads with: {', '.join(s.selector) or 'any labels'}")
    lines.append(f"{I1}Location {s.location}, resolution {s.resolution}; exported to: {', '.join(s.export_to)}")
    if not for_workload:
        lines.append(f"{I1}Endpoints:" if s.endpoints else f"{I1}Endpoints: none known")
        for e in s.endpoints:
            where = f" at {e.address}" if e.address else ""
            subsets = ", ".join(e.subsets) or "none"
            sidecar = f"sidecar, inbound mTLS {e.inbound_mtls}" if e.sidecar else "no sidecar"
            lines.append(f"{I2}{e.kind} {e.name}{where}: subsets {subsets}; {sidecar}")
    lines.append(f"{I1}Clients send:")
    lines += [f"{I2}{line}" for line in s.client_tls]
    for dr in s.destination_rules:
        lines += _destination_rule(dr)
    if not s.destination_rules:
        lines.append(f"{I1}DestinationRule: none (Istio's default traffic policy)")
    for vs in s.virtual_services:
        lines += _virtual_service(vs, for_workload)
    if not s.virtual_services:
        lines.append(f"{I1}VirtualService: none (requests go to every instance, default retries)")
    for g in s.gateways:
        lines.append(f"{I1}Exposed by Gateway {g.gateway} (VirtualService {g.virtual_service}): "
                     + ("; ".join(g.servers) or "no server admits its hosts"))
    return lines


def _destination_rule(dr: DestinationRuleInfo) -> list[str]:
    force = ", in force for clients in the service's namespace" if dr.in_force else ""
    lines = [f"{I1}DestinationRule {dr.namespace}/{dr.name} for {dr.host}{force}; "
             f"exported to: {', '.join(dr.export_to)}"]
    if dr.selector is not None:
        lines.append(f"{I2}only for client proxies with {', '.join(dr.selector)}")
    lines.append(f"{I2}Traffic policy: {'; '.join(dr.policy) or 'none set'}")
    lines += [f"{I2}{p}" for p in dr.port_policies]
    for s in dr.subsets:
        member = "" if s.has_target is None else ("; this workload is in it" if s.has_target else
                                                  "; this workload is not in it")
        instances = ", ".join(s.instances) or "none"
        lines.append(f"{I2}Subset {s.name} ({', '.join(s.labels)}){member}; instances: {instances}")
        if s.policy:
            lines.append(f"{I3}policy: {'; '.join(s.policy)}")
    return lines


def _virtual_service(vs: VirtualServiceInfo, for_workload: bool) -> list[str]:
    force = {None: "", True: ", in force for sidecars in the service's namespace",
             False: ", NOT in force for sidecars in the service's namespace"}[vs.in_force]
    lines = [f"{I1}VirtualService {vs.namespace}/{vs.name} for {', '.join(vs.hosts)}{force}; gateways: "
             f"{', '.join(vs.gateways)}; exported to: {', '.join(vs.export_to)}"]
    for r in vs.routes:
        lines += _route(r, for_workload)
    return lines


def _route(r: RouteInfo, for_workload: bool) -> list[str]:
    name = f" ({r.name})" if r.name else ""
    reach = ""
    if r.reaches_target is None:
        reach = " [sends nothing to this service]"
    elif for_workload:
        reach = " [reaches this workload]" if r.reaches_target else " [does not reach this workload]"
    lines = [f"{I2}{r.kind}[{r.index}]{name} when {r.match}{reach}"]
    lines += [f"{I3}-> {d}" for d in r.destinations]
    lines += [f"{I3}{d}" for d in r.details]
    return lines
