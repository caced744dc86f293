"""`describe`: an analysis input and a target in, one `Description` out (pure).

The input is what `meshctl analyze` reads (`pilot.analysis.load`: files, pilot's
``/debug/configz``, a cluster), indexed once by `pilot.analysis.Context` into the same
`MeshSnapshot` pilot builds. For a pod or workload the services that send it traffic are those
whose selector picks it (or that list it as an endpoint); for a service, its hosts. Each service
then gets its rules (`pilot.describe.routing`), the workload its security
(`pilot.describe.security`). Cost: one `build_mesh`, then linear in the rules touching the target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from pilot.analysis.context import Context
from pilot.analysis.inputs import AnalysisInput, WorkloadFacts
from pilot.describe import words
from pilot.describe.instances import Instance, backs, find_service, find_workload, instances
from pilot.describe.model import (
    SERVICE,
    Description,
    DestinationRuleInfo,
    EndpointInfo,
    PolicyInfo,
    ServiceInfo,
    WorkloadInfo,
)
from pilot.describe.routing import service_rules
from pilot.describe.security import inbound_mtls, policies, policy_warnings, sidecar
from pilot.model.build_services import endpoint_port
from pilot.model.mesh import Service
from pilot.model.mtls import DISABLE, STRICT, WorkloadMtls, workload_mtls

KUBE_SERVICE = "Service"


def describe(inp: AnalysisInput, kind: str, namespace: str, name: str) -> Description:
    """Describe the ``pod``, ``workload`` or ``service`` `namespace`/`name` (raises `TargetNotFound`)."""
    ctx = Context(inp)
    if kind == SERVICE:
        found = _describe_service(ctx, namespace, name)
    else:
        found = _describe_workload(ctx, find_workload(ctx, kind, namespace, name), kind)
    rejected = tuple(_rejected(inp, found.namespace))
    return dataclasses.replace(found, warnings=found.warnings + rejected) if rejected else found


def _rejected(inp: AnalysisInput, namespace: str) -> list[str]:
    """Objects of the target's namespace (or the root namespace) that were not accepted: pilot serves
    the previous version of each, or nothing, so they may be why a rule "is not applied"."""
    out = []
    for m in inp.problems:
        if m.kind and m.name and m.namespace in (namespace, inp.root_namespace):
            where = f" ({m.origin})" if m.origin else ""
            out.append(f"{m.kind} {m.namespace}/{m.name}{where} is not applied: {m.text}")
    return sorted(set(out))


def _describe_workload(ctx: Context, target: WorkloadFacts, kind: str) -> Description:
    mesh = ctx.mesh
    entry = mesh.workload(target.namespace, target.name) if target.kind == "WorkloadEntry" else None
    sidecar_runs = target.has_sidecar and not target.opted_out
    workload = WorkloadInfo(target.kind, target.namespace, target.name, words.labels(target.labels),
                            target.service_account, entry.address if entry else "", sidecar_runs)
    warnings: list[str] = []
    if not sidecar_runs:
        warnings.append(f"{target.kind} {target.namespace}/{target.name} runs no sidecar: its inbound mTLS and "
                        "policies below are not enforced, and its own calls bypass the mesh rules")
    mtls = inbound_mtls(mesh, target.namespace, target.labels)
    resolved = workload_mtls(mesh.peer_authn, target.namespace, target.labels)
    services = []
    for service in mesh.services.values():
        if backs(ctx, target, service):
            info, modes = _service_info(ctx, service, target, sidecar_runs, warnings)
            services.append(info)
            if sidecar_runs:
                _strict_conflicts(service, modes, resolved, entry.ports if entry else None, "this workload", warnings)
    if not services:
        warnings.append(f"no service selects {target.kind} {target.namespace}/{target.name}: "
                        "it receives no traffic addressed to a service host")
    found = policies(mesh, target.namespace, target.labels)
    warnings += policy_warnings(found)
    return Description(kind, target.namespace, target.name, workload, tuple(services), mtls, tuple(found),
                       sidecar(mesh, target.namespace, target.labels), tuple(dict.fromkeys(warnings)))


def _service_info(ctx: Context, service: Service, target: WorkloadFacts | None, target_sidecar: bool,
                  warnings: list[str]) -> tuple[ServiceInfo, dict[int, str]]:
    """The service's facts, and the TLS mode its DestinationRule sets per port (for the STRICT check)."""
    members = instances(ctx, service)
    rules = service_rules(ctx.mesh, service, members, None if target is None else target.labels, target_sidecar)
    warnings += rules.warnings
    kube = any(k.metadata.namespace == service.namespace and k.metadata.name == service.name
               for k in ctx.kube_services)
    endpoints = () if target is not None else tuple(_endpoint(ctx, m, rules.destination_rules) for m in members)
    info = ServiceInfo(
        service.host, KUBE_SERVICE if kube else "ServiceEntry", service.namespace, service.name,
        tuple(f"{p.number}/{p.protocol} ({p.name})" for p in service.ports),
        None if service.selector is None else words.labels(service.selector),
        service.location, service.resolution, tuple(sorted(ctx.mesh.scoping.service_export(service.host))),
        tuple(rules.client_tls), tuple(rules.destination_rules), tuple(rules.virtual_services),
        tuple(sorted(set(rules.gateways), key=lambda g: (g.gateway, g.virtual_service))), endpoints)
    return info, rules.client_modes


def _endpoint(ctx: Context, member: Instance, rules: list[DestinationRuleInfo]) -> EndpointInfo:
    subsets = sorted({f"{s.name} (DestinationRule {dr.namespace}/{dr.name})" for dr in rules for s in dr.subsets
                      if member.name in s.instances})
    mode = workload_mtls(ctx.mesh.peer_authn, member.namespace, member.labels).mode if member.sidecar else DISABLE
    return EndpointInfo(member.name, member.kind, member.address, tuple(subsets), member.sidecar, mode)


def _describe_service(ctx: Context, namespace: str, name: str) -> Description:
    warnings: list[str] = []
    services = []
    found: dict[tuple[str, str, str], PolicyInfo] = {}
    applies: dict[tuple[str, str, str], list[str]] = {}
    for service in find_service(ctx, namespace, name):
        members = instances(ctx, service)
        info, modes = _service_info(ctx, service, None, True, warnings)
        services.append(info)
        if not info.endpoints and service.selector is not None and ctx.workloads_known:
            warnings.append(f"{service.host} has no instance: no workload in {service.namespace} carries "
                            f"{', '.join(info.selector or ())}")
        for member in members:
            if not member.sidecar:
                continue
            for p in policies(ctx.mesh, member.namespace, member.labels):
                key = (p.kind, p.namespace, p.name)
                found.setdefault(key, p)
                applies.setdefault(key, []).append(member.name)
            mtls = workload_mtls(ctx.mesh.peer_authn, member.namespace, member.labels)
            _strict_conflicts(service, modes, mtls, member.ports, member.name, warnings)
    merged = [PolicyInfo(p.kind, p.namespace, p.name, p.action, p.summary, tuple(sorted(set(applies[k]))))
              for k, p in sorted(found.items())]
    warnings += policy_warnings(merged)
    return Description(SERVICE, namespace, name, None, tuple(services), None, tuple(merged), None,
                       tuple(dict.fromkeys(warnings)))


def _strict_conflicts(service: Service, client_modes: dict[int, str], inbound: WorkloadMtls,
                      workload_ports: Mapping[str, int] | None, who: str, warnings: list[str]) -> None:
    """A STRICT inbound port meets clients a DestinationRule tells to send plaintext or non-mesh TLS.
    Port-level modes are by the workload's port, the one the service port forwards to."""
    for number, client in sorted(client_modes.items()):
        port = service.port(number)
        if port is None or client not in ("DISABLE", "SIMPLE"):
            continue
        target = endpoint_port(port, workload_ports)
        if inbound.at(target) == STRICT:
            warnings.append(f"clients of {service.host} port {number} send {client} TLS (DestinationRule), but "
                            f"{who} requires STRICT mTLS on port {target}: those requests fail")
